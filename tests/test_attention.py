"""The blocked dense attention kernel and the blockwise (flash-style) prefill kernel against a naive
softmax, with GQA, packed segments and chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama4_jax.model import blockwise
from llama4_jax.model.attention import attention_mask, dense_attention


def naive(q, k, v, mask):
  b, t, n, h = q.shape
  g = n // k.shape[2]
  k = np.repeat(k, g, axis=2)
  v = np.repeat(v, g, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
  s = np.where(mask[:, None], s, -np.inf)
  m = s.max(-1, keepdims=True)
  p = np.exp(s - np.where(np.isfinite(m), m, 0))
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
  return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("kernel", ["dense", "blockwise"])
@pytest.mark.parametrize("t,chunk", [(40, 16), (384, 48), (384, None)])
def test_blocked_attention_matches_naive(t, chunk, kernel, monkeypatch):
  """Blockwise: blocks of 64 tokens (6 query blocks, each looping over the key blocks its mask reaches;
  chunks of 48 straddle the blocks)."""
  monkeypatch.setattr(blockwise, "BLOCK", 64)
  rng = np.random.RandomState(0)
  b, n, kv, h = 2, 4, 2, 8
  q, k, v = (rng.randn(b, t, x, h).astype(np.float32) for x in (n, kv, kv))
  # two packed documents per row, the boundary at a different place in each row
  bounds = [t // 3, t // 2 + 5]
  seg = np.stack([(np.arange(t) >= c).astype(np.int32) for c in bounds])
  pos = np.stack([np.where(np.arange(t) >= c, np.arange(t) - c, np.arange(t)) for c in bounds])
  mask = np.asarray(attention_mask(jnp.asarray(pos), jnp.asarray(seg), chunk))
  if kernel == "dense":
    got = np.asarray(jax.jit(dense_attention)(q, k, v, mask))
  else:
    got = np.asarray(jax.jit(blockwise.prefill_attention, static_argnums=5)(q, k, v, pos, seg, chunk))
  np.testing.assert_allclose(got, naive(q, k, v, mask), atol=2e-6, rtol=0)


def test_fully_masked_rows_give_zeros():
  rng = np.random.RandomState(1)
  q, k, v = (rng.randn(1, 256, 2, 4).astype(np.float32) for _ in range(3))
  mask = np.tril(np.ones((256, 256), bool))[None].copy()
  mask[0, 7] = False  # a query that sees nothing
  out = np.asarray(jax.jit(dense_attention)(q, k, v, mask))
  assert np.isfinite(out).all() and np.all(out[0, 7] == 0)
