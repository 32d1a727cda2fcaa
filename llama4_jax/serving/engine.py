"""Continuous batching: a fixed set of decode slots advanced together by one jitted step.

The engine thread loops: admit waiting requests into free slots (each is prefilled alone into a fresh
cache row, which is written into the batch cache at its slot, and its first token sampled), then run one
decode step for all slots, hand each active slot's token to its request, and free the slots that finished
(stop token, max_tokens, or cancelled by the client) at once. Idle slots ride along in the step (fixed
shapes: one compiled program) and their results are ignored; an inserted row overwrites its whole cache
row, so nothing leaks from the previous occupant.

Per-request sampling settings are arrays indexed by slot (`sample_rows`), so mixing greedy and sampled
requests compiles nothing new. A request's draws use keys derived from its own seed and the position of
the token, so its output does not depend on the other traffic.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import queue
import threading
import time
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from llama4_jax.inference.sampling import sample_rows

_MIN_BUCKET = 64  # prompts are padded to a power of two >= this: few prefill shapes get compiled


class QueueFull(Exception):
  """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """What one request asks for. top_k 0 = off; top_p 1 = off; temperature 0 = greedy."""
  max_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop_tokens: tuple[int, ...] = ()


@dataclasses.dataclass(eq=False)
class Request:
  """One prompt in flight. The engine puts (tag, kind, value) events on `events`: ("token", id) per new
  token, then exactly one ("done", finish_reason) with reason "stop", "length" or "cancelled", or
  ("error", message). Several requests may share one events queue (told apart by `tag`)."""
  prompt: list[int]
  params: SamplingParams
  events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
  tag: int = 0
  created: float = dataclasses.field(default_factory=time.monotonic)
  first_token_at: float | None = None
  generated: int = 0
  _cancel: threading.Event = dataclasses.field(default_factory=threading.Event)

  def cancel(self) -> None:
    """Ask the engine to stop this request and free its slot (safe from any thread)."""
    self._cancel.set()

  @property
  def cancelled(self) -> bool:
    return self._cancel.is_set()


class EngineStats:
  """Counters the engine keeps (read by /metrics); updated on the engine thread only."""

  def __init__(self, window_s: float = 10.0):
    self.prompt_tokens = 0
    self.generated_tokens = 0
    self.finished = collections.Counter()  # finish reason -> requests
    self.ttft: list[float] = []  # seconds, drained by the metrics registry
    self.steps = 0
    self._window = window_s
    self._recent: collections.deque[tuple[float, int]] = collections.deque()
    self._lock = threading.Lock()

  def record_tokens(self, n: int) -> None:
    now = time.monotonic()
    with self._lock:
      self.generated_tokens += n
      self._recent.append((now, n))
      while self._recent and self._recent[0][0] < now - self._window:
        self._recent.popleft()

  def tokens_per_second(self) -> float:
    """Generated tokens per second over the last `window_s` seconds."""
    now = time.monotonic()
    with self._lock:
      n = sum(k for t, k in self._recent if t >= now - self._window)
    return n / self._window

  def drain_ttft(self) -> list[float]:
    with self._lock:
      out, self.ttft = self.ttft, []
    return out


def _insert_row(cache, row, slot):
  """Writes a batch-1 cache `row` into `cache` at batch index `slot` (blocks are stacked: batch axis 1)."""
  def put(axis):
    return lambda big, small: jax.lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), slot, axis)
  return {"blocks": jax.tree.map(put(1), cache["blocks"], row["blocks"]),
          "tail": jax.tree.map(put(0), cache["tail"], row["tail"])}


def _keys(seeds_B, positions_B):
  """One PRNG key per row: the request's seed folded with the position of the token being drawn."""
  return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.PRNGKey(s), p))(seeds_B, positions_B)


