"""The ring's per-step kernel on TPU: Pallas splash attention, behind the XLA kernel's interface.

`ring_attention` calls `attend_step` / `grad_step` of this module instead of its XLA blockwise ones when
`RingPlan.kernel == "splash"`. Off TPU the same Pallas kernels run in interpret mode (slow; for checking).

What makes a static-mask kernel usable inside a ring: each device's tokens are runs of consecutive true
indices (one run in the contiguous layout, two in zigzag; `RingPlan.block` is the run length R), and
so are the visiting shard's. Between a query run and a key run, causality therefore takes one of three
forms, chosen at run time from the runs' first indices: every key earlier (full mask), the same run
(causal mask) or every key later (skipped). Segments, and on chunked (RoPE) layers the chunk of each
position, become splash segment ids (equal ids attend), so packed documents and Llama 4's chunked layers
need no extra kernels. GQA: an MQA kernel per kv head (vmapped), so only kv heads are read and dk/dv come
out summed over each query group. Forward results (normalised output and log-sum-exp per pair) merge into
the ring's running (o, m, l); the backward calls splash's dkv and dq kernels with the ring's global
log-sum-exp and delta, as the XLA `_grad_step` does.

Splash's block sizes must be multiples of 128, so R must be too (`make_plan` falls back to the XLA kernel
otherwise). The backward uses two functions private to splash (`_splash_attention_bwd_dkv`, `_dq`): the
public kernel's own VJP would need each pair's local log-sum-exp and output, not the ring's global ones.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama4_jax.model.ops import finite_or_zero

_EMPTY_LSE = -1e30  # splash gives rows with no visible key a log-sum-exp near its mask value (-2.4e38)


def available() -> bool:
  try:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel  # noqa: F401
  except ImportError:
    return False
  return True


def _block(run: int) -> int:
  return max(b for b in (512, 256, 128) if run % b == 0)


@functools.lru_cache(maxsize=None)
def _kernels(run: int, groups: int, interpret: bool):
  """(causal, full) MQA splash kernels for a query run of `run` tokens x `groups` query heads over a key
  run of `run` tokens, returning the log-sum-exp too."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b = _block(run)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)

  def make(mask):
    return sk.make_splash_mqa(sm.MultiHeadMask([mask] * groups), block_sizes=sizes, save_residuals=True,
                              head_shards=1, q_seq_shards=1, interpret=interpret)

  with jax.ensure_compile_time_eval():  # concrete mask info, though first asked for inside a trace
    return make(sm.CausalMask((run, run))), make(sm.FullMask((run, run)))


def segment_ids(meta_B3T, chunk_size: int | None, seq_len: int):
  """Splash segment ids [B, T]: the segment, and on chunked layers also the chunk (position // C), so
  that equal ids mean "same document and same chunk"."""
  seg = meta_B3T[:, 2]
  if chunk_size is None:
    return seg
  chunks = seq_len // chunk_size + 1
  return seg * chunks + meta_B3T[:, 1] // chunk_size


