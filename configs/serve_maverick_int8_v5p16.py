"""Serving Llama 4 Maverick (401B parameters, 128 experts) with an int8 base on a TPU v5p-16 (8 chips of 95
GiB HBM): 8 slots of 131,072 tokens each, KV cache included.

    python -m llama4_jax.serve --checkpoint=/path/to/Llama-4-Maverick-17B-128E-Instruct --mesh=tensor=8 \
        --slots=8 --max-context=131072 --dtype=bfloat16 --quantize=int8

NOT SERVABLE YET: a v5p-16 is two hosts and the server runs in one process (no host holds Maverick even
in int8: 373 GiB against a v5p-8's 383). What this config shows is that the programs fit. Mesh: tensor=8: int8
weights are 47 GiB per chip, the KV cache 7 GiB. A v6e-16 (16 x 32 GB) holds the int8 weights (23 GiB per
chip) but not this cache beside them. Compiled by the TPU compiler (`python -m llama4_jax.plan
--config=configs/serve_maverick_int8_v5p16.py --tpu=v5p-16 --serve --compile`; figures in the README's
TPU table). Not run on hardware.
"""

from llama4_jax.train.config import default_run_config, model_fields


def get_config():
  c = default_run_config()
  c.seq_len = 131_072  # tokens per slot: the KV cache length (serve --max-context)
  c.mesh.update(data=1, fsdp=1, tensor=8, expert=1, context=1)
  c.model = model_fields("maverick", dtype="bfloat16", param_dtype="bfloat16", base_quant="int8")
  return c
