"""Memory planner: per-device bytes of a run config on a TPU slice, whether it fits, and what would.

Parameters are counted exactly: the abstract model (no memory allocated) gives every weight's shape,
dtype and logical axes, and the sharding rules table gives its shard on the mesh. Optimizer state (Adam's
two moments, in the parameters' dtype) and gradients follow the trainable parameters (the adapters alone
with LoRA). Activations are a model of what the compiled step keeps for the backward pass under the remat
policy, plus the logits and the gathered weights; its coefficients were fitted to XLA's
`memory_analysis()` of tiny configs on CPU (benchmarks/plan_calibration.py), and tests/test_plan.py holds
it within 25% of XLA on others. Treat it as an estimate: XLA on TPU fuses and buffers differently.
Serving adds the KV cache: a ring of attention_chunk_size entries on chunked layers, the full length on
NoPE layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import numpy as np

from llama4_jax.config import ModelConfig
from llama4_jax.model.attention import _query_block
from llama4_jax.model.linear import is_adapter
from llama4_jax.sharding import LOOSE, batch_shards, logical_to_spec, resolve_mesh_sizes

GiB = 2**30
# HBM per chip and TensorCores per chip (the number in a slice name counts cores on v4 / v5p).
TPU_GENERATIONS = {"v4": (32 * GiB, 2), "v5e": (16 * GiB, 1), "v5p": (95 * GiB, 2), "v6e": (32 * GiB, 1)}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
USABLE_HBM = 0.9  # share of HBM the plan may use: XLA's runtime, programs and fragmentation take the rest

# Activation model: bytes = sum of coefficient x feature. The features are the sizes of what the step
# keeps or builds per device (see `activation_features`); the coefficients were fitted (non-negative least
# squares, residual held at 4) to XLA's memory_analysis() of eight tiny configs on CPU
# (benchmarks/plan_calibration.py).
COEFFICIENTS = {"attention_probs": 4.37, "attention_io": 0.0, "residual": 4.0, "mlp": 2.28, "logits": 4.87,
                "gathered_weights": 1.7}
# The same for a TPU slice (features: `activation_features(..., platform="tpu")`), fitted to the TPU
# compiler's peaks of the ten train steps of `benchmarks/plan_calibration.py --tpu`: within 0.86-1.07 of
# them, but 0.70-1.41 on the eight configs held out (1.12 / 1.41 / 0.70 / 1.40 / 1.11 / 1.34 / 0.79 / 0.72,
# see TPU_HELD_OUT there):
# an estimate, not a verdict; `plan --compile` is the answer for a TPU run.
TPU_COEFFICIENTS = {"attention_probs": 0.0, "attention_io": 0.0, "residual": 7.137, "mlp": 0.577,
                    "logits": 2.131, "gathered_weights": 9.61, "lm_head": 0.0}
# What the TPU estimate has been off by: estimate / compiler peak over the fitted and the first four
# held-out configs of `benchmarks/plan_calibration.py --tpu` (0.702: the LoRA tiny model on a v5e-1;
# 1.411: Scout with capacity factor 2). A TPU training plan states the peak the compiler could then give,
# and calls a run fitting (or not) only when the whole range does; between, the answer is `plan --compile`.
# Four configs compiled after the range was set (the last four of TPU_HELD_OUT) fell inside it: 0.72-1.34.
TPU_ESTIMATE_RATIO = (0.70, 1.42)


@dataclasses.dataclass(frozen=True)
class Tpu:
  name: str  # e.g. v5p-256
  generation: str  # v4 | v5e | v5p | v6e
  chips: int
  hbm_bytes: int  # per chip


def parse_tpu(name: str) -> Tpu:
  """'v5p-256' (cores, as in Cloud TPU accelerator types) -> 128 chips of 95 GiB; v5e/v6e count chips."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v5lite)-(\d+)", name.strip().lower())
  if not m:
    raise ValueError(f"--tpu={name!r}: expected an accelerator type such as v4-32, v5e-8 (or "
                     f"v5litepod-8), v5p-256 or v6e-64 (generations: {', '.join(TPU_GENERATIONS)})")
  gen = _ALIASES.get(m.group(1), m.group(1))
  hbm, cores = TPU_GENERATIONS[gen]
  count = int(m.group(2))
  if count % cores or count == 0:
    raise ValueError(f"--tpu={name!r}: {gen} slices are named by TensorCores, {cores} per chip; use a "
                     f"multiple of {cores}")
  return Tpu(f"{gen}-{count}", gen, count // cores, hbm)


class _Sizes:
  """Stands for a Mesh in `logical_to_spec` (only `.shape` is read): plans need no devices."""

  def __init__(self, sizes: dict[str, int]):
    self.shape = dict(sizes)


@functools.lru_cache(maxsize=32)
def _weights(cfg: ModelConfig) -> tuple[tuple[tuple[int, ...], int, tuple, bool, bool], ...]:
  """(shape, itemsize, logical axes, is adapter, replicated where its mesh axes do not divide it) of
  every weight of the abstract model."""
  from flax import nnx

  from llama4_jax.model.transformer import abstract_model
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(abstract_model(cfg)),
                                                is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  return tuple((tuple(var.shape), np.dtype(var.dtype).itemsize,
                tuple(var.get_metadata().get("logical_axes") or (None,) * len(var.shape)),
                is_adapter([getattr(path[-1], "key", path[-1])]),
                bool(var.get_metadata().get(LOOSE))) for path, var in leaves)


def weight_bytes(cfg: ModelConfig, sizes: dict[str, int]) -> tuple[int, int]:
  """(all, trainable) weight bytes held by one device on a mesh of `sizes`."""
  mesh = _Sizes(sizes)
  total = trainable = 0
  lora = cfg.lora_rank > 0
  for shape, itemsize, axes, adapter, loose in _weights(cfg):
    spec = logical_to_spec(axes, mesh, shape, strict=not loose)
    n = itemsize
    for dim, part in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
      parts = () if part is None else (part,) if isinstance(part, str) else part
      n *= dim // math.prod(sizes[p] for p in parts)
    total += n
    if adapter or not lora:
      trainable += n
  return total, trainable


def _exchange_rows(c, cfg: ModelConfig, sizes: dict[str, int], tokens: int) -> int:
  """Rows of one device's expert-parallel receive buffer (model.expert_parallel): the expert axis times
  its tokens' assignments when dropless, else the capacity."""
  assigned = tokens * cfg.num_experts_per_tok
  rows = sizes["expert"] * assigned
  if cfg.moe_capacity_factor and sizes["expert"] > 1:
    rows = min(rows, -(-math.ceil(cfg.moe_capacity_factor * assigned) // 8) * 8)
  return rows


def activation_features(c, cfg: ModelConfig, sizes: dict[str, int],
                        platform: str = "cpu") -> dict[str, float]:
  """Sizes (bytes, per device) of what one microbatch's forward and backward keep or build:

  attention_probs: float32 [B, heads, query block, keys] blocks of the dense (blocked causal) attention;
  attention_io: q, k, v and the attention output; residual: [tokens, hidden] vectors; mlp: the routed
  experts' rows (the expert-parallel receive buffer: the expert axis times the device's tokens x k when
  dropless, else the capacity) and their gate/up/down outputs, the shared expert, the dense MLP, router
  logits;
  logits: float32 [tokens / loss_chunks, vocab]; gathered_weights: one superblock's weights gathered over
  fsdp and context (zero when neither shards them).
  Per-layer features count every layer without remat; with remat, each superblock's input plus the
  layers of one superblock (live while it is recomputed), and the matmul outputs under the dots policies.

  platform="tpu" adds lm_head, the output projection's whole float32 gradient, which each device builds
  from its tokens before it is reduced (zero when the projection is frozen).
  """
  b = max(1, c.batch_size // (c.microbatches * batch_shards(sizes)))  # (plan_training checks it divides)
  s = c.seq_len // sizes["context"]
  t = b * s
  a = np.dtype(cfg.dtype).itemsize
  tp = sizes["tensor"]
  d, hd = cfg.hidden_size, cfg.head_dim
  h, k = cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp
  f, fm = cfg.intermediate_size // tp, cfg.intermediate_size_mlp // tp
  ring = cfg.attention_impl == "ring" or (cfg.attention_impl == "auto" and sizes["context"] > 1)
  qb = _query_block(s)
  probs = 0 if ring else b * h * s * (s + qb) // 2 * 4

  tpu = platform == "tpu"

  def layer(kind):
    routed = _exchange_rows(c, cfg, sizes, t)
    mlp = (t * cfg.num_local_experts * 4 + routed * (2 * d + 3 * f) * a
           + t * (d + 3 * f) * a) if kind.moe else t * (d + 3 * fm) * a
    return {"attention_probs": probs, "attention_io": t * ((2 * h + 2 * k) * hd * a + h * 4),
            "residual": t * d * a, "mlp": mlp}

  kinds = cfg.layer_kinds()
  per_layer = [layer(kind) for kind in kinds]
  period = cfg.layer_period()
  blocks = cfg.num_hidden_layers // period
  if cfg.remat_policy == "none":
    kept = per_layer
  else:
    kept = per_layer[:period] + per_layer[blocks * period:]  # one live superblock + the unscanned tail
    kept.append({"residual": blocks * t * d * a})  # each superblock's input
    if cfg.remat_policy.startswith("dots"):
      kept.append({"mlp": blocks * t * a * ((2 * h + 2 * k) * hd + 2 * d + 4 * f)})
  names = TPU_COEFFICIENTS if tpu else COEFFICIENTS
  out = {name: float(sum(x.get(name, 0) for x in kept)) for name in names}
  if tpu and cfg.remat_policy == "full":  # the expert FFN is rematerialised per layer: one layer's at once
    out["mlp"] = float(max(x["mlp"] for x in per_layer))
  out["logits"] = float(t // c.get("loss_chunks", 1) * (cfg.vocab_size // tp) * 4)  # one chunk's at a time
  # One superblock's weights (still split over tensor / expert) are gathered over fsdp x context, and
  # cast to the compute dtype when stored otherwise (an int8 / NF4 base, bfloat16 compute over float32).
  layer_weights = [(math.prod(shape), itemsize) for shape, itemsize, axes, *_ in _weights(cfg)
                   if "layers" in axes]
  split = max(blocks, 1) * sizes["tensor"] * sizes["expert"]
  gathered = 0.0
  # (the TPU model also counts the gather over `expert`: the rules shard the other weights over it too)
  gathering = sizes["fsdp"] * sizes["context"] * (sizes["expert"] if tpu else 1)
  if gathering > 1:
    gathered += sum(n * size for n, size in layer_weights) / split
  if cfg.base_quant != "none" or cfg.param_dtype != cfg.dtype:  # the weights as the compute dtype has them
    plain = _weights(cfg.replace(base_quant="none", lora_rank=0))
    gathered += sum(math.prod(shape) for shape, _, axes, *_ in plain if "layers" in axes) * a / split
  out["gathered_weights"] = gathered / (period if tpu else 1)  # TPU: gathered a layer at a time
  if tpu:
    out["lm_head"] = 0.0 if cfg.lora_rank else float(d * (cfg.vocab_size // tp) * 4)
  return out


def activation_bytes(c, cfg: ModelConfig, sizes: dict[str, int], platform: str = "cpu") -> int:
  """Bytes one device holds for the backward pass of one microbatch, the loss's logits and gathered
  weights (the fitted model: `COEFFICIENTS` x `activation_features`; `TPU_COEFFICIENTS` for "tpu")."""
  feats = activation_features(c, cfg, sizes, platform)
  coefficients = TPU_COEFFICIENTS if platform == "tpu" else COEFFICIENTS
  return int(sum(coefficients[k] * v for k, v in feats.items()))


def kv_cache_bytes(cfg: ModelConfig, sizes: dict[str, int], batch: int, length: int,
                   rope: bool | None = None) -> int:
  """The sampler's KV cache on one device: keys, values (compute dtype) and int32 positions. The global
  (NoPE) layers' cache is split over `context` along the sequence (when it divides the length). `rope`:
  only the chunked (True) or only the global (False) layers'."""
  shards = batch_shards(sizes)
  rows = batch // shards if batch % shards == 0 else batch  # a batch the axes do not divide is replicated
  k = cfg.num_key_value_heads // sizes["tensor"]
  a = np.dtype(cfg.dtype).itemsize
  context = sizes.get("context", 1)

  def slots(rope: bool) -> int:
    n = cfg.kv_cache_length(rope, length)
    return n // context if not rope and n % context == 0 else n

  return sum(rows * slots(kind.rope) * (2 * k * cfg.head_dim * a + 4) for kind in cfg.layer_kinds()
             if rope is None or kind.rope == rope)


@dataclasses.dataclass
class Plan:
  mode: str  # train | serve
  mesh: dict[str, int]
  parts: dict[str, int]  # name -> bytes per device
  hbm_bytes: int | None = None
  # (low, high) of estimate / compiler peak seen where the model was checked (None: taken as exact)
  ratio: tuple[float, float] | None = None

  @property
  def total(self) -> int:
    return sum(self.parts.values())

  @property
  def fits(self) -> bool | None:
    """Whether the estimate fits the usable HBM (None without an HBM size)."""
    return None if self.hbm_bytes is None else self.total <= USABLE_HBM * self.hbm_bytes

  @property
  def peak_range(self) -> tuple[int, int]:
    """The compiler's peak that the estimate allows, given how far off the model has been."""
    if self.ratio is None:
      return self.total, self.total
    low, high = self.ratio
    return int(self.total / high), int(self.total / low)

  @property
  def verdict(self) -> str | None:
    """"fits" / "does not fit" when the whole `peak_range` does / does not, else "uncertain"."""
    if self.hbm_bytes is None:
      return None
    usable = USABLE_HBM * self.hbm_bytes
    low, high = self.peak_range
    return "fits" if high <= usable else "does not fit" if low > usable else "uncertain"


def plan_training(c, devices: int, hbm_bytes: int | None = None, platform: str = "cpu") -> Plan:
  """Per-device bytes of training run config `c` on `devices` chips of `platform` ("cpu": the model
  fitted to XLA CPU; "tpu": the one fitted to the TPU compiler)."""
  from llama4_jax.model.transformer import check_mesh_fits
  from llama4_jax.train.config import model_config
  sizes = resolve_mesh_sizes(dict(c.mesh), devices)
  cfg = model_config(c)
  check_mesh_fits(cfg, _Sizes(sizes))
  rows = c.microbatches * batch_shards(sizes)
  if c.batch_size % rows:
    raise ValueError(f"batch_size={c.batch_size} is not divisible by microbatches x the batch mesh axes "
                     f"(data x fsdp x expert) = {rows}")
  if c.seq_len % sizes["context"]:
    raise ValueError(f"seq_len={c.seq_len} is not divisible by mesh.context={sizes['context']}")
  weights, trainable = weight_bytes(cfg, sizes)
  parts = {"parameters": weights, "optimizer state": 2 * trainable,
           "gradients": trainable * (2 if c.microbatches > 1 else 1),
           "activations": activation_bytes(c, cfg, sizes, platform)}
  return Plan("train", sizes, parts, hbm_bytes, TPU_ESTIMATE_RATIO if platform == "tpu" else None)


def plan_serving(c, devices: int, batch: int, length: int, hbm_bytes: int | None = None,
                 prompt: int | None = None) -> Plan:
  """Per-device bytes of serving with `batch` slots of `length` tokens (run config `c`'s model), prefilling
  a prompt of `prompt` tokens (default: the engine's 256-token piece).

  Parameters and the KV cache are exact; the activations are an allowance for the prefill of the prompt
  into a fresh row (that row's cache, and per token a few hidden-width and FFN-width buffers and three
  float32 copies of its queries; attention is blockwise, so nothing grows with the square of the length),
  over the tokens one device holds at once: the prompt / context with a context axis (the ring), else up
  to `Llama4.prefill`'s piece of 8,192 tokens; or, when larger, a copy of the global layers' cache (the
  TPU compiler kept one in the decode step of the bf16 Scout configs); plus the slots' logits. Checked
  against the TPU compiler (README, TPU table), e.g. Scout at 262,144 tokens on v5p-8 and at 1,048,576
  context-parallel on v5p-16."""
  from llama4_jax.model.transformer import PREFILL_PIECE as MODEL_PIECE
  from llama4_jax.model.transformer import check_mesh_fits
  from llama4_jax.serving.admission import PREFILL_PIECE
  from llama4_jax.train.config import model_config
  sizes = resolve_mesh_sizes(dict(c.mesh), devices)
  cfg = model_config(c)
  check_mesh_fits(cfg, _Sizes(sizes))
  weights, _ = weight_bytes(cfg, sizes)
  tp, a, context = sizes["tensor"], np.dtype(cfg.dtype).itemsize, sizes.get("context", 1)
  prompt = min(prompt or PREFILL_PIECE, length)
  tokens = -(-prompt // context) if context > 1 else min(prompt, MODEL_PIECE)
  heads = max(1, cfg.num_attention_heads // tp)
  kinds = cfg.layer_kinds()
  ffn = max(cfg.intermediate_size if k.moe else cfg.intermediate_size_mlp for k in kinds) // tp
  per_token = 3 * heads * cfg.head_dim * 4 + 8 * ffn * a + 4 * cfg.hidden_size * a
  prefill = tokens * per_token + kv_cache_bytes(cfg, sizes, 1, length)
  decode = kv_cache_bytes(cfg, sizes, batch, length, rope=False)
  logits = max(1, batch // batch_shards(sizes)) * cfg.vocab_size // tp * 4 * 2
  parts = {"parameters": weights, "kv cache": kv_cache_bytes(cfg, sizes, batch, length),
           "activations": int(max(prefill, decode) + logits)}
  return Plan("serve", sizes, parts, hbm_bytes)


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
  """(total, active per token) base parameters (adapters and int8 scales excluded): a token uses
  num_experts_per_tok of each MoE layer's routed experts."""
  base = cfg.replace(lora_rank=0, base_quant="none")
  total = sum(math.prod(shape) for shape, *_ in _weights(base))
  routed = sum(math.prod(shape) for shape, _, axes, *_ in _weights(base) if "experts" in axes)
  return total, total - routed + routed * cfg.num_experts_per_tok // cfg.num_local_experts


# --- changes that would make a plan fit ---------------------------------------------------------

def changed(c, changes: dict):
  """A copy of run config `c` with dotted fields set ({"mesh.fsdp": -1, "model.remat_policy": "full"})."""
  import copy
  c = copy.deepcopy(c)
  with c.unlocked():
    for key, value in changes.items():
      target = c
      *parents, leaf = key.split(".")
      for p in parents:
        target = target[p]
      target[leaf] = value
  return c


def _candidates(c, mode: str) -> list[tuple[dict, str]]:
  """(changes, why) to try on the same slice, cheapest first."""
  out = []
  if mode == "train":
    if c.model.remat_policy != "full":
      out.append(({"model.remat_policy": "full"}, ""))
    if c.model.attention_impl != "ring" and c.mesh.context == 1 and c.seq_len >= 2048:
      out.append(({"model.attention_impl": "ring"}, "blockwise custom VJP: memory linear in length"))
    for m in (2, 4, 8, 16, 32):
      if c.microbatches < m and c.batch_size % m == 0:
        out.append(({"microbatches": m}, "gradient accumulation"))
    if c.seq_len >= 16384:
      for ctx in (2, 4, 8, 16):
        if c.mesh.context < ctx and c.seq_len % (ctx * 16) == 0:
          out.append(({"mesh.context": ctx, "mesh.fsdp": -1, "mesh.data": 1}, "sequence parallel"))
  if c.model.param_dtype == "float32":
    out.append(({"model.param_dtype": "bfloat16"}, ""))
  if c.model.dtype == "float32":
    out.append(({"model.dtype": "bfloat16"}, ""))
  if c.mesh.data > 1:
    out.append(({"mesh.data": 1, "mesh.fsdp": -1}, "shard instead of replicate"))
  experts = c.model.num_local_experts
  for e in (experts // 4, experts // 2, experts):  # fewer gathered experts per device
    if e > c.mesh.expert and experts % e == 0:
      out.append(({"mesh.expert": e, "mesh.fsdp": -1, "mesh.data": 1}, "expert parallel"))
  if mode == "serve" and c.model.base_quant == "none":
    out.append(({"model.base_quant": "int8"}, "weight-only int8"))
  if c.model.base_quant == "int8" or (mode == "serve" and c.model.base_quant == "none"):
    out.append(({"model.base_quant": "nf4"}, "4-bit NF4"))
  return out


def _flags(changes: dict, why: str = "") -> str:
  text = " ".join(f"--config.{k}={v}" for k, v in changes.items())
  return f"{text} ({why})" if why else text


def suggest(c, devices: int, hbm_bytes: int, plan_fn, generation: str | None = None,
            max_results: int = 6) -> list[tuple[str, Plan]]:
  """Changes (as command-line flags) under which `plan_fn(config, devices, hbm)` fits, each with its
  plan: single changes first; if none fits, all of them together (the largest of each kind); then the
  smallest larger slice of the same TPU generation (up to 64x the chips)."""
  base = plan_fn(c, devices, hbm_bytes)
  found, together, best = [], {}, base.total
  for changes, why in _candidates(c, base.mode):
    try:
      p = plan_fn(changed(c, changes), devices, hbm_bytes)
    except ValueError:  # e.g. a mesh that does not divide the model
      continue
    if p.fits:
      found.append((_flags(changes, why), p))
    try:  # greedily accumulate the changes that help, for when no single one is enough
      q = plan_fn(changed(c, {**together, **changes}), devices, hbm_bytes)
    except ValueError:
      continue
    if q.total < best:
      together, best = {**together, **changes}, q.total
  if not found and together:
    p = plan_fn(changed(c, together), devices, hbm_bytes)
    if p.fits:
      found.append((_flags(together), p))
  if generation:
    _, cores = TPU_GENERATIONS[generation]
    grown = changed(c, {"mesh.fsdp": -1}) if _fixed(c) else c
    scaled = devices
    while scaled < devices * 64:
      scaled *= 2
      try:
        p = plan_fn(grown, scaled, hbm_bytes)
      except ValueError:
        continue
      if p.fits:
        found.append((f"--tpu={generation}-{scaled * cores} ({scaled} chips; mesh "
                      f"{' '.join(f'{k}={v}' for k, v in p.mesh.items() if v > 1)})", p))
        break
  return found[:max_results]


def _fixed(c) -> bool:
  return all(v != -1 for v in c.mesh.values())


def format_bytes(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def describe(plan: Plan) -> str:
  lines = [f"  {name:<17} {format_bytes(value):>12}" for name, value in plan.parts.items()]
  total = f"  {'total':<17} {format_bytes(plan.total):>12}"
  if plan.hbm_bytes is not None:
    usable = USABLE_HBM * plan.hbm_bytes
    total += (f" of {format_bytes(usable)} usable ({USABLE_HBM:.0%} of {format_bytes(plan.hbm_bytes)} "
              f"HBM): {'fits' if plan.fits else 'does NOT fit'}")
  lines.append(total)
  if plan.ratio is not None:
    low, high = plan.peak_range
    verdict = {"fits": "fits even at the top of that range",
               "does not fit": "does not fit even at the bottom of that range",
               "uncertain": "the range crosses the usable HBM: run with --compile for the compiler's peak",
               None: "run with --compile for the compiler's peak"}[plan.verdict]
    off = f"{plan.ratio[0]:.2f}-{plan.ratio[1]:.2f}x"
    lines.append(f"  an estimate: the model has been {off} the TPU compiler's peak, so that peak would be "
                 f"{format_bytes(low)} to {format_bytes(high)}: {verdict}")
  return "\n".join(lines)
