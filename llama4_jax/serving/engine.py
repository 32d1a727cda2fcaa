"""Continuous batching: a fixed set of decode slots advanced together by one jitted step.

The engine thread loops: advance the long prompt being prefilled in pieces, admit waiting requests into
free slots (`admission.py` holds the policy: what is prefilled, in what call, what reuses a prefilled
row, what is staged), then run one decode step for the busy slots, hand each its token, and free the
slots that finished (stop token, max_tokens, or cancelled by the client) at once. Admitted prompts are
prefilled into fresh cache rows, which are written into the batch cache at their slots, and their first
tokens sampled; short prompts that arrive together share a prefill call, since a call of a few short
prompts costs little more than one. Long prompts are prefilled 256 tokens at a time into a row of their
own, one piece between decode steps (`Llama4.extend`); once whole, the row takes a free slot. Requests
with the same prompt share one prefill: its cache row is copied and each samples its first token from
the same logits with its own key. A step runs only the first 1, 2, 4, ... or all slots (whichever
covers the busy ones), so a lightly loaded server does not pay for its idle slots. Idle slots inside
that width ride along and their results are ignored; an inserted row overwrites its whole cache row, so
nothing leaks from the previous occupant.

The state, each piece a small record: `_Slots` (each slot's request and the per-slot arrays a step
reads), `_Staged` (the long prompt in pieces), `_Kept` (a prefilled row that waiting requests repeat),
and `_Dispatched` (tokens a device call will produce, not read yet: the loop is pipelined).

Per-request sampling settings are arrays indexed by slot (`sample_rows`), so mixing greedy and sampled
requests compiles nothing new. A request's draws use keys derived from its own seed and the position of
the token, so its output does not depend on the other traffic.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np
from llama4_jax.inference.sampler import check_prompt_ids
from llama4_jax.inference.sampling import MAX_TOP_LOGPROBS
from llama4_jax.inference.static import split_for_inference
from llama4_jax.progress import bar
from llama4_jax.serving import steps
from llama4_jax.serving.admission import MIN_BUCKET, PREFILL_WIDTH, Admission, AdmissionPolicy
from llama4_jax.serving.prefix_cache import PrefixCache
from llama4_jax.serving.requests import Logprobs, QueueFull, Request, SamplingParams
from llama4_jax.sharding import RULES, batch_shards

__all__ = ["Engine", "EngineStats", "Logprobs", "QueueFull", "Request", "SamplingParams"]

_IN_FLIGHT = 2  # decode steps left running while the host hands out older tokens


class EngineStats:
  """Counters the engine keeps (read by /metrics); updated on the engine thread only."""

  def __init__(self, window_s: float = 10.0):
    self.prompt_tokens = 0  # prefilled (not counting what the prefix cache gave)
    self.prefix_reused_tokens = 0  # prompt tokens taken from the prefix cache
    self.generated_tokens = 0
    self.finished = collections.Counter()  # finish reason -> requests
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


@dataclasses.dataclass(frozen=True)
class _Kept:
  """A prefilled prompt kept for requests with the same prompt (the `n` choices of one prompt beyond the
  free slots, or copies within one pass): its cache row [1, ...] and logits [1, V]."""
  prompt: list[int]
  row: dict
  logits: jax.Array


@dataclasses.dataclass
class _Staged:
  """A long prompt being prefilled piece by piece into its own cache row, outside the slots (from a
  prefix cache snapshot of its first `reused` tokens, if there was one)."""
  request: Request
  row: dict
  done: int = 0  # prompt tokens in `row`
  logits: jax.Array | None = None  # [1, V] after the last piece so far
  reused: int = 0  # of `done`, tokens that came from the prefix cache
  boundary: int | None = None  # where this prompt parts from the one that made its snapshot: a piece
  # ends there and the prefix cache keeps the row (see prefix_cache.py)


@dataclasses.dataclass(frozen=True)
class _Dispatched:
  """Tokens [n] a device call will produce for `slots`, not yet read on the host, and their
  `token_logprobs` (logprob [m], top ids [m, 20], top logprobs [m, 20]; m <= n rows, the first ones).
  `first`: a prefill's or copy's first tokens (read at once, for the time to first token), else a decode
  step's (read _IN_FLIGHT steps later). `owners`: each slot's request at dispatch; a token whose slot has
  changed hands since is dropped."""
  first: bool
  tokens: jax.Array
  logprobs: tuple[jax.Array, jax.Array, jax.Array]
  slots: Sequence[int]
  owners: tuple[Request | None, ...]


def _logprobs(token: int, logprob, top_ids, top_lps, k: int) -> Logprobs:
  return Logprobs(token, float(logprob), tuple((int(i), float(v)) for i, v in zip(top_ids[:k], top_lps[:k])))


class _Slots:
  """The decode rows: each slot's request (None: free) and the per-slot arrays a decode step reads (next
  input position and sampling settings). A free slot is greedy (it never triggers the sampling sort) and
  at position 0 (decode attention reads as far as the furthest row)."""

  def __init__(self, n: int):
    self.requests: list[Request | None] = [None] * n
    self.pos = np.zeros(n, np.int32)  # next step's input positions
    self.seed = np.zeros(n, np.uint32)
    self.temperature = np.zeros(n, np.float32)
    self.top_k = np.zeros(n, np.int32)
    self.top_p = np.ones(n, np.float32)

  def free(self) -> list[int]:
    """The free slots, lowest first."""
    return [slot for slot, r in enumerate(self.requests) if r is None]

  def busy(self) -> int:
    return sum(r is not None for r in self.requests)

  def top_busy(self) -> int:
    return max(slot for slot, r in enumerate(self.requests) if r is not None)

  def holds(self, slot: int, request: Request | None) -> bool:
    return request is not None and self.requests[slot] is request

  def take(self, slot: int, request: Request) -> None:
    """Puts `request` in `slot`: its next input is the token after its prompt, with its settings."""
    p = request.params
    self.requests[slot] = request
    self.pos[slot] = len(request.prompt)
    self.seed[slot] = p.seed % 2**32
    self.temperature[slot], self.top_k[slot], self.top_p[slot] = p.temperature, p.top_k, p.top_p

  def release(self, slot: int) -> Request:
    request, self.requests[slot] = self.requests[slot], None
    self.temperature[slot], self.pos[slot] = 0.0, 0
    return request

  def release_all(self) -> list[Request]:
    return [self.release(slot) for slot in range(len(self.requests)) if self.requests[slot] is not None]

  def sampling(self, at=slice(None)) -> list[np.ndarray]:
    """(seed, temperature, top_k, top_p) of the slots `at`, copied: on CPU, JAX may use a NumPy array's
    memory in place, and the computation runs after the call returns (the loop is pipelined), so a
    change for the next step must not reach the step in flight."""
    return [a[at].copy() for a in (self.seed, self.temperature, self.top_k, self.top_p)]

  def step_inputs(self) -> tuple[np.ndarray, list[np.ndarray]]:
    """(positions, sampling settings) of every slot, copied, for a decode step; then advances the busy
    slots' positions."""
    pos = self.pos.copy()
    self.pos += np.array([r is not None for r in self.requests], np.int32)
    return pos, self.sampling()


