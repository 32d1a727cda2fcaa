"""Blockwise (flash-style) attention for inference: prefill and extend with memory linear in length.

Queries go a block at a time (`lax.map`: one block is live); each block loops (a `while_loop` with traced
bounds) over only the key blocks its mask can reach: up to its own end (causal), and on chunked layers from
C - 1 tokens before its start. Blocks merge by an online softmax in float32. No [T, T] (or [T, S]) buffer
exists: the largest is one block pair's scores [B, K, block * G, block].

`prefill_attention` attends a prompt to itself (right-padded rows, or packed documents: masks come from
positions and segment ids as in `attention_mask`). `extend_attention` attends a prompt's next piece to the
cached entries before it (read block by block from the cache in place, only the filled slots) and then to
itself, which is what the serving engine's long prompts run a piece at a time.

On TPU, `prefill_attention` of a sequence whose length is a multiple of 128 runs the Pallas splash kernel
instead (through `ring_attention` on one device: `kernels/ring_splash.py`, compiled by Mosaic).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama4_jax.model.platform import on_tpu
from llama4_jax.model.ring_attention import (block_size, fold_queries, make_plan, merge_block,
                                             ring_attention, unfold_queries)

BLOCK = 512  # query and key block length (CPU: 512 x 512 score blocks ran ~1.5x faster than 128 x 128)


def _blocks(x_BT, block: int):
  """[B, T] -> [T / block, B, block]."""
  b, t = x_BT.shape
  return x_BT.reshape(b, t // block, block).transpose(1, 0, 2)


def _merge(acc, q_BKMH, qpos_Bt, qseg_Bt, k_BKSH, v_BKSH, kpos_BS, kseg_BS, lo, hi, block: int,
           chunk_size: int | None):
  """acc = (o [B, K, M, H], m [B, K, M], l [B, K, M]) (float32) merged with key blocks lo..hi-1 of
  (k, v): key s is visible to query t when kpos[s] >= 0, kpos[s] <= qpos[t], the segments match (when
  kseg is given) and, with `chunk_size` C, kpos // C == qpos // C."""
  b, kvh, m_, h = q_BKMH.shape
  t = qpos_Bt.shape[1]
  g = m_ // t
  scale = h ** -0.5

  def body(j, acc):
    at = j * block
    kk = jax.lax.dynamic_slice_in_dim(k_BKSH, at, block, axis=2).astype(q_BKMH.dtype)
    vv = jax.lax.dynamic_slice_in_dim(v_BKSH, at, block, axis=2).astype(q_BKMH.dtype)
    kp = jax.lax.dynamic_slice_in_dim(kpos_BS, at, block, axis=1)[:, None, :]  # [B, 1, blk]
    qp = qpos_Bt[:, :, None]
    mask = (kp >= 0) & (kp <= qp)
    if kseg_BS is not None:
      mask &= jax.lax.dynamic_slice_in_dim(kseg_BS, at, block, axis=1)[:, None, :] == qseg_Bt[:, :, None]
    if chunk_size is not None:
      mask &= kp // chunk_size == qp // chunk_size
    mask = jnp.broadcast_to(mask[:, None, :, None, :], (b, 1, t, g, block)).reshape(b, 1, m_, block)
    s = jnp.einsum("BKMH,BKSH->BKMS", q_BKMH, kk, preferred_element_type=jnp.float32) * scale
    return merge_block(acc, jnp.where(mask, s, -jnp.inf), vv)

  return jax.lax.fori_loop(lo, hi, body, acc)


def _attend(q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT, chunk_size, cached=None):
  """Blockwise attention of q over its own keys (causal by index) and, with `cached` = (k [B, K, S, H],
  v, kpos [B, S], filled slots), over cached keys first. Returns [B, T, N, H] in q's dtype."""
  b, t, n, h = q_BTNH.shape
  kvh = k_BTKH.shape[2]
  if n % kvh:
    raise ValueError(f"query heads {n} must be a multiple of kv heads {kvh}")
  blk = block_size(t, BLOCK)
  k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
  qf = jnp.moveaxis(fold_queries(q_BTNH, kvh, blk), 1, 0)  # [T / block, B, K, block * G, H]: lax.map's
  qpos, qseg = _blocks(positions_BT, blk), _blocks(segment_ids_BT, blk)
  reach = t if chunk_size is None else chunk_size - 1  # how far back (in tokens) a query may see
  if cached is not None:
    ck, cv, ckpos, filled = cached
    cblk = block_size(ck.shape[2], BLOCK)
    chi = (jnp.minimum(filled, ck.shape[2]) + cblk - 1) // cblk

  def per_block(xs):
    i, q, qp, qs = xs
    shape = q.shape[:-1]
    acc = (jnp.zeros(q.shape, jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32),
           jnp.zeros(shape, jnp.float32))
    if cached is not None:
      acc = _merge(acc, q, qp, qs, ck, cv, ckpos, None, 0, chi, cblk, chunk_size)
    lo = jnp.maximum(i * blk - reach, 0) // blk
    acc = _merge(acc, q, qp, qs, k_BKTH, v_BKTH, positions_BT, segment_ids_BT, lo, i + 1, blk, chunk_size)
    o, _, l = acc
    return (o / jnp.where(l == 0, 1.0, l)[..., None]).astype(q_BTNH.dtype)

  if t == blk:  # one query block (a serving piece): no map around it, less to compile
    out = per_block((jnp.int32(0), qf[0], qpos[0], qseg[0]))[None]
  else:
    out = jax.lax.map(per_block, (jnp.arange(t // blk), qf, qpos, qseg))
  return unfold_queries(jnp.moveaxis(out, 0, 1), n)


def prefill_attention(q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT, chunk_size: int | None,
                      mesh=None):
  """Causal GQA attention of a prompt over itself -> [B, T, N, H], equal to `dense_attention` under
  `attention_mask(positions, segment_ids, chunk_size)`: keys at or before the query (by index) in its
  segment, within its chunk on chunked layers. Rows with no visible key give zeros."""
  t = q_BTNH.shape[1]
  if on_tpu() and t % 128 == 0 and (mesh is None or mesh.shape.get("context", 1) == 1):
    plan = make_plan(t, 1, chunk_size, "contiguous", kernel="auto")
    if plan.kernel == "splash":
      index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), positions_BT.shape)
      return ring_attention(q_BTNH, k_BTKH, v_BTKH, index, positions_BT, segment_ids_BT, mesh, plan,
                            custom_vjp=False)
  return _attend(q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT, chunk_size)


def extend_attention(q_BTNH, k_BTKH, v_BTKH, positions_BT, valid_BT, cache, chunk_size: int | None):
  """A prompt's next piece (rows continuing at positions_BT[:, 0], valid_BT marking real tokens) over the
  layer's cache {"k", "v": [B, K, S, H], "pos": [B, S]} (entries before each row's start) and over itself
  (causal) -> [B, T, N, H]. The cache is read in place, only its filled slots."""
  start_B = positions_BT[:, 0]
  kpos_BS = jnp.where(cache["pos"] < start_B[:, None], cache["pos"], -1)
  valid = valid_BT.astype(jnp.int32)
  return _attend(q_BTNH, k_BTKH, v_BTKH, jnp.where(valid > 0, positions_BT, -1), valid, chunk_size,
                 cached=(cache["k"], cache["v"], kpos_BS, jnp.max(start_B)))
