"""Prometheus metrics with vLLM's names (prefix `jaxllm:`), so existing dashboards port over.

Gauges and counters are read from the engine when scraped; latency histograms are observed by the HTTP
layer when a request finishes, from the timestamps the engine keeps (RequestOutput.metrics).
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxllm.sampling import RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class _EngineCollector:
    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine, self.labels = engine, {"model_name": model_name}

    def collect(self) -> Iterator[Any]:
        e, names = self.engine, ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"jaxllm:{name}", doc, labels=names)
            g.add_metric([self.labels["model_name"]], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"jaxllm:{name}", doc, labels=names)
            c.add_metric([self.labels["model_name"]], value)
            return c

        yield gauge("num_requests_running", "Sequences running on the device.", len(e.scheduler.running))
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", len(e.scheduler.waiting))
        yield gauge("kv_cache_usage_perc", "Fraction of KV pages in use (1 = full).", e.kv.usage)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", e.kv.num_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens served by the prefix cache.", e.kv.num_cache_hits)
        yield counter("num_preemptions", "Sequences preempted (to be recomputed).", e.scheduler.num_preemptions)
        yield counter("prompt_tokens", "Prompt tokens prefilled.", e.stats["prompt_tokens"])
        yield counter("generation_tokens", "Tokens generated.", e.stats["generated_tokens"])
        success = CounterMetricFamily("jaxllm:request_success", "Completions finished, by finish reason.",
                                      labels=[*names, "finished_reason"])
        for reason, count in sorted(e.finished_reasons.items()):
            success.add_metric([self.labels["model_name"], str(reason)], count)
        yield success


class Metrics:
    """The server's registry: engine state plus request latency histograms."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple) -> Any:
            return Histogram(f"jaxllm:{name}", doc, labels, registry=self.registry, buckets=buckets).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", LATENCY_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Mean time between output tokens.", TOKEN_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled.", LATENCY_BUCKETS)

    def observe(self, out: RequestOutput) -> None:
        """Record a finished request's latencies."""
        m = out.metrics
        if m is None or m.finished_time is None:
            return
        self.e2e.observe(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue.observe(m.first_scheduled_time - m.arrival_time)
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
            tokens = max(len(c.token_ids) for c in out.outputs)
            if tokens > 1:
                self.tpot.observe((m.finished_time - m.first_token_time) / (tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
