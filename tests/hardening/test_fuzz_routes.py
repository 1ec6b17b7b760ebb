"""Fuzz every route with random and truncated bodies, headers and query strings.

Each example sends one request to a real service over a loopback socket.
The response must never be a 5xx, and every 4xx must carry a JSON error
body: ``{"error": "..."}``, or a JSON-RPC error object on MCP routes. A
rejected request must not open an MCP session.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authserver import LocalAuthServer
from conftest import initialize_body
from live_server import LiveServer, RawResponse
from store.records import Account, Membership, Organization, Workspace
from test_webhooks import WEBHOOK_SETTINGS

SOAK = os.environ.get("EXECUTOR_SOAK") == "1"
EXAMPLES = 3000 if SOAK else 250

WORKSPACE = "ws_fuzz"
MEMBER = "user_fuzz"

ROUTES: list[tuple[str, str]] = [
    ("GET", "/.well-known/oauth-protected-resource"),
    ("GET", "/.well-known/oauth-protected-resource/v1/mcp"),
    ("GET", "/.well-known/oauth-protected-resource/mcp"),
    ("GET", "/.well-known/oauth-authorization-server"),
    ("GET", "/.well-known/jwks.json"),
    ("POST", "/auth/anonymous/token"),
    ("GET", "/auth/anonymous/token"),
    ("POST", "/auth/anonymous/session"),
    ("POST", "/v1/mcp"),
    ("GET", "/v1/mcp"),
    ("DELETE", "/v1/mcp"),
    ("POST", "/mcp"),
    ("POST", "/v1/mcp/anonymous"),
    ("GET", "/v1/mcp/anonymous"),
    ("DELETE", "/v1/mcp/anonymous"),
    ("POST", "/mcp/anonymous"),
    ("POST", "/stripe/webhook"),
    ("POST", "/workos/webhook"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("PUT", "/v1/mcp/anonymous"),
    ("PATCH", "/auth/anonymous/session"),
    ("GET", "/no/such/route"),
]

MCP_METHODS = [
    "initialize", "ping", "tools/list", "tools/call", "notifications/initialized", "resources/list",
    "server/discover", "prompts/get", "logging/setLevel", "completion/complete", "", "\u0000", "x" * 300,
]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    auth = LocalAuthServer()

    async def start_auth() -> dict[str, Any]:
        auth.start()
        return {"authorization_server": auth.issuer}

    async def seed(server: LiveServer) -> None:
        store = server.service.store  # type: ignore[union-attr]
        await store.put_organization(Organization(id="org_fuzz", name="Org", created_at=1.0))
        await store.put_workspace(Workspace(id=WORKSPACE, name="Fuzz", created_at=1.0, organization_id="org_fuzz"))
        await store.put_account(Account(id=MEMBER, kind="workos", created_at=1.0))
        await store.put_membership(Membership(organization_id="org_fuzz", account_id=MEMBER, status="active"))

    server = LiveServer(
        tmp_path_factory.mktemp("fuzz"),
        rate_limit_enabled=False,
        mcp_plugins=["transport_plugin:register"],
        **WEBHOOK_SETTINGS,
    )
    server.start(setup=seed, before=start_auth)
    server.extras["auth"] = auth
    server.extras["token"] = auth.token(MEMBER, lifetime=3600)

    token_response = server.request("POST", "/auth/anonymous/token")
    anonymous = json.loads(token_response.body)["accessToken"]
    bootstrap = json.loads(
        server.request(
            "POST", "/auth/anonymous/session", body=b"{}",
            headers={"Authorization": f"Bearer {anonymous}", "Content-Type": "application/json"},
        ).body
    )
    server.extras["anonymous_token"] = anonymous
    server.extras["api_key"] = bootstrap["apiKey"]
    server.extras["api_workspace"] = bootstrap["workspaceId"]
    opened = server.request(
        "POST", f"/v1/mcp/anonymous?workspaceId={bootstrap['workspaceId']}",
        body=json.dumps(initialize_body()).encode(),
        headers={"X-API-Key": bootstrap["apiKey"], "Accept": "application/json, text/event-stream",
                 "Content-Type": "application/json"},
    )
    assert opened.status == 200
    server.extras["session_id"] = opened.headers["Mcp-Session-Id"]
    try:
        yield server
    finally:
        server.call(auth.stop())
        server.stop()


# -- strategies --------------------------------------------------------------------------

header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=120
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


@st.composite
def jsonrpc_messages(draw: st.DrawFn) -> Any:
    message: dict[str, Any] = {}
    if draw(st.booleans()):
        message["jsonrpc"] = draw(st.sampled_from(["2.0", "1.0", 2, None]))
    if draw(st.booleans()):
        message["id"] = draw(st.one_of(st.integers(), st.text(max_size=10), st.none(), st.floats(allow_nan=False)))
    if draw(st.integers(0, 9)) > 0:
        message["method"] = draw(st.sampled_from(MCP_METHODS) | st.text(max_size=30))
    if draw(st.booleans()):
        message["params"] = draw(json_values)
    if draw(st.integers(0, 5)) == 0:
        message["result"] = draw(json_values)
    if draw(st.integers(0, 5)) == 0:
        message["error"] = draw(json_values)
    return message


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["message", "truncated", "json", "bytes", "batch", "deep", "empty"]))
    if kind == "message":
        return json.dumps(draw(jsonrpc_messages())).encode()
    if kind == "truncated":
        text = json.dumps(draw(st.one_of(jsonrpc_messages(), st.just(initialize_body())))).encode()
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "batch":
        return json.dumps(draw(st.lists(jsonrpc_messages(), max_size=4))).encode()
    if kind == "deep":
        depth = draw(st.integers(100, 5000))
        return b"[" * depth + b"]" * draw(st.integers(0, depth))
    if kind == "empty":
        return b""
    return draw(st.binary(max_size=400))


@st.composite
def query_strings(draw: st.DrawFn, live: LiveServer) -> str:
    kind = draw(st.sampled_from(["none", "workspace", "api_workspace", "random", "encoded", "resource"]))
    if kind == "none":
        return ""
    if kind == "workspace":
        return f"?workspaceId={WORKSPACE}"
    if kind == "api_workspace":
        return f"?workspaceId={live.extras['api_workspace']}"
    if kind == "resource":
        hint = draw(st.sampled_from([
            f"http://127.0.0.1:{live.port}/v1/mcp/anonymous", f"http://127.0.0.1:{live.port}/mcp?x=1",
            "http://127.0.0.1:9/v1/mcp", "not a url", "http://[::1", "%zz",
        ]))
        return "?resource=" + urllib.parse.quote(hint, safe="") + draw(st.sampled_from(["", "&resource=x"]))
    pairs = draw(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=60)), max_size=4))
    if kind == "encoded":
        return "?" + urllib.parse.urlencode(pairs)
    raw = draw(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80))
    return "?" + raw.replace("#", "%23")


@st.composite
def header_sets(draw: st.DrawFn, live: LiveServer) -> dict[str, str]:
    headers: dict[str, str] = {}
    credential = draw(st.sampled_from(["none", "api_key", "bearer_api_key", "oauth", "anonymous", "garbage"]))
    if credential == "api_key":
        headers["X-API-Key"] = live.extras["api_key"]
    elif credential == "bearer_api_key":
        headers["Authorization"] = f"Bearer {live.extras['api_key']}"
    elif credential == "oauth":
        headers["Authorization"] = f"Bearer {live.extras['token']}"
    elif credential == "anonymous":
        headers["Authorization"] = f"Bearer {live.extras['anonymous_token']}"
    elif credential == "garbage":
        headers[draw(st.sampled_from(["Authorization", "X-API-Key"]))] = draw(header_text)

    optional = {
        "Accept": st.sampled_from(["application/json, text/event-stream", "text/event-stream", "application/json", "*/*"])
        | header_text,
        "Content-Type": st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"])
        | header_text,
        "Mcp-Session-Id": st.just(live.extras["session_id"]) | header_text,
        "MCP-Protocol-Version": st.sampled_from(["2025-11-25", "2025-03-26", "2026-07-28", "1999-01-01"]) | header_text,
        "Last-Event-ID": header_text,
        "Origin": st.sampled_from([f"http://127.0.0.1:{live.port}", "http://127.0.0.1:9"]) | header_text,
        "Host": st.sampled_from([f"127.0.0.1:{live.port}", "localhost", "127.0.0.2:1"]) | header_text,
        "Stripe-Signature": header_text,
        "WorkOS-Signature": header_text,
        "User-Agent": header_text,
        "X-Forwarded-For": header_text,
        "Mcp-Method": header_text,
        "Mcp-Name": header_text,
    }
    for name, strategy in optional.items():
        if draw(st.integers(0, 3)) == 0:
            headers[name] = draw(strategy)
    return {name: value.strip() for name, value in headers.items()}


# -- checks --------------------------------------------------------------------------------


def assert_clear_error(response: RawResponse, case: str) -> None:
    """A 4xx must carry a JSON body with an error; a 5xx fails the test."""
    assert response.status < 500, f"{case}: {response.status} {response.body[:300]!r}"
    if response.status < 400:
        return
    if response.headers.get("Server") != "executor-tornado":
        # NOTE: Tornado's HTTP/1.1 parser rejects malformed framing (for
        # example an invalid Host header) with an empty 400 before any
        # handler runs, so those responses carry no JSON body.
        assert response.status == 400, f"{case}: {response.status} from the HTTP layer"
        assert response.body == b"", case
        return
    content_type = response.headers.get("Content-Type", "")
    assert content_type.startswith("application/json"), f"{case}: {response.status} with {content_type!r}"
    body = json.loads(response.body)
    assert isinstance(body, dict) and "error" in body, f"{case}: {response.body[:300]!r}"
    error = body["error"]
    if isinstance(error, dict):
        assert isinstance(error.get("message"), str) and error["message"], case
    else:
        assert isinstance(error, str) and error, case


def open_sessions(live: LiveServer) -> int:
    return live.call(live.service.store.count_open_mcp_sessions())  # type: ignore[union-attr]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not SOAK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzz_every_route(live: LiveServer, data: st.DataObject) -> None:
    method, path = data.draw(st.sampled_from(ROUTES), label="route")
    query = data.draw(query_strings(live), label="query")
    headers = data.draw(header_sets(live), label="headers")
    body = data.draw(bodies(), label="body") if method in ("POST", "PUT", "PATCH") else None
    case = f"{method} {path}{query}"

    before = open_sessions(live)
    response = live.request(method, path + query, body=body, headers=headers, timeout=15)
    assert_clear_error(response, case)
    if response.status >= 400:
        assert open_sessions(live) == before, f"{case}: a rejected request opened a session"


@pytest.mark.parametrize("route", ["/v1/mcp/anonymous", "/auth/anonymous/session", "/stripe/webhook", "/workos/webhook"])
def test_truncated_upload_is_4xx_or_closed(live: LiveServer, route: str) -> None:
    """A body shorter than its Content-Length ends in the body timeout or a closed socket, never a 5xx."""
    import socket

    request = (
        f"POST {route}?workspaceId={live.extras['api_workspace']} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{live.port}\r\nX-API-Key: {live.extras['api_key']}\r\n"
        "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        "Content-Length: 500\r\n\r\n"
    ).encode() + json.dumps(initialize_body()).encode()[:50]
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except TimeoutError:
            pass
    if received:
        status = int(received.split(b" ", 2)[1])
        assert 400 <= status < 500, received[:200]
    assert live.request("GET", "/healthz").status == 200
