"""Low-rank adapters (LoRA) and weight-only int8 / NF4 for the model's linear weights.

A linear weight W is declared by `declare_linear`, which also declares what the config asks for:
- `<name>_scale` when `base_quant` is "int8": W is stored as int8 with one float32 scale per output
  channel (absmax / 127 over the input dims);
  or "nf4" (QLoRA's 4-bit NormalFloat, Dettmers et al. 2023): W is stored as 4-bit codes into
  `NF4_VALUES`, two per byte (uint8; a block's halves share bytes), with one absmax scale per block of `NF4_BLOCK` = 64 consecutive
  weights along the last input dim (`nf4_block`), kept in bfloat16 rather than double-quantized (8-bit
  scales would save 0.125 bits of the 4.25 per weight, 3% of the base, for a second lookup in every
  dequantization and block-of-256 constraints on the sharded dims). Codes and scales keep the kernel's
  dims and logical axes, the last input dim shrunk to pairs (codes) and to blocks (scales).
  The forward pass dequantizes one layer at a time (inside the layer scan).
- `<name>_lora_a` [*groups, *in, r] and `<name>_lora_b` [*groups, r, *out] (zeros at init) when the weight's
  target group is in `lora_targets` and `lora_rank > 0`. The forward pass adds
  (alpha / r) * (dropout(x) @ A) @ B to x @ W, so at init the adapted model equals the base model.
  Adapters are float32 whatever the base's dtype: they are the trainable (master) weights.

Targets group the weights: "q", "k", "v", "o" (attention), "mlp" (dense SwiGLU gate/up/down), "shared"
(the shared expert) and "experts" (the routed experts: stacked per-expert adapters [E, D, r], [E, r, F]).
The embedding, router, norms and LM head are never adapted or quantized.

`Weight` is the pytree a forward pass uses; every linear call site goes through it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax.model.kernels.grouped_matmul import grouped_matmul
from llama4_jax.model.ops import dot
from llama4_jax.model.params import param
from llama4_jax.sharding import LOOSE

ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
SCALE_SUFFIX = "_scale"


def is_adapter(path: Sequence) -> bool:
  """Whether a parameter path (tuple of keys) names a LoRA adapter weight."""
  return str(path[-1]).endswith(ADAPTER_SUFFIXES)


# NF4: the 16 values of a 4-bit NormalFloat (the QLoRA paper's construction: quantiles of N(0, 1),
# 8 on the positive side and 7 on the negative side plus an exact zero, scaled to [-1, 1]; the test
# rebuilds them from that definition).
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
NF4_BLOCK = 64


def nf4_block(n: int) -> int:
  """Block size of NF4 scales along an input dim of size n: 64 when it divides n (all of Llama 4's dims),
  else the largest even divisor of n below 64 (small test models: 32 for a head_dim of 32, 48 for 96)."""
  for b in range(NF4_BLOCK, 1, -2):
    if n % b == 0:
      return b
  raise ValueError(f"an NF4 weight needs an even last input dim, got {n}; use base_quant='int8' for this "
                   "model")


def quantize_nf4(w, axis: int):
  """(uint8 codes, bfloat16 scales) of `w` in NF4 with blocks along `axis` (the last input dim).

  Each block of `nf4_block(n)` = b weights is divided by its absmax and each weight takes the code of the
  nearest of `NF4_VALUES` (ties to the lower). A block's codes pair up halves: byte j of the block holds
  weight j in its low nibble and weight j + b / 2 in its high one, so unpacking is a concatenation, not an
  interleave (which cost the TPU a relayout copy of every dequantized weight). Shapes: codes
  [..., n // 2, ...], scales [..., n // b, ...]."""
  wf = jnp.asarray(w, jnp.float32)
  shape, n = wf.shape, wf.shape[axis]
  b = nf4_block(n)
  blocks = wf.reshape(shape[:axis] + (n // b, b) + shape[axis + 1:])
  absmax = jnp.max(jnp.abs(blocks), axis=axis + 1, keepdims=True)
  normed = blocks / jnp.where(absmax == 0, 1.0, absmax)
  table = jnp.asarray(NF4_VALUES, jnp.float32)
  mids = (table[1:] + table[:-1]) / 2
  codes = jnp.searchsorted(mids, normed, side="left", method="compare_all").astype(jnp.uint8)
  lo, hi = jnp.split(codes, 2, axis=axis + 1)  # [..., n // b, b // 2, ...] each
  packed = (lo | (hi << 4)).reshape(shape[:axis] + (n // 2,) + shape[axis + 1:])
  return packed, jnp.squeeze(absmax, axis + 1).astype(jnp.bfloat16)


def packed_axis(codes, scale) -> int:
  """The dim NF4 codes and scales are blocked along: the one where pairs and blocks differ in size."""
  for i, (c, s) in enumerate(zip(codes.shape, scale.shape)):
    if c != s:
      return i
  raise ValueError(f"NF4 codes {codes.shape} and scales {scale.shape} have no blocked dim")


def dequantize_nf4(codes, scale, dtype):
  """The weight NF4 `codes` (uint8, two per byte) and block `scale`s stand for, in `dtype`."""
  axis = packed_axis(codes, scale)
  shape = codes.shape
  n, nb = 2 * shape[axis], scale.shape[axis]
  blocks = codes.reshape(shape[:axis] + (nb, n // nb // 2) + shape[axis + 1:])
  values = _nf4_lookup(jnp.concatenate([blocks & 15, blocks >> 4], axis=axis + 1), dtype)  # [.., nb, b, ..]
  w = values * jnp.expand_dims(scale.astype(dtype), axis + 1)
  return w.reshape(shape[:axis] + (n,) + shape[axis + 1:])


def _nf4_lookup(nibbles, dtype):
  """NF4_VALUES[nibbles] in `dtype` as a tree of 15 selects on the code's bits: elementwise, so XLA fuses it
  into the dequantization. (A gather from the 16-entry table made the TPU compiler materialize int32
  indices of whole weights: 0.31 GiB buffers per expert weight of a Scout layer on a v5e-8.)"""
  level = [jnp.asarray(v, dtype) for v in NF4_VALUES]
  for bit in range(4):
    on = (nibbles & (1 << bit)) != 0
    level = [jnp.where(on, hi, lo) for lo, hi in zip(level[::2], level[1::2])]
  return level[0]


def quantize(method: str, w, lead: int, n_in: int):
  """(kernel, scale) of `w` [*lead, *in (n_in dims), *out] held as `method` ("int8" or "nf4")."""
  if method == "int8":
    return quantize_int8(w, lead, n_in)
  if method == "nf4":
    return quantize_nf4(w, lead + n_in - 1)
  raise ValueError(f"base_quant {method!r}: choose 'int8' or 'nf4'")


def quant_of(kernel, scale) -> str:
  """How a base kernel is held: "none", "int8" or "nf4"."""
  return "none" if scale is None else "nf4" if jnp.dtype(kernel.dtype) == jnp.uint8 else "int8"


def quantize_int8(w, n_groups: int, n_in: int):
  """(int8 weight, float32 scale [*groups, *out]) with per-output-channel absmax scaling."""
  wf = w.astype(jnp.float32)
  in_axes = tuple(range(n_groups, n_groups + n_in))
  scale = jnp.max(jnp.abs(wf), axis=in_axes) / 127.0
  scale = jnp.where(scale == 0, 1.0, scale)
  q = jnp.clip(jnp.round(wf / jnp.expand_dims(scale, in_axes)), -127, 127).astype(jnp.int8)
  return q, scale


def declare_linear(module: nnx.Module, name: str, rngs: nnx.Rngs | None, cfg, shape: Sequence[int],
                   axes: Sequence[str | None], n_in: int, target: str | None, std: float, stack=(),
                   n_groups: int = 0) -> None:
  """Declares linear weight `name` of `module`: shape [*groups, *in, *out] (n_groups leading group dims,
  then n_in contracted dims), with its int8 / NF4 scale and LoRA adapter when `cfg` asks for them."""
  w = param(rngs, shape, axes, cfg.param_dtype, std=std, stack=stack)
  lead = len(stack)
  g_shape, in_shape = tuple(shape[:n_groups]), tuple(shape[n_groups:n_groups + n_in])
  out_shape = tuple(shape[n_groups + n_in:])
  part_axes = linear_part_axes(axes, n_in, n_groups, cfg.base_quant)
  if cfg.base_quant != "none" and target is not None:
    q, scale = quantize(cfg.base_quant, w[...], lead + n_groups, n_in)
    w = nnx.Param(q, logical_axes=w.get_metadata()["logical_axes"])
    # NF4 scales: a block dim the mesh does not divide is replicated (they are 1/16 of the codes' bytes)
    setattr(module, name + SCALE_SUFFIX, nnx.Param(
        scale, logical_axes=("layers",) * lead + part_axes["scale"], **{LOOSE: cfg.base_quant == "nf4"}))
  setattr(module, name, w)
  if cfg.lora_rank and target in cfg.lora_targets:
    r = cfg.lora_rank
    setattr(module, name + "_lora_a", param(rngs, g_shape + in_shape + (r,), part_axes["lora_a"],
                                            "float32", std=math.prod(in_shape) ** -0.5, stack=stack,
                                            stream="lora"))
    setattr(module, name + "_lora_b", param(rngs, g_shape + (r,) + out_shape, part_axes["lora_b"],
                                            "float32", init="zeros", stack=stack))
  module.lora_scale = cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0
  module.lora_dropout = cfg.lora_dropout
  # (name, leading dims before the input dims incl. the stack, input dims): what `adapt_model` walks
  module.linears = getattr(module, "linears", ()) + ((name, lead + n_groups, n_in),)


def linear_part_axes(axes: Sequence[str | None], n_in: int, n_groups: int = 0,
                     quant: str = "int8") -> dict[str, tuple]:
  """Logical axes of the parts of a linear weight whose kernel has `axes` [*groups, *in, *out]: the
  kernel, its scale (int8: [*groups, *out]; NF4: the kernel's dims, blocked) and the adapter
  A [*groups, *in, r], B [*groups, r, *out]."""
  g, i, o = tuple(axes[:n_groups]), tuple(axes[n_groups:n_groups + n_in]), tuple(axes[n_groups + n_in:])
  scale = tuple(axes) if quant == "nf4" else g + o
  return {"kernel": tuple(axes), "scale": scale, "lora_a": g + i + (None,), "lora_b": g + (None,) + o}


def contract(eq: str, x, w):
  """jnp.einsum(eq, x, w) for one-letter labels with no repeats, contracting in the kernel's dim order.

  jnp.einsum orders multi-dim contractions its own way: "BTNH,NHD->BTD" contracts (H, N), so XLA copies
  both the activation and the kernel into that order on every call (a transposed copy of each output
  projection per layer and step). Contracting in the order the dims lie in `w` keeps both as bitcasts.
  """
  ins, out = eq.split("->")
  xs, ws = ins.split(",")
  batch = [c for c in xs if c in ws and c in out]
  contracted = [c for c in ws if c in xs and c not in out]
  y = dot(x, w, (([xs.index(c) for c in contracted], [ws.index(c) for c in contracted]),
                 ([xs.index(c) for c in batch], [ws.index(c) for c in batch])))
  got = "".join(batch) + "".join(c for c in xs if c not in ws) + "".join(c for c in ws if c not in xs)
  return y if got == out else jnp.transpose(y, [got.index(c) for c in out])


def weight(module: nnx.Module, name: str, n_groups: int = 0) -> "Weight":
  """The `Weight` pytree of linear weight `name` of `module` (see `declare_linear`)."""
  def get(suffix):
    v = getattr(module, name + suffix, None)
    return None if v is None else v.get_value()
  return Weight(get(""), get(SCALE_SUFFIX), get("_lora_a"), get("_lora_b"), n_groups,
                module.lora_scale, module.lora_dropout)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["kernel", "scale", "lora_a", "lora_b"],
                   meta_fields=["n_groups", "lora_scale", "dropout"])
@dataclasses.dataclass(frozen=True)
class Weight:
  """A linear weight as the forward pass sees it: base kernel [*groups, *in, *out] (maybe int8 with
  `scale` [*groups, *out], or NF4 codes with block scales; see the module doc) and an optional adapter
  A [*groups, *in, r], B [*groups, r, *out]."""
  kernel: jax.Array
  scale: jax.Array | None
  lora_a: jax.Array | None
  lora_b: jax.Array | None
  n_groups: int = 0
  lora_scale: float = 0.0
  dropout: float = 0.0

  def axes(self, kernel_axes: Sequence[str | None], n_in: int) -> "Weight":
    """This weight's logical axes: a `Weight` holding, for each array it has, that array's axes
    (see `linear_part_axes`), to map over together with it (`jax.tree.map(f, w, w.axes(...))`)."""
    parts = linear_part_axes(kernel_axes, n_in, self.n_groups, quant_of(self.kernel, self.scale))
    return dataclasses.replace(self, **{k: None if getattr(self, k) is None else v for k, v in parts.items()})

  def narrowed(self, dtype) -> "Weight":
    """This weight with a float kernel wider than `dtype` cast to it (what the matmul would cast it to;
    int8 / NF4 kernels and adapters unchanged): to move or gather it at the compute dtype's size."""
    k = self.kernel
    if jnp.issubdtype(k.dtype, jnp.floating) and jnp.dtype(k.dtype).itemsize > jnp.dtype(dtype).itemsize:
      return dataclasses.replace(self, kernel=k.astype(dtype))
    return self

  def value(self, dtype):
    """The dequantized base kernel in `dtype` (the adapter excluded)."""
    if self.scale is None:
      return self.kernel.astype(dtype)
    if quant_of(self.kernel, self.scale) == "nf4":
      return dequantize_nf4(self.kernel, self.scale, dtype)
    n_in = self.kernel.ndim - self.scale.ndim
    shape = self.scale.shape[:self.n_groups] + (1,) * n_in + self.scale.shape[self.n_groups:]
    return self.kernel.astype(dtype) * self.scale.reshape(shape).astype(dtype)

  def merged(self, dtype):
    """Base + (alpha / r) * A @ B as one dense kernel in `dtype` (for export and merged sampling)."""
    w = self.value(jnp.float32)
    if self.lora_a is not None:
      g = self.n_groups
      a = self.lora_a.reshape(self.lora_a.shape[:g] + (-1, self.lora_a.shape[-1]))
      b = self.lora_b.reshape(self.lora_b.shape[:g + 1] + (-1,))
      delta = jnp.einsum("...ir,...ro->...io", a, b) * self.lora_scale
      w = w + delta.reshape(w.shape)
    return w.astype(dtype)

  def _base(self, apply, x, *extra):
    """apply(x, W, *extra) for the dequantized (or cast) base kernel W; see `_converted_apply`."""
    if self.scale is None and self.kernel.dtype == x.dtype:
      return apply(x, self.kernel, *extra)
    return _converted_apply(apply, self.n_groups, x, self.kernel, self.scale, *extra)

  def _drop(self, x, key, tag: str):
    """Inverted dropout on the adapter's input. The mask uses 8 random bits per element (the drop
    probability rounded to a multiple of 1/256), a quarter of the random words a float draw takes: the
    mask generation is most of what dropout costs."""
    if key is None or self.dropout <= 0:
      return x
    key = jax.random.fold_in(key, zlib.crc32(tag.encode()) & 0x7FFFFFFF)
    threshold = max(1, round(self.dropout * 256))
    words = jax.random.bits(key, (-(-x.size // 4),), jnp.uint32)
    bytes_ = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[:x.size].reshape(x.shape)
    keep = bytes_ >= threshold
    return jnp.where(keep, x * (256.0 / (256 - threshold)), 0).astype(x.dtype)

  def __call__(self, eq: str, x, key=None, tag: str = ""):
    """einsum(eq, x, W) for W = dequantized base, plus the low-rank update when adapted.

    `eq` names x's and the kernel's dims (e.g. "BTD,DNH->BTNH"); `key` (or None) enables LoRA dropout,
    decorrelated per weight by `tag`."""
    y = self._base(lambda x, w: contract(eq, x, w), x)
    if self.lora_a is None:
      return y
    ins, out = eq.split("->")
    xs, ws = ins.split(",")
    assert "r" not in eq, eq
    g = self.n_groups
    n_in = self.lora_a.ndim - g - 1
    groups, ins, outs = ws[:g], ws[g:g + n_in], ws[g + n_in:]
    mid = "".join(c for c in xs if c not in ins) + "r"
    a_sub, b_sub = groups + ins + "r", groups + "r" + outs
    z = jnp.einsum(f"{xs},{a_sub}->{mid}", self._drop(x, key, tag), self.lora_a.astype(x.dtype))
    return y + self.lora_scale * jnp.einsum(f"{mid},{b_sub}->{out}", z, self.lora_b.astype(x.dtype))

  def grouped(self, x_AD, sizes_E, impl: str, key=None, tag: str = ""):
    """Grouped matmul over experts (rows of x sorted by expert, `sizes_E` rows each), adapter included."""
    dt = x_AD.dtype
    y = self._base(lambda x, w, sizes: grouped_matmul(x, w, sizes, impl), x_AD, sizes_E)
    if self.lora_a is None:
      return y
    z = grouped_matmul(self._drop(x_AD, key, tag), self.lora_a.astype(dt), sizes_E, impl)
    return y + self.lora_scale * grouped_matmul(z, self.lora_b.astype(dt), sizes_E, impl)

  def gathered(self, x_NkD, idx_Nk, key=None, tag: str = ""):
    """Per (token, chosen expert) matmul with only the chosen experts' weights read (decoding)."""
    dt = x_NkD.dtype
    scale = None if self.scale is None else self.scale[idx_Nk]
    w = Weight(self.kernel[idx_Nk], scale, None, None, idx_Nk.ndim).value(dt)
    y = dot(x_NkD, w, (((2,), (2,)), ((0, 1), (0, 1))))
    if self.lora_a is None:
      return y
    z = jnp.einsum("NkD,NkDr->Nkr", self._drop(x_NkD, key, tag), self.lora_a[idx_Nk].astype(dt))
    return y + self.lora_scale * jnp.einsum("Nkr,NkrF->NkF", z, self.lora_b[idx_Nk].astype(dt))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _converted_apply(apply, n_groups: int, x, kernel, scale, *extra):
  """apply(x, W, *extra), W = the kernel dequantized (int8 / NF4) or cast to x's dtype; `extra` are
  non-differentiable arrays (group sizes). The backward pass rebuilds W from the kernel instead of
  keeping it: left to autodiff, every layer's full-precision W would stay alive from the forward to the
  backward pass, undoing the quantized / bf16 base's saving."""
  return apply(x, _dequantize(kernel, scale, n_groups, x.dtype), *extra)


def _dequantize(kernel, scale, n_groups: int, dtype):
  return Weight(kernel, scale, None, None, n_groups).value(dtype)


def _converted_fwd(apply, n_groups, x, kernel, scale, *extra):
  return _converted_apply(apply, n_groups, x, kernel, scale, *extra), (x, kernel, scale, extra)


def _converted_bwd(apply, n_groups, res, dy):
  x, kernel, scale, extra = res
  _, vjp = jax.vjp(lambda x, w: apply(x, w, *extra), x, _dequantize(kernel, scale, n_groups, x.dtype))
  dx, dw = vjp(dy)
  none = (None,) * len(extra)
  if scale is not None:  # a quantized base is frozen: no gradient for it (nor for its scale)
    return (dx, None, None) + none
  return (dx, dw.astype(kernel.dtype), None) + none


_converted_apply.defvjp(_converted_fwd, _converted_bwd)


def dropout_key(key, *tags: int):
  """`key` folded with integer tags (layer indices), or None when dropout is off."""
  if key is None:
    return None
  for t in tags:
    key = jax.random.fold_in(key, t)
  return key