# Plain jax.jit over (graphdef, state): nnx.jit would walk the module graph on every call.
@functools.partial(jax.jit, static_argnames=("graphdef", "length"), donate_argnames=("cache",))
def _prefill_insert(graphdef, state, tokens_1T, length_1, cache, slot, seed_1, temperature_1, top_k_1,
                    top_p_1, length):
  model = nnx.merge(graphdef, state)
  logits, row = model.prefill(tokens_1T, length_1, model.init_cache(1, length))
  tok = sample_rows(logits, _keys(seed_1, length_1), temperature_1, top_k_1, top_p_1)
  return tok, _insert_row(cache, row, slot)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _decode_step(graphdef, state, tok_B, pos_B, cache, seed_B, temperature_B, top_k_B, top_p_B):
  logits, cache = nnx.merge(graphdef, state).decode(tok_B, pos_B, cache)
  return sample_rows(logits, _keys(seed_B, pos_B + 1), temperature_B, top_k_B, top_p_B), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "length"))
def _empty_cache(graphdef, state, batch, length):
  return nnx.merge(graphdef, state).init_cache(batch, length)


class Engine:
  """Continuous batching over `slots` decode rows of up to `max_length` tokens each (prompt + output).

  `submit` queues a request (raises QueueFull beyond `max_queue` waiting requests); the engine thread,
  started by `start`, serves it. Thread-safe: HTTP handler threads submit and cancel."""

  def __init__(self, model, slots: int = 8, max_length: int = 2048, max_queue: int = 64):
    cfg = model.config
    if slots < 1:
      raise ValueError(f"slots={slots} must be >= 1")
    if not 2 <= max_length <= cfg.max_position_embeddings:
      raise ValueError(f"max_length={max_length} must be in [2, max_position_embeddings="
                       f"{cfg.max_position_embeddings}]")
    if max_queue < 0:
      raise ValueError(f"max_queue={max_queue} must be >= 0")
    self.config, self.slots, self.max_length, self.max_queue = cfg, slots, max_length, max_queue
    self._graphdef, self._state = nnx.split(model)
    self._cache = self._new_cache()
    self._tok = np.zeros(slots, np.int32)
    self._pos = np.zeros(slots, np.int32)
    self._seed = np.zeros(slots, np.uint32)
    self._temperature = np.zeros(slots, np.float32)
    self._top_k = np.zeros(slots, np.int32)
    self._top_p = np.ones(slots, np.float32)
    self._active: list[Request | None] = [None] * slots
    self._waiting: collections.deque[Request] = collections.deque()
    self._cond = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stop = False
    self.stats = EngineStats()

  def _new_cache(self):
    # committed to its devices like the steps' outputs, so the first step after it compiles nothing new
    cache = _empty_cache(self._graphdef, self._state, self.slots, self.max_length)
    return jax.device_put(cache, jax.tree.map(lambda x: x.sharding, cache))

  # --- called from any thread ------------------------------------------------------------------------
  def check(self, prompt: Sequence[int], max_tokens: int) -> None:
    """Raises ValueError if the request cannot be served (empty, ids outside the vocabulary, too long)."""
    if not len(prompt):
      raise ValueError("the prompt is empty")
    vocab = self.config.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    if max_tokens < 1:
      raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    if len(prompt) + max_tokens > self.max_length:
      raise ValueError(f"the prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the "
                       f"context of {self.max_length} tokens")

  def submit(self, request: Request) -> Request:
    self.check(request.prompt, request.params.max_tokens)
    with self._cond:
      free = self.slots - self.active_slots()
      if len(self._waiting) >= self.max_queue + free:
        raise QueueFull(f"{len(self._waiting)} requests are waiting (the bound is {self.max_queue})")
      self._waiting.append(request)
      self._cond.notify()
    return request

  def queue_depth(self) -> int:
    return len(self._waiting)

  def active_slots(self) -> int:
    return sum(r is not None for r in self._active)

  def start(self) -> "Engine":
    self._thread = threading.Thread(target=self._run, name="llama4_jax-engine", daemon=True)
    self._thread.start()
    return self

  def shutdown(self, timeout: float = 10.0) -> None:
    with self._cond:
      self._stop = True
      self._cond.notify()
    if self._thread is not None:
      self._thread.join(timeout)

  def buckets(self) -> list[int]:
    """The padded prompt widths that get compiled: powers of two from 64 up to the context."""
    out = [_MIN_BUCKET]
    while out[-1] < self.max_length:
      out.append(out[-1] * 2)
    return out

  def _bucket(self, n: int) -> int:
    return next(b for b in self.buckets() if b >= n)

  def warmup(self) -> None:
    """Compiles the decode step and the prefill of every prompt bucket (call before `start`), so no
    request waits for a compile."""
    for width in self.buckets():
      self._admit_one(0, Request([0] * min(width, self.max_length - 1), SamplingParams(max_tokens=1)))
    self._step()
    self.stats = EngineStats()

  # --- the engine thread -----------------------------------------------------------------------------
  def _run(self) -> None:
    while True:
      with self._cond:
        while not self._stop and not self._waiting and self.active_slots() == 0:
          self._cond.wait()
        if self._stop:
          break
      try:
        self._admit()
        if self.active_slots():
          self._step()
      except Exception as e:  # a failed device call: fail what is in flight, keep serving
        logging.exception("engine step failed")
        self._fail_all(f"{type(e).__name__}: {e}")
    self._fail_all("the server is shutting down")

  def _admit(self) -> None:
    for slot in range(self.slots):
      if self._active[slot] is not None:
        continue
      with self._cond:
        request = None
        while self._waiting and request is None:
          request = self._waiting.popleft()
          if request.cancelled:
            self._finish(request, "cancelled")
            request = None
      if request is None:
        return
      try:
        self._admit_one(slot, request)
      except Exception as e:
        self._active[slot] = None
        request.events.put((request.tag, "error", f"{type(e).__name__}: {e}"))
        self.stats.finished["error"] += 1
        raise

  def _admit_one(self, slot: int, request: Request) -> None:
    p, n = request.params, len(request.prompt)
    tokens = np.zeros((1, self._bucket(n)), np.int32)
    tokens[0, :n] = request.prompt
    self._seed[slot] = p.seed % 2**32
    self._temperature[slot], self._top_k[slot], self._top_p[slot] = p.temperature, p.top_k, p.top_p
    tok, self._cache = _prefill_insert(
        self._graphdef, self._state, tokens, np.array([n], np.int32), self._cache, np.int32(slot),
        self._seed[slot:slot + 1], self._temperature[slot:slot + 1], self._top_k[slot:slot + 1],
        self._top_p[slot:slot + 1], length=self.max_length)
    self._active[slot] = request
    self._pos[slot] = n
    self.stats.prompt_tokens += n
    self._deliver(slot, int(tok[0]))

  def _step(self) -> None:
    tok, self._cache = _decode_step(self._graphdef, self._state, self._tok, self._pos, self._cache,
                                    self._seed, self._temperature, self._top_k, self._top_p)
    tok = np.asarray(tok)
    self.stats.steps += 1
    for slot, request in enumerate(self._active):
      if request is not None:
        self._pos[slot] += 1
        self._deliver(slot, int(tok[slot]))

  def _deliver(self, slot: int, tok: int) -> None:
    """Hands a new token to the slot's request, or frees the slot if the request is over."""
    request = self._active[slot]
    if request.cancelled:
      return self._free(slot, "cancelled")
    if request.first_token_at is None:
      request.first_token_at = time.monotonic()
      with self.stats._lock:
        self.stats.ttft.append(request.first_token_at - request.created)
    request.generated += 1
    self.stats.record_tokens(1)
    request.events.put((request.tag, "token", tok))
    self._tok[slot] = tok
    if tok in request.params.stop_tokens:
      self._free(slot, "stop")
    elif request.generated >= request.params.max_tokens:
      self._free(slot, "length")

  def _free(self, slot: int, reason: str) -> None:
    self._finish(self._active[slot], reason)
    self._active[slot] = None
    self._temperature[slot] = 0.0  # idle rows stay greedy, so they never trigger the sampling sort

  def _finish(self, request: Request, reason: str) -> None:
    self.stats.finished[reason] += 1
    request.events.put((request.tag, "done", reason))

  def _fail_all(self, message: str) -> None:
    with self._cond:
      waiting, self._waiting = list(self._waiting), collections.deque()
    for request in waiting + [r for r in self._active if r is not None]:
      request.events.put((request.tag, "error", message))
      self.stats.finished["error"] += 1
    self._active = [None] * self.slots
    self._temperature[:] = 0.0
    # a failed call may have consumed the donated cache: start from a fresh one
    self._cache = self._new_cache()

