"""Llama 4 grouped-query self-attention: RoPE layers (chunked causal, QK norm) and NoPE layers (full causal,
temperature tuning). Reproduces transformers' `Llama4TextAttention` (see shared/design/LLAMA4.md).

Masks are built from positions and segment ids, so packed documents (positions restarting at 0, one
segment id per document) never attend across a boundary and each chunk is counted from its document's start.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax.config import ModelConfig
from llama4_jax.model import blockwise
from llama4_jax.model.blockwise import extend_attention, prefill_attention
from llama4_jax.model.layers import apply_rope, rms_normalize
from llama4_jax.model.linear import declare_linear, weight
from llama4_jax.model.platform import target_platform
from llama4_jax.model.ring_attention import RingContext, from_zigzag, make_plan, ring_attention, visible
from llama4_jax.model.split_decode import split_decode
from llama4_jax.sharding import constrain

# Key/query block of the ring's XLA kernel in a context-parallel prefill (training keeps make_plan's 128,
# which the ring benchmark's memory figures were measured with). On 8 simulated CPU devices a 131,072-token
# prefill peaked at 12.6 GB RSS with 128-token blocks, 7.7 GB with 256, 5.9 GB with 512, at 1,044 / 1,060 /
# 769 tokens/s (`benchmarks/long_context_inference.py`); the program's own buffers are 570 MB a device
# either way: the rest is held by the XLA:CPU runtime while loops run (`benchmarks/xla_cpu_loop_memory.py`).
RING_PREFILL_BLOCK = 256


def attention_mask(positions_BT, segment_ids_BT, chunk_size: int | None, index_BT=None):
  """Boolean [B, T, S] (S = T): key s visible to query t (see `ring_attention.visible`).

  Causal by token index (default: the place in the row) within one segment; with `chunk_size` C, also
  only keys in the query's chunk (position // C), as on Llama 4's RoPE layers.
  """
  if index_BT is None:
    index_BT = jnp.broadcast_to(jnp.arange(positions_BT.shape[1]), positions_BT.shape)
  return visible(index_BT, positions_BT, segment_ids_BT, index_BT, positions_BT, segment_ids_BT,
                 chunk_size)


def _query_block(t: int) -> int:
  """Query block length: 128 (about 4x faster on CPU than one [T, T] block, which spills the caches),
  growing for long sequences so the unrolled loop stays at <= 32 blocks; t itself if nothing divides."""
  qb = max(128, t // 32)
  return qb if t % qb == 0 and t > qb else t


def dense_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, mesh=None):
  """Causal softmax attention in float32 with GQA (query head n reads kv head n // G) -> [B, T, N, H].

  Queries are processed in blocks; block i sees only keys [0, end of block i), which is every key the
  causal mask can allow, so the upper triangle is never computed. Rows with no visible key give zeros.
  """
  t = q_BTNH.shape[1]
  qb = _query_block(t)
  outs = [masked_attention(q_BTNH[:, s:s + qb], k_BSKH[:, :s + qb], v_BSKH[:, :s + qb],
                           mask_BTS[:, s:s + qb, :s + qb]) for s in range(0, t, qb)]
  return jnp.concatenate(outs, axis=1)


def masked_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
  """Softmax attention (float32) of queries [B, T, N, H] over keys [B, S, K, H] under any mask [B, T, S].

  Query heads are folded next to the query axis (M = T*G) so each kv head is one plain matmul, the
  layout XLA CPU runs fastest. Rows with no visible key give zeros, never NaN.
  """
  b, t, n, h = q_BTNH.shape
  kv = k_BSKH.shape[2]
  g = n // kv
  k_BKSH = k_BSKH.transpose(0, 2, 1, 3)
  v_BKSH = v_BSKH.transpose(0, 2, 1, 3)
  q_BKMH = q_BTNH.reshape(b, t, kv, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, h)
  s = jnp.einsum("BKMH,BKSH->BKMS", q_BKMH, k_BKSH, preferred_element_type=jnp.float32)
  s = s.reshape(b, kv, t, g, -1) * (h ** -0.5)
  s = jnp.where(mask_BTS[:, None, :, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = (p / jnp.where(denom == 0, 1.0, denom)).reshape(b, kv, t * g, -1)
  o = jnp.einsum("BKMS,BKSH->BKMH", p.astype(v_BSKH.dtype), v_BKSH, preferred_element_type=jnp.float32)
  return o.reshape(b, kv, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h).astype(q_BTNH.dtype)


def decode_attention(q_BNH, k_BKSH, v_BKSH, mask_BS):
  """One query per row over a KV cache [B, K, S, H] -> [B, N, H] (float32 softmax; GQA).

  Two batched matmuls over (row, kv head), each head's query group as the matmul rows: the cache is kept
  kv-head-major so XLA reads it in place. (In a [B, S, K, H] cache, matmuls made XLA copy the cache
  every step, and multiply-reduces ran 2-4x slower than these.) Rows with no visible key give zeros,
  never NaN.
  """
  b, n, h = q_BNH.shape
  kv = k_BKSH.shape[1]
  q_BKGH = q_BNH.reshape(b, kv, n // kv, h).astype(k_BKSH.dtype)
  s_BKGS = jnp.einsum("BKGH,BKSH->BKGS", q_BKGH, k_BKSH, preferred_element_type=jnp.float32) * (h ** -0.5)
  s_BKGS = jnp.where(mask_BS[:, None, None, :], s_BKGS, -jnp.inf)
  m = jnp.max(s_BKGS, axis=-1, keepdims=True)
  p = jnp.exp(s_BKGS - jnp.where(jnp.isfinite(m), m, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0, 1.0, denom)
  o_BKGH = jnp.einsum("BKGS,BKSH->BKGH", p.astype(v_BKSH.dtype), v_BKSH, preferred_element_type=jnp.float32)
  return o_BKGH.reshape(b, n, h).astype(q_BNH.dtype)


class Attention(nnx.Module):
  """q [D, N, H], k/v [D, K, H], o [N, H, D]: bias-free projections, x @ W layouts."""

  def __init__(self, cfg: ModelConfig, rope: bool, rngs: nnx.Rngs, stack=()):
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    std = cfg.initializer_range
    declare_linear(self, "q", rngs, cfg, (d, n, h), ("embed", "heads", "head_dim"), 1, "q", std, stack)
    declare_linear(self, "k", rngs, cfg, (d, k, h), ("embed", "kv_heads", "head_dim"), 1, "k", std, stack)
    declare_linear(self, "v", rngs, cfg, (d, k, h), ("embed", "kv_heads", "head_dim"), 1, "v", std, stack)
    declare_linear(self, "o", rngs, cfg, (n, h, d), ("heads", "head_dim", "embed"), 2, "o", std, stack)
    self.rope = rope
    self.qk_norm = cfg.use_qk_norm and rope
    self.eps = cfg.rms_norm_eps
    self.chunk_size = cfg.attention_chunk_size if rope else None
    self.temperature_tuning = cfg.attn_temperature_tuning and not rope
    self.floor_scale, self.attn_scale = cfg.floor_scale, cfg.attn_scale

  def _project(self, x_BTD, positions_BT, rope_cos_sin, mesh, key=None):
    """q [B, T, N, H], k, v [B, T, K, H] with RoPE + QK norm (RoPE layers) or temperature (NoPE)."""
    dt = x_BTD.dtype
    q = weight(self, "q")("BTD,DNH->BTNH", x_BTD, key, "q")
    k = weight(self, "k")("BTD,DKH->BTKH", x_BTD, key, "k")
    v = weight(self, "v")("BTD,DKH->BTKH", x_BTD, key, "v")
    q = constrain(q, mesh, ("batch", "seq", "heads", "head_dim"))
    k = constrain(k, mesh, ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(v, mesh, ("batch", "seq", "kv_heads", "head_dim"))
    if self.rope:
      q, k = apply_rope(q, *rope_cos_sin), apply_rope(k, *rope_cos_sin)
      if self.qk_norm:  # after RoPE, weightless, over H
        q, k = rms_normalize(q, self.eps), rms_normalize(k, self.eps)
    elif self.temperature_tuning:  # identity below position floor_scale - 1
      p = positions_BT.astype(jnp.float32)
      scale = jnp.log1p(jnp.floor((p + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
      q = (q.astype(jnp.float32) * scale[:, :, None, None]).astype(dt)
    return q, k, v

  def _decode(self, q_B1NH, k_B1KH, v_B1KH, pos_B, cache, mesh=None, key=None):
    """One token per row against the cache: a layer's dict, or a `StackedCache` (the scanned layers'
    arrays and this layer's index). The cache may hold more rows than the batch (the serving engine
    steps only its first B): only rows 0..B-1 are written and read, in place. A NoPE layer's cache split
    over a `context` axis goes through `split_decode` (each device its shard, merged by log-sum-exp)."""
    b = q_B1NH.shape[0]
    stacked = isinstance(cache, StackedCache)
    arrays, at = (cache.arrays, (cache.index,)) if stacked else (cache, ())
    context = 1 if mesh is None else mesh.shape.get("context", 1)
    if context > 1 and self.chunk_size is None and arrays["pos"].shape[-1] % context == 0:  # split
      out, arrays = split_decode(q_B1NH[:, 0], k_B1KH[:, 0], v_B1KH[:, 0], pos_B, arrays, at, mesh)
      return self._out(out[:, None], key), StackedCache(arrays, cache.index) if stacked else arrays
    arrays = store_decode(arrays, k_B1KH, v_B1KH, pos_B, at)
    rows = {n: a[at][:b] for n, a in arrays.items()}

    def attend(width):  # over the cache's first `width` slots
      def run(q_BNH, k_BKSH, v_BKSH, kpos_BS, qpos_B):
        mask = cache_mask(kpos_BS[:, :width], qpos_B, self.chunk_size)
        return decode_attention(q_BNH, k_BKSH[:, :, :width], v_BKSH[:, :, :width], mask)
      return run

    # Slots past the last position of every row are empty (slot = position % S): read only the smallest
    # width that holds the filled ones.
    size = rows["pos"].shape[-1]
    widths = read_widths(size)
    filled = jnp.minimum(jnp.max(pos_B) + 1, size)
    which = jnp.searchsorted(jnp.asarray(widths[:-1], jnp.int32), filled)  # widths below `filled`
    out = jax.lax.switch(which, [attend(w) for w in widths], q_B1NH[:, 0], rows["k"], rows["v"], rows["pos"],
                         pos_B)
    return self._out(out[:, None], key), StackedCache(arrays, cache.index) if stacked else arrays

  def _out(self, out_BTNH, key=None):
    return weight(self, "o")("BTNH,NHD->BTD", out_BTNH, key, "o")

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, rope_cos_sin, mesh=None, cache=None,
               mode=None, ring: RingContext | None = None, key=None):
    """Attention over the given tokens; with a KV cache (see `init_kv_cache`), `mode` is "prefill"
    (attend within the prompt, then store it), "extend" (more of a prompt whose start is cached: attend
    over those entries and the new tokens, then store them) or "decode" (store one token per row, attend
    over the cache). With `ring` (no cache), ring attention over the mesh's context axis. `key` (or
    None): LoRA dropout. Returns (out [B, T, D], cache)."""
    q, k, v = self._project(x_BTD, positions_BT, rope_cos_sin, mesh, key)
    if ring is not None:
      blocks = {"block": RING_PREFILL_BLOCK} if mode == "prefill" else {}  # else make_plan's default
      plan = make_plan(q.shape[1], ring.devices, self.chunk_size, ring.layout, ring.aligned,
                       kernel=ring.kernel, **blocks)
      out = ring_attention(q, k, v, ring.index, positions_BT, segment_ids_BT, mesh, plan)
      if mode == "prefill":  # a context-parallel prefill: the cache takes the keys in token order
        if ring.layout == "zigzag":
          kv_axes = ("batch", "seq", "kv_heads", "head_dim")
          k, v = from_zigzag(k, mesh, kv_axes), from_zigzag(v, mesh, kv_axes)
          segment_ids_BT = from_zigzag(segment_ids_BT, mesh)
        lengths_B = jnp.sum(segment_ids_BT > 0, axis=1)
        cache = store_tokens(cache, k, v, jnp.zeros_like(lengths_B), lengths_B, fresh=True)
      elif mode is not None:
        raise ValueError(f"ring attention with a KV cache runs prefill only, not {mode!r}")
      return self._out(out, key), cache
    if mode == "decode":
      return self._decode(q, k, v, positions_BT[:, 0], cache, mesh, key)
    if mode == "extend":
      return self._extend(q, k, v, positions_BT, segment_ids_BT, cache, key)
    if mode == "prefill" and q.shape[1] > blockwise.BLOCK:  # blockwise: memory linear in length
      out = prefill_attention(q, k, v, positions_BT, segment_ids_BT, self.chunk_size, mesh)
    else:  # up to one block (the same arithmetic, with no loops to compile), or no cache
      out = dense_attention(q, k, v, attention_mask(positions_BT, segment_ids_BT, self.chunk_size), mesh)
    if mode == "prefill":  # into a fresh cache
      lengths_B = jnp.sum(segment_ids_BT > 0, axis=1)
      cache = store_tokens(cache, k, v, jnp.zeros_like(lengths_B), lengths_B, fresh=True)
    return self._out(out, key), cache

  def _extend(self, q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT, cache, key=None):
    """Rows continue at positions_BT[:, 0] (their earlier tokens are in `cache`, a layer's dict): each new
    token attends over the cached entries before that start and the new tokens up to itself (causal; the
    same chunk on chunked layers), blockwise with the cache read in place, then the new tokens are
    stored."""
    start_B, lengths_B = positions_BT[:, 0], jnp.sum(segment_ids_BT > 0, axis=1)
    out = extend_attention(q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT > 0, cache, self.chunk_size)
    return self._out(out, key), store_tokens(cache, k_BTKH, v_BTKH, start_B, lengths_B)


# ------------------------------------------------------------------------------------------------
# KV cache: per layer {"k", "v": [B, K, S, H], "pos": [B, S] int32 (-1 = empty)}. Token at position p
# lives in slot p % S. Chunked (RoPE) layers get S = min(C, max length): a ring buffer that always holds
# the current chunk; NoPE layers get S = max length.

def init_kv_cache(batch: int, size: int, kv_heads: int, head_dim: int, dtype):
  return {"k": jnp.zeros((batch, kv_heads, size, head_dim), dtype),
          "v": jnp.zeros((batch, kv_heads, size, head_dim), dtype),
          "pos": jnp.full((batch, size), -1, jnp.int32)}


def store_tokens(cache, k_BTKH, v_BTKH, start_B, lengths_B, fresh: bool = False):
  """Stores each row's new tokens (its first lengths[b], at positions start[b]...) at slot position % S:
  slot s gets the latest new position p with p % S == s, so a ring buffer shorter than the tokens keeps
  the last chunk; the other slots keep what they held, or with `fresh` (a prefill into an empty cache)
  are emptied without reading the cache, so a donated cache stays unused and XLA drops it."""
  size, t = cache["pos"].shape[1], k_BTKH.shape[1]
  slots = jnp.arange(size)
  if fresh and size >= t:  # nothing wraps: slot s holds token s (a pad, which splits over `context` too)
    new = slots[None, :] < lengths_B[:, None]
    put = lambda x, c: jnp.where(new[:, None, :, None], jnp.pad(  # noqa: E731
        x.transpose(0, 2, 1, 3).astype(c.dtype), ((0, 0), (0, 0), (0, size - t), (0, 0))), 0)
    return {"k": put(k_BTKH, cache["k"]), "v": put(v_BTKH, cache["v"]),
            "pos": jnp.where(new, slots[None, :], -1).astype(jnp.int32)}
  last = (start_B + lengths_B - 1)[:, None]
  src = last - jnp.mod(last - slots[None, :], size)  # [B, S] the latest new position per slot
  new = src >= start_B[:, None]
  idx = jnp.clip(src - start_B[:, None], 0, k_BTKH.shape[1] - 1)
  take = lambda x: jnp.take_along_axis(x.transpose(0, 2, 1, 3), idx[:, None, :, None], axis=2)  # noqa: E731
  keep = new[:, None, :, None]
  old = cache
  if fresh:
    old = {"k": jnp.zeros_like(cache["k"]), "v": jnp.zeros_like(cache["v"]),
           "pos": jnp.full_like(cache["pos"], -1)}
  return {"k": jnp.where(keep, take(k_BTKH).astype(cache["k"].dtype), old["k"]),
          "v": jnp.where(keep, take(v_BTKH).astype(cache["v"].dtype), old["v"]),
          "pos": jnp.where(new, src, old["pos"]).astype(jnp.int32)}


class StackedCache(NamedTuple):
  """One scanned layer's view of the stacked cache: `arrays` [L, ...] (carried through the scan, so
  decode updates them in place; as scan inputs and outputs XLA copied the whole cache every step) and
  this layer's `index` in them."""
  arrays: dict
  index: jax.Array


