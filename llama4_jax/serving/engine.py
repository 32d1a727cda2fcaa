"""Continuous batching: a fixed set of decode slots advanced together by one jitted step.

The engine thread loops: admit waiting requests into free slots, then run one decode step for all
slots, hand each active slot's token to its request, and free the slots that finished (stop token,
max_tokens, or cancelled by the client) at once. Admitted prompts are prefilled into fresh cache rows,
which are written into the batch cache at their slots, and their first tokens sampled; short prompts
that arrive together (padded to at most 64 tokens) share a prefill call, 3 to 8 a call, since a call of
a few short prompts costs little more than one (the tiny model with 8 slots of 256 tokens: 8 prompts of
16 tokens in 9.1-9.5 ms, one in 2.3-3.1 ms). Prompts longer than 256 tokens are prefilled 256 at a time
into a row of their own, one piece between decode steps (`Llama4.extend`), so a long prompt does not
stall the others' decoding; once whole, the row takes a free slot. Requests with the same prompt
admitted together, such as the `n` choices of one prompt, share one prefill: its cache row is copied
and each samples its first token from the same logits with its own key. A request takes the lowest free
slot and a step runs the first 1, 2, 4, ... or all slots (whichever covers the busy ones; each width is
compiled once, at warm-up), so a lightly loaded server does not pay for its idle slots. Idle slots
inside that width ride along and their results are ignored; an inserted row overwrites its whole cache
row, so nothing leaks from the previous occupant.

Per-request sampling settings are arrays indexed by slot (`sample_rows`), so mixing greedy and sampled
requests compiles nothing new. A request's draws use keys derived from its own seed and the position of
the token, so its output does not depend on the other traffic.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import NamedTuple, Sequence

import jax
import numpy as np
from llama4_jax.inference.sampler import check_prompt_ids
from llama4_jax.inference.static import split_model
from llama4_jax.serving import steps
from llama4_jax.sharding import RULES, batch_shards

_IN_FLIGHT = 2  # decode steps left running while the host hands out older tokens
_MIN_BUCKET = 16  # prompts are padded to a power of two >= this: few prefill shapes get compiled
_PREFILL_ROWS = 8  # up to this many prompts share a prefill call (of 1, 4 or 8 rows, padded) ...
_PREFILL_WIDTH = 64  # ... if each pads to at most this many tokens; longer ones are prefilled alone
PREFILL_PIECE = 256  # longer prompts are prefilled this many tokens at a time, between decode steps
                     # (the planner sizes serving memory by it)


def prefill_piece(max_length: int) -> int:
  """The engine's widest prefill: the largest power of two >= 16 within the context and PREFILL_PIECE
  (the piece a long prompt is prefilled in)."""
  return _powers_of_two(_MIN_BUCKET, min(max_length, PREFILL_PIECE))[-1]


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

  def record_ttft(self, seconds: float) -> None:
    with self._lock:
      self.ttft.append(seconds)

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


class _Kept(NamedTuple):
  """A prefilled prompt kept for requests with the same prompt still waiting (the `n` choices of one
  prompt beyond the free slots): its cache row [1, ...] and logits [1, V]."""
  prompt: list[int]
  row: dict
  logits: jax.Array


@dataclasses.dataclass
class _Staged:
  """A long prompt being prefilled piece by piece into its own cache row, outside the slots."""
  request: Request
  row: dict
  done: int = 0  # prompt tokens in `row`
  logits: jax.Array | None = None


def _powers_of_two(lo: int, hi: int) -> list[int]:
  """lo, 2 lo, 4 lo, ... up to the first one >= hi."""
  out = [lo]
  while out[-1] < hi:
    out.append(out[-1] * 2)
  return out


class Engine:
  """Continuous batching over `slots` decode rows of up to `max_length` tokens each (prompt + output).

  `submit` queues a request (raises QueueFull beyond `max_queue` waiting requests); the engine thread,
  started by `start`, serves it. Thread-safe: HTTP handler threads submit and cancel.

  The loop is pipelined: it dispatches decode step n (JAX runs it asynchronously; the next input tokens
  stay on the device) and only then reads the tokens of step n - _IN_FLIGHT and hands them out, so the
  host's work overlaps the device's. The price is that a finished request rides along for _IN_FLIGHT
  more steps, whose tokens are dropped.
  """

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
    self._row_counts = [n for n in _powers_of_two(1, slots) if n < slots] + [slots]
    self._prefill_rows = min(slots, _PREFILL_ROWS)
    self._static, self._leaves = split_model(model)
    self._pos = np.zeros(slots, np.int32)  # next step's input positions
    self._seed = np.zeros(slots, np.uint32)
    self._temperature = np.zeros(slots, np.float32)
    self._top_k = np.zeros(slots, np.int32)
    self._top_p = np.ones(slots, np.float32)
    self._active: list[Request | None] = [None] * slots  # each slot's request
    self._waiting: collections.deque[Request] = collections.deque()
    # dispatched, not yet read, in dispatch order: (kind, tokens [n], the n slots, their requests at
    # dispatch), kind "first" after a prefill (its rows' first tokens), "step" after a decode step
    self._unread: collections.deque[tuple] = collections.deque()
    self._cond = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stop = False
    self._reset_device_state()
    self.stats = EngineStats()
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
  def check(self, prompt: Sequence[int], max_tokens: int) -> None:
    """Raises ValueError if the request cannot be served (empty, ids outside the vocabulary, too long)."""
    check_prompt_ids(prompt, self.config.vocab_size)
    if max_tokens < 1:
      raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    if len(prompt) + max_tokens > self.max_length:
      raise ValueError(f"the prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the "
                       f"context of {self.max_length} tokens")

  def submit(self, request: Request) -> Request:
    return self.submit_all([request])[0]

  def submit_all(self, requests: Sequence[Request]) -> Sequence[Request]:
    """Queues all of `requests` or none (QueueFull, ValueError), together: requests with the same prompt
    (the `n` choices of one) are admitted in one pass when slots allow, and then share one prefill."""
    for r in requests:
      self.check(r.prompt, r.params.max_tokens)
    with self._cond:
      free = self.slots - self.active_slots()
      if len(self._waiting) + len(requests) > self.max_queue + free:
        raise QueueFull(f"{len(self._waiting)} requests are waiting (the bound is {self.max_queue})")
      self._waiting.extend(requests)
      self._cond.notify()
    return requests

  def queue_depth(self) -> int:
    return len(self._waiting)

  def _free_slots(self) -> list[int]:
    return [slot for slot in range(self.slots) if self._active[slot] is None]

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
    """The padded prompt widths that get compiled: powers of two from 16 up to the context or
    PREFILL_PIECE (longer prompts are prefilled in pieces of that many tokens)."""
    return _powers_of_two(_MIN_BUCKET, prefill_piece(self.max_length))

  def _long(self, request: Request) -> bool:
    return len(request.prompt) > self.buckets()[-1]

  def _bucket(self, n: int) -> int:
    return next(b for b in self.buckets() if b >= n)

  def _step_rows(self) -> int:
    """Slots the next decode step runs: the busy ones are packed low (a request takes the lowest free
    slot), so a step runs the smallest power of two (or all slots) that covers the highest busy one."""
    top = max(i for i, r in enumerate(self._active) if r is not None) + 1
    return next(n for n in self._row_counts if n >= top)

  def warmup(self) -> None:
    """Compiles, through the admission path itself, the prefill of every prompt bucket (and of several
    short prompts at once, and of a prompt in pieces), the copy of a prefilled row, and the decode step of
    each width (call before `start`), so no request waits for a compile."""
    def admit(*prompts):
      self._waiting.extend(Request(p, SamplingParams(max_tokens=1)) for p in prompts)
      self._admit()
      self._iterate()

    for width in self.buckets():
      prompt = [0] * min(width, self.max_length - 1)
      admit(*[prompt] * (2 if width == _MIN_BUCKET and self.slots > 1 else 1))  # 2: a shared prompt
      for rows in self._prefill_sizes()[1:] if width <= _PREFILL_WIDTH else ():
        admit(*[[i] + prompt[1:] for i in range(rows)])
    if self.max_length - 1 > self.buckets()[-1]:  # a prompt of two pieces
      admit([0] * (self.buckets()[-1] + 1))
      while self._staged is not None or self._unread:
        self._stage()
        self._iterate()
    for rows in self._row_counts:  # a step of each width
      self._active[rows - 1] = Request([0], SamplingParams(max_tokens=1))
      self._iterate()
      self._active[rows - 1] = None
    while self._unread:
      self._iterate()
    self.stats = EngineStats()

  def _prefill_sizes(self) -> list[int]:
    """The row counts of a prefill call: 1, then 4, 8, ... up to _PREFILL_ROWS (or the slots); each is
    a compile. (Two prompts in one call of 2 rows gained little over two calls of 1 on the tiny model.)"""
    rows = self._prefill_rows
    return sorted({1, rows} | {n for n in _powers_of_two(4, rows) if n < rows})

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
      tok, self._cache = steps.decode_step(self._static, self._leaves, self._tok, *self._snapshot(self._pos),
                                      self._cache, *self._snapshot(self._seed, self._temperature,
                                                                   self._top_k, self._top_p),
                                      rows=self._step_rows())
      self._tok = tok
      self._unread.append(("step", tok, range(self.slots), list(self._active)))
      self._pos += np.array([r is not None for r in self._active], np.int32)
    while self._unread and (self._steps_unread() > _IN_FLIGHT or self._unread[0][0] == "first"
                            or not self.active_slots()):
      self._read(*self._unread.popleft())

  def _steps_unread(self) -> int:
    return sum(entry[0] == "step" for entry in self._unread)

  @staticmethod
  def _snapshot(*arrays: np.ndarray) -> list[np.ndarray]:
    """Copies of host arrays for a dispatch. On CPU, JAX may use a NumPy array's memory in place, and
    the computation runs after the call returns (the loop is pipelined): changing the array for the next
    step must not reach the step in flight."""
    return [a.copy() for a in arrays]

  def _read(self, kind: str, tok, slots: Sequence[int], owners: Sequence[Request | None]) -> None:
    tok = np.asarray(tok)
    for i, (slot, request) in enumerate(zip(slots, owners)):
      if request is not None and self._active[slot] is request:  # not finished since the dispatch
        self._deliver(slot, int(tok[i]))

  def _admit(self) -> None:
    """Takes waiting requests into the free slots (lowest first). Distinct prompts are prefilled, short
    ones several to a call; a request repeating a prompt admitted in the same pass copies its row."""
    free = self._free_slots()
    taken: list[tuple[int, Request]] = []
    with self._cond:
      while self._waiting and len(taken) < len(free):
        request = self._waiting[0]
        kept = self._kept is not None and request.prompt == self._kept.prompt
        if self._long(request) and not kept and self._staged is not None:
          break  # one long prompt in pieces at a time; the queue keeps its order
        self._waiting.popleft()
        if request.cancelled:
          self._finish(request, "cancelled")
        elif self._long(request) and not kept:
          self._staged = _Staged(request, {})  # its row is made below, outside the lock
        else:
          taken.append((free[len(taken)], request))
    if self._staged is not None and not self._staged.row:
      self._staged.row = steps.empty_state(self._static, self._leaves, 1, self.max_length)[0]
    if not taken:
      return
    first_slot: dict[tuple, int] = {}  # prompt -> the slot that prefills it
    fresh, copies, from_kept = [], [], []
    for slot, request in taken:
      src = first_slot.setdefault(tuple(request.prompt), slot)
      if src != slot:
        copies.append((slot, request, src))
      elif self._kept is not None and request.prompt == self._kept.prompt:
        from_kept.append((slot, request))
        del first_slot[tuple(request.prompt)]
      else:
        fresh.append((slot, request))
    try:
      logits = {}  # prefilled slot -> its logits [1, V]
      for group in self._prefill_groups(fresh):
        logits.update(zip((slot for slot, _ in group), self._prefill(group)))
      for slot, request, src in copies:
        row = steps.row_at(self._cache, np.int32(src))
        self._copy(slot, request, _Kept(request.prompt, row, logits[src]))
      for slot, request in from_kept:
        self._copy(slot, request, self._kept)
      self._keep_for_waiting([(slot, request, logits[slot]) for slot, request in fresh])
    except Exception as e:  # requests not yet in a slot fail here, the rest via _fail_active
      self._fail([request for slot, request in taken if self._active[slot] is not request],
                 f"{type(e).__name__}: {e}")
      raise

  def _stage(self) -> None:
    """Prefills the next piece of the long prompt in progress; once it is whole, moves it into the lowest
    free slot (before `_admit` hands free slots to others) and dispatches its first token."""
    staged = self._staged
    if staged is None or not staged.row:
      return
    request, piece = staged.request, self.buckets()[-1]
    if request.cancelled:
      self._staged = None
      return self._finish(request, "cancelled")
    n = len(request.prompt)
    if staged.done < n:
      tokens = np.zeros((1, piece), np.int32)
      part = request.prompt[staged.done:staged.done + piece]
      tokens[0, :len(part)] = part
      staged.logits, staged.row = steps.extend_row(self._static, self._leaves, tokens,
                                              np.array([staged.done], np.int32),
                                              np.array([len(part)], np.int32), staged.row)
      staged.done += len(part)
    free = self._free_slots()
    if staged.done == n and free:
      self._copy(free[0], request, _Kept(request.prompt, staged.row, staged.logits))
      self._staged = None  # (only now: if the copy fails, `_fail_active` still finds the request)
      self.stats.prompt_tokens += n
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

  def _prefill_groups(self, pending: list[tuple[int, Request]]) -> list[list[tuple[int, Request]]]:
    """Prefill calls for (slot, request) pairs: prompts padded to at most _PREFILL_WIDTH tokens go up to
    _prefill_rows a call, shortest first (a call is as wide as its longest); longer ones one a call."""
    short = [p for p in pending if self._bucket(len(p[1].prompt)) <= _PREFILL_WIDTH]
    short.sort(key=lambda p: len(p[1].prompt))
    calls = []
    for i in range(0, len(short), self._prefill_rows):
      chunk = short[i:i + self._prefill_rows]
      # a call at least half padding (2 prompts in 4 rows) costs more than a call per prompt
      calls += [chunk] if 2 * len(chunk) > self._prefill_size(len(chunk)) else [[p] for p in chunk]
    return calls + [[p] for p in pending if self._bucket(len(p[1].prompt)) > _PREFILL_WIDTH]

  def _prefill_size(self, prompts: int) -> int:
    """The rows of the call that prefills this many prompts."""
    return next(n for n in self._prefill_sizes() if n >= prompts)

  def _set_sampling(self, slot: int, params: SamplingParams) -> None:
    self._seed[slot] = params.seed % 2**32
    self._temperature[slot], self._top_k[slot], self._top_p[slot] = (params.temperature, params.top_k,
                                                                     params.top_p)

  def _prefill(self, group: list[tuple[int, Request]]) -> tuple[jax.Array, ...]:
    """Prefills the group's prompts (one call, padded to 1, 4 or 8 rows) into their slots and dispatches
    their first tokens; returns each row's logits [1, V]."""
    rows = self._prefill_size(len(group))
    width = self._bucket(max(len(request.prompt) for _, request in group))
    tokens = np.zeros((rows, width), np.int32)
    lengths = np.ones(rows, np.int32)
    slots = np.full(rows, self.slots, np.int32)  # padding rows: a slot past the last, written nowhere
    for i, (slot, request) in enumerate(group):
      self._set_sampling(slot, request.params)
      tokens[i, :len(request.prompt)] = request.prompt
      lengths[i], slots[i] = len(request.prompt), slot
    at = np.minimum(slots, self.slots - 1)  # padding rows sample greedily with slot S-1's (unused) settings
    sampling = (self._seed[at], np.where(slots < self.slots, self._temperature[at], 0).astype(np.float32),
                self._top_k[at], self._top_p[at])
    first, logits, self._tok, self._cache = steps.prefill_insert(
        self._static, self._leaves, tokens, lengths, self._cache, self._tok, slots, *sampling,
        length=self.max_length)
    for slot, request in group:
      self._activate(slot, request)
      self.stats.prompt_tokens += len(request.prompt)
    self._unread.append(("first", first, [slot for slot, _ in group], [request for _, request in group]))
    return logits

  def _copy(self, slot: int, request: Request, prefilled: _Kept) -> None:
    """Admits `request` into `slot` with the cache row of its prompt, already prefilled, and dispatches
    its first token, drawn from that prefill's logits with the request's own settings."""
    self._set_sampling(slot, request.params)
    one = slice(slot, slot + 1)
    sampling = self._snapshot(self._seed[one], self._temperature[one], self._top_k[one], self._top_p[one])
    first, self._tok, self._cache = steps.copy_prefill(
        prefilled.logits, prefilled.row, self._cache, self._tok, np.int32(slot),
        np.array([len(request.prompt)], np.int32), *sampling)
    self._activate(slot, request)
    self._unread.append(("first", first, [slot], [request]))

  def _activate(self, slot: int, request: Request) -> None:
    self._active[slot] = request
    self._pos[slot] = len(request.prompt)

  def _deliver(self, slot: int, tok: int) -> None:
    """Hands a new token to the slot's request, or frees the slot if the request is over."""
    request = self._active[slot]
    if request.cancelled:
      return self._free(slot, "cancelled")
    if request.first_token_at is None:
      request.first_token_at = time.monotonic()
      self.stats.record_ttft(request.first_token_at - request.created)
    request.generated += 1
    self.stats.record_tokens(1)
    request.events.put((request.tag, "token", tok))
    if tok in request.params.stop_tokens:
      self._free(slot, "stop")
    elif request.generated >= request.params.max_tokens:
      self._free(slot, "length")

  def _free(self, slot: int, reason: str) -> None:
    self._finish(self._active[slot], reason)
    self._active[slot] = None
    self._temperature[slot] = 0.0  # idle rows stay greedy, so they never trigger the sampling sort
    self._pos[slot] = 0  # and early in their row: decode attention reads as far as the furthest row

  def _finish(self, request: Request, reason: str) -> None:
    self.stats.finished[reason] += 1
    request.events.put((request.tag, "done", reason))

  def _fail(self, requests: Sequence[Request], message: str) -> None:
    for request in requests:
      request.events.put((request.tag, "error", message))
      self.stats.finished["error"] += 1

  def _fail_active(self, message: str) -> None:
    """Fails the requests in the slots and starts from an empty cache. Waiting requests stay queued: a
    device call that failed once may well succeed for them."""
    staged = [] if self._staged is None else [self._staged.request]
    self._fail([r for r in self._active if r is not None] + staged, message)
    self._active = [None] * self.slots
    self._temperature[:], self._pos[:] = 0.0, 0  # as `_free` leaves a slot
    self._reset_device_state()  # a failed call may have consumed the donated cache
