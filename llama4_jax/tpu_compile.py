"""Compile a run's train step, or the sampler's prefill and decode steps, for a Cloud TPU slice with the
real TPU compiler, on any host (no TPU, no TPU VM, no `jax.distributed`).

libtpu describes a slice's devices without the hardware (`jax.experimental.topologies`); a mesh over them,
arguments given as ShapeDtypeStructs with their shardings, and `jit(...).lower(...).compile()` give the
TPU compiler's own per-chip memory, flop count, step-time estimate and partitioned HLO. The model traces
its TPU kernels (splash attention, the megablox grouped matmul, the ragged all-to-all) because kernel
choices follow the mesh's devices (`model.platform`). `python -m llama4_jax.plan --compile` prints this
report.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax import hlo_report
from llama4_jax.inference.static import split_model
from llama4_jax.model.transformer import model_shardings
from llama4_jax.planning import GiB, Tpu, parameter_counts
from llama4_jax.serving import steps
from llama4_jax.train.compiled_memory import lower_train_step, memory_figures
from llama4_jax.train.config import model_config

# Peak dense bf16 FLOP/s per chip (Cloud TPU documentation), for the MFU the compiler's estimate implies.
PEAK_BF16_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
# Chips -> topology (as libtpu names it). v4 / v5p are 3-D tori; v5e / v6e 2-D.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
NEED_LIBTPU = ("compiling for a TPU slice needs libtpu (the TPU compiler), which runs on any host: "
               "pip install -e '.[tpu]'")


def topology_name(tpu: Tpu) -> str:
  """libtpu's name of a slice's topology, e.g. v5p-256 (128 chips) -> 'v5p:4x4x8'."""
  shapes = _SHAPES_3D if tpu.generation in ("v4", "v5p") else _SHAPES_2D
  if tpu.chips not in shapes:
    raise ValueError(f"{tpu.name}: no standard {tpu.generation} slice has {tpu.chips} chips; "
                     f"choose one of {', '.join(str(n) for n in shapes)} chips")
  return f"{tpu.generation}:{shapes[tpu.chips]}"


def tpu_devices(tpu: Tpu) -> list:
  """The devices of a `tpu` slice as the TPU compiler sees them (no TPU needed)."""
  # Several processes may compile at once (test workers, a plan beside a training run): without this,
  # libtpu takes a machine-wide lock file and the second process fails.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    import libtpu  # noqa: F401  (the compiler itself; without it get_topology_desc fails obscurely)
  except ImportError:
    raise RuntimeError(NEED_LIBTPU) from None
  extra = {"chips_per_host_bounds": (1, 1, 1)} if tpu.chips == 1 else {}
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology_name(tpu),
                                             **extra).devices)
  except Exception as e:  # libtpu too old for the generation, or a broken install
    raise RuntimeError(f"libtpu could not describe {tpu.name} ({topology_name(tpu)}): {e}") from e


@dataclasses.dataclass
class Report:
  """One compiled program: per-chip bytes, flops, time estimates, collectives, the largest buffers."""
  name: str
  memory: dict[str, int]  # arguments, outputs, aliased, temporaries, peak (bytes per chip)
  flops: float  # per chip per execution, counted from the HLO with loop trip counts (hlo_report.flops)
  pallas_uncounted: int  # Pallas calls per execution without a cost estimate (their flops are missing)
  splash_flops: float  # of `flops`: splash attention's kernels, counted from their shapes (no estimate)
  compiler_flops: float  # cost_analysis()'s figure, which counts each while-loop body once
  optimal_seconds: float | None  # the compiler's own time estimate as it gives it (see `estimate_caveats`)
  estimate_caveats: dict[str, int]  # hlo_report.estimate_caveats: why that estimate is not a step time
  compute_seconds: float  # flops at the chip's peak bf16 rate: a lower bound of the step time
  collectives: dict[str, dict[str, int]]
  largest: list[dict]
  compile_seconds: float

  def as_json(self) -> dict:
    return {"name": self.name, "peak_bytes": self.memory["peak"],
            "arguments_bytes": self.memory["arguments"], "outputs_bytes": self.memory["outputs"],
            "aliased_bytes": self.memory["aliased"], "temporaries_bytes": self.memory["temporaries"],
            "flops": self.flops, "pallas_calls_without_cost": self.pallas_uncounted,
            "splash_flops_from_shapes": self.splash_flops,
            "compiler_flops": self.compiler_flops, "optimal_seconds": self.optimal_seconds,
            **self.estimate_caveats,
            "compute_seconds": self.compute_seconds,
            "collectives": {k: v["bytes"] for k, v in self.collectives.items()},
            "collective_counts": {k: v["count"] for k, v in self.collectives.items()},
            "largest_buffers": self.largest, "compile_seconds": round(self.compile_seconds, 1)}


def report(name: str, lowered, tpu: Tpu, top: int = 8) -> Report:
  """Compiles `lowered` for `tpu` and reads its figures (see `Report`)."""
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  optimal = cost.get("optimal_seconds")
  text = compiled.as_text()
  counted = hlo_report.flops(text)
  total = counted["matmul"] + counted["pallas"] + counted["splash"]
  return Report(name, memory_figures(compiled), total, counted["pallas_uncounted"], counted["splash"],
                float(cost.get("flops", 0.0)), None if optimal is None else float(optimal),
                hlo_report.estimate_caveats(text), total / PEAK_BF16_FLOPS[tpu.generation],
                hlo_report.collectives(text),
                hlo_report.largest_buffers(text, top), seconds)


def train_model_flops(c) -> float:
  """Model FLOPs of one train step (all chips): 6 x active parameters (less the embedding table) x tokens
  (forward and backward of every matmul; 4 x with LoRA, whose frozen base needs no weight gradients) plus
  causal attention's QK^T and PV (x3 for the backward), chunked layers over at most their chunk.
  Rematerialisation is not counted: this is the numerator of MFU."""
  cfg = model_config(c)
  _, active = parameter_counts(cfg)
  active -= cfg.vocab_size * cfg.hidden_size  # the embedding table is read, not multiplied
  tokens = c.batch_size * c.seq_len
  attn = 0.0
  for kind in cfg.layer_kinds():
    span = min(c.seq_len, cfg.attention_chunk_size) if kind.rope and cfg.attention_chunk_size else c.seq_len
    attn += 2 * 2 * cfg.num_attention_heads * cfg.head_dim * span / 2  # per token: QK^T + PV, causal half
  passes = 4.0 if cfg.lora_rank else 6.0  # a frozen base needs no weight gradients (adapters: negligible)
  return passes * active * tokens + 3.0 * attn * tokens


def mfu(model_flops: float, seconds: float | None, tpu: Tpu) -> float | None:
  """Model FLOPs utilisation of a step of `seconds` on the whole slice (None without a time)."""
  if not seconds:
    return None
  return model_flops / (seconds * tpu.chips * PEAK_BF16_FLOPS[tpu.generation])


def hbm_share(r: Report, tpu: Tpu) -> float:
  return r.memory["peak"] / tpu.hbm_bytes


def format_report(r: Report, tpu: Tpu, model_flops: float | None = None, tokens: int | None = None) -> str:
  """Human-readable lines for one program."""
  m, gib = r.memory, lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
  lines = [f"{r.name}: compiled by the TPU compiler for {tpu.name} in {r.compile_seconds:.0f} s",
           f"  per chip: peak {gib(m['peak'])} of {gib(tpu.hbm_bytes)} HBM ({hbm_share(r, tpu):.0%}); "
           f"arguments {gib(m['arguments'])}, outputs {gib(m['outputs'])}, aliased {gib(m['aliased'])}, "
           f"temporaries {gib(m['temporaries'])}",
           f"  flops per chip {r.flops:.3e} (counted from the HLO"
           + (f"; splash attention {r.splash_flops:.3e}, from its kernels' shapes" if r.splash_flops else "")
           + (f"; {r.pallas_uncounted} Pallas calls without a cost estimate not counted" if r.pallas_uncounted
              else "") + f"); at peak bf16: {r.compute_seconds:.3f} s",
           f"  compiler's own estimate: {_estimate(r)}"]
  seconds = r.compute_seconds
  if model_flops:
    lines.append(f"  model flops {model_flops:.3e} per step: at most {mfu(model_flops, seconds, tpu):.1%} MFU"
                 + (f", {tokens / seconds / tpu.chips:,.0f} tokens/s/chip" if tokens else "")
                 + " (compute-bound at peak; communication and memory time not included)")
  moved = ", ".join(f"{k} {v['bytes'] / GiB:.2f} GiB ({v['count']}x)" for k, v in r.collectives.items()
                    if v["count"])
  lines.append(f"  collectives per step (result bytes per chip): {moved or 'none'}")
  lines.append("  largest buffers:")
  for b in r.largest:
    lines.append(f"    {b['bytes'] / GiB:7.2f} GiB {b['opcode']:<12} {b['shape']:<28} x{b['count']:<3} "
                 f"{_short(b['op_name'])}")
  return "\n".join(lines)


def _estimate(r: Report) -> str:
  """The compiler's `optimal_seconds`, with what keeps it from being this program's time."""
  if r.optimal_seconds is None:
    return "none given"
  why = []
  loops, offloads = r.estimate_caveats["while_loops"], r.estimate_caveats["sparsecore_offloads"]
  if loops:
    why.append(f"counts the body of each of its while loops ({loops}) once")
  if offloads:
    why.append(f"adds -2 s for each scatter it offloads to the SparseCore ({offloads})")
  return f"{r.optimal_seconds:.4g} s" + (f" (not a step time: it {' and '.join(why)})" if why else "")


def _short(op_name: str, width: int = 90) -> str:
  return op_name if len(op_name) <= width else "..." + op_name[-(width - 3):]


# ------------------------------------------------------------------------------------------------
# The programs

def lower_serve_steps(c, mesh, slots: int, length: int, prompt: int | None = None) -> dict:
  """The serving engine's programs for run config `c` on `mesh`, lowered from ShapeDtypeStructs (no
  memory is allocated), with `slots` cache rows of `length` tokens:

  prefill: one prompt of `prompt` tokens (default: the engine's largest prefill bucket, 256) into a
    fresh row, written into the slots' cache; its first token sampled;
  extend: the next 256-token piece of a long prompt into its own row of `length` tokens (how the engine
    prefills prompts longer than a bucket, between decode steps);
  decode: one step of all slots.

  Returns {"prefill": Lowered, "extend": Lowered, "decode": Lowered} (extend only when `length` exceeds
  a piece)."""
  from llama4_jax.serving.admission import prefill_piece
  cfg = model_config(c)
  graphdef, abstract_state, shardings = model_shardings(cfg, mesh)
  static, leaves = split_model(nnx.merge(graphdef, abstract_state))
  leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
            for x, s in zip(leaves, jax.tree.leaves(shardings))]

  def abstract_state_of(batch):
    fn = steps.empty_state.lower(static, leaves, batch=batch, length=length).compile()
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        jax.eval_shape(lambda: fn.out_info), fn.output_shardings)

  cache, tok = abstract_state_of(slots)
  ints = lambda n, dt=jnp.int32: jax.ShapeDtypeStruct((n,), dt)  # noqa: E731
  floats = lambda n: jax.ShapeDtypeStruct((n,), jnp.float32)  # noqa: E731
  piece = prefill_piece(length)
  prompt = prompt or min(piece, length)
  out = {"prefill": steps.prefill_insert.lower(
      static, leaves, jax.ShapeDtypeStruct((1, prompt), jnp.int32), ints(1), cache, tok, ints(1),
      ints(1, jnp.uint32), floats(1), ints(1), floats(1), length=length)}
  if length > piece:
    row, _ = abstract_state_of(1)
    out["extend"] = steps.extend_row.lower(static, leaves, jax.ShapeDtypeStruct((1, piece), jnp.int32),
                                           ints(1), ints(1), row)
  out["decode"] = steps.decode_step.lower(static, leaves, tok, ints(slots), cache, ints(slots, jnp.uint32),
                                          floats(slots), ints(slots), floats(slots), rows=slots)
  return out
