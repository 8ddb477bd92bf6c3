"""Prometheus metrics of one server (its own registry, so several apps in one process, as in the
tests, do not share counters)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from openglm.serve.batcher import Batcher

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the classic text format every Prometheus reads
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Requests by route and status, tokens, queue depth, batch size and latency histograms."""

    def __init__(self, batcher: Batcher) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("openglm_requests", "HTTP requests by route and status code", ["route", "status"], registry=registry)
        self.prompt_tokens = Counter("openglm_prompt_tokens", "Prompt tokens of completed requests", registry=registry)
        self.generated_tokens = Counter("openglm_generated_tokens", "Tokens generated for completed requests", registry=registry)
        self.latency = Histogram(
            "openglm_request_latency_seconds", "Generation requests, submit to last token", ["route"], buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.first_token = Histogram(
            "openglm_time_to_first_token_seconds", "Submit to first generated text", ["route"], buckets=_LATENCY_BUCKETS, registry=registry
        )
        queue = Gauge("openglm_queue_depth", "Requests waiting for a place in the batch", registry=registry)
        queue.set_function(lambda: batcher.queue_depth)
        rows = Gauge("openglm_batch_rows", "Rows (Part Bs) decoding now", registry=registry)
        rows.set_function(lambda: batcher.active_rows)
        registry.register(_EngineCollector(batcher))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """The worker's own counters, read at scrape time (rows / steps is the mean batch size)."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def collect(self) -> Iterator[Metric]:
        stats = self.batcher.stats
        yield CounterMetricFamily("openglm_decode_steps", "Engine steps (each one shared forward pass)", value=stats.steps)
        yield CounterMetricFamily("openglm_decode_rows", "Rows decoded, summed over engine steps", value=stats.rows)
        yield CounterMetricFamily("openglm_failed_steps", "Engine steps that raised (their requests failed)", value=stats.failures)
