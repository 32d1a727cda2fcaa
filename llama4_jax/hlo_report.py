"""What a compiled (SPMD-partitioned) program holds and moves, read from its HLO text.

XLA's `memory_analysis()` gives one device's totals; it does not say which buffers make them. This module
reads `compiled.as_text()` for the two things a user needs to see why a step does or does not fit and how
much it talks:

- `largest_buffers`: the largest arrays the program materialises on a device (instructions outside fused
  computations; a fusion's inside is never a buffer), each with the JAX op that made it (`op_name`
  metadata) and how many instructions make one of that shape and op. Sizes of instructions, not XLA's
  buffer assignment: two of them may share one buffer, so read them as "what is big", not as a sum.
- `collectives`: bytes per step by kind (all-gather, reduce-scatter, all-reduce, all-to-all,
  collective-permute, ragged-all-to-all), each instruction's result bytes per device times how often it
  runs: instructions inside a `while` body (a layer scan, the microbatch loop) count once per iteration,
  from the loop's trip count; a collective the TPU compiler splits into an async chain of fusions (each
  holding a copy of it, with one channel and `chain_id`) counts once. The TPU compiler writes a
  reduce-scatter as a fusion (`all-reduce-scatter`) of an all-reduce and a slice; it counts as a
  reduce-scatter of the slice's bytes. A ragged all-to-all's result is its receive buffer, sized for the
  worst case: an upper bound of what it moves.

Hand-written because no library parses HLO text; the grammar used is XLA's printed form (`%name = shape
opcode(operands), attr=..., metadata={op_name="..."}`), stable across the versions we pin.
"""

from __future__ import annotations

import collections
import functools
import math
import re

_ITEMSIZE = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
             "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1,
             "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCH_PAIR = re.compile(r"\b(?:true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# An async collective the TPU compiler splits into a start, continuation and done fusion: each fused
# computation holds a copy of the collective, with the same channel and chain ids.
_CHAIN = re.compile(r'channel_id=(\d+).*?chain_id="(\d+)"')

COLLECTIVES = {"all-gather": "all-gather", "all-gather-start": "all-gather",
               "reduce-scatter": "reduce-scatter", "all-reduce": "all-reduce",
               "all-reduce-start": "all-reduce", "all-to-all": "all-to-all",
               "ragged-all-to-all": "ragged-all-to-all", "collective-permute": "collective-permute",
               "collective-permute-start": "collective-permute"}
_NOT_BUFFERS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
                "partition-id", "replica-id"}


def array_bytes(shape_text: str) -> list[int]:
  """Bytes of each array in a printed HLO shape ("bf16[8,128]{1,0}" or a tuple of them)."""
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    out.append(int(n * _ITEMSIZE[dtype]))
  return out


class _Instr(collections.namedtuple("_Instr", "name shape opcode rest computation")):
  @property
  def op_name(self) -> str:
    m = _OP_NAME.search(self.rest)
    return m.group(1) if m else ""


@functools.lru_cache(maxsize=2)  # a report reads one text three times (buffers, collectives, flops)
def _parse(text: str):
  """(instructions, entry computation name, fused computation names). An instruction's attributes may
  run over several lines (a Pallas call's kernel metadata): they are joined to it."""
  instrs, comp, entry, current = [], None, None, None

  def flush():
    if current is not None:
      instrs.append(_Instr(current[0], current[1], current[2], " ".join(current[3]), comp))

  for line in text.splitlines():
    h = _HEADER.match(line)
    m = _INSTR.match(line) if not h else None
    if h or m or line.strip() == "}":
      flush()
      current = None
    if h:
      comp = h.group(1)
      entry = comp if line.startswith("ENTRY") else entry
    elif m and comp is not None:
      current = [m.group(1), m.group(2), m.group(3), [m.group(4)]]
    elif current is not None and line.strip() != "}":
      current[3].append(line.strip())
  flush()
  fused = {c for i in instrs if i.opcode == "fusion" for c in _CALLS.findall(i.rest)}
  return instrs, entry, fused