def _heads(xf, groups: int):
  """Folded [b, runs, K, R*G, ...] -> [b, runs, K, G, R, ...] (query heads of a kv head together)."""
  b, runs, kv, m = xf.shape[:4]
  x = xf.reshape(b, runs, kv, m // groups, groups, *xf.shape[4:])
  return jnp.swapaxes(x, 3, 4)


def _folded(x):
  """Inverse of `_heads`."""
  x = jnp.swapaxes(x, 3, 4)
  return x.reshape(*x.shape[:3], x.shape[3] * x.shape[4], *x.shape[5:])


def _head_major(*xs):
  """[R, K, H] <-> [K, R, H]. The kernels are vmapped over kv heads on the leading axis: vmapped over the
  middle one, Mosaic sees a block of (1, H) over the array's last two dims (K, H), which it cannot lower
  (the second-to-last block dim must divide by 8 or span the axis); interpret mode never checks this."""
  return tuple(jnp.swapaxes(x, 0, 1) for x in xs)


def _case(q_first, k_first):
  """0: skip (every key later), 1: causal (same run), 2: full (every key earlier)."""
  return jnp.where(q_first > k_first, 2, jnp.where(q_first == k_first, 1, 0))


def _runs(x, run: int, axis: int):
  return [jax.lax.slice_in_dim(x, r * run, (r + 1) * run, axis=axis) for r in range(x.shape[axis] // run)]


def _setup(qf, qmeta, kmeta, plan):
  """What both directions need: the run length R, query heads per kv head G, the (causal, full) kernels,
  the scale, the scaled queries [b, runs, K, G, R, H], the splash segment ids of queries and keys, and
  case(r, s): the `_case` of query run r against key run s."""
  run = plan.block
  groups = qf.shape[3] // run
  scale = qf.shape[-1] ** -0.5
  q = _heads(qf, groups) * jnp.asarray(scale, qf.dtype)
  qid, kid = (segment_ids(m, plan.chunk_size, plan.seq_len) for m in (qmeta, kmeta))

  def case(r, s):
    return _case(qmeta[0, 0, r * run], kmeta[0, 0, s * run])

  return run, groups, _kernels(run, groups, plan.interpret), scale, q, qid, kid, case


def attend_step(qf, qmeta, k, v, kmeta, acc, plan):
  """`ring_attention._attend_step` with splash kernels: merges the local queries' attention over the shard
  (k [b, S, K, H], v) into acc = (o [b, runs, K, R*G, H], m, l [b, runs, K, R*G]), float32."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  run, groups, (causal, full), _, q, qid, kid, case = _setup(qf, qmeta, kmeta, plan)
  k_runs, v_runs, kid_runs = _runs(k, run, 1), _runs(v, run, 1), _runs(kid, run, 1)

  def pair(kernel, q_r, k_r, v_r, qi, ki):  # q_r [b, K, G, R, H], k_r [b, R, K, H], ids [b, R]
    def one(q1, k1, v1, qi1, ki1):  # over kv heads: q1 [K, G, R, H], k1 [R, K, H]
      ids = sk.SegmentIds(q=qi1, kv=ki1)
      return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(q1, *_head_major(k1, v1))

    out, (lse,) = jax.vmap(one)(q_r, k_r, v_r, qi, ki)
    return out.astype(jnp.float32), jnp.where(lse < _EMPTY_LSE, -jnp.inf, lse)

  def skip(q_r, *_):
    return jnp.zeros(q_r.shape, jnp.float32), jnp.full(q_r.shape[:-1], -jnp.inf, jnp.float32)

  branches = (skip, functools.partial(pair, causal), functools.partial(pair, full))
  o, m, l = (_heads(x, groups) for x in acc)
  new = []
  for r, (q_r, qi) in enumerate(zip(jnp.moveaxis(q, 1, 0), _runs(qid, run, 1))):
    o_r, m_r, l_r = o[:, r], m[:, r], l[:, r]
    for s, (k_r, v_r, ki) in enumerate(zip(k_runs, v_runs, kid_runs)):
      out, lse = jax.lax.switch(case(r, s), branches, q_r, k_r, v_r, qi, ki)
      m_new = jnp.maximum(m_r, lse)
      a, w = jnp.exp(m_r - finite_or_zero(m_new)), jnp.exp(lse - finite_or_zero(m_new))
      o_r = o_r * a[..., None] + out * w[..., None]
      l_r, m_r = l_r * a + w, m_new
    new.append((o_r, m_r, l_r))
  return tuple(_folded(jnp.stack(x, axis=1)) for x in zip(*new))


def grad_step(qf, qmeta, dof, lse, delta, k, v, kmeta, dqf, plan):
  """`ring_attention._grad_step` with splash's backward kernels: returns (dq accumulated into dqf,
  dk [b, S, K, H], dv) for the shard (k, v), from the ring's global log-sum-exp and delta."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  run, groups, (causal, full), scale, q, qid, kid, case = _setup(qf, qmeta, kmeta, plan)
  do = _heads(dof, groups)
  lse = jnp.where(jnp.isfinite(lse), lse, 1e30)  # rows that see no key anywhere: p = 0 everywhere
  ls, de = _heads(lse, groups), _heads(delta, groups)

  def pair(kernel, q_r, do_r, ls_r, de_r, k_r, v_r, qi, ki):
    kw = kernel.kwargs
    sizes = kw["block_sizes"]
    common = dict(is_mqa=True, mask_value=kw["mask_value"], attn_logits_soft_cap=None,
                  q_layout=sizes.q_layout, k_layout=sizes.k_layout, v_layout=sizes.v_layout,
                  mask_function=kw["mask_function"], interpret=kw["interpret"])

    def one(q1, do1, ls1, de1, k1, v1, qi1, ki1):
      ids = sk.SegmentIds(q=qi1, kv=ki1)

      def head(qh, doh, lsh, deh, kh, vh):
        _, dk, dv = sk._splash_attention_bwd_dkv(
            qh, kh, vh, ids, None, lsh, doh, deh, bq=sizes.block_q_dkv, bkv=sizes.block_kv_dkv,
            bkv_compute=sizes.block_kv_dkv_compute, mask_info=kernel.dkv_mask_info,
            use_fused_bwd_kernel=False, **common)
        dq = sk._splash_attention_bwd_dq(
            qh, kh, vh, ids, None, lsh, doh, deh, bq=sizes.block_q_dq, bkv=sizes.block_kv_dq,
            mask_info=kernel.dq_mask_info, **common)
        return dq, dk, dv

      dq, dk, dv = jax.vmap(head)(q1, do1, ls1, de1, *_head_major(k1, v1))
      return (dq,) + _head_major(dk, dv)

    dq, dk, dv = jax.vmap(one)(q_r, do_r, ls_r, de_r, k_r, v_r, qi, ki)
    return dq.astype(jnp.float32) * scale, dk.astype(jnp.float32), dv.astype(jnp.float32)

  def skip(q_r, do_r, ls_r, de_r, k_r, *_):
    zeros = jnp.zeros(k_r.shape, jnp.float32)
    return jnp.zeros(q_r.shape, jnp.float32), zeros, zeros

  branches = (skip, functools.partial(pair, causal), functools.partial(pair, full))
  q_runs = [jnp.moveaxis(x, 1, 0) for x in (q, do, ls, de)]
  qid_runs = _runs(qid, run, 1)
  dq_runs = [0.0] * q.shape[1]
  dk_runs, dv_runs = [], []
  for s, (k_r, v_r, ki) in enumerate(zip(_runs(k, run, 1), _runs(v, run, 1), _runs(kid, run, 1))):
    dk_s = dv_s = 0.0
    for r in range(q.shape[1]):
      args = tuple(x[r] for x in q_runs) + (k_r, v_r, qid_runs[r], ki)
      g_q, g_k, g_v = jax.lax.switch(case(r, s), branches, *args)
      dq_runs[r] = dq_runs[r] + g_q
      dk_s, dv_s = dk_s + g_k, dv_s + g_v
    dk_runs.append(dk_s)
    dv_runs.append(dv_s)
  dq = _heads(dqf, groups) + jnp.stack(dq_runs, axis=1)
  return _folded(dq), jnp.concatenate(dk_runs, axis=1), jnp.concatenate(dv_runs, axis=1)


__all__ = ["attend_step", "available", "grad_step", "segment_ids"]
