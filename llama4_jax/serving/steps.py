"""The serving engine's device calls, each one jitted program: prefill prompts into slots, continue a
long prompt's own row, copy a prefilled row into a slot, one decode step of the first slots, score a
prompt (echo), and an empty cache. Every call that samples also returns the sampled tokens'
log-probabilities (`token_logprobs`: float32, on the device, from the logits it sampled from). The
engine (`engine.py`) calls them through this module, so tests can wrap them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama4_jax.inference.sampling import row_keys, sample_rows, token_logprobs
from llama4_jax.inference.static import merge_model


def _put(big, small, slots_b, axis):
  """big with `small`'s b entries along `axis` written at indices slots_b; an index past the end (a
  padding row's) writes nothing. One row is a dynamic-update-slice, which XLA updates in place."""
  small = small.astype(big.dtype)
  if slots_b.shape[0] == 1:
    return jax.lax.dynamic_update_slice_in_dim(big, small, slots_b[0], axis)
  return big.at[(slice(None),) * axis + (slots_b,)].set(small, mode="drop")


def _insert_rows(cache, rows, slots_b):
  """Writes the b rows of a batch-b cache into `cache` at batch indices slots_b (blocks are stacked:
  batch axis 1)."""
  return {"blocks": jax.tree.map(lambda big, small: _put(big, small, slots_b, 1), cache["blocks"],
                                 rows["blocks"]),
          "tail": jax.tree.map(lambda big, small: _put(big, small, slots_b, 0), cache["tail"], rows["tail"])}


def _take_row(cache, slot):
  """The batch-1 cache row at batch index `slot` (the inverse of `_insert_rows`)."""
  def take(axis):
    return lambda big: jax.lax.dynamic_slice_in_dim(big, slot, 1, axis)
  return {"blocks": jax.tree.map(take(1), cache["blocks"]), "tail": jax.tree.map(take(0), cache["tail"])}


# Plain jax.jit over `split_model`'s (static, leaves): nnx.jit walks the module graph on every call, and a
# (GraphDef, State) pair costs ~2 ms to hash and flatten per call.
@functools.partial(jax.jit, static_argnames=("static", "length"), donate_argnames=("cache",))
def prefill_insert(static, leaves, tokens_bT, lengths_b, cache, tok_S, slots_b, seed_b, temperature_b,
                    top_k_b, top_p_b, length):
  """Prefills b prompts into fresh cache rows, writes the rows into `cache` at slots_b, and samples their
  first tokens [b], which are also written into the next step's input tokens tok_S. Padding rows (slot
  index S) are written nowhere. Returns ((first tokens [b], their `token_logprobs`), each row's logits
  [1, V] (for requests that copy its row), tok_S, cache)."""
  model = merge_model(static, leaves)
  logits, rows = model.prefill(tokens_bT, lengths_b, model.init_cache(tokens_bT.shape[0], length))
  first = sample_rows(logits, row_keys(seed_b, lengths_b), temperature_b, top_k_b, top_p_b)
  row_logits = tuple(logits[i:i + 1] for i in range(logits.shape[0]))
  return ((first, token_logprobs(logits, first)), row_logits, _put(tok_S, first, slots_b, 0),
          _insert_rows(cache, rows, slots_b))


row_at = jax.jit(_take_row)
copy_row = jax.jit(lambda row: jax.tree.map(jnp.copy, row))  # a fresh copy (the prefix cache keeps one)


@functools.partial(jax.jit, donate_argnames=("cache",))
def copy_prefill(logits_1V, row, cache, tok_B, slot, length_1, seed_1, temperature_1, top_k_1, top_p_1):
  """A request whose prompt is already prefilled (its cache `row` and logits_1V kept): writes the row at
  `slot` and samples the request's first token with its own key, as a prefill of its own would."""
  first = sample_rows(logits_1V, row_keys(seed_1, length_1), temperature_1, top_k_1, top_p_1)
  slots = jnp.reshape(slot, (1,))
  return (first, token_logprobs(logits_1V, first)), _put(tok_B, first, slots, 0), _insert_rows(cache, row,
                                                                                              slots)


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("row",))
def extend_row(static, leaves, tokens_1T, start_1, length_1, row):
  """The next piece of a long prompt into its batch-1 cache `row`: (logits [1, V] at its last token, row)."""
  return merge_model(static, leaves).extend(tokens_1T, start_1, length_1, row)


@functools.partial(jax.jit, static_argnames=("static", "rows"), donate_argnames=("cache",))
def decode_step(static, leaves, tok_S, pos_S, cache, seed_S, temperature_S, top_k_S, top_p_S, rows):
  """One decode step of the first `rows` slots (the others are idle): returns the next input tokens [S]
  (the new ones in the first `rows` places), the new tokens' `token_logprobs` (`rows` rows), and the
  cache."""
  r = slice(0, rows)
  logits, cache = merge_model(static, leaves).decode(tok_S[r], pos_S[r], cache)
  nxt = sample_rows(logits, row_keys(seed_S[r], pos_S[r] + 1), temperature_S[r], top_k_S[r], top_p_S[r])
  return tok_S.at[r].set(nxt), token_logprobs(logits, nxt), cache


@functools.partial(jax.jit, static_argnames=("static",))
def score_prompt(static, leaves, tokens_1T):
  """The log-probabilities of a prompt's tokens (right-padded to T), each given the ones before it, from
  one forward pass (`Llama4.forward`, no cache): `token_logprobs` of tokens 1..T-1, each [T - 1, ...]."""
  logits = merge_model(static, leaves).forward(tokens_1T)[0]  # [T, V]
  return token_logprobs(logits[:-1], tokens_1T[0, 1:])


@functools.partial(jax.jit, static_argnames=("static", "batch", "length"))
def empty_state(static, leaves, batch, length):
  """An empty KV cache and input tokens [batch], on the model's devices."""
  return merge_model(static, leaves).init_cache(batch, length), jnp.zeros((batch,), jnp.int32)