def store_decode(cache, k_B1KH, v_B1KH, pos_B, at=()):
  """Writes rows 0..B-1's new key and value at slot pos % S of cache[at] (the cache may hold more rows).

  On CPU a single row is written as two identical updates of the same place: XLA CPU rewrites a scatter of
  one update as a dynamic-update-slice, which it then duplicates into the attention's read of the cache,
  copying every cache array four times a step (a 4,096-token cache of the ~100M MoE: 22 ms a step, 9 ms
  with the two updates)."""
  size = cache["pos"].shape[-1]
  rows, slot = jnp.arange(pos_B.shape[0]), pos_B % size
  k_BKH, v_BKH, unique = k_B1KH[:, 0], v_B1KH[:, 0], True
  if pos_B.shape[0] == 1 and target_platform() == "cpu":
    rows, slot, k_BKH, v_BKH, pos_B = (jnp.concatenate([x, x]) for x in (rows, slot, k_BKH, v_BKH, pos_B))
    unique = False
  put = lambda a, new, tail: a.at[at + (rows, ..., slot) + tail].set(  # noqa: E731
      new.astype(a.dtype), mode="promise_in_bounds", unique_indices=unique)
  return {"k": put(cache["k"], k_BKH, (slice(None),)),
          "v": put(cache["v"], v_BKH, (slice(None),)),
          "pos": put(cache["pos"], pos_B, ())}


MIN_READ_WIDTH = 512  # decode attention reads the cache's first 512, 1024, ... slots (see read_widths)


def read_widths(size: int) -> list[int]:
  """The widths decode attention may read of a cache of `size` slots: powers of two from MIN_READ_WIDTH up
  to it, then `size`. A step reads the smallest that holds every row's filled slots, so a 4,096-token cache
  holding 100 tokens costs what a 512-token one does (the ~100M MoE at 8 busy rows: 26.4 -> 13.7 ms)."""
  widths, width = [], MIN_READ_WIDTH
  while width < size:
    widths.append(width)
    width *= 2
  return widths + [size]


def cache_mask(kpos_BS, qpos_B, chunk_size: int | None):
  """[B, S]: cached key visible to the query at qpos (causal; same chunk on chunked layers). Also
  [B, T, S] for queries qpos [B, T] and keys kpos [B, 1, S]."""
  q = qpos_B[..., None]
  mask = (kpos_BS >= 0) & (kpos_BS <= q)
  if chunk_size is not None:
    mask &= kpos_BS // chunk_size == q // chunk_size
  return mask

