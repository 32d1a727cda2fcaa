"""Sampling strategies: small frozen (hashable) dataclasses, so a strategy is a static jit argument.

Each maps logits [B, V] (float32) and a PRNG key to tokens [B] int32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def argmax(logits_BV):
  """jnp.argmax over the last axis (the first maximum; the first NaN if any) as int32, in two plain
  reductions: XLA's CPU argmax (one reduction over (value, index) pairs) is not vectorized and took
  2.6-4.5x as long on [8, 8192] to [8, 202048] logits on a 2-core x86 machine."""
  v = logits_BV.shape[-1]
  hit = (logits_BV == jnp.max(logits_BV, axis=-1, keepdims=True)) | jnp.isnan(logits_BV)
  return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


@dataclasses.dataclass(frozen=True)
class Greedy:
  def __call__(self, logits, key):
    return argmax(logits)


@dataclasses.dataclass(frozen=True)
class Temperature:
  temperature: float

  def __call__(self, logits, key):
    return jax.random.categorical(key, logits / self.temperature, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK:
  k: int
  temperature: float = 1.0

  def __call__(self, logits, key):
    top, idx = jax.lax.top_k(logits, self.k)
    choice = jax.random.categorical(key, top / self.temperature, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopP:
  """Nucleus sampling: the smallest set of tokens whose probability reaches p (the top token always)."""
  p: float
  temperature: float = 1.0

  def __call__(self, logits, key):
    logits = logits / self.temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    sorted_logits = jnp.where(before < self.p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def make_strategy(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
  """The strategy for `generate`'s arguments; temperature 0 is greedy whatever top_k/top_p say."""
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k={top_k} must be >= 1")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")
  if temperature == 0 or top_k == 1:
    return Greedy()
  if top_k is not None:
    return TopK(top_k, temperature)
  if top_p is not None and top_p < 1:
    return TopP(top_p, temperature)
  return Temperature(temperature)


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
