"""Llama 4 Maverick (17B active, 128 experts, 401B total) pretraining on a TPU v6e-256 slice.

    python -m llama4_jax.train --config=configs/maverick_v6e256.py --workdir=gs://BUCKET/maverick \
        --config.data.source=array_record --config.data.path='/data/corpus/*.array_record' \
        --config.data.tokenizer=/path/to/Llama-4-Maverick/tokenizer.model

Mesh: v6e chips have 32 GB of HBM, so the 401B parameters must be spread over all 256 chips: expert=64
(2 of the 128 experts per chip, in the 24 MoE layers), fsdp=4 x expert=64 for everything else, tensor=1. Parameters
and Adam moments in bf16, bf16 compute, full remat, batch rows split over data*fsdp*expert = 256 chips: one
4096-token sequence per chip per step.

DOES NOT FIT YET. The TPU compiler (`python -m llama4_jax.plan --config=configs/maverick_v6e256.py
--tpu=v6e-256 --compile`) asks for 45.0G of temporaries per chip against 31.25G (190.3G before tokens
were routed per device and the non-expert weights sharded over the expert axis too). The dropless
receive buffer of expert=64 holds 64x each chip's tokens; --config.model.moe_capacity_factor=2.0 bounds it,
but that compile outgrew a 24 GB host and its figure is not known yet. Not run on hardware.
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
  c.model = model_fields("maverick", dtype="bfloat16", param_dtype="bfloat16", remat_policy="full")
  c.data.source = "array_record"
  return c