def _loop_bounds(instrs) -> dict[str, int]:
  """condition computation -> N, for conditions `counter < N` with N a constant (how `lax.scan` and
  `fori_loop` lower; their counters start at 0). The TPU compiler drops `known_trip_count`."""
  constants, out = {}, {}
  for i in instrs:
    if i.opcode == "constant" and i.shape.startswith("s32[]"):
      m = re.match(r"\s*(-?\d+)\)", i.rest)
      if m:
        constants[i.name] = int(m.group(1))
  for i in instrs:
    if i.opcode == "compare" and "direction=LT" in i.rest:
      operands = re.findall(r"%([\w.\-]+)", i.rest.split(")")[0])
      if len(operands) == 2 and operands[1] in constants:
        out[i.computation] = constants[operands[1]]
  return out


def _call_sites(instrs) -> dict[str, list[tuple[tuple[str, ...], int, bool]]]:
  """computation -> its call sites [(targets, trip count, alternatives)]: a while loop's body and
  condition run `trip` times; a conditional's branches are alternatives (one of them runs)."""
  bounds = _loop_bounds(instrs)
  sites = collections.defaultdict(list)
  for i in instrs:
    trip = 1
    if i.opcode == "while":
      t = _TRIP.search(i.rest)
      cond = re.search(r"condition=%([\w.\-]+)", i.rest)
      trip = int(t.group(1)) if t else bounds.get(cond.group(1) if cond else None, 1)
    sites[i.computation] += [((target,), trip, False) for target in _CALLS.findall(i.rest)]
    branches = _BRANCH_PAIR.findall(i.rest)
    for b in _BRANCHES.findall(i.rest):
      branches += [x.strip().lstrip("%") for x in b.split(",") if x.strip()]
    if branches:
      sites[i.computation].append((tuple(branches), 1, True))
  return sites


def _callees_first(sites, entry: str) -> list[str]:
  """The computations reachable from `entry`, every callee before its callers (DFS post-order)."""
  order, seen, stack = [], set(), [(entry, False)]
  while stack:
    comp, done = stack.pop()
    if done:
      order.append(comp)
      continue
    if comp in seen:
      continue
    seen.add(comp)
    stack.append((comp, True))
    stack += [(t, False) for targets, _, _ in sites.get(comp, ()) for t in targets if t not in seen]
  return order


def _multiplicity(instrs, entry: str) -> dict[str, int]:
  """How many times each computation runs per execution of the entry: the sum over its call sites of the
  caller's count, times the trip count for a while loop's body and condition. Every branch of a
  conditional counts as run (an upper bound)."""
  sites = _call_sites(instrs)
  mult = collections.defaultdict(int, {entry: 1})
  for comp in reversed(_callees_first(sites, entry)):
    for targets, trip, _ in sites.get(comp, ()):
      for target in targets:
        mult[target] += mult[comp] * trip
  return dict(mult)


def _totals(instrs, entry: str, own: dict[str, dict[str, float]], rank: str) -> dict[str, float]:
  """Sums per-computation figures `own` over one execution of `entry`, as `_multiplicity` counts runs,
  except that a conditional contributes only its branch with the largest `rank` figure."""
  sites = _call_sites(instrs)
  total: dict[str, collections.Counter] = {}
  for comp in _callees_first(sites, entry):
    t = collections.Counter(own.get(comp, {}))
    for targets, trip, alternatives in sites.get(comp, ()):
      options = [total.get(x, collections.Counter()) for x in targets]
      for chosen in [max(options, key=lambda o: o[rank])] if alternatives else options:
        for k, v in chosen.items():
          t[k] += trip * v
    total[comp] = t
  return dict(total.get(entry, {}))


def collectives(text: str) -> dict[str, dict[str, int]]:
  """kind -> {"bytes": result bytes per device per step, "count": instructions executed per step}."""
  instrs, entry, _ = _parse(text)
  mult = _multiplicity(instrs, entry)
  scattered = _reduce_scatter_results(instrs)
  out = {k: {"bytes": 0, "count": 0} for k in sorted(set(COLLECTIVES.values()))}
  chains = set()
  for i in instrs:
    kind = COLLECTIVES.get(i.opcode)
    if kind is None:
      continue
    chain = _CHAIN.search(i.rest)
    if chain:  # one collective split over an async chain's start, continuation and done fusions
      key = (i.opcode,) + chain.groups()
      if key in chains:
        continue
      chains.add(key)
    sizes = array_bytes(i.shape)
    # an async start returns (operands, results, ...): its result is the largest member
    nbytes = max(sizes) if i.opcode.endswith("-start") and sizes else sum(sizes)
    if i.computation in scattered:  # the TPU's reduce-scatter: all-reduce + slice in one fusion
      kind, nbytes = "reduce-scatter", scattered[i.computation]
    n = mult.get(i.computation, 1)
    out[kind]["bytes"] += nbytes * n
    out[kind]["count"] += n
  return out


