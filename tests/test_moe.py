"""Routed MoE against the dense (every expert on every token) reference, and the grouped matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import SCOUT_LIKE
from llama4_jax.model.kernels.grouped_matmul import grouped_matmul
from llama4_jax.model.moe import MoE


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


@pytest.mark.parametrize("axes, experts", [(dict(fsdp=2, expert=4), 4), (dict(data=2, expert=2, context=2), 8),
                                           (dict(fsdp=2, tensor=2, expert=2), 4)])
def test_expert_parallel_equals_one_device(axes, experts):
  """Tokens routed on their own devices and exchanged over the expert axis (the CPU stand-in for the ragged
  all-to-all) give the one-device outputs and gradients, with 1 or several experts per device and top-2."""
  import llama4_jax as l4
  cfg = SCOUT_LIKE.replace(num_local_experts=experts, num_experts_per_tok=2)
  moe = MoE(cfg, nnx.Rngs(0))
  x = jnp.asarray(np.random.RandomState(3).randn(8, 12, cfg.hidden_size), jnp.float32)
  mesh = l4.make_mesh(**dict(dict(data=1, fsdp=1, tensor=1, expert=1, context=1), **axes))

  def loss(m, x, mesh):
    y, aux = m(x, mesh)
    return jnp.sum(y ** 2) + aux, y

  grad = nnx.jit(nnx.grad(loss, has_aux=True), static_argnums=2)
  (g_one, y_one), (g_ep, y_ep) = grad(moe, x, None), grad(moe, x, mesh)
  np.testing.assert_allclose(np.asarray(y_ep), np.asarray(y_one), atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g_one)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_expert_parallel_with_an_nf4_base():
  """NF4 codes and block scales enter the shard_map split as stored where devices hold whole blocks (1
  block along the model dim, gathered over fsdp inside), dequantized first where they would not (2 blocks
  of 48 along the FFN width split 4 ways over tensor). The outputs equal one device's."""
  import llama4_jax as l4
  cfg = SCOUT_LIKE.replace(num_local_experts=4, num_experts_per_tok=2, intermediate_size=96,
                           base_quant="nf4")
  moe = MoE(cfg, nnx.Rngs(0))
  assert moe.down.shape == (4, 48, cfg.hidden_size) and moe.down_scale.shape == (4, 2, cfg.hidden_size)
  x = jnp.asarray(np.random.RandomState(3).randn(8, 12, cfg.hidden_size), jnp.float32)
  mesh = l4.make_mesh(data=1, fsdp=2, tensor=4, expert=1, context=1)
  run = nnx.jit(lambda m, x, mesh: m(x, mesh)[0], static_argnums=2)
  np.testing.assert_allclose(np.asarray(run(moe, x, mesh)), np.asarray(run(moe, x, None)), atol=1e-5,
                             rtol=1e-5)


def test_grouped_matmul_rows_past_the_groups_are_zero():
  """The expert-parallel receive buffer ends in rows of no group: they give zeros (and no gradient)."""
  rng = np.random.RandomState(4)
  sizes = jnp.asarray([3, 0, 4])
  x = jnp.asarray(rng.randn(12, 8), jnp.float32)
  w = jnp.asarray(rng.randn(3, 8, 5), jnp.float32)
  y = jax.jit(lambda a: grouped_matmul(a, w, sizes, "blocked"))(x)
  np.testing.assert_array_equal(np.asarray(y[7:]), 0)
  np.testing.assert_allclose(np.asarray(y[:7]), np.asarray(grouped_matmul(x[:7], w, sizes, "blocked")),
                             rtol=1e-6)
  dx = jax.grad(lambda a: jnp.sum(grouped_matmul(a, w, sizes, "blocked")))(x)
  np.testing.assert_array_equal(np.asarray(dx[7:]), 0)


@pytest.mark.parametrize("experts", [4, 8])
def test_expert_capacity_drops_only_what_does_not_fit(experts):
  """With a capacity factor each token's routed output (top-1) is either the one-device one or dropped
  (zero), some are dropped when routing is skewed, and a factor as large as the expert axis drops none
  (1 and 2 experts per device)."""
  import llama4_jax as l4
  cfg = SCOUT_LIKE.replace(num_local_experts=experts, num_experts_per_tok=1)
  moe = MoE(cfg, nnx.Rngs(0))
  x = jnp.asarray(np.random.RandomState(5).randn(8, 16, cfg.hidden_size), jnp.float32)
  x = x + 3.0 * moe.router[...][:, 0]  # skew: most tokens pick expert 0
  mesh = l4.make_mesh(data=1, fsdp=2, tensor=1, expert=4, context=1)
  routed = nnx.jit(lambda m, x, mesh: m(x, mesh)[0] - m.shared(x), static_argnums=2)
  want = np.asarray(routed(moe, x, None)).reshape(-1, cfg.hidden_size)
  for factor, dropped in ((4.0, False), (1.25, True)):
    moe.capacity_factor = factor
    got = np.asarray(routed(moe, x, mesh)).reshape(-1, cfg.hidden_size)
    kept = np.all(np.isclose(got, want, atol=1e-5, rtol=1e-5), axis=1)
    zero = np.all(got == 0, axis=1)
    assert np.all(kept | zero)
    assert (not kept.all()) == dropped, kept.mean()
