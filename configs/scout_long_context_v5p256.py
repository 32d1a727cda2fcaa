"""Llama 4 Scout long-context training at 256K tokens per row on a TPU v5p-256 slice (128 chips).

    # on every worker of the slice (launch/ does this for you):
    python -m llama4_jax.train --config=configs/scout_long_context_v5p256.py --workdir=gs://BUCKET/scout-256k \
        --config.init_from=gs://BUCKET/scout --config.data.source=array_record \
        --config.data.path='/data/long/*.array_record' \
        --config.data.tokenizer=/path/to/Llama-4-Scout/tokenizer.model

Mesh: context=16 splits each 262,144-token row into 16 shards of 16,384 tokens (zigzag: two runs of
8,192 = C per chip). The NoPE layers (1 in 4) run the full 16-chip ring; K/V travel as the 8 kv heads
only (5x less than all 40 heads). The chunked layers: with packed rows (the default data path) they use
the ring with the kernel skipping blocks outside each window; unpacked rows whose positions equal their
indices need no communication at all, since every run holds exactly one chunk. fsdp=8: parameters and Adam
moments are sharded over fsdp x context = 128 chips (12 bytes x 108B / 128 = about 10 GB per chip);
batch rows over data*fsdp*expert = 8, so one row per fsdp group per step. bf16 compute, full remat.
Not yet run on hardware; the memory planner and this config's validation are the checks so far.
"""

from llama4_jax.train.config import default_run_config, model_fields


def get_config():
  c = default_run_config()
  c.steps = 2_000
  c.batch_size = 8
  c.seq_len = 262_144
  c.learning_rate = 1e-5
  c.warmup_steps = 100
  c.log_every = 1
  c.eval_every = 200
  c.eval_batches = 4
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.mesh.update(data=1, fsdp=8, tensor=1, expert=1, context=16)
  c.model = model_fields("scout", dtype="bfloat16", param_dtype="float32", remat_policy="full",
                         attention_impl="ring", ring_layout="zigzag")
  c.data.source = "array_record"
  return c
