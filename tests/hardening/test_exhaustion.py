"""Resource exhaustion: oversized and slow uploads, session floods, streams that never read.

Every test runs against a real service on a loopback port. It checks that
the abuse is rejected or cut off, that resident memory stays within a
generous bound, and that the service still responds afterwards. Set EXECUTOR_SOAK=1
for the larger counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import time
from pathlib import Path

import httpx2
import pytest

import executor_tornado.app
from conftest import MCP_HEADERS, anonymous_key, fetch, initialize_body, json_body, running
from mcp_client import sdk_client
from test_sse_resources import open_session, raw_request, resident_bytes
from test_webhooks import WEBHOOK_SETTINGS

SOAK = os.environ.get("EXECUTOR_SOAK") == "1"
SESSION_FLOOD = 10000 if SOAK else 2000
STREAM_FLOOD = 4000 if SOAK else 1000
PLUGIN = ["transport_plugin:register"]
# The OAuth MCP paths share the handler of the API key paths. They check
# the token before the body, so without an authorization server they are
# 503 before any size check.
BODY_ROUTES = [
    "/v1/mcp/anonymous", "/mcp/anonymous", "/auth/anonymous/session",
    "/auth/anonymous/token", "/stripe/webhook", "/workos/webhook",
]


@pytest.mark.parametrize("size", [300 * 1024, 3 * 1024 * 1024])
async def test_oversized_body_is_413(data_dir: Path, size: int) -> None:
    async with running(data_dir, max_body_bytes=256 * 1024, **WEBHOOK_SETTINGS) as service:
        bootstrap = await anonymous_key(service)
        before = await service.store.count_open_mcp_sessions()
        body = json.dumps({**initialize_body(), "pad": "x" * size}).encode()
        gc.collect()
        resident_before = resident_bytes()
        for route in BODY_ROUTES * 5:
            response = await fetch(
                service, f"{route}?workspaceId={bootstrap['workspaceId']}", method="POST", body=body,
                headers={**MCP_HEADERS, "X-API-Key": bootstrap["apiKey"], "Authorization": f"Bearer {bootstrap['accessToken']}"},
            )
            assert response.code == 413, (route, response.code, response.body[:200])
            assert "too large" in json_body(response)["error"], route
        assert await service.store.count_open_mcp_sessions() == before
        assert (await fetch(service, "/healthz")).code == 200
        gc.collect()
        growth = resident_bytes() - resident_before
        assert growth < 64 * 1024 * 1024, f"resident memory grew by {growth} bytes after 30 rejected bodies"


@pytest.mark.parametrize("route", ["/v1/mcp/anonymous", "/auth/anonymous/session", "/stripe/webhook"])
async def test_slow_upload_hits_body_timeout(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    monkeypatch.setattr(executor_tornado.app, "BODY_TIMEOUT_SECONDS", 1.0)
    async with running(data_dir, **WEBHOOK_SETTINGS) as service:
        bootstrap = await anonymous_key(service)
        head = (
            f"POST {route}?workspaceId={bootstrap['workspaceId']} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{service.port}\r\nX-API-Key: {bootstrap['apiKey']}\r\n"
            "Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000\r\n\r\n{"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(head.encode())
        await writer.drain()
        started = time.monotonic()
        closed = False
        for _ in range(40):
            await asyncio.sleep(0.5)
            if reader.at_eof():
                closed = True
                break
            try:
                writer.write(b" ")  # one byte every half second: a trickle that never completes
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(4096), 0.01)
        writer.close()
        elapsed = time.monotonic() - started
        assert closed, "the server kept a trickling upload open past its body timeout"
        assert elapsed < 10, f"the upload was cut off only after {elapsed:.1f} s"

        for _ in range(100):
            if service.requests_in_progress == 0:
                break
            await asyncio.sleep(0.05)
        assert service.requests_in_progress == 0, "the handler of the cut-off upload is still running"
        assert (await fetch(service, "/healthz")).code == 200


async def test_session_flood_from_one_principal_is_capped(data_dir: Path) -> None:
    async with running(data_dir, rate_limit_enabled=False) as service:
        flooder = await anonymous_key(service, user_agent="flooder")
        cap = service.settings.max_sessions_per_principal
        headers = {**MCP_HEADERS, "X-API-Key": flooder["apiKey"]}
        gc.collect()
        before = resident_bytes()
        statuses: dict[int, int] = {}
        retry_after: set[str] = set()

        async with httpx2.AsyncClient(timeout=60, limits=httpx2.Limits(max_connections=50)) as client:
            async def one() -> None:
                response = await client.post(flooder["mcpUrl"], json=initialize_body(), headers=headers)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 503:
                    retry_after.add(response.headers.get("Retry-After", ""))

            for start in range(0, SESSION_FLOOD, 100):
                await asyncio.gather(*(one() for _ in range(min(100, SESSION_FLOOD - start))))

            assert statuses.get(200) == cap, statuses
            assert statuses.get(503) == SESSION_FLOOD - cap, statuses
            assert all(value.isdigit() and int(value) >= 1 for value in retry_after)
            assert await service.store.count_open_mcp_sessions() == cap

            bystander = await anonymous_key(service, user_agent="bystander")
            response = await client.post(
                bystander["mcpUrl"], json=initialize_body(), headers={**MCP_HEADERS, "X-API-Key": bystander["apiKey"]}
            )
            assert response.status_code == 200, "another principal still gets a session"

        gc.collect()
        growth = resident_bytes() - before
        assert growth < 150 * 1024 * 1024, f"resident memory grew by {growth} bytes"


async def test_never_read_streams_stay_bounded(data_dir: Path) -> None:
    async with running(
        data_dir, mcp_plugins=PLUGIN, rate_limit_enabled=False, max_sessions_per_principal=STREAM_FLOOD + 10,
        sse_buffer_bytes=64 * 1024,
    ) as service:
        bootstrap = await anonymous_key(service)
        path = bootstrap["mcpUrl"].removeprefix(service.base_url)
        async with httpx2.AsyncClient(timeout=60, limits=httpx2.Limits(max_connections=50)) as client:
            sessions: list[str] = []
            for start in range(0, STREAM_FLOOD, 100):
                sessions += await asyncio.gather(*(open_session(client, bootstrap) for _ in range(100)))

        gc.collect()
        before = resident_bytes()
        writers = []
        for start in range(0, len(sessions), 100):
            batch = sessions[start:start + 100]
            opened = await asyncio.gather(*(
                raw_request(
                    service.port, "GET", path,
                    {"X-API-Key": bootstrap["apiKey"], "Mcp-Session-Id": session_id, "Accept": "text/event-stream"},
                    rcvbuf=4096,
                )
                for session_id in batch
            ))
            writers += [writer for _, writer in opened]
        for _ in range(500):
            if service.transport.open_stream_count >= len(sessions):
                break
            await asyncio.sleep(0.02)
        assert service.transport.open_stream_count == len(sessions)

        headers = {"X-API-Key": bootstrap["apiKey"], **MCP_HEADERS}
        flood = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "announce", "arguments": {}}}
        async with httpx2.AsyncClient(timeout=60) as client:
            for session_id in sessions[:100]:
                for _ in range(5):
                    response = await client.post(
                        bootstrap["mcpUrl"], json=flood, headers={**headers, "Mcp-Session-Id": session_id}
                    )
                    assert response.status_code == 200
        health = await fetch(service, "/healthz")
        assert health.code == 200, "the service answers while every stream is stalled"
        gc.collect()
        growth = resident_bytes() - before
        assert growth < 200 * 1024 * 1024, f"resident memory grew by {growth} bytes for {len(sessions)} streams"

        for writer in writers:
            writer.transport.abort()
        for _ in range(500):
            if service.transport.open_stream_count == 0:
                break
            await asyncio.sleep(0.02)
        assert service.transport.open_stream_count == 0, "dropped streams were released"


# Code, the task status it must end in, and the error type it must report.
SANDBOX_BOMBS = {
    "memory": ("chunks = []\nwhile True:\n    chunks.append('a' * 1000000)", "failed", "MemoryError"),
    "recursion": ("def down(n):\n    return down(n + 1)\ndown(0)", "failed", "RecursionError"),
    "endless loop": ("n = 0\nwhile True:\n    n += 1", "timed_out", None),
}


async def test_sandbox_bombs_over_mcp_leave_service_up(data_dir: Path) -> None:
    async with running(
        data_dir, rate_limit_enabled=False, sandbox_max_memory_bytes=64 * 1024 * 1024,
        sandbox_max_recursion_depth=200, sandbox_max_duration_seconds=2.0,
    ) as service:
        bootstrap = await anonymous_key(service)
        gc.collect()
        before = resident_bytes()

        async with sdk_client(bootstrap["mcpUrl"], {"X-API-Key": bootstrap["apiKey"]}) as client:
            cases = list(SANDBOX_BOMBS.items()) * 2
            results = await asyncio.gather(
                *(client.call_tool("execute", {"code": code}) for _, (code, _, _) in cases)
            )
            health = await fetch(service, "/healthz")
            assert health.code == 200

            for (name, (_, status, error_type)), result in zip(cases, results):
                assert result.is_error is True, name
                body = result.structured_content
                assert body is not None, name
                assert body["status"] == status, (name, body["status"])
                if error_type is not None:
                    assert error_type in json.dumps(body["error"]), (name, body["error"])

            after = await client.call_tool("execute", {"code": "40 + 2"})
            assert after.structured_content is not None
            assert after.structured_content["result"] == 42, "the pool serves after the bombs"

        growth = resident_bytes() - before
        assert growth < 100 * 1024 * 1024, f"the service process grew by {growth} bytes; the sandbox runs in workers"
