"""The engine's admission policy, in one place: which waiting requests take which free slots, which
prompts are prefilled in which call, which reuse a prompt prefilled already, which long prompt is staged
(prefilled in pieces outside the slots), and how wide each compiled call is.

The rules:
- Requests are admitted in queue order into the lowest free slots, while slots are free.
- A cancelled request leaving the queue is finished, not admitted. A request that only scores its prompt
  (echo with max_tokens 0) takes no slot: it leaves the queue even when every slot is busy.
- A prompt longer than the widest prefill bucket (`prefill_piece`: 256 tokens, or less for a short
  context) is *staged*: prefilled a piece at a time between decode steps into a row of its own, so it
  does not stall the others; one at a time, and a second long prompt waits (and so does the queue
  behind it, to keep its order). Once whole, the staged row takes the lowest free slot before any other
  admission.
- With the prefix cache on (`prefix_cache.py`), a prompt that starts with a kept prefix is staged as
  well: its row starts as a copy of the prefix's, and only the rest is prefilled.
- Requests with the same prompt admitted together (the `n` choices of one prompt) share one prefill:
  the first is prefilled, the others copy its cache row. A prompt the engine kept from an earlier pass
  (its waiting repeats did not fit in the slots then) is copied, never prefilled again.
- Distinct short prompts (padded to at most PREFILL_WIDTH tokens) share a prefill call, up to
  PREFILL_ROWS a call, shortest first; a call at least half padding is split into calls of one. Longer
  prompts are prefilled one a call.
- Prompts are padded to a power of two >= MIN_BUCKET tokens, prefill calls to 1, 4, 8 rows, and decode
  steps run the first 1, 2, 4, ... or all slots (whichever covers the highest busy one): each shape is
  compiled once, at warm-up.

`AdmissionPolicy.plan` applies the rules to the waiting queue; it touches no device, so the rules are
tested on their own (tests/test_serve.py).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

from llama4_jax.serving.requests import Request

MIN_BUCKET = 16  # prompts are padded to a power of two >= this: few prefill shapes get compiled
PREFILL_ROWS = 8  # up to this many prompts share a prefill call (of 1, 4 or 8 rows, padded) ...
PREFILL_WIDTH = 64  # ... if each pads to at most this many tokens; longer ones are prefilled alone
PREFILL_PIECE = 256  # longer prompts are prefilled this many tokens at a time, between decode steps
                     # (the planner sizes serving memory by it)


def powers_of_two(lo: int, hi: int) -> list[int]:
  """lo, 2 lo, 4 lo, ... up to the first one >= hi."""
  out = [lo]
  while out[-1] < hi:
    out.append(out[-1] * 2)
  return out


def prefill_piece(max_length: int) -> int:
  """The engine's widest prefill: the largest power of two >= 16 within the context and PREFILL_PIECE
  (the piece a long prompt is prefilled in)."""
  return powers_of_two(MIN_BUCKET, min(max_length, PREFILL_PIECE))[-1]


Slotted = tuple[int, Request]  # (slot, request)


@dataclasses.dataclass
class Admission:
  """What one admission pass does. Every admitted request is in exactly one of `prefill`, `copy`,
  `reuse_kept`."""
  prefill: list[list[Slotted]] = dataclasses.field(default_factory=list)  # prefill calls, in order
  copy: list[tuple[int, Request, int]] = dataclasses.field(default_factory=list)  # (slot, request,
  # the slot of the same prompt prefilled in this pass): copies its cache row after the prefills
  reuse_kept: list[Slotted] = dataclasses.field(default_factory=list)  # copy the kept prompt's row
  stage: Request | None = None  # a long prompt to prefill in pieces
  cancelled: list[Request] = dataclasses.field(default_factory=list)  # left the queue cancelled
  score_only: list[Request] = dataclasses.field(default_factory=list)  # echo, max_tokens 0: no slot

  @property
  def slotted(self) -> list[Slotted]:
    """Every (slot, request) this pass admits."""
    return ([p for call in self.prefill for p in call] + [(s, r) for s, r, _ in self.copy]
            + self.reuse_kept)


class AdmissionPolicy:
  """The rules above for an engine of `slots` rows of `max_length` tokens."""

  def __init__(self, slots: int, max_length: int):
    self.slots = slots
    self.buckets = powers_of_two(MIN_BUCKET, prefill_piece(max_length))  # padded prompt widths
    self.step_widths = [n for n in powers_of_two(1, slots) if n < slots] + [slots]  # decode step rows
    rows = min(slots, PREFILL_ROWS)
    # prefill call rows: 1, then 4, 8, ... (two prompts in a call of 2 rows gained little over two
    # calls of 1 on the tiny model)
    self.prefill_sizes = sorted({1, rows} | {n for n in powers_of_two(4, rows) if n < rows})

  def bucket(self, n: int) -> int:
    """The padded width of a prompt of n tokens (n <= the widest bucket)."""
    return next(b for b in self.buckets if b >= n)

  def is_long(self, prompt: Sequence[int]) -> bool:
    """Prefilled in pieces (staged) rather than in one call."""
    return len(prompt) > self.buckets[-1]

  def prefill_size(self, prompts: int) -> int:
    """The rows of the call that prefills this many prompts."""
    return next(n for n in self.prefill_sizes if n >= prompts)

  def step_width(self, top_busy: int) -> int:
    """Rows the next decode step runs when slot `top_busy` is the highest busy one."""
    return next(n for n in self.step_widths if n > top_busy)

  def plan(self, waiting: collections.deque[Request], free: Sequence[int], kept: Sequence[int] | None,
           staging: bool, cached: Callable[[Sequence[int]], bool] | None = None) -> Admission:
    """Takes the requests it admits off the front of `waiting` (the caller holds its lock). `free`: the
    free slots, lowest first; `kept`: the prompt whose prefilled row the engine keeps, if any;
    `staging`: a long prompt is being prefilled in pieces already; `cached(prompt)`: the prefix cache
    holds a prefix of it (then it is staged too, continuing from that prefix)."""
    out = Admission()
    taken: list[Slotted] = []
    while waiting and (len(taken) < len(free) or waiting[0].params.max_tokens == 0):
      request = waiting[0]
      if request.cancelled or request.params.max_tokens == 0:
        (out.cancelled if request.cancelled else out.score_only).append(waiting.popleft())
        continue
      repeats_kept = kept is not None and request.prompt == kept
      staged = not repeats_kept and (self.is_long(request.prompt)
                                     or (cached is not None and cached(request.prompt)))
      if staged and (staging or out.stage is not None):
        break  # one long prompt in pieces at a time; the queue keeps its order
      waiting.popleft()
      if staged:
        out.stage = request
      else:
        taken.append((free[len(taken)], request))
    first_slot: dict[tuple[int, ...], int] = {}  # prompt -> the slot that prefills it in this pass
    fresh: list[Slotted] = []
    for slot, request in taken:
      if kept is not None and request.prompt == kept:
        out.reuse_kept.append((slot, request))
      elif (src := first_slot.setdefault(tuple(request.prompt), slot)) != slot:
        out.copy.append((slot, request, src))
      else:
        fresh.append((slot, request))
    out.prefill = self._prefill_calls(fresh)
    return out

  def _prefill_calls(self, fresh: list[Slotted]) -> list[list[Slotted]]:
    short = sorted((p for p in fresh if self.bucket(len(p[1].prompt)) <= PREFILL_WIDTH),
                   key=lambda p: len(p[1].prompt))
    rows = self.prefill_sizes[-1]
    calls = []
    for i in range(0, len(short), rows):
      chunk = short[i:i + rows]
      # a call at least half padding (2 prompts in 4 rows) costs more than a call per prompt
      calls += [chunk] if 2 * len(chunk) > self.prefill_size(len(chunk)) else [[p] for p in chunk]
    return calls + [[p] for p in fresh if self.bucket(len(p[1].prompt)) > PREFILL_WIDTH]
