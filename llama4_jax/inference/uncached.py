"""A simple sampler without a KV cache: each new token re-runs the model over a fixed window.

One compiled forward over [1, window] tokens (causal attention makes the unused tail irrelevant), so it
is slow for long outputs but exact, and it serves as the reference for the cached sampler.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_uncached(model, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                    seed: int = 0, stop_tokens: Sequence[int] = (), window: int = 256) -> list[int]:
  """New tokens after `prompt` (greedy when temperature == 0). The context slides past `window`."""
  if not len(prompt):
    raise ValueError("the prompt is empty: give at least one token (e.g. the BOS token)")
  vocab = model.config.vocab_size
  if min(prompt) < 0 or max(prompt) >= vocab:
    raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(prompt)}..{max(prompt)}")

  @nnx.jit
  def next_logits(model, buf, last):
    return model.forward(buf)[0, last]

  tokens = list(prompt)
  rng = np.random.default_rng(seed)
  out: list[int] = []
  for _ in range(max_new_tokens):
    ctx = tokens[-window:]
    buf = np.zeros((1, window), np.int32)
    buf[0, : len(ctx)] = ctx
    logits = np.asarray(next_logits(model, jnp.asarray(buf), len(ctx) - 1), np.float64)
    if temperature > 0:
      p = np.exp((logits - logits.max()) / temperature)
      tok = int(rng.choice(vocab, p=p / p.sum()))
    else:
      tok = int(logits.argmax())
    out.append(tok)
    tokens.append(tok)
    if tok in stop_tokens:
      break
  return out