def estimate_caveats(text: str) -> dict[str, int]:
  """What keeps the compiler's own step-time estimate (`cost_analysis()["optimal_seconds"]`) from being
  a step time: {"while_loops": `while` instructions, whose bodies the cost model counts once however
  many times they run (a layer scan, the microbatch loop); "sparsecore_offloads": scatters the TPU
  compiler runs on the SparseCore (v5p, v6e), for each of which libtpu 0.0.42's cost model adds -2 s
  (`benchmarks/tpu_collective_lowering.py` measures both)}."""
  instrs, _, _ = _parse(text)
  return {"while_loops": sum(i.opcode == "while" for i in instrs),
          "sparsecore_offloads": sum(i.opcode == "custom-call" and '"PrepareAsyncCallStart"' in i.rest
                                     for i in instrs)}


def _reduce_scatter_results(instrs) -> dict[str, int]:
  """Fused computations that the TPU compiler emits as a reduce-scatter (named all-reduce-scatter*: an
  all-reduce whose result is sliced to this device's shard inside the fusion) -> bytes of the shard."""
  out = {}
  for i in instrs:
    if i.opcode == "fusion":
      for comp in _CALLS.findall(i.rest):
        if comp.startswith("all-reduce-scatter"):
          out[comp] = sum(array_bytes(i.shape))
  return out


def largest_buffers(text: str, top: int = 10) -> list[dict]:
  """The `top` largest arrays the program materialises (see the module docstring), grouped by (op, shape,
  JAX op name): [{"bytes", "opcode", "shape", "op_name", "count"}], largest first."""
  instrs, _, fused = _parse(text)
  groups: dict[tuple, dict] = {}
  for i in instrs:
    if i.computation in fused or i.opcode in _NOT_BUFFERS or i.shape.startswith("("):
      continue
    sizes = array_bytes(i.shape)
    if not sizes:
      continue
    shape = i.shape.split("{")[0]
    key = (i.opcode, shape, i.op_name)
    g = groups.setdefault(key, {"bytes": sizes[0], "opcode": i.opcode, "shape": shape,
                                "op_name": i.op_name, "count": 0})
    g["count"] += 1
  return sorted(groups.values(), key=lambda g: -g["bytes"])[:top]


_CONTRACT = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")
_DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
_PALLAS_FLOPS = re.compile(r'"cost_estimate":\{"flops":"(\d+)"')


def _dims(shape_text: str) -> list[int]:
  m = _ARRAY.search(shape_text)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def flops(text: str) -> dict[str, float]:
  """Per-device flops of one execution, counted from the HLO with while loops' trip counts (XLA's
  `cost_analysis()` counts a loop body once, so a scanned model's figure is off by the layer count) and
  the costliest branch of each conditional:
  2 x output elements x contraction size for every dot and convolution (fused ones included; XLA TPU
  writes some batched matmuls as convolutions whose windows mostly read padding or dilation holes, so
  a convolution counts only the taps that read real input), plus
  the cost estimate of each Pallas kernel. Splash attention's kernels (jax's, which carry no cost
  estimate) are counted from their operand shapes: every block of every query run against its key run
  (`splash_flops`). Returns {"matmul": ..., "pallas": ..., "splash": ..., "splash_calls": ...,
  "pallas_uncounted": number of Pallas calls per step counted by neither}."""
  instrs, entry, _ = _parse(text)
  shapes = {i.name: i.shape for i in instrs}
  keys = ("matmul", "pallas", "splash", "splash_calls", "pallas_uncounted")
  own = collections.defaultdict(lambda: dict.fromkeys(keys, 0.0))
  for i in instrs:
    out = own[i.computation]  # this computation's own figures; `_totals` multiplies by how often it runs
    if i.opcode == "dot":
      lhs = re.match(r"\s*%([\w.\-]+)", i.rest)
      contract = _CONTRACT.search(i.rest)
      dims = _dims(shapes.get(lhs.group(1), "")) if lhs else []
      k = 1
      for d in (contract.group(1).split(",") if contract and contract.group(1) else []):
        k *= dims[int(d)] if int(d) < len(dims) else 1
      out["matmul"] += 2.0 * _elements(i.shape) * k
    elif i.opcode == "convolution":
      out["matmul"] += _conv_flops(i, shapes)
    elif (i.opcode == "custom-call" and "tpu_custom_call" in i.rest
          and not i.name.startswith(_NO_MATMUL_KERNELS)):
      f = _PALLAS_FLOPS.search(i.rest)
      splash = None if f else splash_flops(i, shapes)
      if f:
        out["pallas"] += float(f.group(1))
      elif splash is not None:
        out["splash"] += splash
        out["splash_calls"] += 1
      else:
        out["pallas_uncounted"] += 1
  for figures in own.values():
    figures["all"] = figures["matmul"] + figures["pallas"] + figures["splash"]
  totals = _totals(instrs, entry, own, rank="all")
  out = {k: totals.get(k, 0.0) for k in keys}
  out["splash_calls"], out["pallas_uncounted"] = int(out["splash_calls"]), int(out["pallas_uncounted"])
  return out


