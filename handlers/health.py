"""Process health, store readiness and Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST

from handlers.base import BaseHandler
from store import StoreError


class HealthHandler(BaseHandler):
    """``GET /healthz``: the process serves requests."""

    def get(self) -> None:
        self.send_json(200, {"status": "ok"})


class ReadyHandler(BaseHandler):
    """``GET /readyz``: the store responds to a ping and the process is not shutting down."""

    async def get(self) -> None:
        if self.service.draining:
            self.send_error_json(503, "Shutting down: send new requests to another process")
            return
        try:
            await self.service.store.ping()
        except StoreError as exc:
            self.send_error_json(503, f"Store is not reachable: {exc}")
            return
        self.send_json(200, {"status": "ready"})


class MetricsHandler(BaseHandler):
    """``GET /metrics`` in the Prometheus text format."""

    def get(self) -> None:
        service = self.service
        if service.transport is not None:
            service.metrics.live_sessions.set(len(service.transport.live))
            service.metrics.open_streams.set(service.transport.open_stream_count)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(service.metrics.render())


default_handlers = [
    (r"/healthz", HealthHandler),
    (r"/readyz", ReadyHandler),
    (r"/metrics", MetricsHandler),
]
