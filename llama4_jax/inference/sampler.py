"""`generate`: jit-compiled prefill + `lax.while_loop` decode over a sharded KV cache; `generate_stream`.

Prompts of different lengths share a batch: they are right-padded, each row keeps its own positions
and stop state, so a row's tokens are exactly those it would get alone. The chunked (RoPE) layers keep
a ring buffer of C = attention_chunk_size entries, the NoPE layers the whole length (`Llama4.init_cache`).
The cache is created sharded (batch over data/fsdp/expert, kv heads over tensor; the NoPE layers'
sequence over context) inside the compiled program.

Every compiled call here is a plain `jax.jit` over `split_for_inference`'s (static handle, parameter
leaves): `nnx.jit` walks the whole module graph on every call (measured: 61 ms vs 9.6 ms per decode step
for the 100M-parameter benchmark model on the 2-core CPU), and a (GraphDef, State) pair costs ~2 ms per
call to hash and flatten. On CPU a model of several scanned superblocks runs as its `unstacked` copy.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama4_jax.inference.sampling import row_keys, sample_rows, settings_rows
from llama4_jax.inference.static import merge_model, split_for_inference

_BUCKET = 64  # prompt and cache lengths are rounded up to this, so few shapes get compiled


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def check_prompt_ids(prompt: Sequence[int], vocab: int, name: str = "the prompt") -> None:
  """Raises ValueError if `prompt` is empty or holds a token id outside [0, vocab)."""
  if not len(prompt):
    raise ValueError(f"{name} is empty: give at least one token (e.g. the BOS token)")
  lo, hi = min(prompt), max(prompt)
  if lo < 0 or hi >= vocab:
    raise ValueError(f"{name} has token id {hi if hi >= vocab else lo} outside the vocabulary [0, {vocab})")


def _check_prompts(model, prompts, max_new_tokens, cache_length):
  if not len(prompts):
    raise ValueError("no prompts given")
  for i, p in enumerate(prompts):
    check_prompt_ids(p, model.config.vocab_size, f"prompt {i}")
  longest = max(len(p) for p in prompts)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  limit = model.config.max_position_embeddings
  need = longest + max_new_tokens
  if cache_length is not None and need > cache_length:
    raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {need} "
                     f"exceeds cache_length={cache_length}; shorten the prompt or raise cache_length")
  if need > limit:
    raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {need} "
                     f"exceeds the model's max_position_embeddings={limit}")
  return longest


def _pack(prompts, width):
  tokens = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  return tokens, np.asarray([len(p) for p in prompts], np.int32)


@functools.partial(jax.jit, static_argnames=("static", "max_new_tokens", "cache_length"))
def _generate_loop(static, leaves, tokens, lengths, seeds, settings, stop, max_new_tokens, cache_length):
  """Prefill and the decode loop in one program; the cache is created inside it (no extra call)."""
  model = merge_model(static, leaves)
  b = tokens.shape[0]
  logits, cache = model.prefill(tokens, lengths, model.init_cache(b, cache_length))
  tok = sample_rows(logits, row_keys(seeds, lengths), *settings)
  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok)
  done = jnp.isin(tok, stop)
  count = jnp.ones((b,), jnp.int32)

  def cond(state):
    step, _, _, _, _, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, tok, pos, cache, out, done, count = state
    logits, cache = model.decode(tok, pos, cache)
    nxt = sample_rows(logits, row_keys(seeds, pos + 1), *settings)
    nxt = jnp.where(done, 0, nxt)
    out = out.at[:, step].set(nxt)
    count = count + (~done).astype(jnp.int32)
    done = done | jnp.isin(nxt, stop)
    return step + 1, nxt, pos + 1, cache, out, done, count

  state = (jnp.int32(1), tok, lengths, cache, out, done, count)
  _, _, _, cache, out, _, count = jax.lax.while_loop(cond, body, state)
  return out, count


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, cache_length: int | None = None) -> list[list[int]]:
  """New tokens for each prompt (a list of token ids), up to and including a stop token.

  temperature 0 is greedy; otherwise sampling, optionally restricted by top_k (first) and top_p,
  reproducible from `seed`: each token is drawn with a key from the seed and its position, so a prompt
  gets the same tokens whatever else is in the batch, from `generate_stream`, and from the server for
  the same seed. The settings are traced: one compiled program serves them all. stop_tokens default to
  the model config's eos_token_id. cache_length defaults to the longest prompt + max_new_tokens (rounded
  up).
  """
  settings, stop, tokens, lengths, length = _prepare(model, prompts, max_new_tokens, temperature, top_k,
                                                     top_p, stop_tokens, cache_length)
  seeds = np.full((len(prompts),), seed % 2**32, np.uint32)  # as the server takes it
  out, count = _generate_loop(*split_for_inference(model), tokens, lengths, seeds, settings,
                              np.asarray(stop or [-1], np.int32), max_new_tokens, length)
  out, count = np.asarray(out), np.asarray(count)
  return [out[i, : count[i]].tolist() for i in range(len(prompts))]


@functools.partial(jax.jit, static_argnames=("static", "batch", "length"))
def _init_cache(static, leaves, batch, length):
  return merge_model(static, leaves).init_cache(batch, length)


def _prepare(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, cache_length):
  """Checks the arguments; returns (sampling settings per row, stop ids, padded tokens [B, T] and
  lengths [B] (host arrays), the cache length)."""
  longest = _check_prompts(model, prompts, max_new_tokens, cache_length)
  settings = settings_rows(len(prompts), temperature, top_k, top_p)
  stop = list(model.config.eos_token_id if stop_tokens is None else stop_tokens)
  tokens, lengths = _pack(prompts, _round_up(longest, _BUCKET))
  return settings, stop, tokens, lengths, cache_length or _round_up(longest + max_new_tokens, _BUCKET)


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("cache",))
def _prefill_pure(static, leaves, tokens, lengths, cache, seeds, settings):
  logits, cache = merge_model(static, leaves).prefill(tokens, lengths, cache)
  return sample_rows(logits, row_keys(seeds, lengths), *settings), cache


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("cache",))
def _decode_pure(static, leaves, tok, pos, cache, seeds, settings):
  logits, cache = merge_model(static, leaves).decode(tok, pos, cache)
  return sample_rows(logits, row_keys(seeds, pos + 1), *settings), cache


def generate_stream(model, prompt: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                    stop_tokens: Sequence[int] | None = None,
                    cache_length: int | None = None) -> Iterator[int]:
  """Yields the new tokens of one prompt as they are produced (one compiled decode step per token).

  Same tokens as `generate` for the same arguments."""
  settings, stop, tokens, lengths, length = _prepare(model, [prompt], max_new_tokens, temperature, top_k,
                                                     top_p, stop_tokens, cache_length)
  stop = set(stop)
  static, leaves = split_for_inference(model)
  cache = _init_cache(static, leaves, 1, length)
  seeds = jnp.full((1,), seed % 2**32, jnp.uint32)
  tok, cache = _prefill_pure(static, leaves, tokens, lengths, cache, seeds, settings)
  pos = lengths
  for i in range(max_new_tokens):
    t = int(tok[0])
    yield t
    if t in stop or i == max_new_tokens - 1:
      return
    tok, cache = _decode_pure(static, leaves, tok, pos, cache, seeds, settings)
    pos = pos + 1
