"""Building blocks: RMSNorm, interleaved RoPE, SwiGLU, the embedding lookup.

Axis letters used in this package's einsum strings and shape names:
  B batch, T query length, S key length, D hidden (embed), N query heads, K kv heads, G query heads per
  kv head (N = K * G), H head dim, E experts, F expert/shared width, M dense width, V vocab, L stacked
  layers (superblocks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from llama4_jax.model.linear import declare_linear, weight
from llama4_jax.model.params import param
from llama4_jax.sharding import constrain, logical_to_spec, mesh_axes_of


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype, then times the weight [D]."""

  def __init__(self, dim: int, eps: float, dtype, stack=()):
    self.weight = param(None, (dim,), ("norm",), dtype, init="ones", stack=stack)
    self.eps = eps

  def __call__(self, x):
    return rms_normalize(x, self.eps) * self.weight[...].astype(x.dtype)


def rms_normalize(x, eps: float):
  """Weightless RMS norm over the last axis in float32 (also Llama 4's QK norm)."""
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rope_angles(positions, inv_freq: np.ndarray):
  """cos, sin [B, T, H/2] (float32) for integer positions [B, T]."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTNH, cos_BTh, sin_BTh):
  """Interleaved rotary embedding: pairs (2j, 2j+1) of the head dim rotate as one complex number."""
  dtype = x_BTNH.dtype
  x = x_BTNH.astype(jnp.float32).reshape(*x_BTNH.shape[:-1], -1, 2)  # [B, T, N, H/2, 2]
  re, im = x[..., 0], x[..., 1]
  cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
  out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
  return out.reshape(x_BTNH.shape).astype(dtype)


class SwiGLU(nnx.Module):
  """down(silu(x @ gate) * (x @ up)): the dense MLP (width M, LoRA target "mlp") and the shared expert
  (width F, target "shared")."""

  def __init__(self, cfg, width: int, rngs: nnx.Rngs, target: str, stack=()):
    d, std = cfg.hidden_size, cfg.initializer_range
    for name in ("gate", "up"):
      declare_linear(self, name, rngs, cfg, (d, width), ("embed", "mlp"), 1, target, std, stack)
    declare_linear(self, "down", rngs, cfg, (width, d), ("mlp", "embed"), 1, target, std, stack)

  def __call__(self, x_BTD, mesh=None, key=None):
    g_BTM = weight(self, "gate")("BTD,DM->BTM", x_BTD, key, "gate")
    u_BTM = weight(self, "up")("BTD,DM->BTM", x_BTD, key, "up")
    h_BTM = constrain(jax.nn.silu(g_BTM) * u_BTM, mesh, ("batch", "seq", "mlp"))
    return weight(self, "down")("BTM,MD->BTD", h_BTM, key, "down")


def embed_lookup(table_VD, ids_BT, mesh, dtype):
  """Rows of the embedding table [V, D] for token ids [B, T] -> [B, T, D] in `dtype`.

  On a mesh the table stays split along D (the "embed" rule: fsdp x expert x context) and the ids travel
  instead: each device gathers the ids of the devices sharing its D-group, looks up its D-slice of their
  rows, and one all-to-all hands every device its own tokens' full rows. The backward pass scatters into
  the local [V, D/S] slice (float32, S times smaller) rather than building the whole table's gradient on
  every device and all-reducing it, which is what gathering the table did (Scout: 3.9 GiB per chip).
  """
  axes = tuple(a for a in mesh_axes_of("embed") if mesh is not None and mesh.shape.get(a, 1) > 1)
  if not axes:
    table = constrain(table_VD, mesh, ("vocab", None))  # gather the table, not the tokens
    return constrain(jnp.take(table, ids_BT, axis=0).astype(dtype), mesh, ("batch", "seq", "act_embed"))
  ids_spec = logical_to_spec(("batch", "seq"), mesh, ids_BT.shape, strict=False)

  def local(table_vd, ids_bt):
    every = jax.lax.all_gather(ids_bt, axes)  # [S, b, t]: the ids of each device of the D-group
    rows = jnp.take(table_vd, every, axis=0).astype(dtype)  # [S, b, t, D/S]
    return jax.lax.all_to_all(rows, axes, 0, rows.ndim - 1, tiled=True)[0]  # my tokens, every D-slice

  out_spec = P(*ids_spec, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(None, axes), ids_spec), out_specs=out_spec,
                       check_vma=False)(table_VD, ids_BT)