# Pallas kernels of XLA's own that do no matmul (the TPU lowering of `ragged_dot` computes its group
# metadata in one): zero flops, not "uncounted".
_NO_MATMUL_KERNELS = ("ragged-dot-metadata",)
# Matmuls of splash attention's kernels per (query, key) pair of a block: the forward's QK^T and PV, the
# dq kernel's QK^T, dO V^T and dS K, the dkv kernel's QK^T, P^T dO, dO V^T and dS^T Q.
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
_SPLASH_KERNEL = re.compile(r"splash_\w*?_(fwd|dq|dkv)_")


def splash_flops(i, shapes) -> float | None:
  """Flops of one splash attention kernel call from its operands (q [..., queries, head_dim], then k
  [..., keys, head_dim] after the int mask-info operands): 2 x q's elements x keys per matmul. Every
  block is counted: exact for runs of one block (the ring's runs at most 512 tokens), an upper bound
  where a causal mask lets the kernel skip blocks. None when `i` is not a splash kernel."""
  kind = _SPLASH_KERNEL.match(i.name + "_")
  if not kind:
    return None
  operands = re.findall(r"%([\w.\-]+)", i.rest.split("custom_call_target")[0])
  floats = [shapes.get(o, "") for o in operands if re.match(r"\s*(bf16|f32|f16)\[", shapes.get(o, ""))]
  if len(floats) < 2:
    return None
  q, k = _dims(floats[0]), _dims(floats[1])
  if len(q) < 2 or len(k) < 2:
    return None
  return 2.0 * _SPLASH_MATMULS[kind.group(1)] * math.prod(q) * k[-2]


def _elements(shape_text: str) -> int:
  n = 1
  for d in _dims(shape_text):
    n *= d
  return n


def _conv_flops(i, shapes) -> float:
  """2 x multiply-adds of a convolution, counting per spatial dim only window taps that land on real
  input elements (not padding, not lhs-dilation holes)."""
  import numpy as np
  operands = re.findall(r"%([\w.\-]+)", i.rest.split(")")[0])
  labels = _DIM_LABELS.search(i.rest)
  if len(operands) < 2 or not labels:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  lhs, rhs, out = _dims(shapes.get(operands[0], "")), _dims(shapes.get(operands[1], "")), _dims(i.shape)
  if not (lhs and rhs and out) or "i" not in rhs_l:
    return 0.0
  window = re.search(r"window=\{([^}]*)\}", i.rest)
  attrs = dict(kv.split("=", 1) for kv in window.group(1).split()) if window else {}
  spatial = sorted(ch for ch in out_l if ch.isdigit())

  def per_dim(key, j, default):
    if key not in attrs:
      return default
    return attrs[key].split("x")[j]

  taps, outer = 1, 1
  for j, ch in enumerate(spatial):
    size = int(per_dim("size", j, "1"))
    stride, ld, rd = (int(per_dim(k, j, "1")) for k in ("stride", "lhs_dilate", "rhs_dilate"))
    pad_lo = int(per_dim("pad", j, "0_0").split("_")[0])
    length, o = lhs[lhs_l.index(ch)], out[out_l.index(ch)]
    x = np.arange(o)[:, None] * stride + np.arange(size)[None, :] * rd - pad_lo  # dilated-input coords
    real = (x >= 0) & (x <= (length - 1) * ld) & (x % ld == 0)
    taps *= int(real.sum())
    outer *= o
  return 2.0 * (_elements(i.shape) / max(outer, 1)) * taps * rhs[rhs_l.index("i")]
