"""Compile time of a 48-layer narrow Llama 4 against its 4-layer twin (scanned superblocks).

    python benchmarks/compile_time.py

Also reports the 48-layer model unscanned (`scan_layers=False`) for contrast. Prints JSON.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

import llama4_jax as l4
from common import emit, machine

NARROW = l4.get_config("maverick", vocab_size=1024, hidden_size=64, intermediate_size=64,
                       intermediate_size_mlp=128, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, num_local_experts=4, bos_token_id=1, eos_token_id=(2,),
                       pad_token_id=0)


def compile_seconds(cfg) -> float:
  graphdef, state = nnx.split(l4.abstract_model(cfg))
  ids = jax.ShapeDtypeStruct((2, 128), jnp.int32)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x))
  t0 = time.perf_counter()
  fn.lower(state, ids).compile()
  return time.perf_counter() - t0


def main():
  results = {}
  for name, cfg in (("layers4", NARROW.replace(num_hidden_layers=4)),
                    ("layers48", NARROW.replace(num_hidden_layers=48)),
                    ("layers48_unscanned", NARROW.replace(num_hidden_layers=48, scan_layers=False))):
    results[name] = round(compile_seconds(cfg), 2)
  emit({"benchmark": "compile_time_seconds", **results,
        "ratio_48_vs_4": round(results["layers48"] / results["layers4"], 2),
        "ratio_48_unscanned_vs_4": round(results["layers48_unscanned"] / results["layers4"], 2),
        "machine": machine()})


if __name__ == "__main__":
  main()
