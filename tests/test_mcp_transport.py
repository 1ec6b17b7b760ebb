"""The Streamable HTTP session state machine, row by row, over real HTTP.

Each test names the row of the session table it walks: the event, the state
it starts from, and the exact status, headers and body that must follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from conftest import anonymous_key, initialize_body, running
from executor_tornado.clock import ManualClock
from executor_tornado.mcp.state import TRANSITIONS, Rejected, SessionEvent, SessionState, next_state
from sse_client import SseReader

ACCEPT_BOTH = "application/json, text/event-stream"
PLUGIN = {"mcp_plugins": ["transport_plugin:register"]}


class McpHttp:
    """Raw HTTP against one MCP URL with one API key."""

    def __init__(self, client: httpx2.AsyncClient, url: str, key: str) -> None:
        self.client = client
        self.url = url
        self.key = key

    def headers(self, session_id: str | None = None, **extra: str) -> dict[str, str]:
        headers = {"X-API-Key": self.key, "Accept": ACCEPT_BOTH, "Content-Type": "application/json"}
        if session_id is not None:
            headers["Mcp-Session-Id"] = session_id
        headers.update(extra)
        return {k: v for k, v in headers.items() if v != ""}

    async def post(self, body: Any, session_id: str | None = None, **extra: str) -> httpx2.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return await self.client.post(self.url, content=content, headers=self.headers(session_id, **extra))

    async def initialize(self, version: str = "2025-11-25") -> str:
        response = await self.post(initialize_body(version))
        assert response.status_code == 200, response.text
        session_id = response.headers["Mcp-Session-Id"]
        acknowledged = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"}, session_id)
        assert acknowledged.status_code == 202
        return session_id

    @contextlib.asynccontextmanager
    async def stream(self, method: str, session_id: str | None, body: Any = None, **extra: str) -> AsyncIterator[httpx2.Response]:
        content = None if body is None else json.dumps(body)
        async with self.client.stream(method, self.url, content=content, headers=self.headers(session_id, **extra)) as response:
            yield response


def seq(event_id: str) -> int:
    """Return the store sequence number of an SSE event id (``<seq>/<stream>``)."""
    return int(event_id.split("/")[0])


def call(request_id: int, tool: str, arguments: dict[str, Any] | None = None, meta: dict[str, Any] | None = None) -> dict:
    params: dict[str, Any] = {"name": tool, "arguments": arguments or {}}
    if meta:
        params["_meta"] = meta
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


@contextlib.asynccontextmanager
async def mcp_service(data_dir: Path, **settings: Any) -> AsyncIterator[tuple[Any, McpHttp]]:
    async with running(data_dir, **{**PLUGIN, **settings}) as service:
        bootstrap = await anonymous_key(service)
        async with httpx2.AsyncClient(timeout=30) as client:
            yield service, McpHttp(client, bootstrap["mcpUrl"], bootstrap["apiKey"])


def test_state_table_is_complete() -> None:
    for state in SessionState:
        for event in SessionEvent:
            assert (state, event) in TRANSITIONS, (state, event)
    assert next_state(SessionState.INITIALIZING, SessionEvent.INITIALIZED) is SessionState.ACTIVE
    assert next_state(SessionState.ACTIVE, SessionEvent.DELETE) is SessionState.CLOSED
    with pytest.raises(Rejected) as rejected:
        next_state(SessionState.CLOSED, SessionEvent.REQUEST)
    assert rejected.value.status == 404


async def test_initialize_without_session_creates_one(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        response = await mcp.post(initialize_body("2025-06-18"))
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
        session_id = response.headers["Mcp-Session-Id"]
        assert len(session_id) >= 43, "at least 256 bits, URL-safe base64"
        body = response.json()
        assert body["id"] == 1
        assert body["result"]["protocolVersion"] == "2025-06-18"
        assert body["result"]["serverInfo"]["name"] == "executor-tornado"
        record = await service.store.get_mcp_session(session_id)
        assert record.state == "initializing"
        assert record.principal.startswith("apikey|anon_")


async def test_unknown_version_negotiates_latest_handshake(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        response = await mcp.post(initialize_body("1999-01-01"))
        assert response.status_code == 200
        assert response.json()["result"]["protocolVersion"] == "2025-11-25"


async def test_initialize_with_session_id_is_400(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        session_id = await mcp.initialize()
        response = await mcp.post(initialize_body(), session_id)
        assert response.status_code == 400
        assert response.json() == {
            "jsonrpc": "2.0", "id": None,
            "error": {"code": -32600, "message": "Bad Request: initialize must be sent without an Mcp-Session-Id header"},
        }


async def test_other_message_without_session_is_400(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        for body in (call(1, "whoami"), {"jsonrpc": "2.0", "method": "notifications/initialized"}):
            response = await mcp.post(body)
            assert response.status_code == 400
            assert response.json()["error"] == {
                "code": -32600, "message": "Bad Request: Mcp-Session-Id header is required; send initialize first",
            }
        assert await service.store.count_open_mcp_sessions() == 0


async def test_unknown_and_closed_session_is_404(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        expected = {
            "jsonrpc": "2.0", "id": None,
            "error": {"code": -32001, "message": "Session not found: it is unknown, expired or was terminated; initialize a new session"},
        }
        response = await mcp.post(call(1, "whoami"), "no-such-session")
        assert response.status_code == 404
        assert response.json() == expected

        session_id = await mcp.initialize()
        deleted = await mcp.client.delete(mcp.url, headers=mcp.headers(session_id))
        assert deleted.status_code == 204
        for method in ("POST", "GET", "DELETE"):
            if method == "POST":
                response = await mcp.post(call(2, "whoami"), session_id)
            else:
                response = await mcp.client.request(method, mcp.url, headers=mcp.headers(session_id))
            assert response.status_code == 404, method
            assert response.json() == expected


async def test_initialized_notification_activates(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        response = await mcp.post(initialize_body())
        session_id = response.headers["Mcp-Session-Id"]
        acknowledged = await mcp.post({"jsonrpc": "2.0", "method": "notifications/initialized"}, session_id)
        assert acknowledged.status_code == 202
        assert acknowledged.content == b""
        assert (await service.store.get_mcp_session(session_id)).state == "active"


async def test_request_answered_as_json(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        session_id = await mcp.initialize()
        response = await mcp.post(call(7, "whoami"), session_id, **{"MCP-Protocol-Version": "2025-11-25"})
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["Mcp-Session-Id"] == session_id
        body = response.json()
        assert body["id"] == 7
        principal, workspace, seen_session = body["result"]["content"][0]["text"].split(" ")
        assert seen_session == session_id
        assert principal.startswith("apikey|anon_")


async def test_request_answered_as_sse_with_priming(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        session_id = await mcp.initialize("2025-11-25")
        body = call(3, "progress", {"steps": 3, "pause": 0.05}, meta={"progressToken": "p1"})
        async with mcp.stream("POST", session_id, body, **{"MCP-Protocol-Version": "2025-11-25"}) as response:
            assert response.status_code == 200
            assert response.headers["Content-Type"] == "text/event-stream"
            assert response.headers["Mcp-Session-Id"] == session_id
            reader = SseReader(response)
            events = await reader.events_until_response(3)
        priming = events[0]
        assert priming.data == ""
        assert priming.retry == 3000
        assert priming.id is not None
        progress = [e.message for e in events[1:-1]]
        assert [p["params"]["progress"] for p in progress] == [1, 2, 3]
        assert all(p["params"]["progressToken"] == "p1" for p in progress)
        assert events[-1].message["result"]["content"][0]["text"] == "done 3"
        sequence_numbers = [seq(e.id) for e in events]
        assert sequence_numbers == sorted(sequence_numbers)
        assert len(set(sequence_numbers)) == len(sequence_numbers)
        assert len({e.id.split("/")[1] for e in events}) == 1, "one stream token per POST stream"


async def test_no_priming_before_2025_11_25(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        session_id = await mcp.initialize("2025-06-18")
        body = call(3, "progress", {"steps": 1}, meta={"progressToken": 1})
        async with mcp.stream("POST", session_id, body, **{"MCP-Protocol-Version": "2025-06-18"}) as response:
            events = await SseReader(response).events_until_response(3)
        assert events[0].data != "", "the first event is the progress notification, not a priming event"


async def test_notification_or_response_only_is_202(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        session_id = await mcp.initialize()
        for body in (
            {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 99}},
            {"jsonrpc": "2.0", "id": 12345, "result": {}},
        ):
            response = await mcp.post(body, session_id)
            assert response.status_code == 202
            assert response.content == b""


async def test_get_stream_and_second_get_409(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        session_id = await mcp.initialize()
        async with mcp.stream("GET", session_id, Accept="text/event-stream") as first:
            assert first.status_code == 200
            assert first.headers["Content-Type"] == "text/event-stream"
            reader = SseReader(first)
            priming = await reader.next_event()
            assert priming.data == ""
            assert priming.retry == 3000

            second = await mcp.client.get(mcp.url, headers=mcp.headers(session_id, Accept="text/event-stream"))
            assert second.status_code == 409
            assert second.json()["error"] == {"code": -32600, "message": "Conflict: this session already has an open GET stream"}

            response = await mcp.post(call(4, "announce"), session_id)
            assert response.status_code == 200
            event = await reader.next_event()
            assert event.message == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}


async def test_get_without_sse_accept_is_406(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        session_id = await mcp.initialize()
        response = await mcp.client.get(mcp.url, headers=mcp.headers(session_id, Accept="application/json"))
        assert response.status_code == 406


async def test_last_event_id_replays_only_that_session(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        first = await mcp.initialize()
        other = await mcp.initialize()
        async with mcp.stream("GET", first, Accept="text/event-stream") as stream:
            reader = SseReader(stream)
            priming = await reader.next_event()
            for request_id in (1, 2):
                assert (await mcp.post(call(request_id, "announce"), first)).status_code == 200
            missed = [await reader.next_event(), await reader.next_event()]

        async with mcp.stream("GET", first, Accept="text/event-stream", **{"Last-Event-ID": priming.id}) as resumed:
            reader = SseReader(resumed)
            replayed = [await reader.next_event(), await reader.next_event()]
        assert [e.id for e in replayed] == [e.id for e in missed]
        assert [e.message for e in replayed] == [e.message for e in missed]

        async with mcp.stream("GET", other, Accept="text/event-stream", **{"Last-Event-ID": priming.id}) as foreign:
            assert foreign.status_code == 200
            reader = SseReader(foreign)
            assert (await mcp.post(call(3, "announce"), other)).status_code == 200
            event = await reader.next_event()
        own_ids = {seq(e.id) for e in missed}
        assert seq(event.id) not in own_ids, "another session's event id replays none of its events"
        assert seq(event.id) > max(own_ids)


async def test_post_stream_resumed_with_get(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        session_id = await mcp.initialize()
        body = call(5, "progress", {"steps": 4, "pause": 0.2}, meta={"progressToken": "t"})
        async with mcp.stream("POST", session_id, body) as response:
            reader = SseReader(response)
            priming = await reader.next_event()
            first_progress = await reader.next_event()
        async with mcp.stream("GET", session_id, Accept="text/event-stream", **{"Last-Event-ID": first_progress.id}) as resumed:
            events = await SseReader(resumed).events_until_response(5)
        assert [e.message["params"]["progress"] for e in events[:-1]] == [2, 3, 4]
        assert events[-1].message["result"]["content"][0]["text"] == "done 4"
        assert seq(events[0].id) > seq(first_progress.id) > seq(priming.id)


async def test_delete_ends_streams_and_closes(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        session_id = await mcp.initialize()
        async with mcp.stream("GET", session_id, Accept="text/event-stream") as stream:
            reader = SseReader(stream)
            await reader.next_event()
            deleted = await mcp.client.delete(mcp.url, headers=mcp.headers(session_id))
            assert deleted.status_code == 204
            assert await reader.next_event() is None, "the GET stream ends"
        record = await service.store.get_mcp_session(session_id)
        assert record.state == "closed"
        assert record.close_reason == "deleted by client"
        again = await mcp.client.delete(mcp.url, headers=mcp.headers(session_id))
        assert again.status_code == 404


async def test_idle_session_expires(data_dir: Path) -> None:
    clock = ManualClock()
    async with running(data_dir, clock=clock, session_idle_seconds=60, **PLUGIN) as service:
        bootstrap = await anonymous_key(service)
        async with httpx2.AsyncClient(timeout=30) as client:
            mcp = McpHttp(client, bootstrap["mcpUrl"], bootstrap["apiKey"])
            idle = await mcp.initialize()
            busy = await mcp.initialize()
            async with mcp.stream("GET", busy, Accept="text/event-stream") as stream:
                reader = SseReader(stream)
                await reader.next_event()
                clock.advance(61)
                closed = await service.transport.reap_idle()
                assert closed == 1, "a session with an open stream is not idle"
                assert (await service.store.get_mcp_session(idle)).state == "closed"
                assert (await service.store.get_mcp_session(busy)).state == "active"
            response = await mcp.post(call(1, "whoami"), idle)
            assert response.status_code == 404


async def test_session_bound_to_principal(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        session_id = await mcp.initialize()
        other = await anonymous_key(service, user_agent="intruder")
        intruder = McpHttp(mcp.client, other["mcpUrl"], other["apiKey"])
        response = await intruder.post(call(1, "whoami"), session_id)
        assert response.status_code == 404
        assert (await mcp.post(call(2, "whoami"), session_id)).status_code == 200


async def test_refreshed_key_keeps_session(data_dir: Path) -> None:
    async with running(data_dir, **PLUGIN) as service:
        bootstrap = await anonymous_key(service)
        async with httpx2.AsyncClient(timeout=30) as client:
            mcp = McpHttp(client, bootstrap["mcpUrl"], bootstrap["apiKey"])
            session_id = await mcp.initialize()
            refreshed = await client.post(
                service.base_url + "/auth/anonymous/session",
                json={"sessionId": bootstrap["sessionId"]},
                headers={"Authorization": f"Bearer {bootstrap['accessToken']}"},
            )
            new_key = refreshed.json()["apiKey"]
            assert new_key != bootstrap["apiKey"]
            again = McpHttp(client, bootstrap["mcpUrl"], new_key)
            assert (await again.post(call(1, "whoami"), session_id)).status_code == 200


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({"Accept": "application/json"}, None, 406, -32600),
        ({"Accept": "text/event-stream"}, None, 406, -32600),
        ({"Content-Type": "text/plain"}, None, 415, -32600),
        ({}, b"{not json", 400, -32700),
        ({}, {"jsonrpc": "2.0"}, 400, -32600),
        ({}, [{"jsonrpc": "2.0", "id": 1, "method": "ping"}], 400, -32600),
        ({"MCP-Protocol-Version": "2024-01-01"}, None, 400, -32600),
    ],
)
async def test_post_transport_rules(data_dir: Path, headers: dict, body: Any, status: int, code: int) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        session_id = await mcp.initialize()
        payload = body if body is not None else call(1, "whoami")
        response = await mcp.post(payload, session_id, **headers)
        assert response.status_code == status
        assert response.json()["error"]["code"] == code


async def test_any_handshake_version_header_is_accepted(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        session_id = await mcp.initialize("2025-11-25")
        for version in ("2025-03-26", "2025-06-18", "2025-11-25", ""):
            response = await mcp.post(call(1, "whoami"), session_id, **{"MCP-Protocol-Version": version})
            assert response.status_code == 200, version


async def test_dns_rebinding_protection(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        foreign_host = await mcp.post(initialize_body(), Host="evil.example")
        assert foreign_host.status_code == 421
        foreign_origin = await mcp.post(initialize_body(), Origin="http://evil.example")
        assert foreign_origin.status_code == 403
        local_origin = await mcp.post(initialize_body(), Origin=f"http://localhost:{service.port}")
        assert local_origin.status_code == 200
        assert await service.store.count_open_mcp_sessions() == 1


async def test_body_limit_is_413(data_dir: Path) -> None:
    async with mcp_service(data_dir, max_body_bytes=1024) as (service, mcp):
        big = call(1, "whoami", {"padding": "x" * 2048})
        response = await mcp.post(big)
        assert response.status_code == 413
        assert response.json() == {"error": "Request body too large: the limit is 1024 bytes"}


async def test_session_cap_per_principal(data_dir: Path) -> None:
    async with mcp_service(data_dir, max_sessions_per_principal=2) as (service, mcp):
        await mcp.initialize()
        await mcp.initialize()
        refused = await mcp.post(initialize_body())
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "30"
        other = await anonymous_key(service, user_agent="other")
        neighbour = McpHttp(mcp.client, other["mcpUrl"], other["apiKey"])
        assert (await neighbour.post(initialize_body())).status_code == 200, "another principal is not affected"


async def test_session_cap_per_process(data_dir: Path) -> None:
    async with mcp_service(data_dir, max_sessions=1) as (service, mcp):
        await mcp.initialize()
        refused = await mcp.post(initialize_body())
        assert refused.status_code == 503
        assert await service.store.count_open_mcp_sessions() == 1


async def test_session_survives_restart(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        session_id = await mcp.initialize()
        port, url, key = service.port, mcp.url, mcp.key
    async with running(data_dir, port=port, **PLUGIN) as service:
        async with httpx2.AsyncClient(timeout=30) as client:
            mcp = McpHttp(client, url, key)
            response = await mcp.post(call(9, "whoami"), session_id)
            assert response.status_code == 200
            assert response.json()["result"]["content"][0]["text"].endswith(session_id)


async def test_modern_revision_is_stateless(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        meta = {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        }
        body = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": meta}}
        headers = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "server/discover"}
        response = await mcp.post(body, **headers)
        assert response.status_code == 200, response.text
        assert "Mcp-Session-Id" not in response.headers
        assert "2026-07-28" in json.dumps(response.json()["result"])

        tool = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "whoami", "arguments": {}, "_meta": meta}}
        response = await mcp.post(tool, **{"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "whoami"})
        assert response.status_code == 200, response.text
        assert response.json()["result"]["content"][0]["text"].endswith(" None")

        for method in ("GET", "DELETE"):
            refused = await mcp.client.request(method, mcp.url, headers=mcp.headers(**{"MCP-Protocol-Version": "2026-07-28"}))
            assert refused.status_code == 405
            assert refused.headers["Allow"] == "POST"
        assert await service.store.count_open_mcp_sessions() == 0


async def test_concurrent_posts_on_one_session(data_dir: Path) -> None:
    async with mcp_service(data_dir) as (service, mcp):
        session_id = await mcp.initialize()
        responses = await asyncio.gather(
            *(mcp.post(call(index, "sleep", {"seconds": 0.1}), session_id) for index in range(10))
        )
        assert [r.status_code for r in responses] == [200] * 10


async def test_idle_stream_gets_keepalive_comments(data_dir: Path) -> None:
    async with mcp_service(data_dir, sse_keepalive_seconds=0.2) as (service, mcp):
        session_id = await mcp.initialize()
        async with mcp.stream("GET", session_id, Accept="text/event-stream") as stream:
            reader = SseReader(stream)
            await reader.next_event()
            comment = await reader.next_event(timeout=5, skip_comments=False)
            assert comment.comments == ["keep-alive"]
            assert comment.id is None
            assert comment.data == ""
