"""The application: the shared service state and the Tornado route table.

:class:`Service` owns everything that lives as long as the process: the
store, the signing keys, the rate limiter, the OAuth verifier, the MCP
kernel and transport. Handlers reach it through ``self.settings["service"]``.

Example::

    service = Service(Settings(port=0))
    await service.start()            # binds, opens the store, starts the transport
    print(service.base_url)
    await service.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from executor_tornado import __version__
from executor_tornado.clock import Clock, SystemClock
from executor_tornado.keys import KeyMaterial, load_key_material
from executor_tornado.mcp.registry import McpRegistry, load_plugins
from executor_tornado.mcp.session import SessionRuntime
from executor_tornado.mcp.transport import McpTransport
from executor_tornado.metrics import Metrics
from executor_tornado.oauth import MetadataProxy, OAuthVerifier
from executor_tornado.ratelimit import RateLimiter, parse_networks
from executor_tornado.settings import Settings
from store import Store, open_store

__all__ = ["Service", "make_routes"]

log = logging.getLogger("executor_tornado")
access_log = logging.getLogger("executor_tornado.access")

SERVER_NAME = "executor-tornado"
BODY_TIMEOUT_SECONDS = 30.0
DRAIN_POLL_SECONDS = 0.05


def make_routes() -> list[Any]:
    """Return the route table, one ``default_handlers`` list per handlers module."""
    from handlers import anonymous, discovery, health, mcp, webhooks

    return [*discovery.default_handlers, *anonymous.default_handlers, *mcp.default_handlers, *webhooks.default_handlers, *health.default_handlers]


class Service:
    """Process-wide state shared by every handler."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        store: Store | None = None,
        registry: McpRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.store: Store = store or open_store(settings.resolved_store_url)
        self.metrics = Metrics()
        self.metrics.instrument_store(self.store)
        self.registry = registry or McpRegistry()
        self.trusted_networks = parse_networks(settings.trusted_proxies)
        self.keys = KeyMaterial(signer=None, api_keys=None)
        self.limiter = RateLimiter(self.store, settings, self.clock)
        self.oauth_verifier: OAuthVerifier | None = None
        self.metadata_proxy: MetadataProxy | None = None
        self.transport: McpTransport | None = None
        self.execution: Any = None
        self.http_server: tornado.httpserver.HTTPServer | None = None
        self.port: int | None = None
        self._exit_stack = contextlib.AsyncExitStack()
        self._started = False
        self.extensions: dict[str, Any] = {}
        self.requests_in_progress = 0
        self.draining = False

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    def is_trusted_peer(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_networks)

    def log_auth_failure(self, route: str, reason: str) -> None:
        """Count and log a rejected credential; ``reason`` never contains token bytes."""
        self.metrics.auth_failures.labels(route=route).inc()
        log.info("Rejected credential on %s: %s", route, reason)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, *, listen: bool = True, sockets: list[socket.socket] | None = None) -> None:
        """Bind the port, open the store, load keys and start the MCP transport.

        With ``port=0`` the chosen port is written back into the settings, so
        URLs the service prints and signs name the real port.
        """
        if listen and sockets is None:
            sockets = tornado.netutil.bind_sockets(self.settings.port, self.settings.host)
        if sockets:
            self.port = sockets[0].getsockname()[1]
            if self.settings.port != self.port:
                self.settings = self.settings.model_copy(update={"port": self.port})
                self.limiter = RateLimiter(self.store, self.settings, self.clock)

        self.settings.resolved_data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.store.open()
        self._exit_stack.push_async_callback(self.store.close)

        self.keys = load_key_material(self.settings, self.clock)
        if self.keys.generated:
            log.info("Generated %s (mode 0600); reused on restart", " and ".join(self.keys.generated))
        if self.settings.issuer_url:
            self.oauth_verifier = OAuthVerifier(self.settings, self.clock)
            self.metadata_proxy = MetadataProxy(self.settings, self.clock)

        await self._start_mcp()

        if sockets:
            app = tornado.web.Application(
                make_routes(),
                service=self,
                default_handler_class=_default_handler(),
                log_function=self._log_request,
                compress_response=False,
                xheaders=False,
            )
            self.http_server = tornado.httpserver.HTTPServer(
                app,
                max_body_size=max(self.settings.max_body_bytes * 2, 1024 * 1024),
                body_timeout=BODY_TIMEOUT_SECONDS,
                idle_connection_timeout=75,
            )
            self.http_server.add_sockets(sockets)
        self._started = True

    async def _start_mcp(self) -> None:
        from executor_tornado.execution import Execution

        self.execution = Execution(self.store, self.settings, self.clock)
        await self.execution.start()
        self._exit_stack.push_async_callback(self.execution.close)
        self.execution.tasks.on_status = self.metrics.task_status
        self.execution.register(self.registry)
        load_plugins(self.registry, self.settings.mcp_plugins)
        server = self.registry.build_server(SERVER_NAME, __version__)
        lifespan_state = await self._exit_stack.enter_async_context(server.lifespan(server))
        settings = self.settings
        runtime = SessionRuntime(
            server=server,
            lifespan_state=lifespan_state,
            store=self.store,
            clock=self.clock,
            sse_retry_ms=settings.sse_retry_ms,
            sse_buffer_bytes=settings.sse_buffer_bytes,
            sse_keepalive_seconds=settings.sse_keepalive_seconds,
            event_log_max_events=settings.event_log_max_events,
            event_log_max_bytes=settings.event_log_max_bytes,
            event_log_max_age_seconds=settings.event_log_max_age_seconds,
        )
        self.transport = McpTransport(runtime, settings, self.registry)
        await self.transport.start()

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Shut down gracefully, then close the sandbox pool and the store.

        1. Close the listening sockets and report not ready on ``/readyz``.
        2. End GET streams with a ``retry:`` hint, so clients reconnect to
           another process behind the proxy or to this one after a restart.
        3. Wait up to ``grace_seconds`` (default
           ``settings.shutdown_grace_seconds``) for requests in progress and
           tool calls in flight.
        4. End what is left, again with a retry hint.

        Session records stay open in the store, so any process can restore them.
        """
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        self.draining = True
        if self.http_server is not None:
            self.http_server.stop()
        if self.transport is not None:
            self.transport.end_get_streams()
        await self._wait_for_requests(grace)
        if self.transport is not None:
            await self.transport.shutdown()
        for closer in reversed(self.extensions.get("closers", [])):
            await closer()
        if self.http_server is not None:
            await self.http_server.close_all_connections()
        await self._exit_stack.aclose()
        self._started = False

    def request_started(self) -> None:
        self.requests_in_progress += 1
        self.metrics.requests_in_progress.inc()

    def request_ended(self) -> None:
        self.requests_in_progress -= 1
        self.metrics.requests_in_progress.dec()

    async def _wait_for_requests(self, grace_seconds: float) -> None:
        """Wait until no request is in progress and no tool call in flight, for at most ``grace_seconds``."""
        deadline = time.monotonic() + grace_seconds
        while True:
            in_flight = self.transport.in_flight_count if self.transport is not None else 0
            if self.requests_in_progress <= 0 and in_flight == 0:
                return
            if time.monotonic() >= deadline:
                log.warning(
                    "Shutdown grace period of %.1f s ended with %d requests in progress and %d tool calls in flight",
                    grace_seconds,
                    self.requests_in_progress,
                    in_flight,
                )
                return
            await asyncio.sleep(DRAIN_POLL_SECONDS)

    # -- access log ------------------------------------------------------------------------

    def _log_request(self, handler: tornado.web.RequestHandler) -> None:
        status = handler.get_status()
        seconds = handler.request.request_time()
        route = _route_label(handler)
        self.metrics.observe_request(route, status, seconds)
        level = logging.INFO if status < 500 else logging.ERROR
        access_log.log(
            level,
            "%s %s %d %.1fms",
            handler.request.method,
            route,
            status,
            seconds * 1000.0,
            extra={
                "request_id": getattr(handler, "request_id", "-"),
                "method": handler.request.method,
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000.0, 2),
            },
        )


def _route_label(handler: tornado.web.RequestHandler) -> str:
    """Return the metrics label of a request: its path, or ``unmatched`` so unknown paths cannot grow the label set."""
    from handlers.base import NotFoundHandler

    if isinstance(handler, NotFoundHandler):
        return "unmatched"
    path = handler.request.path
    if path.startswith("/.well-known/oauth-protected-resource"):
        return "/.well-known/oauth-protected-resource"
    return path


def _default_handler() -> type:
    from handlers.base import NotFoundHandler

    return NotFoundHandler

