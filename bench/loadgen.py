"""The load generator every server under test is driven by.

It runs in its own process (one core at most, on uvloop) and speaks raw
HTTP/1.1 with keep-alive over asyncio streams, one TCP connection per MCP
session, so the client side costs the same for every server. It reads one
JSON job from argv and prints one JSON result line on stdout.

Jobs:
  calls    N sessions, each initialize + initialized, then tools/call in a
           closed loop for a fixed time; calls/s and latency percentiles.
  setup    C workers opening sessions (initialize + initialized) for a fixed
           time; sessions/s.
  streams  open sessions with a GET SSE stream each, in steps; after each
           step print a line and wait for a line on stdin, so the caller can
           read the server's resident memory while the streams are idle.
  notify   one session with a GET stream; a tool stamps time.monotonic()
           into a log notification that the server routes to the GET
           stream; latency = arrival - stamp (CLOCK_MONOTONIC is system-wide).
  post     a plain POST in a closed loop on C connections (token issuance).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import uvloop

PROTOCOL_VERSION = "2025-11-25"


class HttpConnection:
    """One keep-alive HTTP/1.1 connection with just enough parsing for MCP."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def send(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        if method != "GET":
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        assert self.writer is not None
        self.writer.write(head + body)

    async def read_head(self) -> tuple[int, dict[str, str]]:
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = raw[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    async def read_body(self, headers: dict[str, str]) -> bytes:
        """Read a whole body: Content-Length or chunked (an SSE response to one POST ends)."""
        assert self.reader is not None
        if "content-length" in headers:
            return await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                chunk = await self.read_chunk()
                if not chunk:
                    return b"".join(parts)
                parts.append(chunk)
        return b""

    async def read_chunk(self) -> bytes:
        assert self.reader is not None
        size_line = await self.reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        self.send(method, path, headers, body)
        status, response_headers = await self.read_head()
        return status, response_headers, await self.read_body(response_headers)


def rpc_result(headers: dict[str, str], body: bytes, request_id: int) -> dict[str, Any]:
    """Find the JSON-RPC response with ``request_id`` in a JSON or SSE body."""
    if headers.get("content-type", "").startswith("text/event-stream"):
        for line in body.split(b"\n"):
            if line.startswith(b"data:") and len(line) > 6:
                message = json.loads(line[5:])
                if message.get("id") == request_id:
                    return message
        raise RuntimeError(f"no response to request {request_id} in SSE body {body[:300]!r}")
    message = json.loads(body)
    if message.get("id") != request_id:
        raise RuntimeError(f"unexpected response {body[:300]!r}")
    return message


class McpSession:
    def __init__(self, job: dict[str, Any]) -> None:
        self.connection = HttpConnection(job["host"], job["port"])
        self.path = job["path"]
        self.base_headers = {
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
            "User-Agent": "bench-loadgen",
            **job.get("headers", {}),
        }
        self.headers = dict(self.base_headers)
        self.next_id = 1

    async def open(self) -> None:
        await self.connection.connect()
        await self.initialize()

    async def initialize(self) -> None:
        body = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}},
        }
        self.headers = dict(self.base_headers)
        status, headers, raw = await self.connection.request("POST", self.path, self.headers, json.dumps(body).encode())
        if status != 200:
            raise RuntimeError(f"initialize: HTTP {status}: {raw[:300]!r}")
        rpc_result(headers, raw, 0)
        if "mcp-session-id" in headers:
            self.headers["Mcp-Session-Id"] = headers["mcp-session-id"]
        self.headers["MCP-Protocol-Version"] = PROTOCOL_VERSION
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        status, _, raw = await self.connection.request("POST", self.path, self.headers, note)
        if status not in (200, 202):
            raise RuntimeError(f"initialized: HTTP {status}: {raw[:300]!r}")

    async def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        request_id = self.next_id
        self.next_id += 1
        body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}
        status, headers, raw = await self.connection.request("POST", self.path, self.headers, json.dumps(body).encode())
        if status != 200:
            raise RuntimeError(f"tools/call: HTTP {status}: {raw[:300]!r}")
        message = rpc_result(headers, raw, request_id)
        if "error" in message or message["result"].get("isError"):
            raise RuntimeError(f"tools/call failed: {message}")
        return message


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


