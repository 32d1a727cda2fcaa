"""Llama 4 Maverick (17B active, 128 experts, 401B total) pretraining on a TPU v6e-256 slice.

    python -m llama4_jax.train --config=configs/maverick_v6e256.py --workdir=gs://BUCKET/maverick \
        --config.data.source=array_record --config.data.path='/data/corpus/*.array_record' \
        --config.data.tokenizer=/path/to/Llama-4-Maverick/tokenizer.model

Mesh: v6e chips have 32 GB of HBM, so the 401B parameters must be spread over all 256 chips: expert=64
(2 of the 128 experts per chip, in the 24 MoE layers), fsdp=4 x expert=64 for everything else, tensor=1. Parameters
and Adam moments in bf16, bf16 compute, full remat, batch rows split over data*fsdp*expert = 256 chips: one
4096-token sequence per chip per step. attention_impl="ring" on one device per sequence: the splash
kernel on TPU, with no [4096, 4096] probabilities in memory.

Expert capacity factor 1.25 (GShard's training setting): each device's experts take at most 1.25x their
balanced share of the routed tokens (5,120 rows) and drop the rest, which then pass through the shared
expert and the residual only; the load-balancing loss keeps drops rare. Dropless
(--config.model.moe_capacity_factor=0) does not fit: its receive buffer must hold 64x each chip's tokens
(the TPU compiler asks for 45.0G of temporaries against 31.25G). `python -m llama4_jax.plan
--config=configs/maverick_v6e256.py --tpu=v6e-256 --compile` gives the compiled figures (README, TPU
table). Not run on hardware.
"""

from llama4_jax.train.config import default_run_config, model_fields


def get_config():
  c = default_run_config()
  c.steps = 100_000
  c.batch_size = 256
  c.seq_len = 4096
  c.microbatches = 1
  c.learning_rate = 2e-4
  c.warmup_steps = 2000
  c.log_every = 10
  c.eval_every = 1000
  c.eval_batches = 20
  c.checkpoint_every = 500
  c.mesh.update(data=1, fsdp=4, tensor=1, expert=64, context=1)
  c.model = model_fields("maverick", dtype="bfloat16", param_dtype="bfloat16", remat_policy="full",
                         attention_impl="ring", moe_capacity_factor=1.25)
  c.data.source = "array_record"
  return c
