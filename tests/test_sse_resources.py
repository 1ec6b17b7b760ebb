"""SSE resource bounds: stalled readers, dropped streams, resumption after a drop."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
from pathlib import Path

import httpx2

from conftest import anonymous_key, initialize_body, running
from executor_tornado.mcp.session import TRIM_EVERY_EVENTS
from executor_tornado.mcp.sse import SseStream
from handlers.mcp import McpHandler
from sse_client import SseReader

PLUGIN = ["transport_plugin:register"]


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def open_session(client: httpx2.AsyncClient, bootstrap: dict) -> str:
    headers = {"X-API-Key": bootstrap["apiKey"], "Accept": "application/json, text/event-stream"}
    response = await client.post(bootstrap["mcpUrl"], json=initialize_body(), headers=headers)
    session_id = response.headers["Mcp-Session-Id"]
    await client.post(
        bootstrap["mcpUrl"], json={"jsonrpc": "2.0", "method": "notifications/initialized"},
        headers={**headers, "Mcp-Session-Id": session_id},
    )
    return session_id


async def raw_request(port: int, method: str, target: str, headers: dict[str, str], body: bytes = b"", rcvbuf: int | None = None):
    """Open a socket, send one request and return the reader and writer (the caller decides when to read)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    return reader, writer


async def read_event_ids(reader: asyncio.StreamReader, count: int) -> list[str]:
    """Read the response head, then ``count`` SSE events; return their ids."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert b" 200 " in head.split(b"\r\n")[0], head
    ids: list[str] = []
    while len(ids) < count:
        line = await asyncio.wait_for(reader.readline(), 10)
        text = line.decode().strip()
        if text.startswith("id: "):
            ids.append(text[4:])
    return ids


async def test_stalled_reader_is_dropped_and_resumes(data_dir: Path) -> None:
    async with running(
        data_dir, mcp_plugins=PLUGIN, sse_buffer_bytes=256 * 1024, event_log_max_events=3000,
        event_log_max_bytes=64 * 1024 * 1024,
    ) as service:
        bootstrap = await anonymous_key(service)
        async with httpx2.AsyncClient(timeout=30) as client:
            session_id = await open_session(client, bootstrap)
            path = bootstrap["mcpUrl"].removeprefix(service.base_url)
            call = {"jsonrpc": "2.0", "id": 42, "method": "tools/call",
                    "params": {"name": "flood", "arguments": {"count": 10000, "size": 4000}}}
            headers = {
                "X-API-Key": bootstrap["apiKey"], "Mcp-Session-Id": session_id,
                "Accept": "application/json, text/event-stream", "Content-Type": "application/json",
            }
            gc.collect()
            before = resident_bytes()
            reader, writer = await raw_request(
                service.port, "POST", path, headers, json.dumps(call).encode(), rcvbuf=4096
            )
            received = await read_event_ids(reader, 2)

            live = service.transport.live[session_id]
            for _ in range(600):
                if not live.pending:
                    break
                await asyncio.sleep(0.05)
            assert not live.pending, "the tool ran to completion although the client stopped reading"
            growth = resident_bytes() - before
            assert growth < 24 * 1024 * 1024, f"resident memory grew by {growth} bytes for 40 MB of events"

            drained = 0
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), 10)
                if not chunk:
                    break
                drained += len(chunk)
            assert drained < 8 * 1024 * 1024, "the server dropped the connection instead of buffering everything"
            writer.close()

            resume_headers = {
                "X-API-Key": bootstrap["apiKey"], "Mcp-Session-Id": session_id,
                "Accept": "text/event-stream", "Last-Event-ID": received[-1],
            }
            async with client.stream("GET", bootstrap["mcpUrl"], headers=resume_headers) as resumed:
                assert resumed.status_code == 200
                events = await SseReader(resumed).events_until_response(42, timeout=30)
            replayed = [int(event.id.split("/")[0]) for event in events]
            assert replayed == sorted(replayed)
            assert replayed[0] > int(received[-1].split("/")[0])
            window = 3000 + TRIM_EVERY_EVENTS
            assert 1000 <= len(events) <= window, "the events still in the window (trimmed every 64 appends)"
            assert events[-1].message["result"]["content"][0]["text"] == "flooded 10000"


async def test_dropped_get_streams_leave_nothing(data_dir: Path) -> None:
    async with running(data_dir, mcp_plugins=PLUGIN, mcp_rate_per_minute=100000) as service:
        bootstrap = await anonymous_key(service)
        path = bootstrap["mcpUrl"].removeprefix(service.base_url)
        async with httpx2.AsyncClient(timeout=30) as client:
            sessions = [await open_session(client, bootstrap) for _ in range(10)]

        for round_number in range(100):
            for session_id in sessions:
                headers = {"X-API-Key": bootstrap["apiKey"], "Mcp-Session-Id": session_id, "Accept": "text/event-stream"}
                reader, writer = await raw_request(service.port, "GET", path, headers)
                await read_event_ids(reader, 1)
                writer.transport.abort()
            for _ in range(200):
                if service.transport.open_stream_count == 0:
                    break
                await asyncio.sleep(0.01)
            assert service.transport.open_stream_count == 0, f"round {round_number}"

        await asyncio.sleep(0.2)
        gc.collect()
        # Earlier tests in the same process may leave their own objects for
        # the collector; count only those of this service.
        streams = [
            obj for obj in gc.get_objects()
            if isinstance(obj, SseStream) and obj._responder.service is service
        ]
        handlers = [obj for obj in gc.get_objects() if isinstance(obj, McpHandler) and obj.service is service]
        assert streams == []
        assert handlers == []
        assert all(live.get_stream is None for live in service.transport.live.values())
