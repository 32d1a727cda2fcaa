"""The server's metrics, exposed with `prometheus_client` (text format 0.0.4) from a registry of its own:

    llama4_jax_requests_total{endpoint, status}     counter    HTTP requests answered, by status code
    llama4_jax_prompt_tokens_total                  counter    prompt tokens prefilled
    llama4_jax_prefix_cache_reused_tokens_total     counter    prompt tokens the prefix cache gave
    llama4_jax_generation_tokens_total              counter    tokens generated
    llama4_jax_finished_requests_total{reason}      counter    stop, length, cancelled, error
    llama4_jax_queue_depth                          gauge      requests waiting for a slot
    llama4_jax_active_slots / llama4_jax_slots      gauge      decode slots in use / in all
    llama4_jax_generation_tokens_per_second         gauge      over the last 10 s
    llama4_jax_time_to_first_token_seconds          histogram  from arrival to the first token

Memory is bounded: the engine observes each time to first token into the histogram's buckets as it
happens; the engine's counters and gauges are read when /metrics is scraped.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineCollector:
  """What the engine counts (`EngineStats`) and its queue and slots, read at each scrape."""

  def __init__(self, engine):
    self._engine = engine

  def collect(self):
    engine, stats = self._engine, self._engine.stats
    yield CounterMetricFamily("llama4_jax_prompt_tokens", "Prompt tokens prefilled.", stats.prompt_tokens)
    yield CounterMetricFamily("llama4_jax_prefix_cache_reused_tokens",
                              "Prompt tokens taken from the prefix cache instead of prefilled.",
                              stats.prefix_reused_tokens)
    yield CounterMetricFamily("llama4_jax_generation_tokens", "Tokens generated.", stats.generated_tokens)
    finished = CounterMetricFamily("llama4_jax_finished_requests", "Requests finished, by reason.",
                                   labels=["reason"])
    for reason, n in sorted(stats.finished.items()):
      finished.add_metric([reason], n)
    yield finished
    yield GaugeMetricFamily("llama4_jax_queue_depth", "Requests waiting for a decode slot.",
                            engine.queue_depth())
    yield GaugeMetricFamily("llama4_jax_active_slots", "Decode slots in use.", engine.active_slots())
    yield GaugeMetricFamily("llama4_jax_slots", "Decode slots in all.", engine.slots)
    yield GaugeMetricFamily("llama4_jax_generation_tokens_per_second",
                            "Tokens generated per second over the last 10 s.", stats.tokens_per_second())


class ServerMetrics:
  """The server's registry: request counts kept by the HTTP handlers, the time-to-first-token histogram
  the engine observes into, and the engine's own counters."""

  def __init__(self, engine):
    self.registry = CollectorRegistry(auto_describe=True)
    self._requests = Counter("llama4_jax_requests", "HTTP requests answered, by endpoint and status code.",
                             ["endpoint", "status"], registry=self.registry)
    self._ttft = Histogram("llama4_jax_time_to_first_token_seconds",
                           "Seconds from a request's arrival to its first token.", buckets=TTFT_BUCKETS,
                           registry=self.registry)
    self.registry.register(_EngineCollector(engine))
    engine.ttft_observer = self._ttft.observe

  def count_request(self, endpoint: str, status: int) -> None:
    self._requests.labels(endpoint, str(status)).inc()

  def render(self) -> str:
    return generate_latest(self.registry).decode()
