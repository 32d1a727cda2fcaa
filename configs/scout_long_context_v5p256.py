"""Llama 4 Scout long-context training at 64K tokens per row on a TPU v5p-256 slice (128 chips, 32 hosts).

    # on every worker of the slice (launch/ does this for you):
    python -m llama4_jax.train --config=configs/scout_long_context_v5p256.py --workdir=gs://BUCKET/scout-64k \
        --config.init_from=gs://BUCKET/scout-orbax --config.data.source=array_record \
        --config.data.path='/data/long/*.array_record' \
        --config.data.tokenizer=/path/to/Llama-4-Scout/tokenizer.model

Mesh: context=4 splits each 65,536-token row over the 4 chips of one host (16,384 tokens per chip; zigzag:
two runs of 8,192 = C). The NoPE layers (1 in 4) run the 4-chip ring; K/V travel as the 8 kv heads only
(5x less than all 40 heads). Chunked layers: packed rows (the default data path) reach C - 1 = one run
back, so K/V travel one step each way (3 of the 4 shards) and the kernel skips blocks outside each window;
unpacked rows whose positions equal their indices need no communication, as every run holds exactly one
chunk. expert=8 (2 of the 16 experts per chip) and fsdp=4 over
the rest: without expert parallelism every chip gathers all experts of a 4-layer superblock (36 GB in
fp32). Parameters and Adam moments in bf16, bf16 compute, full remat; batch rows over fsdp x expert, one
row per host per step. The context axis may also span hosts (hosts that split a row load the same rows;
tested with two CPU processes), but within a host the ring's hops stay on the chips' fast links.
loss_chunks=8: the
loss builds the fp32 logits over the 202K vocabulary for 2,048 of each chip's 16,384 tokens at a time
(all at once they take about 13 GB per chip). The TPU compiler (`python -m llama4_jax.plan
--config=configs/scout_long_context_v5p256.py --tpu=v5p-256 --compile`): peak 38.3 GiB per chip of 95,
with the splash kernel inside the ring compiled through Mosaic; the planner's TPU-fitted estimate is 37.8.
Not yet run on hardware.
"""

from llama4_jax.train.config import default_run_config, model_fields


def get_config():
  c = default_run_config()
  c.steps = 2_000
  c.batch_size = 32
  c.seq_len = 65_536
  c.loss_chunks = 8
  c.learning_rate = 1e-5
  c.warmup_steps = 100
  c.log_every = 1
  c.eval_every = 200
  c.eval_batches = 4
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=8, context=4)
  c.model = model_fields("scout", dtype="bfloat16", param_dtype="bfloat16", remat_policy="full",
                         attention_impl="ring", ring_layout="zigzag")
  c.data.source = "array_record"
  return c
