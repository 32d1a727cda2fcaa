"""Helpers shared by the benchmark scripts: the ~100M-parameter MoE config and timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import llama4_jax as l4

# ~101M parameters: 6 MoE layers of 8 experts (top-1) plus a shared expert, vocab 32000.
MOE_100M = l4.get_config(
    "scout", vocab_size=32000, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, intermediate_size=768, intermediate_size_mlp=2048,
    num_local_experts=8, bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    max_position_embeddings=8192)


def timeit(fn, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall seconds of fn() over `repeats` runs after `warmup` runs."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def machine() -> dict:
  import jax
  return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
          "jax_backend": jax.default_backend(), "jax": jax.__version__}


def emit(result: dict) -> None:
  print(json.dumps(result, indent=2))
