"""Run ``executor-tornado serve`` as a real child process on a loopback port.

Operations tests need what the in-process fixture cannot give: signals,
exit codes, ``NOTIFY_SOCKET`` and several processes sharing one store.

Example::

    async with serve_process(data_dir) as server:
        response = await fetch(server.base_url, "/healthz")
    assert server.returncode == 0
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent
REPOSITORY = TESTS_DIR.parent
START_TIMEOUT_SECONDS = 60.0


class ServiceProcess:
    """One ``serve`` child process; its JSON log lines go to ``log_path``."""

    def __init__(self, data_dir: Path, env: dict[str, str], log_path: Path) -> None:
        self.data_dir = data_dir
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.port = 0

    async def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "executor_tornado.cli", "serve"],
                cwd=REPOSITORY,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            for entry in self.log_entries():
                message = entry.get("message", "")
                if message.startswith("executor-tornado listening on "):
                    self.base_url = message.split()[3]
                    self.port = int(self.base_url.rsplit(":", 1)[1])
                    return
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log_text()}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"serve did not log its address within {START_TIMEOUT_SECONDS} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_entries(self) -> list[dict]:
        """Every JSON log line so far; other lines (a traceback) are skipped."""
        entries = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> int:
        """Wait for the exit and return the exit code; raise ``AssertionError`` after ``timeout`` seconds."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"serve still running {timeout} s later:\n{self.log_text()}")
            await asyncio.sleep(0.05)
        return self.process.returncode

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def service_env(data_dir: Path, **variables: str) -> dict[str, str]:
    """The environment of a child service: the test's own, minus service settings, plus ``variables``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("EXECUTOR_", "MCP_", "ANONYMOUS_AUTH_", "WORKOS_", "STRIPE_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }
    env.update(
        {
            "EXECUTOR_HOST": "127.0.0.1",
            "EXECUTOR_PORT": "0",
            "EXECUTOR_DATA_DIR": str(data_dir),
            "EXECUTOR_LOG_FORMAT": "json",
            "EXECUTOR_SANDBOX_WORKERS": "1",
            "EXECUTOR_MCP_PLUGINS": "transport_plugin:register",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), str(REPOSITORY), env.get("PYTHONPATH", "")])),
        }
    )
    env.update(variables)
    return env


@contextlib.asynccontextmanager
async def serve_process(
    data_dir: Path, log_path: Path | None = None, **variables: str
) -> AsyncIterator[ServiceProcess]:
    """Start a child service, yield it, then stop it with SIGTERM (SIGKILL if it hangs)."""
    server = ServiceProcess(data_dir, service_env(data_dir, **variables), log_path or data_dir.parent / "serve.log")
    try:
        await server.start()
        yield server
    finally:
        if server.returncode is None and server.process is not None:
            server.terminate()
            try:
                await server.wait(30.0)
            except AssertionError:
                server.kill()


ACCEPT_BOTH = "application/json, text/event-stream"

SHARED_ISSUER = "http://executor.test"
"""The API key issuer for processes sharing a store.

Keys carry the issuer, which defaults to the base URL and so to each
process's own port; processes sharing a store need one value.
"""


def mcp_headers(key: str, session_id: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"X-API-Key": key, "Accept": ACCEPT_BOTH, "Content-Type": "application/json"}
    if session_id:
        headers["Mcp-Session-Id"] = session_id
    headers.update(extra)
    return headers


async def open_session(client: Any, url: str, key: str) -> str:
    """Initialize an MCP session over ``client`` (an ``httpx2.AsyncClient``) and return its id."""
    from conftest import initialize_body

    response = await client.post(url, content=json.dumps(initialize_body()), headers=mcp_headers(key))
    assert response.status_code == 200, response.text
    session_id = response.headers["Mcp-Session-Id"]
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    acknowledged = await client.post(url, content=json.dumps(initialized), headers=mcp_headers(key, session_id))
    assert acknowledged.status_code == 202, acknowledged.text
    return session_id


async def call_tool(
    client: Any, url: str, key: str, session_id: str, name: str, arguments: dict[str, Any], request_id: int = 5
) -> dict[str, Any]:
    """Call an MCP tool and return the JSON-RPC response, whether it came as JSON or on an SSE stream."""
    from sse_client import SseReader

    body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": name, "arguments": arguments}}
    async with client.stream("POST", url, content=json.dumps(body), headers=mcp_headers(key, session_id)) as response:
        assert response.status_code == 200, await response.aread()
        if response.headers["Content-Type"].startswith("application/json"):
            return json.loads(await response.aread())
        events = await SseReader(response).events_until_response(request_id, timeout=60.0)
        return events[-1].message
