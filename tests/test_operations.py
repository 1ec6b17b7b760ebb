"""The service under a service manager: sd_notify, watchdog and SIGTERM drain.

Each test runs ``executor-tornado serve`` as a child process on a loopback
port, as systemd would, and talks to it over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from pathlib import Path

import httpx2
import pytest

from conftest import anonymous_key
from service_process import SHARED_ISSUER, call_tool, mcp_headers, open_session, serve_process
from sse_client import SseReader

class NotifySocket:
    """A Unix datagram socket in the abstract namespace, standing in for systemd's notification socket."""

    def __init__(self) -> None:
        self.address = f"@executor-tornado-test-{secrets.token_hex(8)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def receive_until(self, assignment: str, timeout: float = 30.0, *, count: int = 1) -> list[str]:
        """Collect datagrams until ``count`` of them contain ``assignment``; return all received so far."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while self.count(assignment) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {assignment} within {timeout} s; received {self.messages}"
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), remaining)
            except asyncio.TimeoutError:
                continue
            self.messages.append(data.decode())
        return self.messages

    def read_pending(self) -> list[str]:
        """Collect the datagrams already queued on the socket, without waiting."""
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def count(self, assignment: str) -> int:
        return sum(1 for message in self.messages if assignment in message.splitlines())

    def close(self) -> None:
        self.sock.close()


async def test_notify_socket_receives_ready_watchdog_stopping(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    notify = NotifySocket()
    try:
        async with serve_process(data_dir, NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="400000") as server:
            await notify.receive_until("READY=1")
            ready = next(message for message in notify.messages if "READY=1" in message.splitlines())
            assert f"STATUS=Serving on {server.base_url}" in ready.splitlines()
            assert f"MAINPID={server.process.pid}" in ready.splitlines()

            health = await httpx2.AsyncClient().get(server.base_url + "/readyz")
            assert health.status_code == 200, "READY=1 comes only after the store answers"

            # Pings come every 0.2 s (half of WATCHDOG_USEC); the bound is generous.
            await notify.receive_until("WATCHDOG=1", timeout=20.0, count=3)
            ready_index = next(i for i, m in enumerate(notify.messages) if "READY=1" in m.splitlines())
            first_ping = next(i for i, m in enumerate(notify.messages) if "WATCHDOG=1" in m.splitlines())
            assert first_ping > ready_index, "no watchdog ping before READY=1"

            server.terminate()
            await notify.receive_until("STOPPING=1")
            assert await server.wait(30.0) == 0
    finally:
        notify.close()


async def test_notify_without_socket_does_nothing() -> None:
    from executor_tornado.notify import Notifier

    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False


async def test_notify_watchdog_ignored_for_other_pid() -> None:
    from executor_tornado.notify import Notifier

    other = Notifier.from_environment({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval_seconds is None
    own = Notifier.from_environment({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())})
    assert own.watchdog_interval_seconds == 0.5


async def test_sigterm_drains_call_and_ends_stream(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    grace = 20.0
    notify = NotifySocket()
    try:
        async with serve_process(
            data_dir,
            NOTIFY_SOCKET=notify.address,
            EXECUTOR_SHUTDOWN_GRACE_SECONDS=str(grace),
            EXECUTOR_SSE_RETRY_MS="1500",
            ANONYMOUS_AUTH_ISSUER=SHARED_ISSUER,
        ) as server:
            await notify.receive_until("READY=1")
            bootstrap = await anonymous_key(server.base_url)
            url, key = bootstrap["mcpUrl"], bootstrap["apiKey"]

            async with httpx2.AsyncClient(timeout=60) as client:
                session_id = await open_session(client, url, key)
                stored = await call_tool(
                    client, url, key, session_id, "execute", {"code": "tools.kv.set(key='before-stop', value=7)\n'stored'"}
                )
                assert stored["result"]["structuredContent"]["status"] == "completed", stored
                get_headers = {**mcp_headers(key, session_id), "Accept": "text/event-stream"}
                async with client.stream("GET", url, headers=get_headers) as get_response:
                    assert get_response.status_code == 200
                    get_reader = SseReader(get_response)
                    await get_reader.next_event()  # the priming event

                    call = {
                        "jsonrpc": "2.0",
                        "id": 7,
                        "method": "tools/call",
                        "params": {
                            "name": "progress",
                            "arguments": {"steps": 4, "pause": 0.5},
                            "_meta": {"progressToken": "drain"},
                        },
                    }
                    async with client.stream(
                        "POST", url, content=json.dumps(call), headers=mcp_headers(key, session_id)
                    ) as post_response:
                        assert post_response.headers["Content-Type"].startswith("text/event-stream")
                        post_reader = SseReader(post_response)
                        post_events = []
                        while True:
                            event = await post_reader.next_event()
                            assert event is not None
                            post_events.append(event)
                            if event.message and event.message.get("method") == "notifications/progress":
                                break

                        # The call is in flight: stop the service now.
                        signalled_at = time.monotonic()
                        server.terminate()

                        get_tail = []
                        while (event := await get_reader.next_event(timeout=30.0)) is not None:
                            get_tail.append(event)
                        assert get_tail, "the GET stream ended without a frame"
                        assert get_tail[-1].retry == 1500, f"no retry hint at the end: {get_tail}"

                        post_events += await post_reader.events_until_response(7, timeout=30.0)
                        response = post_events[-1].message
                        assert response["result"]["content"][0]["text"] == "done 4"
                        progress = [e for e in post_events if e.message and e.message.get("method") == "notifications/progress"]
                        assert [e.message["params"]["progress"] for e in progress] == [1, 2, 3, 4]

                exit_code = await server.wait(grace + 10.0)
                elapsed = time.monotonic() - signalled_at
                assert exit_code == 0, server.log_text()
                assert elapsed < grace, f"exit took {elapsed:.1f} s, longer than the grace period"
                await notify.receive_until("STOPPING=1")
                messages = [entry["message"] for entry in server.log_entries()]
                assert "Stopped" in messages
                assert not any("grace period" in message and "ended" in message for message in messages)

        # Nothing acknowledged is lost: a new process on the same store keeps
        # the session and replays the finished call's events from the log.
        first_event_id = post_events[0].id
        async with serve_process(
            data_dir, log_path=tmp_path / "second.log", ANONYMOUS_AUTH_ISSUER=SHARED_ISSUER
        ) as second:
            second_url = url.replace(server.base_url, second.base_url)
            async with httpx2.AsyncClient(timeout=60) as client:
                replay_headers = {
                    **mcp_headers(key, session_id),
                    "Accept": "text/event-stream",
                    "Last-Event-ID": first_event_id,
                }
                async with client.stream("GET", second_url, headers=replay_headers) as replay:
                    assert replay.status_code == 200
                    replayed = await SseReader(replay).events_until_response(7, timeout=30.0)
                    assert replayed[-1].message["result"]["content"][0]["text"] == "done 4"

                ping = {"jsonrpc": "2.0", "id": 8, "method": "ping"}
                response = await client.post(second_url, content=json.dumps(ping), headers=mcp_headers(key, session_id))
                assert response.status_code == 200, response.text

                read_back = await call_tool(
                    client, second_url, key, session_id, "execute", {"code": "tools.kv.get(key='before-stop')"}, 9
                )
                assert read_back["result"]["structuredContent"]["result"] == 7, read_back
    finally:
        notify.close()


async def test_sigterm_ends_calls_past_grace_period(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    grace = 1.0
    async with serve_process(data_dir, EXECUTOR_SHUTDOWN_GRACE_SECONDS=str(grace)) as server:
        bootstrap = await anonymous_key(server.base_url)
        url, key = bootstrap["mcpUrl"], bootstrap["apiKey"]
        async with httpx2.AsyncClient(timeout=60) as client:
            session_id = await open_session(client, url, key)
            call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "sleep", "arguments": {"seconds": 60}}}
            async with client.stream("POST", url, content=json.dumps(call), headers=mcp_headers(key, session_id)) as response:
                assert response.headers["Content-Type"].startswith("text/event-stream")
                reader = SseReader(response)
                await reader.next_event()  # the priming event: the call is in flight

                signalled_at = time.monotonic()
                server.terminate()
                tail = []
                while (event := await reader.next_event(timeout=60.0)) is not None:
                    tail.append(event)

            assert tail, "the POST stream ended without a frame"
            assert tail[-1].retry is not None, f"no retry hint at the end: {tail}"
            assert not any(event.message and "result" in event.message for event in tail)
            assert await server.wait(60.0) == 0
            elapsed = time.monotonic() - signalled_at
            assert elapsed < 30.0, f"exit took {elapsed:.1f} s with a grace period of {grace} s"
            warnings = [e["message"] for e in server.log_entries() if e["level"] == "warning"]
            assert any("grace period of 1.0 s ended with" in message for message in warnings), warnings


async def test_serve_port_in_use_fails_cleanly(tmp_path: Path) -> None:
    from service_process import ServiceProcess, service_env

    data_dir = tmp_path / "data"
    notify = NotifySocket()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServiceProcess(
            data_dir,
            service_env(data_dir, EXECUTOR_PORT=str(port), NOTIFY_SOCKET=notify.address),
            tmp_path / "serve.log",
        )
        try:
            with pytest.raises(AssertionError, match="serve exited with 1"):
                await server.start()
            received = notify.read_pending()
        finally:
            server.kill()
            notify.close()

    assert server.log_text() == f"executor-tornado: Cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert received == [], "no READY=1 for a service that never served"
