"""Serving Llama 4 Scout (109B parameters) in bf16 on one TPU v5p-8 host (4 chips of 95 GiB HBM): 8 slots of
131,072 tokens each (prompt + completion), KV cache included.

    python -m llama4_jax.serve --checkpoint=/path/to/Llama-4-Scout-17B-16E-Instruct --mesh=tensor=4 \
        --slots=8 --max-context=131072 --dtype=bfloat16

Mesh: tensor=4 (10 of the 40 query heads, 2 of the 8 KV heads, a quarter of every FFN's width and of the
vocabulary per chip): the weights are 50 GiB per chip, the cache 14 GiB (the 12 global layers hold all
131,072 positions, the 36 chunked ones a ring of 8,192). Compiled by the TPU compiler
(`python -m llama4_jax.plan --config=configs/serve_scout_v5p8.py --tpu=v5p-8 --serve --compile`; the
README's TPU table has the figures): the engine's prefill (256 tokens), a long prompt's next piece and a
decode step of all 8 slots each fit. Not run on hardware.
"""

from llama4_jax.train.config import default_run_config, model_fields


def get_config():
  c = default_run_config()
  c.seq_len = 131_072  # tokens per slot: the KV cache length (serve --max-context)
  c.mesh.update(data=1, fsdp=1, tensor=4, expert=1, context=1)
  c.model = model_fields("scout", dtype="bfloat16", param_dtype="bfloat16")
  return c
