"""Fits the memory planner's activation coefficients to XLA and reports the planner's error.

For a set of tiny training configs on 8 simulated CPU devices, compiles the train step
(`compiled_train_step_memory`, XLA's memory_analysis) and computes the planner's features; fits the
non-negative coefficients of `llama4_jax.planning.COEFFICIENTS` by least squares on the relative error of
the activation bytes, and prints JSON: the fitted coefficients and, per config, XLA's peak, the plan's
total with the current coefficients and their ratio.

  python benchmarks/plan_calibration.py [--fit-only NAME ...]
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

BASE = dict(data=1, fsdp=1, tensor=1, expert=1, context=1)
WIDE = {"model.hidden_size": 256, "model.intermediate_size": 512, "model.intermediate_size_mlp": 512,
        "model.vocab_size": 2048}
DEEP = dict(WIDE, **{"model.num_hidden_layers": 8})


def calibration_configs():
  """name -> run config: the configs the coefficients are fitted to (tests/test_plan.py checks others)."""
  from train_utils import micro_config
  return {
      "micro s32 fsdp8": micro_config("x", mesh=dict(BASE, fsdp=8)),
      "micro s256": micro_config("x", seq_len=256, mesh=BASE),
      "wide s256": micro_config("x", seq_len=256, mesh=BASE, **WIDE),
      "wide b16 s256 fsdp2 tensor2 expert2": micro_config(
          "x", seq_len=256, batch_size=16, mesh=dict(BASE, fsdp=2, tensor=2, expert=2), **WIDE),
      "deep b4 s512 remat full fsdp4": micro_config(
          "x", seq_len=512, batch_size=4, mesh=dict(BASE, fsdp=4), **DEEP, **{"model.remat_policy": "full"}),
      "deep b4 s512 fsdp4": micro_config("x", seq_len=512, batch_size=4, mesh=dict(BASE, fsdp=4), **DEEP),
      "wide b1 s1024 context8": micro_config("x", seq_len=1024, batch_size=1, mesh=dict(BASE, context=8),
                                             **WIDE),
      "wide bf16 s256 fsdp2": micro_config("x", seq_len=256, mesh=dict(BASE, fsdp=2), **WIDE,
                                           **{"model.dtype": "bfloat16", "model.param_dtype": "bfloat16"}),
  }


def main():
  import jax
  import numpy as np
  from scipy.optimize import nnls

  import llama4_jax as l4
  from llama4_jax import planning
  from llama4_jax.sharding import resolve_mesh_sizes
  from llama4_jax.train.compiled_memory import compiled_train_step_memory
  from llama4_jax.train.config import model_config

  names = list(planning.COEFFICIENTS)
  rows, targets, report = [], [], []
  for name, c in calibration_configs().items():
    n = int(np.prod(list(c.mesh.values())))
    mesh = l4.make_mesh(**dict(c.mesh), devices=jax.devices()[:n])
    xla = compiled_train_step_memory(c, mesh)
    plan = planning.plan_training(c, n)
    exact = plan.total - plan.parts["activations"]
    feats = planning.activation_features(c, model_config(c), resolve_mesh_sizes(dict(c.mesh), n))
    rows.append([feats[k] for k in names])
    targets.append(xla["peak"] - exact)
    report.append({"config": name, "xla_peak_mib": round(xla["peak"] / 2**20, 2),
                   "plan_mib": round(plan.total / 2**20, 2), "ratio": round(plan.total / xla["peak"], 3),
                   "exact_mib": exact / 2**20})
  a, y = np.asarray(rows), np.asarray(targets, float)
  w = 1.0 / y  # relative error
  coef, _ = nnls(a * w[:, None], y * w)
  for r, row in zip(report, a):  # what the fitted coefficients would give
    fitted = r.pop("exact_mib") + float(row @ coef) / 2**20
    r["ratio_fitted"] = round(fitted / r["xla_peak_mib"], 3)
  print(json.dumps({"benchmark": "plan_calibration", "fitted": {k: round(float(v), 2) for k, v in
                                                                  zip(names, coef)},
                    "current": planning.COEFFICIENTS, "configs": report}, indent=1))


if __name__ == "__main__":
  main()
