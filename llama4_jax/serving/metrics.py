"""The server's metrics in Prometheus' text exposition format (version 0.0.4), without a client library.

    llama4_jax_requests_total{endpoint, status}     counter    HTTP requests answered, by status code
    llama4_jax_prompt_tokens_total                  counter    prompt tokens prefilled
    llama4_jax_generation_tokens_total              counter    tokens generated
    llama4_jax_finished_requests_total{reason}      counter    stop, length, cancelled, error
    llama4_jax_queue_depth                          gauge      requests waiting for a slot
    llama4_jax_active_slots / llama4_jax_slots      gauge      decode slots in use / in all
    llama4_jax_generation_tokens_per_second         gauge      over the last 10 s
    llama4_jax_time_to_first_token_seconds          histogram  from arrival to the first token
"""

from __future__ import annotations

import bisect
import collections
import threading

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
  def __init__(self, buckets=TTFT_BUCKETS):
    self.bounds = tuple(buckets)
    self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
    self.sum = 0.0

  def observe(self, value: float) -> None:
    self.counts[bisect.bisect_left(self.bounds, value)] += 1
    self.sum += value

  def lines(self, name: str) -> list[str]:
    out, total = [], 0
    for bound, n in zip(self.bounds + (float("inf"),), self.counts):
      total += n
      le = "+Inf" if bound == float("inf") else repr(bound)
      out.append(f'{name}_bucket{{le="{le}"}} {total}')
    return out + [f"{name}_sum {self.sum!r}", f"{name}_count {total}"]


class ServerMetrics:
  """Request counts kept by the HTTP handlers, plus what the engine counts (`EngineStats`)."""

  def __init__(self, engine):
    self._engine = engine
    self._lock = threading.Lock()
    self._requests: collections.Counter = collections.Counter()  # (endpoint, status) -> n
    self._ttft = Histogram()

  def count_request(self, endpoint: str, status: int) -> None:
    with self._lock:
      self._requests[(endpoint, status)] += 1

  def render(self) -> str:
    engine, stats = self._engine, self._engine.stats
    with self._lock:
      for value in stats.drain_ttft():
        self._ttft.observe(value)
      requests = sorted(self._requests.items())
      ttft = self._ttft.lines("llama4_jax_time_to_first_token_seconds")
    lines = ["# HELP llama4_jax_requests_total HTTP requests answered, by endpoint and status code.",
             "# TYPE llama4_jax_requests_total counter"]
    lines += [f'llama4_jax_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in requests]

    def one(name, kind, help_, value):
      lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"])

    one("llama4_jax_prompt_tokens_total", "counter", "Prompt tokens prefilled.", stats.prompt_tokens)
    one("llama4_jax_generation_tokens_total", "counter", "Tokens generated.", stats.generated_tokens)
    lines += ["# HELP llama4_jax_finished_requests_total Requests finished, by reason.",
              "# TYPE llama4_jax_finished_requests_total counter"]
    lines += [f'llama4_jax_finished_requests_total{{reason="{r}"}} {n}'
              for r, n in sorted(stats.finished.items())]
    one("llama4_jax_queue_depth", "gauge", "Requests waiting for a decode slot.", engine.queue_depth())
    one("llama4_jax_active_slots", "gauge", "Decode slots in use.", engine.active_slots())
    one("llama4_jax_slots", "gauge", "Decode slots in all.", engine.slots)
    one("llama4_jax_generation_tokens_per_second", "gauge", "Tokens generated per second over the last "
        "10 s.", f"{stats.tokens_per_second():.3f}")
    lines += ["# HELP llama4_jax_time_to_first_token_seconds Seconds from a request's arrival to its first "
              "token.", "# TYPE llama4_jax_time_to_first_token_seconds histogram"] + ttft
    return "\n".join(lines) + "\n"
