"""Llama 4 Scout (17B active, 16 experts, 109B total) pretraining on a TPU v5p-256 slice (128 chips).

    # on every worker of the slice (launch/ does this for you):
    python -m llama4_jax.train --config=configs/scout_v5p256.py --workdir=gs://BUCKET/scout \
        --config.data.source=array_record --config.data.path='/data/corpus/*.array_record' \
        --config.data.tokenizer=/path/to/Llama-4-Scout/tokenizer.model

Mesh: expert=16 puts one expert's weights on each of 16 chips (the routed experts are 93% of the
parameters) and tokens travel to them by ragged all-to-all; fsdp=8 x expert=16 shards everything else
and the optimizer state over all 128 chips; batch rows are split over data*fsdp*expert = 128 chips, so
each chip runs 1 sequence of 8192 tokens per microbatch (2 microbatches). Parameters and Adam moments in
fp32 (12 bytes/param = 1.3 TB over 128 chips: 9.42 GiB per chip), compute in bf16, full
rematerialisation of each 4-layer superblock, dropless MoE, and the blockwise custom-VJP attention
(attention_impl="ring" on one device per sequence: the splash kernel on TPU).

The TPU compiler, on any host (`python -m llama4_jax.plan --config=configs/scout_v5p256.py
--tpu=v5p-256 --compile`, ~8 minutes on 2 cores): peak 48.4 GiB per chip of 95 (arguments 9.42,
temporaries 39.0); with --config.microbatches=1 (2 sequences per chip at once) 66.6 GiB; with
--config.model.moe_capacity_factor=2.0 32.6 GiB. The planner's TPU-fitted estimate is 50.3.
Expected: loss ~2.5 after a few thousand steps on web text; not yet measured on hardware.
"""

from llama4_jax.train.config import default_run_config, model_fields


def get_config():
  c = default_run_config()
  c.steps = 100_000
  c.batch_size = 256
  c.seq_len = 8192
  c.microbatches = 2
  c.learning_rate = 3e-4
  c.warmup_steps = 2000
  c.weight_decay = 0.1
  c.log_every = 10
  c.eval_every = 1000
  c.eval_batches = 20
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.mesh.update(data=1, fsdp=8, tensor=1, expert=16, context=1)
  c.model = model_fields("scout", dtype="bfloat16", param_dtype="float32", remat_policy="full",
                         attention_impl="ring")
  c.data.source = "array_record"
  return c
