"""The API-key forwarding proxy of the conformance test, against a small upstream Tornado app.

The conformance suite only shows that the proxy works well enough for the
suite. These tests pin what the suite does not check: the key replaces a
client's own, a foreign Host passes unchanged, chunks are relayed before
the upstream response ends, and a client that disconnects takes its
upstream connection down with it.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.iostream import IOStream
from tornado.tcpclient import TCPClient

from conformance_proxy import ApiKeyProxy

PROXY_KEY = "proxy-key-123"
WAIT_SECONDS = 5.0


@dataclass
class StreamProbe:
    """Controls of one ``/stream`` request.

    ``release`` lets the handler go on after the first chunk, ``closed`` is
    set when its connection closes, and ``drop_after_first`` makes it drop
    the connection in place of sending the second chunk.
    """

    release: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    drop_after_first: bool = False


class EchoHandler(tornado.web.RequestHandler):
    """Return what arrived: method, URI, every header pair and the body."""

    async def _echo(self) -> None:
        self.set_status(201)
        self.set_header("Mcp-Session-Id", "session-abc")
        self.finish(
            {
                "method": self.request.method,
                "uri": self.request.uri,
                "headers": [[name, value] for name, value in self.request.headers.get_all()],
                "body": self.request.body.decode(),
            }
        )

    async def post(self) -> None:
        await self._echo()

    async def get(self) -> None:
        await self._echo()


class StreamHandler(tornado.web.RequestHandler):
    """Send one chunk, wait until the test releases the second, then finish (or drop the connection)."""

    def initialize(self, probe: StreamProbe) -> None:
        self.probe = probe

    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.write("data: first\n\n")
        await self.flush()
        await self.probe.release.wait()
        if self.probe.drop_after_first:
            self.request.connection.close()  # type: ignore[union-attr]
            return
        self.finish("data: second\n\n")

    def on_connection_close(self) -> None:
        self.probe.closed.set()


@asynccontextmanager
async def upstream_and_proxy() -> AsyncIterator[tuple[ApiKeyProxy, StreamProbe]]:
    probe = StreamProbe()
    app = tornado.web.Application([(r"/echo", EchoHandler), (r"/stream", StreamHandler, {"probe": probe})])
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    proxy = ApiKeyProxy()
    proxy.start(upstream_port=sockets[0].getsockname()[1], api_key=PROXY_KEY)
    try:
        yield proxy, probe
    finally:
        probe.release.set()
        await proxy.stop()
        server.stop()
        await server.close_all_connections()


async def open_stream(proxy: ApiKeyProxy) -> IOStream:
    """Send ``GET /stream`` over a raw connection and return it once the response headers arrived."""
    stream = await TCPClient().connect("127.0.0.1", proxy.port)
    await stream.write(f"GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode())
    headers = await asyncio.wait_for(stream.read_until(b"\r\n\r\n"), WAIT_SECONDS)
    assert headers.startswith(b"HTTP/1.1 200"), headers
    return stream


async def test_proxy_forwards_request_with_key() -> None:
    async with upstream_and_proxy() as (proxy, _):
        request = HTTPRequest(
            f"{proxy.base_url}/echo?workspaceId=ws_1",
            method="POST",
            body=b'{"jsonrpc":"2.0"}',
            headers={
                "Host": "evil.example.com",
                "Origin": "http://evil.example.com",
                "X-API-Key": "client-key",
                "Content-Type": "application/json",
            },
        )
        response = await AsyncHTTPClient().fetch(request, raise_error=False)

    assert response.code == 201
    assert response.headers["Mcp-Session-Id"] == "session-abc"
    echoed = json.loads(response.body)
    headers = echoed["headers"]
    assert echoed["method"] == "POST"
    assert echoed["uri"] == "/echo?workspaceId=ws_1"
    assert echoed["body"] == '{"jsonrpc":"2.0"}'
    assert [value for name, value in headers if name == "X-Api-Key"] == [PROXY_KEY], "the proxy's key replaces the client's"
    assert ["Host", "evil.example.com"] in headers
    assert ["Origin", "http://evil.example.com"] in headers
    assert ["Content-Type", "application/json"] in headers


async def test_proxy_relays_chunks_before_end() -> None:
    async with upstream_and_proxy() as (proxy, probe):
        stream = await open_stream(proxy)
        try:
            first = await asyncio.wait_for(stream.read_until(b"data: first\n\n"), WAIT_SECONDS)
            assert first.endswith(b"data: first\n\n")
            assert not probe.release.is_set(), "the first chunk arrived while the upstream response was still open"

            probe.release.set()
            second = await asyncio.wait_for(stream.read_until(b"data: second\n\n"), WAIT_SECONDS)
            assert second.endswith(b"data: second\n\n")
        finally:
            stream.close()


async def test_proxy_client_disconnect_closes_upstream() -> None:
    async with upstream_and_proxy() as (proxy, probe):
        stream = await open_stream(proxy)
        await asyncio.wait_for(stream.read_until(b"data: first\n\n"), WAIT_SECONDS)
        stream.close()

        await asyncio.wait_for(probe.closed.wait(), WAIT_SECONDS)
        assert probe.closed.is_set()


async def test_proxy_upstream_drop_drops_client() -> None:
    async with upstream_and_proxy() as (proxy, probe):
        probe.drop_after_first = True
        stream = await open_stream(proxy)
        try:
            await asyncio.wait_for(stream.read_until(b"data: first\n\n"), WAIT_SECONDS)
            probe.release.set()
            rest = await asyncio.wait_for(stream.read_until_close(), WAIT_SECONDS)
        finally:
            stream.close()

    assert b"0\r\n\r\n" not in rest, "a dropped upstream body must not end with a clean last chunk"


async def test_proxy_upstream_refused_is_502() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    proxy = ApiKeyProxy()
    proxy.start(upstream_port=closed_port, api_key=PROXY_KEY)
    try:
        response = await AsyncHTTPClient().fetch(f"{proxy.base_url}/v1/mcp", raise_error=False)
    finally:
        await proxy.stop()

    assert response.code == 502
    assert f"127.0.0.1:{closed_port}" in response.body.decode()
