"""Prometheus metrics of one service process.

Each :class:`Metrics` owns its own ``CollectorRegistry`` so tests can run
several services in one process without collisions.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """Counters, gauges and histograms exported at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "executor_http_requests_total", "HTTP requests by route and status", ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "executor_http_request_duration_seconds", "HTTP request duration by route", ["route"],
            registry=self.registry,
        )
        self.rate_limit_rejections = Counter(
            "executor_rate_limit_rejections_total", "Requests rejected with 429 by route", ["route"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "executor_auth_failures_total", "Rejected credentials by route", ["route"], registry=self.registry
        )
        self.open_streams = Gauge("executor_sse_open_streams", "Open SSE streams", registry=self.registry)
        self.live_sessions = Gauge("executor_mcp_live_sessions", "MCP sessions live in this process", registry=self.registry)
        self.tasks = Counter("executor_tasks_total", "Sandbox tasks by outcome", ["status"], registry=self.registry)

    def rate_limited(self, route: str) -> None:
        self.rate_limit_rejections.labels(route=route).inc()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
