"""Decode attention over a KV cache split along the sequence over the mesh's `context` axis.

A context-parallel prefill leaves each global (NoPE) layer's cache split over the context devices (slot
s on device s // (S / devices)), so a long context's cache never has to fit on one chip. A decode step
then runs inside `shard_map`: the device holding a row's slot (position % S) writes the new key and value
in place (a scatter into its own shard; the others drop the update), every device attends the query
(replicated over `context`) to its shard, and the partial results merge by log-sum-exp: the global max of
the scores (`pmax`), then the rescaled sums and weighted values (`psum`). Per step and layer that moves
[B, N] statistics and [B, N, H] values between devices, never the cache. (Left to GSPMD, the scatter and
the layer-indexed read of the stacked cache made it gather the whole cache on every chip: 24 GiB per layer
stack for Scout at 1M tokens on v5p-16.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llama4_jax.model.ops import finite_or_zero
from llama4_jax.sharding import logical_to_spec

AXIS = "context"


def split_decode(q_BNH, k_BKH, v_BKH, pos_B, arrays: dict, at: tuple, mesh: Mesh,
                 chunk_size: int | None = None):
  """Stores rows 0..B-1's new key and value at slot pos % S of `arrays` ({"k", "v": [(L,) R, K, S, H],
  "pos": [(L,) R, S]}, R >= B rows; `at` = (layer index,) for a stacked cache, else ()) and attends each
  row's query over its cache. Returns (out [B, N, H], arrays)."""
  b, n, h = q_BNH.shape
  rows, size = arrays["pos"].shape[-2], arrays["pos"].shape[-1]
  if rows > b:  # the serving engine steps its first B rows: the others attend nothing and write nowhere
    pad = lambda x, value=0: jnp.pad(x, [(0, rows - b)] + [(0, 0)] * (x.ndim - 1),  # noqa: E731
                                     constant_values=value)
    q_BNH, k_BKH, v_BKH, pos_B = pad(q_BNH), pad(k_BKH), pad(v_BKH), pad(pos_B, -1)
  lead = (None,) * len(at)
  spec = lambda axes, x: logical_to_spec(axes, mesh, x.shape, strict=False)  # noqa: E731
  in_specs = (spec(("batch", "heads", None), q_BNH), spec(("batch", "kv_heads", None), k_BKH),
              spec(("batch", "kv_heads", None), v_BKH), spec(("batch",), pos_B),
              {"k": spec(lead + ("batch", "kv_heads", "kv_seq", None), arrays["k"]),
               "v": spec(lead + ("batch", "kv_heads", "kv_seq", None), arrays["v"]),
               "pos": spec(lead + ("batch", "kv_seq"), arrays["pos"])},
              jax.sharding.PartitionSpec())
  out_specs = (in_specs[0], in_specs[4])
  layer = at[0] if at else jnp.int32(0)

  def local(q, kn, vn, pos, cache, layer):
    shard = cache["pos"].shape[-1]
    first = jax.lax.axis_index(AXIS) * shard
    slot = jnp.mod(pos, size) - first
    slot = jnp.where((pos >= 0) & (slot >= 0) & (slot < shard), slot, shard)  # elsewhere: dropped
    r = jnp.arange(q.shape[0])
    where = (layer,) if at else ()
    put = lambda a, new, tail: a.at[where + (r, ..., slot) + tail].set(  # noqa: E731
        new.astype(a.dtype), mode="drop")
    cache = {"k": put(cache["k"], kn, (slice(None),)), "v": put(cache["v"], vn, (slice(None),)),
             "pos": put(cache["pos"], pos, ())}
    k, v, kpos = (cache[name][layer] if at else cache[name] for name in ("k", "v", "pos"))
    kvh = k.shape[1]
    qg = q.reshape(q.shape[0], kvh, q.shape[1] // kvh, h).astype(k.dtype)
    s = jnp.einsum("BKGH,BKSH->BKGS", qg, k, preferred_element_type=jnp.float32) * h ** -0.5
    mask = (kpos >= 0) & (kpos <= pos[:, None])
    if chunk_size is not None:
      mask &= kpos // chunk_size == pos[:, None] // chunk_size
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    m = jax.lax.pmax(jnp.max(s, axis=-1), AXIS)  # [B, K, G]: the max over every shard
    p = jnp.exp(s - finite_or_zero(m)[..., None])
    l = jax.lax.psum(jnp.sum(p, axis=-1), AXIS)
    o = jax.lax.psum(jnp.einsum("BKGS,BKSH->BKGH", p.astype(v.dtype), v, preferred_element_type=jnp.float32),
                     AXIS)
    out = o / jnp.where(l == 0, 1.0, l)[..., None]
    return out.reshape(q.shape).astype(q.dtype), cache

  out, arrays = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
      q_BNH, k_BKH, v_BKH, pos_B, arrays, layer)
  return out[:b], arrays
