"""Sampling: logits [B, V] (float32) to tokens [B] int32, greedy or sampled with temperature, top-k and
top-p given per row as arrays. The settings are traced values, not constants of the compiled program, so
one program serves every strategy (and every request mix in the server).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def argmax(logits_BV):
  """jnp.argmax over the last axis (the first maximum; the first NaN if any) as int32, in two plain
  reductions: XLA's CPU argmax (one reduction over (value, index) pairs) is not vectorized and took
  2.6-4.5x as long on [8, 8192] to [8, 202048] logits on a 2-core x86 machine."""
  v = logits_BV.shape[-1]
  hit = (logits_BV == jnp.max(logits_BV, axis=-1, keepdims=True)) | jnp.isnan(logits_BV)
  return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> None:
  """Raises ValueError for settings `sample_rows` cannot take."""
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k={top_k} must be >= 1")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")


def settings_rows(batch: int, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(temperature_B, top_k_B, top_p_B) for `sample_rows`, every row alike (checked first)."""
  check_sampling(temperature, top_k, top_p)
  return (np.full((batch,), temperature, np.float32), np.full((batch,), top_k or 0, np.int32),
          np.full((batch,), 1.0 if top_p is None else top_p, np.float32))


def row_keys(seeds_B, positions_B):
  """One PRNG key per row: the row's seed folded with the position of the token being drawn, so a row's
  draws depend on neither the other rows nor how the decoding was split into calls."""
  return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.PRNGKey(s), p))(seeds_B, positions_B)


def sample_rows(logits_BV, keys_B, temperature_B, top_k_B, top_p_B):
  """Tokens [B] int32 with per-row settings, for batches whose rows belong to different requests.

  temperature_B 0 is greedy; top_k_B 0 means no top-k; top_p_B 1 means no nucleus. keys_B: one PRNG key
  per row, so a row's draw does not depend on the other rows. Top-k is applied first, then top-p on the
  renormalized rest (as transformers and the OpenAI-compatible servers do). The sort over the vocabulary
  runs only when some row samples."""
  greedy = argmax(logits_BV)
  sampling = temperature_B > 0

  def sampled():
    scaled = logits_BV / jnp.where(sampling, temperature_B, 1.0)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(ranked.shape[-1])[None, :]
    ranked = jnp.where((top_k_B[:, None] > 0) & (rank >= top_k_B[:, None]), -jnp.inf, ranked)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    ranked = jnp.where((before < top_p_B[:, None]) | (rank == 0), ranked, -jnp.inf)
    choice = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys_B, ranked)
    drawn = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(sampling, drawn, greedy)

  return jax.lax.cond(jnp.any(sampling), sampled, lambda: greedy)


MAX_TOP_LOGPROBS = 20  # the most alternatives a request may ask log-probabilities for (OpenAI's bound)


def token_logprobs(logits_BV, tokens_B, k: int = MAX_TOP_LOGPROBS):
  """Log-probabilities, in float32, of the distribution each token was drawn from *before* temperature,
  top-k and top-p (what OpenAI-compatible servers report): (logprob of tokens_B [B], the k most likely
  token ids [B, k] int32, their logprobs [B, k]). Works on any leading shape ([B, T, V] too)."""
  lp = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(lp, tokens_B[..., None].astype(jnp.int32), axis=-1)[..., 0]
  top_lp, top_ids = jax.lax.top_k(lp, min(k, lp.shape[-1]))
  return chosen, top_ids.astype(jnp.int32), top_lp
