"""Llama 4 mixture-of-experts block: top-k sigmoid router that scales each expert's *input*, routed SwiGLU
experts, plus a shared expert on every token. Reproduces transformers' `Llama4TextMoe`.

Routing is real: the N*k (token, expert) assignments are sorted by expert and run through a grouped matmul
(`grouped_matmul`), so each token costs k expert evaluations, not E. `moe_impl="dense"` runs every expert
on every token (the transformers formulation) and is the reference the tests compare against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax.config import ModelConfig
from llama4_jax.model.expert_parallel import expert_parallel
from llama4_jax.model.layers import SwiGLU
from llama4_jax.model.linear import declare_linear, weight
from llama4_jax.model.ops import dot
from llama4_jax.model.params import param
from llama4_jax.model.platform import target_platform


def default_moe_impl() -> str:
  """The grouped matmul for the platform being compiled for: megablox on TPU, ragged_dot on GPU (XLA's
  TPU ragged_dot runs the weight gradient as a dense masked product, E times the work), blocked on CPU."""
  return {"cpu": "blocked", "tpu": "gmm"}.get(target_platform(), "ragged_dot")


# Logical axes of the routed experts' kernels [E, in, out].
EXPERT_AXES = {"gate": ("experts", "expert_embed", "mlp"), "up": ("experts", "expert_embed", "mlp"),
               "down": ("experts", "mlp", "expert_embed")}


class MoE(nnx.Module):
  """router [D, E]; experts gate/up [E, D, F], down [E, F, D]; shared expert SwiGLU of width F."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack=()):
    d, e, f = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
    pd, std = cfg.param_dtype, cfg.initializer_range
    self.router = param(rngs, (d, e), ("embed", None), pd, std=std, stack=stack)
    for name, shape in (("gate", (e, d, f)), ("up", (e, d, f)), ("down", (e, f, d))):
      declare_linear(self, name, rngs, cfg, shape, EXPERT_AXES[name], 1, "experts", std, stack, n_groups=1)
    self.shared = SwiGLU(cfg, f, rngs, "shared", stack=stack)
    self.top_k = cfg.num_experts_per_tok
    self.impl = cfg.moe_impl
    self.capacity_factor = cfg.moe_capacity_factor
    self.remat = cfg.remat_policy == "full"

  def route(self, x_D):
    """Router logits [..., E], chosen experts [..., k] and their sigmoid scores [..., k] (in x's dtype)
    for tokens x [..., D] (any leading shape: flattening a sequence-sharded [B, T] would gather it)."""
    logits = dot(x_D, self.router[...].astype(x_D.dtype), (((x_D.ndim - 1,), (0,)), ((), ())))
    if self.top_k == 1:  # Llama 4's setting; argmax is several times faster than top_k on CPU
      top_idx = jnp.argmax(logits, axis=-1)[..., None]
      top_logits = jnp.max(logits, axis=-1, keepdims=True)  # the logit at argmax, without a gather
    else:
      top_logits, top_idx = jax.lax.top_k(logits, self.top_k)
    scores = jax.nn.sigmoid(top_logits.astype(jnp.float32)).astype(x_D.dtype)
    return logits, top_idx, scores

  def __call__(self, x_BTD, mesh=None, key=None):
    """Returns y [B, T, D] and the load-balancing auxiliary loss (a float32 scalar). `key`: LoRA dropout."""
    b, t, d = x_BTD.shape
    logits, idx, score = self.route(x_BTD)
    impl = default_moe_impl() if self.impl == "auto" else self.impl
    weights = tuple(weight(self, name, n_groups=1) for name in EXPERT_AXES)
    flat = lambda a: a.reshape(b * t, a.shape[-1])  # noqa: E731
    few = 2 * b * t * self.top_k <= self.gate.shape[0]  # few tokens (decoding)
    routed = functools.partial(self._routed, impl=impl, remat=self.remat)
    if impl == "dense":
      routed_BTD = self._dense(flat(x_BTD), flat(idx), flat(score), weights, key).reshape(b, t, d)
    elif mesh is not None and mesh.size > 1 and not few:
      # each device routes its own tokens (a global sort would gather them all onto every device)
      axes = tuple(w.axes(EXPERT_AXES[name], 1) for w, name in zip(weights, EXPERT_AXES))
      weights = tuple(w.narrowed(x_BTD.dtype) for w in weights)  # gathered in the compute dtype
      routed_BTD = expert_parallel(routed, mesh, x_BTD, idx, score, weights, axes, self.gate.shape[0], key,
                                   self.capacity_factor)
    elif few:
      routed_BTD = self._gathered(flat(x_BTD), flat(idx), flat(score), weights, key).reshape(b, t, d)
    else:
      routed_BTD = routed(flat(x_BTD), flat(idx), flat(score), weights, key).reshape(b, t, d)
    y_BTD = self.shared(x_BTD, mesh, key) + routed_BTD
    return y_BTD, load_balance_loss(logits, idx)

  @staticmethod
  def _routed(x_ND, idx_Nk, score_Nk, weights, key=None, exchange=None, *, impl, remat=False):
    """Sorted (token, expert) pairs through grouped matmuls; weights = (gate, up, down) `Weight`s.
    `exchange(x_AD, sizes_E, ffn)` (expert parallelism, see `expert_parallel`) runs `ffn` where the
    experts live; without it the weights hold every expert. `remat`: the expert FFN keeps only its input
    rows for the backward pass and recomputes gate and up there (under full remat the superblock's
    recomputed forward would otherwise hold every layer's [rows, F] activations at once: with
    expert parallelism the rows are the receive buffer, up to the expert axis size times the tokens)."""
    gate, up, down = weights
    n, k = idx_Nk.shape
    expert_A = idx_Nk.reshape(-1)  # A = N*k assignments, token-major
    order_A = jnp.argsort(expert_A, stable=True)
    token_A = order_A // k
    x_AD = x_ND[token_A] * score_Nk.reshape(-1)[order_A][:, None]  # the score scales the expert input

    def ffn(rows_RD, sizes_G):  # rows sorted by expert, sizes_G rows of each of the weights' experts
      gate_RF = gate.grouped(rows_RD, sizes_G, impl, key, "experts.gate")
      up_RF = up.grouped(rows_RD, sizes_G, impl, key, "experts.up")
      return down.grouped(jax.nn.silu(gate_RF) * up_RF, sizes_G, impl, key, "experts.down")

    if remat:
      ffn = jax.checkpoint(ffn)
    e = gate.kernel.shape[0] if exchange is None else exchange.num_experts
    sizes_E = jnp.bincount(expert_A, length=e)
    y_AD = ffn(x_AD, sizes_E) if exchange is None else exchange(x_AD, sizes_E, ffn)
    y_AD = y_AD[jnp.argsort(order_A)]  # back to token-major order
    return y_AD.reshape(n, k, -1).sum(axis=1)

  @staticmethod
  def _gathered(x_ND, idx_Nk, score_Nk, weights, key=None):
    """Each (token, expert) pair with that expert's weights gathered: memory traffic of k experts per
    token instead of all E, which is what bounds a decode step."""
    gate, up, down = weights
    x_NkD = x_ND[:, None, :] * score_Nk[:, :, None]
    g = gate.gathered(x_NkD, idx_Nk, key, "experts.gate")
    u = up.gathered(x_NkD, idx_Nk, key, "experts.up")
    y = down.gathered(jax.nn.silu(g) * u, idx_Nk, key, "experts.down")
    return y.sum(axis=1)

  @staticmethod
  def _dense(x_ND, idx_Nk, score_Nk, weights, key=None):
    """Every expert on every token, unchosen ones with score 0 (transformers' formulation)."""
    gate, up, down = weights
    dt = x_ND.dtype
    e = gate.kernel.shape[0]
    score_NE = jnp.zeros((x_ND.shape[0], e), dt).at[
        jnp.arange(x_ND.shape[0])[:, None], idx_Nk].set(score_Nk)
    x_END = x_ND[None] * score_NE.T[:, :, None]
    g = gate("END,EDF->ENF", x_END, key, "experts.gate")
    u = up("END,EDF->ENF", x_END, key, "experts.up")
    return down("ENF,EFD->ND", jax.nn.silu(g) * u, key, "experts.down")


def load_balance_loss(logits, idx):
  """Switch-style balance loss E * sum_e f_e * p_e (f: share of assignments, p: mean softmax prob), for
  logits [..., E] and chosen experts [..., k]."""
  e = logits.shape[-1]
  axes = tuple(range(logits.ndim - 1))
  frac = jnp.mean(jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32), axis=-2), axis=axes) / idx.shape[-1]
  prob = jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=axes)
  return e * jnp.sum(frac * prob)
