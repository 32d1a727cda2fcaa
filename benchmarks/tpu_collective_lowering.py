"""How the TPU compiler lowers a weight gather and a gradient reduce-scatter, and what its own step-time
estimate counts: two things to know when reading `plan --compile`'s collectives and estimate.

    python benchmarks/tpu_collective_lowering.py     # ~1 minute on 2 cores; needs libtpu

Prints one JSON object:
- "collectives": for v5p slices of 16 to 128 chips, a v4-128 and v6e slices of 16 to 256 chips, the
  collective instructions (opcode -> count, from the partitioned HLO) of (a) gathering a bf16 [5120,
  8192] weight split over the whole slice (fsdp x expert, as the rules split Scout's non-expert weights),
  (b) the same split over the 8-chip fsdp axis only, (c) the weight gradient of a data-parallel matmul,
  summed over the slice and left split over it (GSPMD's choice), and (d) that gradient by an explicit
  `psum_scatter` in a `shard_map`.
- "estimate": the compiler's `optimal_seconds` (cost_analysis) of programs of 1-3 one-dimensional
  scatter-adds and of one inside a 5-step loop, on v5e, v5p and v6e, beside the count of scatters it
  offloads to the SparseCore (`hlo_report.estimate_caveats`).
These are the compiler's choices (libtpu as pinned by jax[tpu]), not hardware measurements.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from llama4_jax import hlo_report, planning, tpu_compile  # noqa: E402

D, F, TOKENS = 5120, 8192, 1024  # a Scout weight's shape; tokens per chip for the gradient


def _kinds(text: str) -> dict[str, int]:
  return {k: v["count"] for k, v in hlo_report.collectives(text).items() if v["count"]}


def _collectives(tpu_name: str) -> dict:
  tpu = planning.parse_tpu(tpu_name)
  devices = np.array(tpu_compile.tpu_devices(tpu))
  mesh = Mesh(devices.reshape(8, -1), ("fsdp", "expert"))
  both = ("fsdp", "expert")

  def spec(*s):
    return NamedSharding(mesh, P(*s))

  def gather(split):
    w = jax.ShapeDtypeStruct((D, F), jnp.bfloat16, sharding=spec(split, None))
    f = jax.jit(lambda w: jax.lax.with_sharding_constraint(w, spec()) * 2)
    return _kinds(f.lower(w).compile().as_text())

  h = jax.ShapeDtypeStruct((TOKENS * tpu.chips, D), jnp.bfloat16, sharding=spec(both, None))
  g = jax.ShapeDtypeStruct((TOKENS * tpu.chips, F), jnp.bfloat16, sharding=spec(both, None))

  def grad(h, g):
    return jnp.einsum("td,tf->df", h, g, preferred_element_type=jnp.float32)

  gspmd = jax.jit(grad, out_shardings=spec(both, None))
  explicit = jax.jit(partial(jax.shard_map, in_specs=(P(both, None), P(both, None)), out_specs=P(both, None),
                             mesh=mesh)(lambda h, g: jax.lax.psum_scatter(grad(h, g), both, tiled=True)))
  return {"chips": tpu.chips, "topology": tpu_compile.topology_name(tpu),
          "gather over the slice": gather(both), "gather over fsdp (8 chips)": gather("fsdp"),
          "gradient, GSPMD": _kinds(gspmd.lower(h, g).compile().as_text()),
          "gradient, psum_scatter": _kinds(explicit.lower(h, g).compile().as_text())}


def _estimates(tpu_name: str) -> dict:
  tpu = planning.parse_tpu(tpu_name)
  mesh = Mesh(np.array(tpu_compile.tpu_devices(tpu)), ("x",))
  rep = NamedSharding(mesh, P())
  idx = jax.ShapeDtypeStruct((4096,), jnp.int32, sharding=rep)
  val = jax.ShapeDtypeStruct((4096,), jnp.float32, sharding=rep)

  def scatters(n):
    return lambda i, v: [jnp.zeros((1024 * (k + 1),), jnp.float32).at[i * (k + 1)].add(v) for k in range(n)]

  def looped(i, v):
    return jax.lax.fori_loop(0, 5, lambda k, acc: acc.at[(i + k) % 1024].add(v), jnp.zeros((1024,)))

  out = {}
  for name, f in [("1 scatter", scatters(1)), ("2 scatters", scatters(2)), ("3 scatters", scatters(3)),
                  ("1 scatter in a 5-step loop", looped)]:
    compiled = jax.jit(f).lower(idx, val).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out[name] = dict(optimal_seconds=cost.get("optimal_seconds"), flops=cost.get("flops"),
                     **hlo_report.estimate_caveats(compiled.as_text()))
  return out


def main():
  slices = ("v5p-32", "v5p-64", "v5p-128", "v5p-256", "v4-128", "v6e-16", "v6e-32", "v6e-64", "v6e-256")
  print(json.dumps({"benchmark": "tpu_collective_lowering", "jax": jax.__version__,
                    "collectives": {t: _collectives(t) for t in slices},
                    "estimate": {t: _estimates(t) for t in ("v5e-4", "v5p-8", "v6e-4")}}, indent=1))


if __name__ == "__main__":
  main()
