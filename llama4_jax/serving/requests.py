"""What a client asks the engine for: a request's sampling settings, the request itself with the queue its
tokens arrive on, and the error for a full queue."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time


class QueueFull(Exception):
  """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """What one request asks for. top_k 0 = off; top_p 1 = off; temperature 0 = greedy.

  logprobs: None, or report each new token's log-probability with this many (0-20) most likely
  alternatives. echo: also report the prompt's tokens' log-probabilities (before any token); then
  max_tokens may be 0 (score the prompt only, no slot taken)."""
  max_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop_tokens: tuple[int, ...] = ()
  logprobs: int | None = None
  echo: bool = False


@dataclasses.dataclass(frozen=True)
class Logprobs:
  """A token's log-probability and the most likely alternatives [(token id, logprob)], most likely first:
  float32 log-softmax of the logits the token was drawn from, before temperature, top-k and top-p."""
  token: int
  logprob: float
  top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(eq=False)
class Request:
  """One prompt in flight. The engine puts (tag, kind, value, logprobs) events on `events`: with `echo`
  first ("prompt", None, [None, Logprobs of prompt token 1, ...]); then ("token", id, Logprobs or None)
  per new token, then exactly one ("done", finish_reason, None) with reason "stop", "length" or
  "cancelled", or ("error", message, None). Several requests may share one events queue (told apart by
  `tag`)."""
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
