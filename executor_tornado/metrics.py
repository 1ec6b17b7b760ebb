"""Prometheus metrics of one service process.

Each :class:`Metrics` owns its own ``CollectorRegistry`` so tests can run
several services in one process without collisions. Every process exports
its own numbers; Prometheus sums them across the processes behind a proxy.

Example::

    metrics = Metrics()
    metrics.instrument_store(store)          # times every store call
    metrics.observe_request("/v1/mcp", 200, 0.012)
    body = metrics.render()                  # text format for /metrics
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from store.base import Store

__all__ = ["Metrics"]

# Store calls take from tens of microseconds (SQLite, page cache) to
# milliseconds (MongoDB over the network); the default buckets start at 5 ms.
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# Lifecycle methods run once per process and would only add noise.
_UNTIMED_STORE_METHODS = frozenset({"open", "close"})


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
        self.tasks = Counter(
            "executor_tasks_total",
            "Sandbox runs by outcome: completed, failed, timed_out, denied, or waiting_approval when a run pauses",
            ["status"],
            registry=self.registry,
        )
        self.store_latency = Histogram(
            "executor_store_operation_duration_seconds",
            "Duration of store calls by operation",
            ["operation"],
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.store_errors = Counter(
            "executor_store_errors_total", "Store calls that raised, by operation", ["operation"],
            registry=self.registry,
        )
        self.requests_in_progress = Gauge(
            "executor_http_requests_in_progress", "HTTP requests being handled, SSE streams included",
            registry=self.registry,
        )

    def rate_limited(self, route: str) -> None:
        self.rate_limit_rejections.labels(route=route).inc()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def task_status(self, status: str) -> None:
        self.tasks.labels(status=status).inc()

    def instrument_store(self, store: Store) -> None:
        """Time every call of the store interface on ``store`` (the instance, not its class)."""
        public = {
            name for name, member in vars(Store).items()
            if not name.startswith("_") and inspect.iscoroutinefunction(member)
        }
        for name in sorted(public - _UNTIMED_STORE_METHODS):
            setattr(store, name, self._timed(name, getattr(store, name)))

    def _timed(self, operation: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        histogram = self.store_latency.labels(operation=operation)
        errors = self.store_errors.labels(operation=operation)

        @functools.wraps(method)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            except Exception:
                errors.inc()
                raise
            finally:
                histogram.observe(time.perf_counter() - started)

        return timed

    def render(self) -> bytes:
        return generate_latest(self.registry)
