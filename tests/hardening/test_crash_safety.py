"""Crash safety: kill -9 the service while it writes, restart it, and find every acknowledged write.

The service runs as a subprocess (``python -m executor_tornado.cli serve``)
on a loopback port and an SQLite store in a temporary data directory. Three
clients write at once: anonymous tokens (accounts and rate buckets),
session bootstraps (API keys) and ``execute`` calls over MCP (tasks and
key-value entries). Each response the service acknowledged is recorded.
The test sends SIGKILL mid-load, restarts the service on the same data
directory, and checks that the store passes ``PRAGMA integrity_check`` and
contains every acknowledged write. Set EXECUTOR_SOAK=1 for more rounds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

from conftest import MCP_HEADERS, initialize_body
from store.sqlite import SQLiteStore

SOAK = os.environ.get("EXECUTOR_SOAK") == "1"
ROUNDS = 8 if SOAK else 2
LOAD_SECONDS = 6.0 if SOAK else 2.5
TOKEN_RATE_PER_MINUTE = 60
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Acknowledged:
    accounts: list[str] = field(default_factory=list)
    api_key_jtis: list[str] = field(default_factory=list)
    tasks: dict[str, int] = field(default_factory=dict)
    kv: dict[tuple[str, str], int] = field(default_factory=dict)
    admitted_tokens: int = 0
    first_token_at: float | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("EXECUTOR_", "MCP_", "ANONYMOUS_AUTH_", "WORKOS_", "STRIPE_"))
    }
    env.update({
        "EXECUTOR_DATA_DIR": str(data_dir),
        "EXECUTOR_HOST": "127.0.0.1",
        "EXECUTOR_PORT": str(port),
        "EXECUTOR_TOKEN_RATE_PER_MINUTE": str(TOKEN_RATE_PER_MINUTE),
        "EXECUTOR_MCP_RATE_PER_MINUTE": "100000",
        "EXECUTOR_BOOTSTRAP_GLOBAL_PER_MINUTE": "100000",
        "EXECUTOR_BOOTSTRAP_RATE_PER_MINUTE": "100000",
        "EXECUTOR_LOG_FORMAT": "text",
        "PYTHONPATH": str(REPO_ROOT),
    })
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "executor_tornado.cli", "serve"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )


async def wait_ready(base: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    async with httpx2.AsyncClient(timeout=2) as client:
        for _ in range(300):
            assert process.poll() is None, f"the service exited: {log_path.read_text()[-2000:]}"
            try:
                if (await client.get(f"{base}/readyz")).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"the service did not become ready: {log_path.read_text()[-2000:]}")


def jti_of(api_key: str) -> str:
    payload = api_key.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]


async def token_worker(client: httpx2.AsyncClient, base: str, acked: Acknowledged, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if acked.first_token_at is None:
            acked.first_token_at = time.time()
        try:
            response = await client.post(f"{base}/auth/anonymous/token", headers={"User-Agent": "crash-tokens"})
        except httpx2.TransportError:
            return
        if response.status_code == 200:
            acked.accounts.append(response.json()["accountId"])
            acked.admitted_tokens += 1
        else:
            assert response.status_code == 429, response.text
            await asyncio.sleep(0.05)


async def bootstrap_worker(client: httpx2.AsyncClient, base: str, acked: Acknowledged, stop: asyncio.Event) -> None:
    token = (await client.post(f"{base}/auth/anonymous/token", headers={"User-Agent": "crash-bootstrap"})).json()
    acked.accounts.append(token["accountId"])
    while not stop.is_set():
        try:
            response = await client.post(
                f"{base}/auth/anonymous/session", json={},
                headers={"Authorization": f"Bearer {token['accessToken']}", "User-Agent": "crash-bootstrap"},
            )
        except httpx2.TransportError:
            return
        assert response.status_code == 200, response.text
        acked.api_key_jtis.append(jti_of(response.json()["apiKey"]))


async def execute_worker(
    client: httpx2.AsyncClient, base: str, acked: Acknowledged, stop: asyncio.Event, worker: int
) -> None:
    token = (await client.post(f"{base}/auth/anonymous/token", headers={"User-Agent": f"crash-exec-{worker}"})).json()
    bootstrap = (await client.post(
        f"{base}/auth/anonymous/session", json={},
        headers={"Authorization": f"Bearer {token['accessToken']}", "User-Agent": f"crash-exec-{worker}"},
    )).json()
    headers = {**MCP_HEADERS, "X-API-Key": bootstrap["apiKey"], "User-Agent": f"crash-exec-{worker}"}
    opened = await client.post(bootstrap["mcpUrl"], json=initialize_body(), headers=headers)
    headers["Mcp-Session-Id"] = opened.headers["Mcp-Session-Id"]
    await client.post(bootstrap["mcpUrl"], json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    workspace = bootstrap["workspaceId"]
    number = 0
    while not stop.is_set():
        number += 1
        key = f"w{worker}-{number}"
        code = f"tools.kv.set(key={key!r}, value={number})\n{number}"
        call = {"jsonrpc": "2.0", "id": number, "method": "tools/call",
                "params": {"name": "execute", "arguments": {"code": code}}}
        try:
            response = await client.post(bootstrap["mcpUrl"], json=call, headers=headers)
        except httpx2.TransportError:
            return
        assert response.status_code == 200, response.text
        message = json.loads(response.text) if response.headers["Content-Type"].startswith("application/json") else \
            json.loads([line for line in response.text.splitlines() if line.startswith("data: {")][-1][6:])
        result = message["result"]["structuredContent"]
        assert result["status"] == "completed", result
        acked.tasks[result["taskId"]] = number
        acked.kv[(workspace, key)] = number


async def one_round(data_dir: Path, port: int, log_path: Path, acked: Acknowledged) -> None:
    base = f"http://127.0.0.1:{port}"
    process = start_service(data_dir, port, log_path)
    try:
        await wait_ready(base, process, log_path)
        stop = asyncio.Event()
        async with httpx2.AsyncClient(timeout=30) as client:
            workers = [
                asyncio.ensure_future(token_worker(client, base, acked, stop)),
                asyncio.ensure_future(bootstrap_worker(client, base, acked, stop)),
                *(asyncio.ensure_future(execute_worker(client, base, acked, stop, n)) for n in range(2)),
            ]
            await asyncio.sleep(LOAD_SECONDS)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


async def test_kill_during_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    log_path = tmp_path / "service.log"
    acked = Acknowledged()
    for _ in range(ROUNDS):
        await one_round(data_dir, free_port(), log_path, acked)

    assert acked.accounts, "tokens were issued before the kill"
    assert acked.api_key_jtis, "API keys were issued before the kill"
    assert acked.tasks, "tasks ran before the kill"

    port = free_port()
    process = start_service(data_dir, port, log_path)
    try:
        await wait_ready(f"http://127.0.0.1:{port}", process, log_path)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()[-2000:]

    database = data_dir / "executor.db"
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        bucket = connection.execute(
            "SELECT tokens, updated_at FROM rate_buckets WHERE key LIKE '%/auth/anonymous/token%crash-tokens%'"
        ).fetchone()
    assert bucket is not None, "the token bucket of the load survived"

    store = SQLiteStore(str(database))
    await store.open()
    try:
        for account_id in acked.accounts:
            assert await store.get_account(account_id) is not None, account_id
        for jti in acked.api_key_jtis:
            assert await store.get_api_key(jti) is not None, jti
        for task_id, number in acked.tasks.items():
            task = await store.get_task(task_id)
            assert task is not None, task_id
            assert task.status == "completed", (task_id, task.status)
            assert task.result == number, task_id
        for (workspace, key), number in acked.kv.items():
            assert await store.kv_get(workspace, key) == number, key
    finally:
        await store.close()

    # Each acknowledged token took one token from the bucket. Since the first
    # request at most one a second (60 a minute) came back, plus one for rounding.
    tokens, updated_at = bucket
    assert acked.first_token_at is not None
    refilled = (updated_at - acked.first_token_at) * TOKEN_RATE_PER_MINUTE / 60.0
    assert tokens + acked.admitted_tokens <= TOKEN_RATE_PER_MINUTE + refilled + 1, (tokens, acked.admitted_tokens)
