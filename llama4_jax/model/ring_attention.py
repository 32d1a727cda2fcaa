"""Sequence-parallel ring attention over the mesh's `context` axis (see shared/design/LONG_CONTEXT.md).

Each device keeps its query shard; key/value shards (kv heads only, with their token metadata: true
index, position and segment id) travel around a ring of devices with `lax.ppermute` (for windowed
layers over packed zigzag rows, a few steps each way), and blockwise online-softmax statistics merge the
partial results in float32. A custom VJP saves only q, k, v, the
output and the log-sum-exp, and runs a second ring in which dk/dv (already summed over each query group)
follow their k/v one hop behind, so every transfer overlaps a block of compute.

Masks come from metadata, never from shard offsets, so any token order works: causal by true index,
same segment, and on chunked (RoPE) layers same chunk (position // C) within C - 1 tokens. `RingPlan`
decides statically how far each layer's keys must travel: the whole ring for full-causal (NoPE) layers;
only within a group of devices, or not at all, for chunked layers whose chunks line up with the shards.

The per-step kernel is XLA blockwise attention that skips blocks with no visible key at run time (the
same rule `block_cost` uses for the load-balance model), or on TPU the Pallas splash attention kernel
(`kernels/ring_splash.py`; `RingPlan.kernel`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama4_jax.config import RING_KERNELS as KERNELS
from llama4_jax.config import RING_LAYOUTS as LAYOUTS
from llama4_jax.model.kernels import ring_splash
from llama4_jax.model.ops import finite_or_zero
from llama4_jax.model.platform import on_tpu
from llama4_jax.sharding import logical_to_spec

AXIS = "context"


def visible(q_idx, q_pos, q_seg, k_idx, k_pos, k_seg, chunk_size: int | None):
  """Boolean [..., Tq, Tk]: key visible to query. Causal by true token index within one segment; with
  `chunk_size` C also the same chunk (position // C) and fewer than C tokens back (which only matters
  for padding, whose positions do not advance; for real tokens it follows from the chunk rule)."""
  q_idx, k_idx = q_idx[..., :, None], k_idx[..., None, :]
  mask = (k_idx <= q_idx) & (q_seg[..., :, None] == k_seg[..., None, :])
  if chunk_size is not None:
    mask &= (q_pos[..., :, None] // chunk_size == k_pos[..., None, :] // chunk_size)
    mask &= q_idx - k_idx < chunk_size
  return mask


@dataclasses.dataclass(frozen=True)
class RingContext:
  """What a model forward pass tells its attention layers when ring attention is on: the token order
  (`layout`), the true index of each token [B, T] (traced), whether positions equal indices, and the
  per-step kernel asked for (see `make_plan`)."""
  devices: int
  layout: str
  aligned: bool
  index: jax.Array
  kernel: str = "auto"


# ------------------------------------------------------------------------------------------------
# Plans: which devices exchange K/V for a layer, and how many ring steps it takes.

@dataclasses.dataclass(frozen=True)
class RingPlan:
  """Static plan of one attention layer. Devices form rings of `group` consecutive devices on the
  context axis; each device sees the K/V of `steps` of them (itself first, then d-1, d-2, ...), and then
  of `back` more travelling the other way (d+1, d+2, ...). `kernel` is the per-step kernel: "xla"
  (blocks of `block` tokens) or "splash" (blocks are the runs; `interpret`: Pallas interpret mode, off
  TPU)."""
  devices: int
  group: int
  steps: int
  chunk_size: int | None
  block: int
  kernel: str = "xla"
  interpret: bool = False
  seq_len: int = 0
  back: int = 0

  def shift(self, k: int):
    """ppermute pairs sending device d to d + k within its group."""
    g = self.group
    return [(d, d // g * g + (d % g + k) % g) for d in range(self.devices)]

  def sources(self) -> list[int]:
    """Offsets of the devices whose K/V a device sees, in order: 0, -1, ..., -(steps-1), 1, ..., back."""
    return [-s for s in range(self.steps)] + list(range(1, self.back + 1))


def run_length(seq_len: int, devices: int, layout: str) -> int:
  """Tokens in each contiguous run of the sequence a device holds (zigzag: two runs per device)."""
  parts = devices * (2 if layout == "zigzag" and devices > 1 else 1)
  if seq_len % parts:
    raise ValueError(f"sequence length {seq_len} must be divisible by {parts} for ring attention over "
                     f"{devices} devices ({layout} layout); pad the sequence or change mesh.context")
  return seq_len // parts


def make_plan(seq_len: int, devices: int, chunk_size: int | None, layout: str = "zigzag",
              aligned: bool = False, block: int = 128, kernel: str = "auto") -> RingPlan:
  """The ring plan of a layer over a global sequence of `seq_len` tokens.

  `kernel`: "auto" takes splash on TPU when the runs allow it (a multiple of 128 tokens), else XLA;
  "splash" insists (interpret mode off TPU); "xla" is the blockwise XLA kernel.

  `aligned` says that position == token index (no packing), so chunk edges are known statically:
  then a chunked layer whose runs hold whole chunks needs no communication, and one whose chunks span
  g runs communicates only within groups of g devices. Packed rows (positions restarting per document)
  reach at most C - 1 tokens back, which are w = ceil((C - 1) / run) runs: w ring steps in the contiguous
  layout; in zigzag, where device d holds runs d and 2N-1-d, the runs before them sit on the devices up to
  w away on either side, so K/V travel w steps each way (2w + 1 shards instead of the N of the whole
  ring, when that is fewer).
  """
  run = run_length(seq_len, devices, layout)
  kernel = _choose_kernel(kernel, run, seq_len, chunk_size)
  blk = run if kernel == "splash" else block_size(run, block)
  with_kernel = lambda group, steps: RingPlan(  # noqa: E731
      devices, group, steps, chunk_size, blk, kernel, kernel == "splash" and not on_tpu(),
      seq_len)
  if chunk_size is None or devices == 1:
    return with_kernel(devices, devices)
  if aligned and run % chunk_size == 0:
    return with_kernel(1, 1)
  if aligned and chunk_size % run == 0 and devices % (chunk_size // run) == 0:
    g = chunk_size // run
    return with_kernel(g, g)
  w = -(-(chunk_size - 1) // run)  # runs within reach of a query
  if layout == "contiguous":
    return with_kernel(devices, min(devices, 1 + w))
  if 2 * w + 1 < devices:
    return dataclasses.replace(with_kernel(devices, 1 + w), back=w)
  return with_kernel(devices, devices)


def _choose_kernel(kernel: str, run: int, seq_len: int, chunk_size: int | None) -> str:
  if kernel not in KERNELS:
    raise ValueError(f"ring kernel {kernel!r} is not one of {KERNELS}")
  if kernel == "xla":
    return kernel
  ids_fit = chunk_size is None or (seq_len + 1) * (seq_len // chunk_size + 1) < 2**31
  why = ("splash attention is not in this JAX install" if not ring_splash.available() else
         f"each device's runs of {run} tokens are not a multiple of 128 (splash's block)" if run % 128 else
         None if ids_fit else f"segment x chunk ids of {seq_len} tokens with C={chunk_size} overflow int32")
  if kernel == "splash" and why:
    raise ValueError(f"ring_kernel='splash' cannot be used: {why}; use 'xla' or 'auto'")
  if kernel == "auto" and (why or not on_tpu()):
    return "xla"
  return "splash"


def block_size(run: int, target: int) -> int:
  """Kernel block length: the largest divisor of `run` not above `target`, so blocks never straddle runs;
  a whole run when only tiny divisors exist (a prime length), trading memory for speed."""
  best = max(b for b in range(1, min(run, target) + 1) if run % b == 0)
  return best if best >= min(run, 16) else run


# ------------------------------------------------------------------------------------------------
# Token layouts. Zigzag splits the sequence into 2N chunks; device i holds chunks i and 2N-1-i, which
# balances causal work. It is applied once to the model's inputs and undone on its outputs.

def zigzag_order(seq_len: int, devices: int) -> np.ndarray:
  """Token indices in zigzag order: out[j] = original index of the j-th token of the layout."""
  c = np.arange(seq_len).reshape(2 * devices, -1)
  return np.concatenate([np.concatenate([c[i], c[2 * devices - 1 - i]]) for i in range(devices)])


def _zigzag_perms(n: int):
  """ppermute pairs for the chunks of the contiguous layout (device j: chunks 2j, 2j+1) to zigzag."""
  home = lambda c: c if c < n else 2 * n - 1 - c  # noqa: E731
  even = [(j, home(2 * j)) for j in range(n)]
  odd = [(j, home(2 * j + 1)) for j in range(n)]
  return even, odd


def _relayout(x, mesh: Mesh, logical_axes, forward: bool):
  n = mesh.shape[AXIS]
  even, odd = _zigzag_perms(n)
  spec = logical_to_spec(logical_axes, mesh, x.shape, strict=False)

  def local(x):
    half = x.shape[1] // 2
    a, b = x[:, :half], x[:, half:]
    i_even = jax.lax.axis_index(AXIS) % 2 == 0
    if forward:  # a: chunk 2j, b: chunk 2j+1 -> slots (chunk i, chunk 2N-1-i)
      ra, rb = jax.lax.ppermute(a, AXIS, even), jax.lax.ppermute(b, AXIS, odd)
      first, second = jnp.where(i_even, ra, rb), jnp.where(i_even, rb, ra)
    else:  # slot 0: chunk i, slot 1: chunk 2N-1-i -> (chunk 2j, chunk 2j+1)
      ev, od = jnp.where(i_even, a, b), jnp.where(i_even, b, a)
      inv = lambda perm: [(d, s) for s, d in perm]  # noqa: E731
      first, second = jax.lax.ppermute(ev, AXIS, inv(even)), jax.lax.ppermute(od, AXIS, inv(odd))
    return jnp.concatenate([first, second], axis=1)

  return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(x)


def to_zigzag(x, mesh: Mesh | None, logical_axes=("batch", "seq")):
  """[B, T, ...] in token order -> zigzag layout, moving only the half-shards that change device."""
  if mesh is None or mesh.shape.get(AXIS, 1) == 1:
    return x
  return _relayout(x, mesh, logical_axes, forward=True)


def from_zigzag(x, mesh: Mesh | None, logical_axes=("batch", "seq")):
  """Inverse of `to_zigzag`."""
  if mesh is None or mesh.shape.get(AXIS, 1) == 1:
    return x
  return _relayout(x, mesh, logical_axes, forward=False)


# ------------------------------------------------------------------------------------------------
# The per-step kernel: blockwise attention of the local queries over one K/V shard.
# Queries are kept folded per kv head: [b, nq, K, M, H] with M = block * G (G query heads per kv head).

def fold_queries(q_BTNH, kv_heads: int, block: int):
  """[B, T, N, H] -> [B, T / block, K, block * G, H]: each kv head's query group next to its tokens."""
  b, t, n, h = q_BTNH.shape
  g = n // kv_heads
  x = q_BTNH.reshape(b, t // block, block, kv_heads, g, h).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, t // block, kv_heads, block * g, h)


def unfold_queries(x, n: int):
  """Inverse of `fold_queries`: [B, T / block, K, block * G, H] -> [B, T, N, H]."""
  b, nq, kv, m, h = x.shape
  g = n // kv
  x = x.reshape(b, nq, kv, m // g, g, h).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, nq * (m // g), n, h)


def merge_block(acc, s_BKMS, v_BKSH):
  """Online softmax: acc = (o [B, K, M, H], m [B, K, M], l [B, K, M]) (float32; unnormalised output,
  running max, running sum) merged with one key block's scaled scores s [B, K, M, S] (-inf where masked)
  and values v [B, K, S, H]."""
  o, m, l = acc
  m_new = jnp.maximum(m, jnp.max(s_BKMS, axis=-1))
  alpha = jnp.exp(m - finite_or_zero(m_new))
  p = jnp.exp(s_BKMS - finite_or_zero(m_new)[..., None])
  pv = jnp.einsum("BKMS,BKSH->BKMH", p.astype(v_BKSH.dtype), v_BKSH, preferred_element_type=jnp.float32)
  return o * alpha[..., None] + pv, m_new, l * alpha + jnp.sum(p, axis=-1)


def _kv_blocks(k_BSKH, block):
  b, s, kv, h = k_BSKH.shape
  return k_BSKH.reshape(b, s // block, block, kv, h).transpose(1, 0, 3, 2, 4)  # [nk, b, K, blk, H]


def _meta_blocks(meta_B3T, block):
  b, _, t = meta_B3T.shape
  return meta_B3T.reshape(b, 3, t // block, block).transpose(2, 0, 1, 3)  # [n, b, 3, blk]


def _block_mask(qm, km, g: int, chunk_size):
  """[b, 1, M, blk] mask for a query block's meta qm [b, 3, bq] and a key block's km [b, 3, bk]."""
  m = visible(qm[:, 0], qm[:, 1], qm[:, 2], km[:, 0], km[:, 1], km[:, 2], chunk_size)
  b, bq, bk = m.shape
  return jnp.broadcast_to(m[:, :, None, :], (b, bq, g, bk)).reshape(b, 1, bq * g, bk)


def _any_visible(qm, km, chunk_size):
  """Cheap block skip rule on index ranges (exact for runs of consecutive indices)."""
  ok = jnp.min(km[:, 0]) <= jnp.max(qm[:, 0])
  if chunk_size is not None:
    ok &= jnp.min(qm[:, 0]) - jnp.max(km[:, 0]) < chunk_size
  return ok


def _scores(q, kk, qm, km, chunk_size):
  """Scaled float32 scores [b, K, M, blk] of a folded query block q [b, K, M, H] against a key block
  kk [b, K, blk, H], and the mask of the pairs that may attend."""
  s = jnp.einsum("BKMH,BKSH->BKMS", q, kk, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  return s, _block_mask(qm, km, q.shape[2] // qm.shape[-1], chunk_size)


def _attend_step(qf, qmeta, k, v, kmeta, acc, plan: RingPlan):
  """One ring step forward: merges the local queries' attention over shard (k, v) into
  acc = (o [b, nq, K, M, H], m [b, nq, K, M], l [b, nq, K, M]), all float32."""
  kb, vb, kmb = _kv_blocks(k, plan.block), _kv_blocks(v, plan.block), _meta_blocks(kmeta, plan.block)
  qmb = _meta_blocks(qmeta, plan.block)

  def per_q(args):
    q, qm, o, m, l = args  # q [b, K, M, H]

    def per_k(carry, kv):
      kk, vv, km = kv

      def compute(carry):
        s, mask = _scores(q, kk, qm, km, plan.chunk_size)
        return merge_block(carry, jnp.where(mask, s, -jnp.inf), vv)

      return jax.lax.cond(_any_visible(qm, km, plan.chunk_size), compute, lambda c: c, carry), None

    return jax.lax.scan(per_k, (o, m, l), (kb, vb, kmb))[0]

  o, m, l = acc
  mv = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731  nq first, for lax.map
  out = jax.lax.map(per_q, (mv(qf), qmb, mv(o), mv(m), mv(l)))
  return tuple(jnp.moveaxis(x, 0, 1) for x in out)


def _grad_step(qf, qmeta, dof, lse, delta, k, v, kmeta, dqf, plan: RingPlan):
  """One ring step backward: returns (dq accumulated into dqf, dk [b, S, K, H], dv) for shard (k, v)."""
  scale = qf.shape[-1] ** -0.5
  kb, vb, kmb = _kv_blocks(k, plan.block), _kv_blocks(v, plan.block), _meta_blocks(kmeta, plan.block)
  mv = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731
  q_xs = (mv(qf), _meta_blocks(qmeta, plan.block), mv(dof), mv(lse), mv(delta))

  def per_k(dq_all, kv):
    kk, vv, km = kv

    def per_q(carry, xs):
      (q, qm, do, ls, de), dq = xs

      def compute(args):
        (dk, dv), dq = args
        s, mask = _scores(q, kk, qm, km, plan.chunk_size)
        p = jnp.where(mask, jnp.exp(s - finite_or_zero(ls)[..., None]), 0.0)
        dv = dv + jnp.einsum("BKMS,BKMH->BKSH", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("BKMH,BKSH->BKMS", do, vv, preferred_element_type=jnp.float32)
        ds = (p * (dp - de[..., None]) * scale).astype(q.dtype)
        dq = dq + jnp.einsum("BKMS,BKSH->BKMH", ds, kk, preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("BKMS,BKMH->BKSH", ds, q, preferred_element_type=jnp.float32)
        return (dk, dv), dq

      carry, dq = jax.lax.cond(_any_visible(qm, km, plan.chunk_size), compute, lambda a: a, (carry, dq))
      return carry, dq

    zeros = jnp.zeros(kk.shape, jnp.float32)
    (dk, dv), dq_all = jax.lax.scan(per_q, (zeros, zeros), (q_xs, dq_all))
    return dq_all, (dk, dv)

  dq_all, (dk, dv) = jax.lax.scan(per_k, mv(dqf), (kb, vb, kmb))
  unblock = lambda x: x.transpose(1, 0, 3, 2, 4).reshape(k.shape)  # noqa: E731  [nk,b,K,blk,H]
  return jnp.moveaxis(dq_all, 0, 1), unblock(dk), unblock(dv)


# ------------------------------------------------------------------------------------------------
# The ring (runs inside shard_map on local shards).

def _ring_forward(q, k, v, qmeta, kmeta, plan: RingPlan):
  # Tie the integer metadata to q, k, v: when autodiff partially evaluates this function (under
  # jax.checkpoint or a differentiated scan), metadata-only values (every block's mask) would otherwise
  # count as "known", be computed up front and be kept for the backward pass: memory quadratic in length.
  q, k, v, qmeta, kmeta = jax.lax.optimization_barrier((q, k, v, qmeta, kmeta))
  b, t, n, h = q.shape
  kvh = k.shape[2]
  qf = fold_queries(q, kvh, plan.block)
  shape = qf.shape[:-1]
  acc = (jnp.zeros(qf.shape, jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32),
         jnp.zeros(shape, jnp.float32))
  nxt = plan.shift(1)

  attend = _attend_step
  if plan.kernel == "splash":
    attend = ring_splash.attend_step

  def step(kv, acc, perm, send):
    sent = jax.lax.ppermute(kv, AXIS, perm) if send else None  # in flight during the compute
    return sent, attend(qf, qmeta, *kv[:2], kv[2], acc, plan)

  def sweep(kv, acc, perm, count):
    """Attends to kv and to the count - 1 shards that arrive after it by `perm`, one per step."""
    if count > 1:
      kv, acc = step(kv, acc, perm, True)
    if count > 2:
      kv, acc = jax.lax.fori_loop(0, count - 2, lambda _, c: step(*c, perm, True), (kv, acc))
    return step(kv, acc, perm, False)[1]

  kv = (k, v, kmeta)
  ahead = jax.lax.ppermute(kv, AXIS, plan.shift(-1)) if plan.back else None  # d+1's shard, sent early
  acc = sweep(kv, acc, nxt, plan.steps)
  if plan.back:
    acc = sweep(ahead, acc, plan.shift(-1), plan.back)
  o, m, l = acc
  out = o / jnp.where(l == 0, 1.0, l)[..., None]
  lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(jnp.where(l == 0, 1.0, l)))
  return unfold_queries(out, n).astype(q.dtype), lse


def _ring_backward(q, k, v, qmeta, kmeta, out, lse, dout, plan: RingPlan):
  kvh, n = k.shape[2], q.shape[2]
  qf, dof = fold_queries(q, kvh, plan.block), fold_queries(dout, kvh, plan.block)
  delta = jnp.sum(dof.astype(jnp.float32) * fold_queries(out, kvh, plan.block).astype(jnp.float32), axis=-1)
  grad = _grad_step
  if plan.kernel == "splash":
    grad = ring_splash.grad_step

  def step(kv, dkv, dq, perm, send_kv, recv):
    sent = jax.lax.ppermute(kv, AXIS, perm) if send_kv else None
    # dk/dv of the shard held now arrive from the device it came through, one hop behind their k/v.
    arrived = jax.lax.ppermute(dkv, AXIS, perm) if recv else None
    dq, dk, dv = grad(qf, qmeta, dof, lse, delta, kv[0], kv[1], kv[2], dq, plan)
    if arrived is not None:
      dk, dv = dk + arrived[0], dv + arrived[1]
    return sent, (dk, dv), dq

  def sweep(kv, dq, direction, count, home):
    """Gradients for kv and the count - 1 shards that arrive after it, each sent `direction` (+1 or -1)
    devices on: returns dq and the dk/dv of the last shard held, summed over the devices it visited,
    sent `home` devices on (to the device the shard belongs to)."""
    perm = plan.shift(direction)
    kv, dkv, dq = step(kv, None, dq, perm, count > 1, False)
    if count > 2:
      kv, dkv, dq = jax.lax.fori_loop(0, count - 2, lambda _, c: step(*c, perm, True, True), (kv, dkv, dq))
    if count > 1:
      _, dkv, dq = step(kv, dkv, dq, perm, False, True)
    return (jax.lax.ppermute(dkv, AXIS, plan.shift(home)) if home else dkv), dq

  dq = jnp.zeros(qf.shape, jnp.float32)
  kv = (k, v, kmeta)
  ahead = jax.lax.ppermute(kv, AXIS, plan.shift(-1)) if plan.back else None
  # the shard held last came from d - (steps - 1); in the other direction from d + back
  (dk, dv), dq = sweep(kv, dq, 1, plan.steps, 1 - plan.steps)
  if plan.back:
    (bk, bv), dq = sweep(ahead, dq, -1, plan.back, plan.back)
    dk, dv = dk + bk, dv + bv
  return unfold_queries(dq, n).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def ring_attention(q_BTNH, k_BTKH, v_BTKH, index_BT, positions_BT, segment_ids_BT, mesh: Mesh | None,
                   plan: RingPlan, kv_segment_ids_BT=None, custom_vjp: bool = True):
  """Causal GQA attention of tokens laid out over the mesh's context axis -> [B, T, N, H].

  index, positions and segment ids [B, T] describe each token (index: its place in the original
  sequence). `kv_segment_ids` (default: the same) lets keys carry their own segment ids. Rows with no
  visible key give zeros. `custom_vjp=False` differentiates through the ring instead (for comparison).

  The custom VJP wraps the two `shard_map`s (forward ring, backward ring) from outside, so autodiff
  never looks inside them: saving anything of the forward ring but its declared residuals would cost
  memory that grows with every block pair.
  """
  b, t, n, _ = q_BTNH.shape
  kvh = k_BTKH.shape[2]
  if n % kvh:
    raise ValueError(f"query heads {n} must be a multiple of kv heads {kvh}")
  kv_seg = segment_ids_BT if kv_segment_ids_BT is None else kv_segment_ids_BT
  qmeta = jnp.stack([index_BT, positions_BT, segment_ids_BT], axis=1).astype(jnp.int32)  # [B, 3, T]
  kmeta = jnp.stack([index_BT, positions_BT, kv_seg], axis=1).astype(jnp.int32)
  devices = 1 if mesh is None else mesh.shape.get(AXIS, 1)
  if devices != plan.devices:
    raise ValueError(f"a ring plan for {plan.devices} devices used on a context axis of {devices}")
  lse_shape = (b, t // plan.block, kvh, plan.block * (n // kvh))  # [B, blocks, K, M], see fold_queries
  specs = None
  if mesh is not None and mesh.size > 1:  # also on one context device: each device attends its own rows
    tensor = mesh.shape.get("tensor", 1)
    if n % tensor or kvh % tensor:
      raise ValueError(f"query heads {n} and kv heads {kvh} must both be divisible by the mesh's "
                       f"tensor={tensor} for ring attention")
    spec = lambda axes, shape: logical_to_spec(axes, mesh, shape, strict=False)  # noqa: E731
    specs = {"q": spec(("batch", "seq", "heads", None), q_BTNH.shape),
             "kv": spec(("batch", "seq", "kv_heads", None), k_BTKH.shape),
             "meta": spec(("batch", None, "seq"), qmeta.shape),
             "lse": spec(("batch", "seq", "kv_heads", None), lse_shape)}

  def sharded(fn, ins, outs):
    if specs is None:
      return fn
    pick = lambda names: tuple(specs[x] for x in names)  # noqa: E731
    return jax.shard_map(fn, mesh=mesh, in_specs=pick(ins), out_specs=pick(outs), check_vma=False)

  forward = sharded(functools.partial(_ring_forward, plan=plan), ("q", "kv", "kv", "meta", "meta"),
                    ("q", "lse"))
  if not custom_vjp:
    return forward(q_BTNH, k_BTKH, v_BTKH, qmeta, kmeta)[0]
  backward = sharded(functools.partial(_ring_backward, plan=plan),
                     ("q", "kv", "kv", "meta", "meta", "q", "lse", "q"), ("q", "kv", "kv"))

  @jax.custom_vjp
  def attend(q, k, v, qm, km):
    return forward(q, k, v, qm, km)[0]

  def attend_fwd(q, k, v, qm, km):
    out, lse = forward(q, k, v, qm, km)
    return out, (q, k, v, qm, km, out, lse)

  def attend_bwd(res, dout):
    return (*backward(*res, dout), None, None)

  attend.defvjp(attend_fwd, attend_bwd)
  return attend(q_BTNH, k_BTKH, v_BTKH, qmeta, kmeta)


# ------------------------------------------------------------------------------------------------
# Static load-balance model.

def block_cost(seq_len: int, devices: int, layout: str, plan: RingPlan) -> dict:
  """Blocks each device computes per ring step under the kernel's skip rule (`_any_visible`), for an
  unpacked sequence. Returns the critical path (sum over steps of the busiest device) over the ideal
  (total work / devices)."""
  order = zigzag_order(seq_len, devices) if layout == "zigzag" else np.arange(seq_len)
  idx = order.reshape(devices, -1, plan.block)  # [device, block, token]
  lo, hi = idx.min(-1), idx.max(-1)
  offsets = plan.sources()
  work = np.zeros((len(offsets), devices))
  for s, offset in enumerate(offsets):
    for d in range(devices):
      g0 = d // plan.group * plan.group
      src = g0 + (d - g0 + offset) % plan.group
      ok = lo[src][None, :] <= hi[d][:, None]
      if plan.chunk_size is not None:
        ok &= lo[d][:, None] - hi[src][None, :] < plan.chunk_size
      work[s, d] = ok.sum()
  critical, ideal = work.max(axis=1).sum(), work.sum() / devices
  return {"critical_path_blocks": float(critical), "ideal_blocks": float(ideal),
          "ratio": float(critical / ideal) if ideal else 1.0}


__all__ = ["KERNELS", "LAYOUTS", "RingContext", "RingPlan", "block_cost", "from_zigzag", "make_plan",
           "ring_attention", "run_length", "to_zigzag", "visible", "zigzag_order"]
