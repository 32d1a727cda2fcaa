"""Serving Llama 4 Scout (109B parameters) in bf16 with a 1,048,576-token context on one TPU v5p-16 slice (8
chips of 95 GiB HBM): the prompt is prefilled context-parallel (ring attention over 8 devices, zigzag),
and the global (NoPE) layers' KV cache stays split over the devices along the sequence for decoding.

    python -m llama4_jax.serve --checkpoint=/path/to/Llama-4-Scout-17B-16E-Instruct --mesh=context=8 \
        --slots=1 --max-context=1048576 --dtype=bfloat16

Mesh: context=8 (each chip holds 131,072 of the prompt's tokens during prefill; the weights are split 8
ways as under fsdp, since `embed` maps to context too). Compiled by the TPU compiler
(`python -m llama4_jax.plan --config=configs/serve_scout_1m_v5p16.py --tpu=v5p-16 --serve --compile
--serve_batch=1 --prompt_length=1048576`; the README's TPU table has the figures). Not run on hardware.
"""

from llama4_jax.train.config import default_run_config, model_fields


def get_config():
  c = default_run_config()
  c.seq_len = 1_048_576  # tokens per slot: the KV cache length (serve --max-context)
  c.mesh.update(data=1, fsdp=1, tensor=1, expert=1, context=8)
  c.model = model_fields("scout", dtype="bfloat16", param_dtype="bfloat16")
  return c
