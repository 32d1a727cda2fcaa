"""Serving Llama 4 Scout with an int8 base (weight-only, per-channel scales) on a TPU v6e-8 (8 chips of 32 GB
HBM): 8 slots of 131,072 tokens each, KV cache included.

    python -m llama4_jax.serve --checkpoint=/path/to/Llama-4-Scout-17B-16E-Instruct --mesh=tensor=8 \
        --slots=8 --max-context=131072 --dtype=bfloat16 --quantize=int8

Mesh: tensor=8 (5 query heads and 1 KV head per chip): int8 weights are 12.6 GiB per chip (bf16 would be
25 GiB, leaving no room for the cache on these chips), the KV cache 7 GiB. The bf16 checkpoint is read
into its shards and quantized weight by weight as it loads. Compiled by the TPU compiler (`python -m
llama4_jax.plan --config=configs/serve_scout_int8_v6e8.py --tpu=v6e-8 --serve --compile`; figures in the
README's TPU table). Not run on hardware.
"""

from llama4_jax.train.config import default_run_config, model_fields


def get_config():
  c = default_run_config()
  c.seq_len = 131_072  # tokens per slot: the KV cache length (serve --max-context)
  c.mesh.update(data=1, fsdp=1, tensor=8, expert=1, context=1)
  c.model = model_fields("scout", dtype="bfloat16", param_dtype="bfloat16", base_quant="int8")
  return c
