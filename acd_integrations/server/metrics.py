"""Prometheus metrics of one server: requests, tokens, latency and queue depth.

Each app gets its own ``CollectorRegistry`` so several apps in one process (tests, Ray
replicas sharing a worker) never collide on metric names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServerMetrics"]


class ServerMetrics:
    """The counters the server updates; :meth:`render` is the ``/metrics`` body."""

    def __init__(self, max_concurrency: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "acd_requests",
            "Requests answered, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "acd_prompt_tokens", "Prompt tokens of answered requests.", registry=self.registry
        )
        self.completion_tokens = Counter(
            "acd_completion_tokens",
            "Generated tokens of answered requests.",
            registry=self.registry,
        )
        self.latency = Histogram(
            "acd_request_latency_seconds",
            "Seconds from a request's arrival to its last byte, by endpoint.",
            ["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "acd_queue_depth",
            "Requests admitted and not yet finished (decoding or waiting for the engine).",
            registry=self.registry,
        )
        self.max_concurrency = Gauge(
            "acd_max_concurrency",
            "Admitted requests beyond which 429 is answered.",
            registry=self.registry,
        )
        self.max_concurrency.set(max_concurrency)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
