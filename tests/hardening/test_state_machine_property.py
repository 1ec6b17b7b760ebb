"""The MCP session state machine under random sequences of requests from several principals.

A hypothesis ``RuleBasedStateMachine`` sends POST, GET and DELETE requests
and idle expiry to a real service. It keeps its own model of every session,
written from the session table of the transport: the state a session is in,
who owns it and whether a GET stream is open. Every rule asserts the exact
status the table gives, and after every step the invariant compares the
model with the session records in the store.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from conftest import initialize_body
from executor_tornado.clock import ManualClock
from live_server import LiveServer, RawResponse

SOAK = os.environ.get("EXECUTOR_SOAK") == "1"
IDLE_SECONDS = 600.0
PER_PRINCIPAL_CAP = 3
PRINCIPALS = 3
ACCEPT_BOTH = "application/json, text/event-stream"

# The session table, as the test reads it: the status each event gets in
# each state. "none" is a session id the server never issued.
EXPECTED_STATUS = {
    ("initialize with id", "initializing"): 400,
    ("initialize with id", "active"): 400,
    ("initialize with id", "closed"): 404,
    ("initialize with id", "none"): 404,
    ("initialized", "initializing"): 202,
    ("initialized", "active"): 202,
    ("initialized", "closed"): 404,
    ("initialized", "none"): 404,
    ("request", "initializing"): 200,
    ("request", "active"): 200,
    ("request", "closed"): 404,
    ("request", "none"): 404,
    ("notification", "initializing"): 202,
    ("notification", "active"): 202,
    ("notification", "closed"): 404,
    ("notification", "none"): 404,
    ("GET", "initializing"): 200,
    ("GET", "active"): 200,
    ("GET", "closed"): 404,
    ("GET", "none"): 404,
    ("DELETE", "initializing"): 204,
    ("DELETE", "active"): 204,
    ("DELETE", "closed"): 404,
    ("DELETE", "none"): 404,
}
NEXT_STATE = {
    ("initialized", "initializing"): "active",
    ("DELETE", "initializing"): "closed",
    ("DELETE", "active"): "closed",
}


@dataclass
class Principal:
    api_key: str
    workspace_id: str
    account_id: str


@dataclass
class ModelSession:
    owner: int
    state: str = "initializing"
    stream: tuple[http.client.HTTPConnection, http.client.HTTPResponse] | None = None
    history: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    clock = ManualClock()
    server = LiveServer(
        tmp_path_factory.mktemp("state"),
        clock=clock,
        rate_limit_enabled=False,
        session_idle_seconds=IDLE_SECONDS,
        max_sessions_per_principal=PER_PRINCIPAL_CAP,
        api_key_ttl_seconds=10 * 365 * 86400,
        mcp_plugins=["transport_plugin:register"],
    )
    server.extras["clock"] = clock
    server.start()
    # The principals are made before the clock moves: PyJWT checks "iat"
    # against the wall clock, so tokens issued later, in the shifted future,
    # would be rejected. Every run's teardown deletes the sessions it opened.
    server.extras["principals"] = [_bootstrap(server) for _ in range(PRINCIPALS)]
    try:
        yield server
    finally:
        server.stop()


def _bootstrap(live: LiveServer) -> Principal:
    token = json.loads(live.request("POST", "/auth/anonymous/token").body)["accessToken"]
    body = json.loads(
        live.request(
            "POST", "/auth/anonymous/session", body=b"{}",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        ).body
    )
    assert "apiKey" in body, body
    return Principal(api_key=body["apiKey"], workspace_id=body["workspaceId"], account_id=body["accountId"])


class SessionMachine(RuleBasedStateMachine):
    live: LiveServer

    def __init__(self) -> None:
        super().__init__()
        self.principals: list[Principal] = self.live.extras["principals"]
        self.sessions: dict[str, ModelSession] = {}
        self.request_id = 0

    # -- HTTP -----------------------------------------------------------------------------

    def _target(self, principal: int) -> str:
        return f"/v1/mcp/anonymous?workspaceId={self.principals[principal].workspace_id}"

    def _headers(self, principal: int, session_id: str | None, accept: str = ACCEPT_BOTH) -> dict[str, str]:
        headers = {"X-API-Key": self.principals[principal].api_key, "Accept": accept, "Content-Type": "application/json"}
        if session_id is not None:
            headers["Mcp-Session-Id"] = session_id
        return headers

    def _post(self, principal: int, session_id: str | None, message: dict[str, Any]) -> RawResponse:
        return self.live.request(
            "POST", self._target(principal), body=json.dumps(message).encode(),
            headers=self._headers(principal, session_id),
        )

    def _next_id(self) -> int:
        self.request_id += 1
        return self.request_id

    # -- model ----------------------------------------------------------------------------

    def _state_for(self, principal: int, session_id: str) -> str:
        """The state the table applies: another principal's session is "none" to this caller."""
        session = self.sessions.get(session_id)
        if session is None or session.owner != principal:
            return "none"
        return session.state

    def _open_count(self, principal: int) -> int:
        return sum(1 for s in self.sessions.values() if s.owner == principal and s.state != "closed")

    def _pick(self, data: st.DataObject) -> tuple[int, str]:
        """Draw a session id (now and then one never issued) and a caller, usually its owner."""
        if not self.sessions or data.draw(st.integers(0, 7), label="unknown id") == 0:
            session_id = secrets.token_urlsafe(32)
            return data.draw(st.integers(0, PRINCIPALS - 1), label="principal"), session_id
        session_id = data.draw(st.sampled_from(list(self.sessions)), label="session")
        if data.draw(st.integers(0, 3), label="intruder") == 0:
            return data.draw(st.integers(0, PRINCIPALS - 1), label="principal"), session_id
        return self.sessions[session_id].owner, session_id

    def _check(self, event: str, principal: int, session_id: str, response: RawResponse) -> None:
        state = self._state_for(principal, session_id)
        expected = EXPECTED_STATUS[(event, state)]
        assert response.status == expected, (event, state, response.status, response.body[:200])
        if response.status >= 400:
            body = json.loads(response.body)
            assert body["jsonrpc"] == "2.0" and isinstance(body["error"]["message"], str), body
        if response.status == 404:
            assert body["error"]["code"] == -32001
        if (event, state) in NEXT_STATE:
            session = self.sessions[session_id]
            session.state = NEXT_STATE[(event, state)]
            session.history.append(event)

    # -- rules --------------------------------------------------------------------------

    @initialize()
    def one_session_each(self) -> None:
        """Start every run with one session per principal, the first of them active, so most steps hit a real session."""
        for principal in range(PRINCIPALS):
            self.initialize(principal)
        first = next(iter(self.sessions))
        response = self._post(0, first, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        self._check("initialized", 0, first, response)

    @rule(principal=st.integers(0, PRINCIPALS - 1))
    def initialize(self, principal: int) -> None:
        response = self._post(principal, None, initialize_body(request_id=self._next_id()))
        if self._open_count(principal) >= PER_PRINCIPAL_CAP:
            assert response.status == 503, response.body
            assert int(response.headers["Retry-After"]) >= 1
            return
        assert response.status == 200, response.body
        session_id = response.headers["Mcp-Session-Id"]
        assert session_id not in self.sessions, "a session id was issued twice"
        self.sessions[session_id] = ModelSession(owner=principal)

    @rule(principal=st.integers(0, PRINCIPALS - 1), method=st.sampled_from(["ping", "tools/list"]))
    def request_without_session(self, principal: int, method: str) -> None:
        response = self._post(principal, None, {"jsonrpc": "2.0", "id": self._next_id(), "method": method})
        assert response.status == 400, response.body

    @rule(data=st.data())
    def initialize_with_session(self, data: st.DataObject) -> None:
        principal, session_id = self._pick(data)
        response = self._post(principal, session_id, initialize_body(request_id=self._next_id()))
        self._check("initialize with id", principal, session_id, response)

    @rule(data=st.data())
    def initialized(self, data: st.DataObject) -> None:
        principal, session_id = self._pick(data)
        response = self._post(principal, session_id, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        self._check("initialized", principal, session_id, response)

    @rule(data=st.data(), method=st.sampled_from(["ping", "tools/list"]))
    def request(self, data: st.DataObject, method: str) -> None:
        principal, session_id = self._pick(data)
        response = self._post(principal, session_id, {"jsonrpc": "2.0", "id": self._next_id(), "method": method})
        self._check("request", principal, session_id, response)
        if response.status == 200 and response.headers.get("Content-Type", "").startswith("application/json"):
            assert "result" in json.loads(response.body)

    @rule(data=st.data(), kind=st.sampled_from(["notification", "response"]))
    def notification(self, data: st.DataObject, kind: str) -> None:
        principal, session_id = self._pick(data)
        if kind == "notification":
            message: dict[str, Any] = {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}
        else:
            message = {"jsonrpc": "2.0", "id": "srv-unknown", "result": {}}
        response = self._post(principal, session_id, message)
        self._check("notification", principal, session_id, response)

    @rule(data=st.data())
    def open_get_stream(self, data: st.DataObject) -> None:
        principal, session_id = self._pick(data)
        connection = http.client.HTTPConnection("127.0.0.1", self.live.port, timeout=10)
        connection.request("GET", self._target(principal), headers=self._headers(principal, session_id, "text/event-stream"))
        response = connection.getresponse()
        state = self._state_for(principal, session_id)
        session = self.sessions.get(session_id)
        if state in ("initializing", "active") and session is not None and session.stream is not None:
            assert response.status == 409, "a second live GET stream for one session is 409"
            response.read()
            connection.close()
            return
        if response.status != 200:
            raw = RawResponse(response.status, response.headers, response.read())
            connection.close()
            self._check("GET", principal, session_id, raw)
            return
        self._check("GET", principal, session_id, RawResponse(200, response.headers, b""))
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert session is not None
        session.stream = (connection, response)

    @precondition(lambda self: any(s.stream is not None for s in self.sessions.values()))
    @rule(data=st.data())
    def close_get_stream(self, data: st.DataObject) -> None:
        session_id = data.draw(st.sampled_from([k for k, s in self.sessions.items() if s.stream is not None]))
        session = self.sessions[session_id]
        assert session.stream is not None
        session.stream[0].close()
        session.stream = None
        self._wait_until_stream_released(session_id)

    def _wait_until_stream_released(self, session_id: str) -> None:
        """Wait (at most 10 s) until the server has noticed the client closed its GET stream."""
        transport = self.live.service.transport  # type: ignore[union-attr]

        async def released() -> bool:
            live = transport.live.get(session_id)
            return live is None or live.get_stream is None or not live.get_stream.is_open

        deadline = time.monotonic() + 10
        while not self.live.call(released()):
            assert time.monotonic() < deadline, "the server kept a closed GET stream open"
            time.sleep(0.01)

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        principal, session_id = self._pick(data)
        response = self.live.request("DELETE", self._target(principal), headers=self._headers(principal, session_id))
        self._check("DELETE", principal, session_id, response)
        session = self.sessions.get(session_id)
        if response.status == 204 and session is not None and session.stream is not None:
            connection, stream = session.stream
            stream.read()  # returns once the server ends the stream, or times out after 10 s
            connection.close()
            session.stream = None

    @rule()
    def idle_expiry(self) -> None:
        clock: ManualClock = self.live.extras["clock"]
        clock.advance(IDLE_SECONDS + 1)
        self.live.call(self.live.service.transport.reap_idle())  # type: ignore[union-attr]
        for session in self.sessions.values():
            if session.state != "closed" and session.stream is None:
                session.state = "closed"
                session.history.append("idle expiry")

    # -- invariant ------------------------------------------------------------------------

    @invariant()
    def store_matches_model(self) -> None:
        store = self.live.service.store  # type: ignore[union-attr]
        for session_id, session in self.sessions.items():
            record = self.live.call(store.get_mcp_session(session_id))
            assert record is not None, session_id
            assert record.state == session.state, (session.history, record.state, session.state)
            owner = self.principals[session.owner]
            assert record.principal == f"apikey|{owner.account_id}|{owner.workspace_id}"
        for index, principal in enumerate(self.principals):
            key = f"apikey|{principal.account_id}|{principal.workspace_id}"
            assert self.live.call(store.count_open_mcp_sessions(principal=key)) == self._open_count(index)

    def teardown(self) -> None:
        for session_id, session in self.sessions.items():
            if session.stream is not None:
                session.stream[0].close()
            if session.state != "closed":
                self.live.request("DELETE", self._target(session.owner), headers=self._headers(session.owner, session_id))


def test_session_state_machine(live: LiveServer) -> None:
    SessionMachine.live = live
    run_state_machine_as_test(
        SessionMachine,
        settings=settings(
            max_examples=300 if SOAK else 60,
            stateful_step_count=40 if SOAK else 30,
            deadline=None,
            derandomize=not SOAK,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
