"""Shared test helpers: a real service on a loopback port and real HTTP.

pytest-tornasync runs ``async def`` tests on a fresh IOLoop per test; it has
no async fixtures, so tests start services with ``async with running(...)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse

from executor_tornado.app import Service
from executor_tornado.clock import Clock
from executor_tornado.settings import Settings

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# Settings read the environment; keep the developer's own variables out of tests.
for _name in list(os.environ):
    if _name.startswith(("EXECUTOR_", "MCP_", "ANONYMOUS_AUTH_", "WORKOS_", "STRIPE_")) and _name not in ("EXECUTOR_TEST_MONGODB_URI", "EXECUTOR_SOAK"):
        del os.environ[_name]


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a loopback test service: port 0, a private data directory, no .env file."""
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "data_dir": data_dir}
    values.update(overrides)
    return Settings(_env_file=None, **values)


@contextlib.asynccontextmanager
async def running(
    data_dir: Path, *, clock: Clock | None = None, **overrides: Any
) -> AsyncIterator[Service]:
    """Start a real service on 127.0.0.1 with an ephemeral port; stop it afterwards."""
    service = Service(make_settings(data_dir, **overrides), clock=clock)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def fetch(
    service_or_url: Service | str,
    path: str = "",
    *,
    method: str = "GET",
    body: bytes | str | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 20.0,
) -> HTTPResponse:
    """Send one real HTTP request; never raises for an HTTP error status."""
    base = service_or_url.base_url if isinstance(service_or_url, Service) else service_or_url
    if isinstance(body, dict):
        body = json.dumps(body)
    if body is None and method in ("POST", "PUT", "PATCH"):
        body = b""
    request = HTTPRequest(
        base + path,
        method=method,
        body=body,
        headers=headers or {},
        request_timeout=timeout,
        allow_nonstandard_methods=True,
    )
    return await AsyncHTTPClient().fetch(request, raise_error=False)


def json_body(response: HTTPResponse) -> Any:
    return json.loads(response.body)


async def anonymous_key(service: Service, user_agent: str = "pytest") -> dict[str, str]:
    """Run the anonymous flow (token, then session bootstrap) and return the bootstrap body."""
    token_response = await fetch(service, "/auth/anonymous/token", method="POST", headers={"User-Agent": user_agent})
    assert token_response.code == 200, token_response.body
    token = json_body(token_response)["accessToken"]
    session_response = await fetch(
        service,
        "/auth/anonymous/session",
        method="POST",
        body={},
        headers={"Authorization": f"Bearer {token}", "User-Agent": user_agent},
    )
    assert session_response.code == 200, session_response.body
    return {**json_body(session_response), "accessToken": token}


MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def initialize_body(version: str = "2025-11-25", request_id: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "pytest", "version": "1"},
        },
    }


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path
