"""The serving decode step of a deep model against its KV cache length: does a step cost what it reads?

    python benchmarks/decode_cache.py [--layers 16] [--lengths 256 4096] [--model moe_100m] [--dtype bfloat16]

A 16-layer tiny Llama 4 (four scanned superblocks of four layers), 8 decode slots; the engine's jitted
step (`llama4_jax.serving.steps.decode_step`) is timed at 1 and 8 busy rows for each cache length
(best of 7 runs of 50 steps), with every row at position length / 2 and at position `--fill`, and its
compiled HLO is searched for copies of whole cache arrays (there should be none: the stacked cache rides
in the layer scan's carry and is updated in place). `--model moe_100m --dtype bfloat16` times the ~100M
MoE's step instead (one superblock plus two layers). Prints JSON.
"""

from __future__ import annotations

import argparse
import re
import sys
import os
import time

import numpy as np


def step_ms(step, args, rows: int) -> float:
  tok, cache = args[2], args[4]
  for _ in range(3):
    tok, _, cache = step(*args[:2], tok, args[3], cache, *args[5:], rows=rows)
  tok.block_until_ready()
  best = float("inf")
  for _ in range(7):
    t0 = time.perf_counter()
    for _ in range(50):
      tok, _, cache = step(*args[:2], tok, args[3], cache, *args[5:], rows=rows)
    tok.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / 50)
  args[2], args[4] = tok, cache
  return round(best * 1e3, 3)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=16)
  p.add_argument("--slots", type=int, default=8)
  p.add_argument("--lengths", type=int, nargs="+", default=[256, 4096])
  p.add_argument("--model", choices=["tiny", "moe_100m"], default="tiny",
                 help="moe_100m: the ~100M-parameter MoE of benchmarks/common.py (--layers is ignored)")
  p.add_argument("--dtype", default="float32", help="parameter and compute dtype, e.g. bfloat16")
  p.add_argument("--fill", type=int, default=100,
                 help="also time the step with every row at this position (decode attention reads only the "
                      "filled part of the cache, in power-of-two widths from 512)")
  a = p.parse_args()
  import jax
  import llama4_jax as l4
  from common import MOE_100M, emit, machine
  from llama4_jax.inference.static import split_model
  from llama4_jax.serving.steps import decode_step, empty_state

  cfg = MOE_100M if a.model == "moe_100m" else l4.get_config("tiny", num_hidden_layers=a.layers)
  model = l4.create_model(cfg.replace(param_dtype=a.dtype, dtype=a.dtype))
  static, leaves = split_model(model)
  s = a.slots
  results = []
  for length in a.lengths:
    cache, tok = empty_state(static, leaves, s, length)
    shapes = {str(list(x.shape)).replace(" ", "") for x in jax.tree.leaves(cache)}
    args = [static, leaves, tok, np.full(s, length // 2, np.int32), cache, np.zeros(s, np.uint32),
            np.zeros(s, np.float32), np.zeros(s, np.int32), np.ones(s, np.float32)]
    row = {"cache_length": length, "cache_MB": round(sum(x.nbytes for x in jax.tree.leaves(cache)) / 2**20, 1)}
    for rows in (1, s):
      hlo = decode_step.lower(*args, rows=rows).compile().as_text()
      copies = [c for c in re.findall(r"= \w+(\[[\d,]+\])\S* copy\(", hlo) if c in shapes]
      row[f"rows_{rows}"] = {"step_ms": step_ms(decode_step, args, rows), "cache_copies_in_hlo": len(copies)}
      if a.fill < length // 2:  # the same step with every row at position `fill`: the cache mostly empty
        half, args[3] = args[3], np.full(s, a.fill, np.int32)
        row[f"rows_{rows}"][f"step_ms_at_position_{a.fill}"] = step_ms(decode_step, args, rows)
        args[3] = half
    results.append(row)
    print(row, file=sys.stderr, flush=True)
  emit({"benchmark": "decode_cache", "model": a.model, "dtype": a.dtype,
        "layers": model.config.num_hidden_layers, "superblocks": model.num_blocks, "slots": s,
        "params": model.config.num_params(), "results": results, "machine": machine()})


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main()
