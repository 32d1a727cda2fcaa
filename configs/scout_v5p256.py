"""Llama 4 Scout (17B active, 16 experts, 109B total) pretraining on a TPU v5p-256 slice (128 chips).

    # on every worker of the slice (launch/ does this for you):
    python -m llama4_jax.train --config=configs/scout_v5p256.py --workdir=gs://BUCKET/scout \
        --config.data.source=array_record --config.data.path='/data/corpus/*.array_record' \
        --config.data.tokenizer=/path/to/Llama-4-Scout/tokenizer.model

Mesh: expert=16 puts one expert's weights on each of 16 chips (the routed experts are 93% of the
parameters); fsdp=8 shards everything else and the optimizer state; batch rows are split over
data*fsdp*expert = 128 chips, so each chip runs 2 sequences of 8192 tokens per microbatch. Parameters and
Adam moments in fp32 (12 bytes/param = 1.3 TB over 128 chips of 95 GB HBM: about 10 GB per chip),
compute in bf16, full rematerialisation of each 4-layer superblock, and the blockwise custom-VJP attention
(attention_impl="ring", on one device per sequence here) because the dense path keeps every query block's
probabilities: `python -m llama4_jax.plan --config=configs/scout_v5p256.py --tpu=v5p-256` estimates 82 of
85.5 usable GiB per chip with 2 microbatches (274 GiB with dense attention and 1 microbatch).
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