async def job_calls(job: dict[str, Any]) -> dict[str, Any]:
    sessions = [McpSession(job) for _ in range(job["sessions"])]
    await asyncio.gather(*(session.open() for session in sessions))
    tool, arguments = job["tool"], job.get("arguments", {})
    for session in sessions:  # warm-up: one call each, untimed
        await session.call(tool, arguments)
    latencies: list[float] = []
    deadline = time.perf_counter() + job["seconds"]
    cpu_start = time.process_time()

    async def loop(session: McpSession) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await session.call(tool, arguments)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(loop(session) for session in sessions))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_start
    for session in sessions:
        session.connection.close()
    latencies.sort()
    return {
        "count": len(latencies),
        "per_second": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "loadgen_cpu": cpu / elapsed,
    }


async def job_setup(job: dict[str, Any]) -> dict[str, Any]:
    count = 0
    deadline = time.perf_counter() + job["seconds"]
    cpu_start = time.process_time()

    async def worker() -> None:
        nonlocal count
        session = McpSession(job)
        await session.connection.connect()
        while time.perf_counter() < deadline:
            await session.initialize()
            count += 1
        session.connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(job["concurrency"])))
    elapsed = time.perf_counter() - started
    return {"count": count, "per_second": count / elapsed, "loadgen_cpu": (time.process_time() - cpu_start) / elapsed}


async def open_get_stream(session: McpSession) -> None:
    """Open the session's standalone GET SSE stream on its own connection and read its headers."""
    stream = HttpConnection(session.connection.host, session.connection.port)
    await stream.connect()
    headers = {k: v for k, v in session.headers.items() if k != "Content-Type"}
    headers["Accept"] = "text/event-stream"
    stream.send("GET", session.path, headers)
    status, _ = await stream.read_head()
    if status != 200:
        raise RuntimeError(f"GET stream: HTTP {status}")
    session.stream = stream  # type: ignore[attr-defined]


async def job_streams(job: dict[str, Any]) -> dict[str, Any]:
    """Open sessions with GET streams in steps; the POST connection of each is closed after set-up."""
    opened: list[McpSession] = []
    semaphore = asyncio.Semaphore(job.get("concurrency", 32))
    loop = asyncio.get_running_loop()

    async def open_one() -> None:
        async with semaphore:
            session = McpSession(job)
            await session.open()
            await open_get_stream(session)
            session.connection.close()
            opened.append(session)

    for target in job["steps"]:
        await asyncio.gather(*(open_one() for _ in range(target - len(opened))))
        print(json.dumps({"open": len(opened)}), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
    return {"open": len(opened)}


async def job_notify(job: dict[str, Any]) -> dict[str, Any]:
    session = McpSession(job)
    await session.open()
    await open_get_stream(session)
    stream: HttpConnection = session.stream  # type: ignore[attr-defined]
    latencies: list[float] = []
    pending = b""

    async def next_stamp() -> float:
        nonlocal pending
        while True:
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data:") and b"bench-stamp" in line:
                        arrived = time.monotonic()
                        message = json.loads(line[5:])
                        return arrived - float(message["params"]["data"]["stamp"])
            pending += (await stream.read_chunk()).replace(b"\r\n", b"\n")

    for index in range(job["count"] + 5):
        waiter = asyncio.ensure_future(next_stamp())
        await session.call("notify", {})
        latency = await asyncio.wait_for(waiter, 10)
        if index >= 5:  # the first five are warm-up
            latencies.append(latency)
    latencies.sort()
    stream.close()
    session.connection.close()
    return {"count": len(latencies), "p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000}


async def job_post(job: dict[str, Any]) -> dict[str, Any]:
    count = 0
    deadline = time.perf_counter() + job["seconds"]
    headers = {"User-Agent": "bench-loadgen", **job.get("headers", {})}

    async def worker() -> None:
        nonlocal count
        connection = HttpConnection(job["host"], job["port"])
        await connection.connect()
        while time.perf_counter() < deadline:
            status, _, raw = await connection.request("POST", job["path"], headers, b"")
            if status != 200:
                raise RuntimeError(f"POST {job['path']}: HTTP {status}: {raw[:300]!r}")
            count += 1
        connection.close()

    cpu_start = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(job["concurrency"])))
    elapsed = time.perf_counter() - started
    return {"count": count, "per_second": count / elapsed, "loadgen_cpu": (time.process_time() - cpu_start) / elapsed}


JOBS = {"calls": job_calls, "setup": job_setup, "streams": job_streams, "notify": job_notify, "post": job_post}


def main() -> None:
    job = json.loads(sys.argv[1])
    result = uvloop.run(JOBS[job["kind"]](job))
    print(json.dumps({"result": result}), flush=True)


if __name__ == "__main__":
    main()
