"""Routed MoE against the dense (every expert on every token) reference, and the grouped matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import SCOUT_LIKE
from llama4_jax.model.moe import MoE, grouped_matmul


@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
def test_grouped_matmul_matches_numpy(impl):
  rng = np.random.RandomState(0)
  sizes = np.array([5, 0, 17, 1, 0, 9])  # empty groups included
  x = rng.randn(sizes.sum(), 8).astype(np.float32)
  w = rng.randn(len(sizes), 8, 3).astype(np.float32)
  group = np.repeat(np.arange(len(sizes)), sizes)
  want = np.einsum("mk,mkn->mn", x, w[group])
  got = jax.jit(lambda a, b, s: grouped_matmul(a, b, s, impl))(x, w, jnp.asarray(sizes))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # gradients (the blocked one has its own VJP): dy = c gives dx = c @ w[g]^T, dw[g] = x_g^T c_g
  c = rng.randn(*want.shape).astype(np.float32)
  dx, dw = jax.jit(jax.grad(lambda a, b: jnp.sum(grouped_matmul(a, b, jnp.asarray(sizes), impl) * c),
                            argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(np.asarray(dx), np.einsum("mn,mkn->mk", c, w[group]), rtol=1e-5, atol=1e-5)
  want_dw = np.stack([x[group == g].T @ c[group == g] for g in range(len(sizes))])
  np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
def test_routed_equals_dense_reference(top_k, impl):
  cfg = SCOUT_LIKE.replace(num_experts_per_tok=top_k, num_local_experts=5)
  moe = MoE(cfg.replace(moe_impl=impl), nnx.Rngs(0))
  graphdef, state = nnx.split(moe)
  dense = nnx.merge(graphdef, state)
  dense.impl = "dense"
  x = jnp.asarray(np.random.RandomState(1).randn(2, 37, cfg.hidden_size), jnp.float32)

  run = nnx.jit(lambda m, x: m(x))
  y_routed, aux_routed = run(moe, x)
  y_dense, aux_dense = run(dense, x)
  np.testing.assert_allclose(np.asarray(y_routed), np.asarray(y_dense), atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(float(aux_routed), float(aux_dense), rtol=1e-6)

  # gradients agree too (the training path differentiates through the routing)
  def loss(m, x):
    return jnp.sum(m(x)[0] ** 2)

  g_routed = nnx.grad(loss)(moe, x)
  g_dense = nnx.grad(loss)(dense, x)
  for a, b in zip(jax.tree.leaves(g_routed), jax.tree.leaves(g_dense)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)



def test_few_tokens_take_the_gathered_path():
  """With fewer (token, expert) pairs than experts (decoding) the chosen weights are gathered."""
  cfg = SCOUT_LIKE.replace(num_local_experts=8, num_experts_per_tok=2)
  moe = MoE(cfg, nnx.Rngs(0))
  graphdef, state = nnx.split(moe)
  dense = nnx.merge(graphdef, state)
  dense.impl = "dense"
  x = jnp.asarray(np.random.RandomState(2).randn(2, 1, cfg.hidden_size), jnp.float32)  # 4 pairs, 8 experts
  run = nnx.jit(lambda m, x: m(x)[0])
  np.testing.assert_allclose(np.asarray(run(moe, x)), np.asarray(run(dense, x)), atol=2e-5, rtol=1e-5)
