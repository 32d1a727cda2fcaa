"""The TPU configs compiled by the real TPU compiler on this host: one JSON row per config.

    python benchmarks/tpu_compile.py                      # every row below (tens of minutes on 2 cores)
    python benchmarks/tpu_compile.py --only scout_v5p256  # one row (a,b for several; scout* a prefix)

Each row: the slice, the compiler's per-chip peak against HBM, the planner's estimate, flops per chip
counted from the HLO (loop trip counts included), the step time at peak bf16 that implies (a lower bound:
no communication or memory time), the MFU and tokens/s/chip at that time, and the collectives' bytes per
step. These are compiler figures, not hardware measurements. Needs libtpu (pip install -e '.[tpu]').
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# name, config file, TPU type, overrides, serving (slots, cache length) or None for training
ROWS = [
    ("scout_v5p256", "configs/scout_v5p256.py", "v5p-256", {}, None),
    ("scout_v5p256_capacity2", "configs/scout_v5p256.py", "v5p-256", {"model.moe_capacity_factor": 2.0}, None),
    ("scout_v5p256_2seq", "configs/scout_v5p256.py", "v5p-256", {"microbatches": 1}, None),
    ("scout_long_context_v5p256", "configs/scout_long_context_v5p256.py", "v5p-256", {}, None),
    ("maverick_v6e256", "configs/maverick_v6e256.py", "v6e-256", {}, None),
    ("lora_scout_v5p8", "configs/lora_scout_v5p8.py", "v5p-8", {}, None),
    ("qlora_scout_v5e8", "configs/qlora_scout_v5e8.py", "v5e-8", {}, None),
    # serving: the engine's prefill (256 tokens), a long prompt's next piece and a decode step of 8 slots
    ("serve_scout_v5p8", "configs/serve_scout_v5p8.py", "v5p-8", {}, (8, 131072)),
    ("serve_scout_int8_v6e8", "configs/serve_scout_int8_v6e8.py", "v6e-8", {}, (8, 131072)),
    ("serve_maverick_int8_v5p16", "configs/serve_maverick_int8_v5p16.py", "v5p-16", {}, (8, 131072)),
    # the notebooks' models on a Colab TPU (one v5e chip)
    ("tiny_cpu_v5e1", "configs/tiny_cpu.py", "v5e-1", {}, None),
    ("lora_tiny_cpu_v5e1", "configs/lora_tiny_cpu.py", "v5e-1", {}, None),
    ("qlora_tiny_cpu_v5e1", "configs/lora_tiny_cpu.py", "v5e-1", {"model.base_quant": "nf4"}, None),
    ("tiny_cpu_v6e1", "configs/tiny_cpu.py", "v6e-1", {}, None),
]


def load_config(path: str, overrides: dict):
  from llama4_jax.cli import load_config as load
  from llama4_jax.planning import changed
  return changed(load(os.path.join(ROOT, path)), overrides)


def row(name, path, tpu_name, overrides, serve) -> dict:
  from llama4_jax import planning, tpu_compile
  from llama4_jax.sharding import make_mesh, resolve_mesh_sizes
  c = load_config(path, overrides)
  tpu = planning.parse_tpu(tpu_name)
  mesh = make_mesh(**resolve_mesh_sizes(dict(c.mesh), tpu.chips), devices=tpu_compile.tpu_devices(tpu))
  out = {"name": name, "config": path, "overrides": overrides, "tpu": tpu.name, "chips": tpu.chips,
         "hbm_bytes": tpu.hbm_bytes}
  start = time.perf_counter()
  try:
    if serve:
      slots, length = serve
      plan = planning.plan_serving(c, tpu.chips, slots, length, tpu.hbm_bytes)
      reports = [tpu_compile.report(f"{k} step", low, tpu)
                 for k, low in tpu_compile.lower_serve_steps(c, mesh, slots, length).items()]
    else:
      plan = planning.plan_training(c, tpu.chips, tpu.hbm_bytes, platform="tpu")
      reports = [tpu_compile.report("train step", tpu_compile.lower_train_step(c, mesh), tpu)]
  except Exception as e:  # a config that does not compile is a row too
    out.update(error=f"{type(e).__name__}: {str(e)[:400]}", seconds=round(time.perf_counter() - start))
    return out
  out["estimate_bytes"] = plan.total
  for r in reports:
    fig = {k: v for k, v in r.as_json().items() if k != "largest_buffers"}
    fig["peak_share_of_hbm"] = round(r.memory["peak"] / tpu.hbm_bytes, 3)
    fig["largest_buffers"] = [{k: b[k] for k in ("bytes", "opcode", "shape", "count")} | {
        "op_name": b["op_name"][-120:]} for b in r.largest[:4]]
    if not serve:
      flops = tpu_compile.train_model_flops(c)
      fig.update(model_flops=flops, mfu_at_compute_bound=tpu_compile.mfu(flops, r.compute_seconds, tpu),
                 tokens_per_sec_per_chip=c.batch_size * c.seq_len / r.compute_seconds / tpu.chips,
                 estimate_over_compiler=round(plan.total / r.memory["peak"], 3))
    out[r.name.split()[0]] = fig
  out["seconds"] = round(time.perf_counter() - start)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="comma-separated row names to run (NAME* for a prefix); "
                      "default: every row")
  args = parser.parse_args()
  wanted = [w for w in args.only.split(",") if w]
  unknown = [w for w in wanted if not any(_matches(spec[0], w) for spec in ROWS)]
  if unknown:
    raise SystemExit(f"--only: no row named {', '.join(unknown)}; rows: {', '.join(s[0] for s in ROWS)}")
  for spec in ROWS:
    if not wanted or any(_matches(spec[0], w) for w in wanted):
      print(json.dumps(row(*spec)), flush=True)


def _matches(name: str, pattern: str) -> bool:
  return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


if __name__ == "__main__":
  main()
