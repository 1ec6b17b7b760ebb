"""Two service processes on one SQLite file, alone and behind nginx.

Each test starts two ``executor-tornado serve`` child processes that share
a data directory, as ``executor-tornado@8081`` and ``@8082`` do under
systemd. The nginx test renders ``deploy/nginx/executor-tornado.conf`` with
the processes' ports and runs Debian's nginx in front of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest

from conftest import anonymous_key
from service_process import SHARED_ISSUER, ServiceProcess, mcp_headers, open_session, serve_process
from sse_client import SseReader

REPOSITORY = Path(__file__).resolve().parent.parent
NGINX_SAMPLE = REPOSITORY / "deploy" / "nginx" / "executor-tornado.conf"


@contextlib.asynccontextmanager
async def two_processes(tmp_path: Path, **variables: str) -> AsyncIterator[tuple[ServiceProcess, ServiceProcess]]:
    data_dir = tmp_path / "data"
    settings = {"ANONYMOUS_AUTH_ISSUER": SHARED_ISSUER, **variables}
    async with serve_process(data_dir, tmp_path / "first.log", **settings) as first:
        async with serve_process(data_dir, tmp_path / "second.log", **settings) as second:
            yield first, second


async def test_rate_bucket_shared_between_processes(tmp_path: Path) -> None:
    async with two_processes(tmp_path, EXECUTOR_TOKEN_RATE_PER_MINUTE="3") as (first, second):
        async with httpx2.AsyncClient(timeout=30) as client:
            headers = {"User-Agent": "rate-bucket-test"}
            for attempt in range(3):
                response = await client.post(first.base_url + "/auth/anonymous/token", headers=headers)
                assert response.status_code == 200, f"token {attempt + 1} of 3: {response.text}"

            rejected = await client.post(second.base_url + "/auth/anonymous/token", headers=headers)
            assert rejected.status_code == 429, "the bucket filled through the first process is full in the second"
            assert rejected.json() == {"error": "Rate limit exceeded"}
            assert int(rejected.headers["Retry-After"]) >= 1

            other_agent = await client.post(
                second.base_url + "/auth/anonymous/token", headers={"User-Agent": "another-client"}
            )
            assert other_agent.status_code == 200, "another client's bucket is untouched"


async def test_session_deleted_elsewhere_is_404(tmp_path: Path) -> None:
    async with two_processes(tmp_path) as (first, second):
        bootstrap = await anonymous_key(first.base_url)
        key = bootstrap["apiKey"]
        path = bootstrap["mcpUrl"].removeprefix(first.base_url)
        async with httpx2.AsyncClient(timeout=30) as client:
            session_id = await open_session(client, first.base_url + path, key)
            ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}

            restored = await client.post(second.base_url + path, content=json.dumps(ping), headers=mcp_headers(key, session_id))
            assert restored.status_code == 200, "the second process restores the session from the store"

            deleted = await client.delete(first.base_url + path, headers=mcp_headers(key, session_id))
            assert deleted.status_code == 204, deleted.text

            after_delete = await client.post(second.base_url + path, content=json.dumps(ping), headers=mcp_headers(key, session_id))
            assert after_delete.status_code == 404
            assert after_delete.json()["error"]["message"].startswith("Session not found"), after_delete.text

            stream_headers = {**mcp_headers(key, session_id), "Accept": "text/event-stream"}
            stream_after_delete = await client.get(second.base_url + path, headers=stream_headers)
            assert stream_after_delete.status_code == 404


async def test_api_key_revoked_in_store_rejected_by_both(tmp_path: Path) -> None:
    async with two_processes(tmp_path) as (first, second):
        bootstrap = await anonymous_key(first.base_url)
        key = bootstrap["apiKey"]
        path = bootstrap["mcpUrl"].removeprefix(first.base_url)
        async with httpx2.AsyncClient(timeout=30) as client:
            await open_session(client, second.base_url + path, key)
            listed = subprocess.run(
                [*cli_command(), "keys", "list", "--account", bootstrap["accountId"]],
                env=second.env, capture_output=True, text=True, timeout=60, check=False,
            )
            assert listed.returncode == 0, listed.stderr
            (record,) = json.loads(listed.stdout)
            revoked = subprocess.run(
                [*cli_command(), "keys", "revoke", record["jti"]],
                env=second.env, capture_output=True, text=True, timeout=60, check=False,
            )
            assert revoked.returncode == 0, revoked.stderr

            for server in (first, second):
                response = await client.post(
                    server.base_url + path,
                    content=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
                    headers=mcp_headers(key),
                )
                assert response.status_code == 401, f"{server.base_url}: {response.text}"


def cli_command() -> list[str]:
    return [sys.executable, "-m", "executor_tornado.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def nginx_in_front(tmp_path: Path, upstream_ports: list[int], port: int) -> AsyncIterator[str]:
    """Run nginx with the sample configuration, its upstreams on ``upstream_ports``; yield its base URL."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.fail("nginx is not installed: run `apt-get update && apt-get install -y nginx`")

    prefix = tmp_path / "nginx"
    prefix.mkdir()
    sample = NGINX_SAMPLE.read_text()
    assert "server 127.0.0.1:8081" in sample
    assert "server 127.0.0.1:8082" in sample
    assert "listen 80;" in sample
    site = sample.replace("127.0.0.1:8081", f"127.0.0.1:{upstream_ports[0]}")
    site = site.replace("127.0.0.1:8082", f"127.0.0.1:{upstream_ports[1]}")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    (prefix / "executor-tornado.conf").write_text(site)
    (prefix / "nginx.conf").write_text(
        f"""daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/executor-tornado.conf;
}}
"""
    )
    checked = subprocess.run(
        [nginx, "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert checked.returncode == 0, checked.stderr

    process = subprocess.Popen(
        [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
        stdout=subprocess.DEVNULL, stderr=(prefix / "stderr.log").open("wb"),
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30.0
        while True:
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    break
            assert process.poll() is None, (prefix / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not start listening within 30 s"
            await asyncio.sleep(0.05)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def served_by(servers: list[ServiceProcess], request_id: str) -> list[int]:
    """Return the indexes of the processes whose access log has ``request_id``.

    A process writes its access line after it sent the response, so the
    line may lag the response by a moment.
    """
    deadline = time.monotonic() + 10.0
    while True:
        found = [
            index
            for index, server in enumerate(servers)
            if any(
                entry.get("request_id") == request_id and entry.get("logger") == "executor_tornado.access"
                for entry in server.log_entries()
            )
        ]
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def test_nginx_routes_session_to_one_process(tmp_path: Path) -> None:
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    async with two_processes(
        tmp_path, EXECUTOR_PUBLIC_URL=public_url, EXECUTOR_TRUSTED_PROXIES="127.0.0.1/32"
    ) as (first, second):
        servers = [first, second]
        async with nginx_in_front(tmp_path, [first.port, second.port], port) as proxy_url:
            bootstrap = await anonymous_key(proxy_url)
            key = bootstrap["apiKey"]
            url = bootstrap["mcpUrl"]
            assert url.startswith(proxy_url)
            async with httpx2.AsyncClient(timeout=30) as client:
                ready = await client.get(proxy_url + "/readyz")
                assert ready.status_code == 200, "loopback clients may read health through the proxy"

            async with httpx2.AsyncClient(timeout=30) as client:
                sessions = [await open_session(client, url, key) for _ in range(4)]
                homes: dict[str, int] = {}
                for session_id in sessions:
                    seen = set()
                    for request_number in range(6):
                        request_id = f"route-{session_id[:12]}-{request_number}"
                        ping = {"jsonrpc": "2.0", "id": request_number + 10, "method": "ping"}
                        response = await client.post(
                            url, content=json.dumps(ping), headers=mcp_headers(key, session_id, **{"X-Request-Id": request_id})
                        )
                        assert response.status_code == 200, response.text
                        assert response.headers["X-Request-Id"] == request_id
                        (index,) = await served_by(servers, request_id)
                        seen.add(index)
                    assert len(seen) == 1, f"session {session_id[:12]} reached processes {seen}"
                    homes[session_id] = seen.pop()

                # The GET stream of a session opens on the process that serves its POSTs.
                session_id = sessions[0]
                stream_headers = {**mcp_headers(key, session_id), "Accept": "text/event-stream"}
                async with client.stream("GET", url, headers=stream_headers) as stream:
                    assert stream.status_code == 200
                    reader = SseReader(stream)
                    await reader.next_event()
                    home = servers[homes[session_id]]
                    other = servers[1 - homes[session_id]]
                    counts = (await open_streams(client, home), await open_streams(client, other))
                    assert counts == (1, 0), f"open streams (home, other): {counts}"

                    # Restart without dropping the client: stop the home
                    # process; its stream ends with a retry hint and nginx
                    # moves the session to the other process.
                    home.terminate()
                    tail = []
                    while (event := await reader.next_event(timeout=30.0)) is not None:
                        tail.append(event)
                    assert tail and tail[-1].retry is not None, tail
                assert await home.wait(30.0) == 0

                request_id = f"moved-{secrets.token_hex(4)}"
                ping = {"jsonrpc": "2.0", "id": 99, "method": "ping"}
                moved = await client.post(
                    url, content=json.dumps(ping), headers=mcp_headers(key, session_id, **{"X-Request-Id": request_id})
                )
                assert moved.status_code == 200, moved.text
                assert await served_by(servers, request_id) == [servers.index(other)]


async def open_streams(client: httpx2.AsyncClient, server: ServiceProcess) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    response = await client.get(server.base_url + "/metrics")
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        if family.name == "executor_sse_open_streams":
            return family.samples[0].value
    raise AssertionError("executor_sse_open_streams missing from /metrics")
