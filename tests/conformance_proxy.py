"""A loopback forwarding proxy that adds an ``X-API-Key`` header to every request.

The MCP conformance CLI cannot send custom headers, but every MCP endpoint of
the service needs credentials. The proxy listens on 127.0.0.1 only and
forwards each request (method, path and query, headers, body) to a service on
127.0.0.1, with ``X-API-Key`` set to the key it was started with. Other
headers pass unchanged apart from hop-by-hop ones, so a foreign ``Host`` or
``Origin`` still reaches the service's DNS-rebinding check.

The response is relayed as it arrives: status, headers (``Mcp-Session-Id``
among them) and each body chunk, flushed at once, so SSE events reach the
client without buffering. When the client disconnects, the proxy closes the
upstream connection, so the service's stream ends too.

Example::

    proxy = ApiKeyProxy()                       # binds 127.0.0.1 on an ephemeral port
    proxy.start(upstream_port=service.port, api_key=key)
    url = f"http://127.0.0.1:{proxy.port}/v1/mcp/anonymous?workspaceId=ws_1"
    ...
    await proxy.stop()
"""

from __future__ import annotations

import logging
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

__all__ = ["ApiKeyProxy"]

log = logging.getLogger("tests.conformance_proxy")

LOOPBACK = "127.0.0.1"
API_KEY_HEADER = "X-API-Key"
MAX_BODY_BYTES = 64 * 1024 * 1024

# RFC 9110 section 7.6.1 hop-by-hop headers, plus the framing headers that
# each side of the proxy sets for its own connection.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


class _UpstreamResponse(httputil.HTTPMessageDelegate):
    """Receives the service's response and hands each part to the relay handler."""

    def __init__(self, handler: _RelayHandler) -> None:
        self._handler = handler
        self.headers_seen = False
        self.complete = False

    def headers_received(
        self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine, headers: httputil.HTTPHeaders
    ) -> None:
        assert isinstance(start_line, httputil.ResponseStartLine)
        self.headers_seen = True
        self._handler.start_response(start_line, headers)

    async def data_received(self, chunk: bytes) -> None:
        await self._handler.relay_chunk(chunk)

    def finish(self) -> None:
        self.complete = True

    def on_connection_close(self) -> None:
        pass


class _RelayHandler(tornado.web.RequestHandler):
    """Forwards one request to the upstream service and relays its response."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def initialize(self, proxy: ApiKeyProxy) -> None:
        self._proxy = proxy
        self._upstream: IOStream | None = None
        self._client_gone = False
        self._streaming = False

    def compute_etag(self) -> str | None:
        return None

    async def get(self) -> None:
        await self._forward()

    async def head(self) -> None:
        await self._forward()

    async def post(self) -> None:
        await self._forward()

    async def delete(self) -> None:
        await self._forward()

    async def patch(self) -> None:
        await self._forward()

    async def put(self) -> None:
        await self._forward()

    async def options(self) -> None:
        await self._forward()

    def on_connection_close(self) -> None:
        self._client_gone = True
        if self._upstream is not None:
            self._upstream.close()

    def _upstream_headers(self) -> httputil.HTTPHeaders:
        headers = httputil.HTTPHeaders()
        for name, value in self.request.headers.get_all():
            if name.lower() in HOP_BY_HOP_HEADERS or name.lower() == API_KEY_HEADER.lower():
                continue
            headers.add(name, value)
        headers[API_KEY_HEADER] = self._proxy.api_key
        if self.request.body or self.request.method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(self.request.body))
        headers["Connection"] = "close"
        return headers

    async def _forward(self) -> None:
        upstream_port = self._proxy.upstream_port
        try:
            self._upstream = await TCPClient().connect(LOOPBACK, upstream_port)
        except OSError as exc:
            log.warning("Proxy could not connect to upstream port %d: %s", upstream_port, exc)
            self._send_bad_gateway(f"Upstream connection to {LOOPBACK}:{upstream_port} failed: {exc}")
            return
        if self._client_gone:
            self._upstream.close()
            return

        connection = HTTP1Connection(
            self._upstream,
            True,
            HTTP1ConnectionParameters(max_body_size=MAX_BODY_BYTES, decompress=False),
        )
        response = _UpstreamResponse(self)
        try:
            start_line = httputil.RequestStartLine(self.request.method or "GET", self.request.uri or "/", "HTTP/1.1")
            connection.write_headers(start_line, self._upstream_headers())
            if self.request.body:
                connection.write(self.request.body)
            connection.finish()
            await connection.read_response(response)
        except StreamClosedError:
            pass
        finally:
            self._upstream.close()

        if self._client_gone:
            return
        request_line = f"{self.request.method} {self.request.path}"
        if not response.headers_seen:
            log.warning("Upstream port %d closed the connection before responding to %s", upstream_port, request_line)
            self._send_bad_gateway(f"Upstream {LOOPBACK}:{upstream_port} closed the connection before responding")
        elif not response.complete:
            # The service dropped the connection mid-body, so drop the client's too.
            log.warning("Upstream port %d dropped the response to %s mid-body", upstream_port, request_line)
            self.request.connection.close()  # type: ignore[union-attr]
        else:
            self.finish()

    def start_response(self, start_line: httputil.ResponseStartLine, headers: httputil.HTTPHeaders) -> None:
        """Copy the upstream status and end-to-end headers onto this response."""
        self.set_status(start_line.code, start_line.reason or "Unknown")
        for default in ("Content-Type", "Server", "Date"):
            self.clear_header(default)
        for name, value in headers.get_all():
            if name.lower() not in HOP_BY_HOP_HEADERS:
                self.add_header(name, value)
        # A response without Content-Length is a stream (SSE): flush every
        # chunk. One with a length is sent whole at the end, with that length.
        self._streaming = "Content-Length" not in headers

    async def relay_chunk(self, chunk: bytes) -> None:
        if self._client_gone:
            return
        self.write(chunk)
        if not self._streaming:
            return
        try:
            await self.flush()
        except StreamClosedError:
            self.on_connection_close()

    def _send_bad_gateway(self, message: str) -> None:
        self.clear()
        self.set_status(502)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(message)


class ApiKeyProxy:
    """An HTTP server on 127.0.0.1 that forwards every request to a local service with an API key.

    The socket is bound in the constructor, so ``port`` is known before the
    upstream service starts (the service must accept ``127.0.0.1:<port>`` as
    a ``Host``). Connections made before :meth:`start` wait in the listen
    backlog.
    """

    def __init__(self) -> None:
        self._sockets = tornado.netutil.bind_sockets(0, LOOPBACK)
        self.port: int = self._sockets[0].getsockname()[1]
        self.upstream_port = 0
        self.api_key = ""
        self._server: tornado.httpserver.HTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, *, upstream_port: int, api_key: str) -> None:
        """Accept connections and forward them to ``127.0.0.1:upstream_port`` with ``api_key``."""
        if not api_key:
            raise ValueError("api_key is empty: pass the key the upstream service issued")
        self.upstream_port = upstream_port
        self.api_key = api_key
        app = tornado.web.Application([(r".*", _RelayHandler, {"proxy": self})])
        self._server = tornado.httpserver.HTTPServer(app, max_body_size=MAX_BODY_BYTES)
        self._server.add_sockets(self._sockets)

    async def stop(self) -> None:
        """Stop listening and close every open client connection (and so their upstream connections).

        Calling it again, or before :meth:`start`, only closes the listening socket.
        """
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
        for sock in self._sockets:
            sock.close()

    async def __aenter__(self) -> ApiKeyProxy:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()