class Engine:
  """Continuous batching over `slots` decode rows of up to `max_length` tokens each (prompt + output).

  `submit` queues a request (raises QueueFull beyond `max_queue` waiting requests); the engine thread,
  started by `start`, serves it. Thread-safe: HTTP handler threads submit and cancel.

  The loop is pipelined: it dispatches decode step n (JAX runs it asynchronously; the next input tokens
  stay on the device) and only then reads the tokens of step n - _IN_FLIGHT and hands them out, so the
  host's work overlaps the device's. The price is that a finished request rides along for _IN_FLIGHT
  more steps, whose tokens are dropped.
  """

  def __init__(self, model, slots: int = 8, max_length: int = 2048, max_queue: int = 64,
               prefix_cache_tokens: int = 0):
    cfg = model.config
    if slots < 1:
      raise ValueError(f"slots={slots} must be >= 1")
    if not 2 <= max_length <= cfg.max_position_embeddings:
      raise ValueError(f"max_length={max_length} must be in [2, max_position_embeddings="
                       f"{cfg.max_position_embeddings}]")
    if max_queue < 0:
      raise ValueError(f"max_queue={max_queue} must be >= 0")
    self.config, self.slots, self.max_length, self.max_queue = cfg, slots, max_length, max_queue
    self.policy = AdmissionPolicy(slots, max_length)
    self.prefix = PrefixCache(prefix_cache_tokens, self.policy.buckets[-1], max_length)
    self._static, self._leaves = split_for_inference(model)
    self._slots = _Slots(slots)
    self._waiting: collections.deque[Request] = collections.deque()
    self._unread: collections.deque[_Dispatched] = collections.deque()  # in dispatch order
    self._cond = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stop = False
    self._reset_device_state()
    self.stats = EngineStats()
    self.ttft_observer: Callable[[float], None] | None = None  # called with each time to first token
    mesh = getattr(model, "mesh", None)
    shards = 1 if mesh is None else batch_shards(mesh.shape)
    if slots % shards:
      logging.warning("slots=%d is not a multiple of the mesh's batch axes (%s = %d): the KV cache is not "
                      "split over all of them, so each device holds more of it; choose a multiple of %d",
                      slots, " x ".join(RULES["batch"]), shards, shards)

  def _reset_device_state(self) -> None:
    # committed to its devices like the steps' outputs, so the first step after it compiles nothing new
    fresh = steps.empty_state(self._static, self._leaves, self.slots, self.max_length)
    self._cache, self._tok = jax.device_put(fresh, jax.tree.map(lambda x: x.sharding, fresh))
    self._unread.clear()
    self._kept: _Kept | None = None  # a prefilled prompt that waiting requests repeat
    self._staged: _Staged | None = None  # a long prompt being prefilled in pieces

  # --- called from any thread ------------------------------------------------------------------------
  def check(self, prompt: Sequence[int], max_tokens: int, logprobs: int | None = None,
            echo: bool = False) -> None:
    """Raises ValueError if the request cannot be served (empty, ids outside the vocabulary, too long)."""
    check_prompt_ids(prompt, self.config.vocab_size)
    if max_tokens < (0 if echo else 1):
      raise ValueError(f"max_tokens={max_tokens} must be >= 1 (or 0 to score an echoed prompt)")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
      raise ValueError(f"logprobs={logprobs} must be in [0, {MAX_TOP_LOGPROBS}]")
    if len(prompt) + max_tokens > self.max_length:
      raise ValueError(f"the prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the "
                       f"context of {self.max_length} tokens")

  def submit(self, request: Request) -> Request:
    return self.submit_all([request])[0]

  def submit_all(self, requests: Sequence[Request]) -> Sequence[Request]:
    """Queues all of `requests` or none (QueueFull, ValueError), together: requests with the same prompt
    (the `n` choices of one) are admitted in one pass when slots allow, and then share one prefill."""
    for r in requests:
      self.check(r.prompt, r.params.max_tokens, r.params.logprobs, r.params.echo)
    with self._cond:
      free = self.slots - self.active_slots()
      if len(self._waiting) + len(requests) > self.max_queue + free:
        raise QueueFull(f"{len(self._waiting)} requests are waiting (the bound is {self.max_queue})")
      self._waiting.extend(requests)
      self._cond.notify()
    return requests

  def queue_depth(self) -> int:
    return len(self._waiting)

  def active_slots(self) -> int:
    return self._slots.busy()

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

  def warmup(self, progress: bool | None = None) -> None:
    """Compiles, through the admission path itself, the prefill of every prompt bucket (and of several
    short prompts at once, and of a prompt in pieces), the copy of a prefilled row, and the decode step of
    each width (call before `start`), so no request waits for a compile. progress: a bar over the
    programs (default: when stderr is a terminal)."""
    def admit(*prompts):
      self._waiting.extend(Request(p, SamplingParams(max_tokens=1)) for p in prompts)
      self._admit()
      self._iterate()

    def in_pieces(prompt):
      admit(prompt)
      while self._staged is not None or self._unread:
        self._stage()
        self._iterate()

    def step(rows):
      self._slots.take(rows - 1, Request([0], SamplingParams(max_tokens=1)))
      self._iterate()
      self._slots.release(rows - 1)

    policy, work = self.policy, []  # (what, how): one or a few programs each
    for width in policy.buckets:
      prompt = [0] * min(width, self.max_length - 1)
      shared = [prompt] * (2 if width == MIN_BUCKET and self.slots > 1 else 1)  # 2: a copied prefill
      work.append((f"prefill {width}", lambda shared=shared: admit(*shared)))
      for rows in policy.prefill_sizes[1:] if width <= PREFILL_WIDTH else ():
        work.append((f"prefill {rows}x{width}",
                     lambda rows=rows, p=prompt: admit(*[[i] + p[1:] for i in range(rows)])))
    if self.max_length - 1 > policy.buckets[-1]:
      work.append(("prefill in pieces", lambda: in_pieces([0] * (policy.buckets[-1] + 1))))
      if self.prefix.enabled:  # the same prefix again: from the prefix cache
        work.append(("prefix cache", lambda: in_pieces([0] * (policy.buckets[-1] + 2))))
    work += [(f"decode {rows} rows", lambda rows=rows: step(rows)) for rows in policy.step_widths]
    with bar(len(work), "compiling the server's programs", unit="program", enabled=progress) as done:
      for what, how in work:
        done.set_postfix_str(what, refresh=False)
        how()
        done.update()
      while self._unread:
        self._iterate()
    self.stats = EngineStats()
    self.prefix.clear()  # (warm-up's own prompts)
  # --- the engine thread -----------------------------------------------------------------------------
  def _run(self) -> None:
    while True:
      with self._cond:
        while not (self._stop or self._waiting or self._unread or self.active_slots() or self._staged):
          self._cond.wait()
        if self._stop:
          break
      try:
        self._stage()
        self._admit()
        self._iterate()
      except Exception as e:  # a failed device call: fail the requests in the slots, keep serving
        logging.exception("engine step failed")
        self._fail_active(f"{type(e).__name__}: {e}")
    with self._cond:
      waiting, self._waiting = list(self._waiting), collections.deque()
    self._fail(waiting, "the server is shutting down")
    self._fail_active("the server is shutting down")

  def _iterate(self) -> None:
    """Dispatches a decode step if any slot is busy, then hands out everything dispatched before it."""
    if self.active_slots():
      owners = tuple(self._slots.requests)
      rows = self.policy.step_width(self._slots.top_busy())
      pos, sampling = self._slots.step_inputs()
      self._tok, logprobs, self._cache = steps.decode_step(self._static, self._leaves, self._tok, pos,
                                                           self._cache, *sampling, rows=rows)
      self._unread.append(_Dispatched(False, self._tok, logprobs, range(self.slots), owners))
    while self._unread and (self._steps_unread() > _IN_FLIGHT or self._unread[0].first
                            or not self.active_slots()):
      self._read(self._unread.popleft())

  def _steps_unread(self) -> int:
    return sum(not d.first for d in self._unread)

  def _read(self, dispatched: _Dispatched) -> None:
    tokens = np.asarray(dispatched.tokens)
    wanted = any(r is not None and r.params.logprobs is not None for r in dispatched.owners)
    chosen, top_ids, top_lps = (np.asarray(a) for a in dispatched.logprobs) if wanted else (None,) * 3
    for i, (slot, request) in enumerate(zip(dispatched.slots, dispatched.owners)):
      if self._slots.holds(slot, request):  # not finished since the dispatch
        k = request.params.logprobs
        info = None if k is None else _logprobs(int(tokens[i]), chosen[i], top_ids[i], top_lps[i], k)
        self._deliver(slot, int(tokens[i]), info)

  def _admit(self) -> None:
    """Carries out the admission policy's plan for the waiting requests and the free slots."""
    with self._cond:
      plan: Admission = self.policy.plan(self._waiting, self._slots.free(),
                                         None if self._kept is None else self._kept.prompt,
                                         staging=self._staged is not None,
                                         cached=self.prefix.has if self.prefix.enabled else None)
    for request in plan.cancelled:
      self._finish(request, "cancelled")
    for request in plan.score_only:  # echo with max_tokens 0: the prompt's logprobs, no slot
      self._score(request)
      self._finish(request, "length")
    if plan.stage is not None:
      if plan.stage.params.echo:
        self._score(plan.stage)
      hit = self.prefix.longest(plan.stage.prompt)
      row = (steps.copy_row(hit.row) if hit.row is not None  # (a copy: extending a row consumes it)
             else steps.empty_state(self._static, self._leaves, 1, self.max_length)[0])
      self._staged = _Staged(plan.stage, row, done=hit.length, reused=hit.length, boundary=hit.boundary)
    if not plan.slotted:
      return
    for slot, request in plan.slotted:  # in their slots before any device call: a failed call fails them
      self._slots.take(slot, request)
    for slot, request in plan.slotted:
      if request.params.echo:
        self._score(request)
    logits = {}  # prefilled slot -> its logits [1, V]
    for call in plan.prefill:
      logits.update(zip((slot for slot, _ in call), self._prefill(call)))
    for slot, request, src in plan.copy:
      self._copy(slot, request, _Kept(request.prompt, steps.row_at(self._cache, np.int32(src)),
                                      logits[src]))
    for slot, request in plan.reuse_kept:
      self._copy(slot, request, self._kept)
    self._keep_for_waiting([(slot, request, logits[slot]) for call in plan.prefill
                            for slot, request in call])

  def _stage(self) -> None:
    """Prefills the next piece of the long prompt in progress; once it is whole, moves it into the lowest
    free slot (before `_admit` hands free slots to others) and dispatches its first token."""
    staged = self._staged
    if staged is None:
      return
    request, piece = staged.request, self.policy.buckets[-1]
    if request.cancelled:
      self._staged = None
      return self._finish(request, "cancelled")
    n = len(request.prompt)
    if staged.done < n:
      tokens = np.zeros((1, piece), np.int32)
      end = staged.done + piece
      if staged.boundary is not None and staged.done < staged.boundary < end:
        end = staged.boundary
      part = request.prompt[staged.done:end]
      tokens[0, :len(part)] = part
      staged.logits, staged.row = steps.extend_row(self._static, self._leaves, tokens,
                                                   np.array([staged.done], np.int32),
                                                   np.array([len(part)], np.int32), staged.row)
      staged.done += len(part)
      at_boundary = staged.done == staged.boundary
      if self.prefix.wants(request.prompt, staged.done, anywhere=at_boundary):  # whole pieces, or where
        self.prefix.put(request.prompt, staged.done,  # prompts part: keep a snapshot
                        steps.copy_row(staged.row) if staged.done < n else staged.row, anywhere=at_boundary)
    free = self._slots.free()
    if staged.done == n and free:
      self._slots.take(free[0], request)
      self._staged = None  # (the request is in its slot: if the copy fails, `_fail_active` finds it)
      self._copy(free[0], request, _Kept(request.prompt, staged.row, staged.logits))
      self.stats.prompt_tokens += n - staged.reused
      self.stats.prefix_reused_tokens += staged.reused
      self._keep_for_waiting([(free[0], request, staged.logits)])

  def _keep_for_waiting(self, prefilled: list[tuple[int, Request, jax.Array]]) -> None:
    """Keeps the row of a prompt just prefilled that waiting requests repeat (one prompt at a time; the
    latest wins), and lets go of a kept row no waiting request needs any more."""
    with self._cond:
      waiting = [r.prompt for r in self._waiting]
    for slot, request, logits in prefilled:
      if request.prompt in waiting:
        self._kept = _Kept(request.prompt, steps.row_at(self._cache, np.int32(slot)), logits)
    if self._kept is not None and self._kept.prompt not in waiting:
      self._kept = None

  def _prefill(self, call: list[tuple[int, Request]]) -> tuple[jax.Array, ...]:
    """Prefills the call's prompts (already in their slots; one call, padded to 1, 4 or 8 rows) into
    their slots and dispatches their first tokens; returns each row's logits [1, V]."""
    rows = self.policy.prefill_size(len(call))
    width = self.policy.bucket(max(len(request.prompt) for _, request in call))
    tokens = np.zeros((rows, width), np.int32)
    lengths = np.ones(rows, np.int32)
    slots = np.full(rows, self.slots, np.int32)  # padding rows: a slot past the last, written nowhere
    for i, (slot, request) in enumerate(call):
      tokens[i, :len(request.prompt)] = request.prompt
      lengths[i], slots[i] = len(request.prompt), slot
    # padding rows sample greedily with slot S-1's (unused) settings
    seed, temperature, top_k, top_p = self._slots.sampling(np.minimum(slots, self.slots - 1))
    temperature = np.where(slots < self.slots, temperature, 0).astype(np.float32)
    (first, logprobs), logits, self._tok, self._cache = steps.prefill_insert(
        self._static, self._leaves, tokens, lengths, self._cache, self._tok, slots, seed, temperature,
        top_k, top_p, length=self.max_length)
    self.stats.prompt_tokens += sum(len(request.prompt) for _, request in call)
    self._unread.append(_Dispatched(True, first, logprobs, [slot for slot, _ in call],
                                    tuple(request for _, request in call)))
    return logits

  def _copy(self, slot: int, request: Request, prefilled: _Kept) -> None:
    """Writes the cache row of `request`'s prompt, already prefilled, into its slot and dispatches its
    first token, drawn from that prefill's logits with the request's own settings."""
    (first, logprobs), self._tok, self._cache = steps.copy_prefill(
        prefilled.logits, prefilled.row, self._cache, self._tok, np.int32(slot),
        np.array([len(request.prompt)], np.int32), *self._slots.sampling(slice(slot, slot + 1)))
    self._unread.append(_Dispatched(True, first, logprobs, [slot], (request,)))

  def _score(self, request: Request) -> None:
    """Puts the prompt's tokens' log-probabilities on the request's events (one forward pass, padded to a
    power of two of at least 16 tokens; each width compiles on first use)."""
    n, k = len(request.prompt), request.params.logprobs or 0
    width = min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), self.max_length)
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :n] = request.prompt
    chosen, top_ids, top_lps = (np.asarray(a) for a in steps.score_prompt(self._static, self._leaves,
                                                                          tokens))
    infos = [None] + [_logprobs(request.prompt[t + 1], chosen[t], top_ids[t], top_lps[t], k)
                      for t in range(n - 1)]
    request.events.put((request.tag, "prompt", None, infos))

  def _deliver(self, slot: int, tok: int, info: Logprobs | None = None) -> None:
    """Hands a new token to the slot's request, or frees the slot if the request is over."""
    request = self._slots.requests[slot]
    if request.cancelled:
      return self._free(slot, "cancelled")
    if request.first_token_at is None:
      request.first_token_at = time.monotonic()
      if self.ttft_observer is not None:
        self.ttft_observer(request.first_token_at - request.created)
    request.generated += 1
    self.stats.record_tokens(1)
    request.events.put((request.tag, "token", tok, info))
    if tok in request.params.stop_tokens:
      self._free(slot, "stop")
    elif request.generated >= request.params.max_tokens:
      self._free(slot, "length")

  def _free(self, slot: int, reason: str) -> None:
    self._finish(self._slots.release(slot), reason)

  def _finish(self, request: Request, reason: str) -> None:
    self.stats.finished[reason] += 1
    request.events.put((request.tag, "done", reason, None))

  def _fail(self, requests: Sequence[Request], message: str) -> None:
    for request in requests:
      request.events.put((request.tag, "error", message, None))
      self.stats.finished["error"] += 1

  def _fail_active(self, message: str) -> None:
    """Fails the requests in the slots and the staged one, and starts from an empty cache. Waiting
    requests stay queued: a device call that failed once may well succeed for them."""
    staged = [] if self._staged is None else [self._staged.request]
    self._fail(self._slots.release_all() + staged, message)
    self._reset_device_state()  # a failed call may have consumed the donated cache
