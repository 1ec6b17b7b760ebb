"""Start each server under test on 127.0.0.1, drive it with bench/loadgen.py and print one table.

Run through bench/run.sh, which builds the benchmark venvs first. Every server
is a separate process started and stopped here; the load generator is another
process. Results also go to bench/results.json (raw runs) and the table to
stdout as Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BENCH_PYTHON = BENCH_DIR / ".venv" / "bin" / "python"
FASTMCP_PYTHON = BENCH_DIR / ".venv-fastmcp" / "bin" / "python"
HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# A checkout to import executor-tornado from instead of this one (--ours-source), for before/after runs.
OURS_SOURCE: list[str] = []

# Per-client budgets raised so one load generator on one address is not
# throttled; the limiter still runs and writes its buckets on every request.
RAISED_LIMITS = {
    "EXECUTOR_MCP_RATE_PER_MINUTE": "100000000",
    "EXECUTOR_TOKEN_RATE_PER_MINUTE": "100000000",
    "EXECUTOR_BOOTSTRAP_GLOBAL_PER_MINUTE": "100000000",
    "EXECUTOR_BOOTSTRAP_RATE_PER_MINUTE": "100000000",
    "EXECUTOR_MAX_SESSIONS": "100000",
    "EXECUTOR_MAX_SESSIONS_PER_PRINCIPAL": "100000",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"server did not listen on {port} within {timeout} s")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Server:
    """One server under test: its process, its MCP URL path and the headers a client sends."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.port = free_port()
        self.path = "/mcp"
        self.headers: dict[str, str] = {}
        self.log = open(log_path, "ab")
        full_env = {**os.environ, **env}
        command = [part.replace("{port}", str(self.port)) for part in command]
        full_env = {key: value.replace("{port}", str(self.port)) for key, value in full_env.items()}
        self.process = subprocess.Popen(command, env=full_env, stdout=self.log, stderr=self.log, cwd=BENCH_DIR)
        wait_for_port(self.port, self.process)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def job(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"kind": kind, "host": HOST, "port": self.port, "path": self.path, "headers": self.headers, **fields}


def post_json(url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **headers}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def start_server(kind: str, mode: str, work_dir: Path) -> Iterator[Server]:
    """Start one server; ``kind`` is ours, sdk, fastmcp or tornado and ``mode`` sse or json."""
    log_path = work_dir / f"{kind}-{mode}.log"
    if kind == "ours":
        data_dir = Path(tempfile.mkdtemp(prefix="ours-", dir=work_dir))
        env = {
            "EXECUTOR_HOST": HOST,
            "EXECUTOR_PORT": "{port}",
            "EXECUTOR_DATA_DIR": str(data_dir),
            "EXECUTOR_MCP_PLUGINS": "bench_plugin:register",
            "PYTHONPATH": os.pathsep.join([*OURS_SOURCE, str(BENCH_DIR)]),
            # 0 commits every response to SSE at once; within the default 50 ms window a fast tool is sent as JSON.
            "EXECUTOR_JSON_RESPONSE_TIMEOUT_SECONDS": "0" if mode == "sse" else "0.05",
            **RAISED_LIMITS,
        }
        server = Server(f"ours-{mode}", [str(BENCH_DIR / ".venv" / "bin" / "executor-tornado"), "serve"], env, log_path)
        base = f"http://{HOST}:{server.port}"
        token = post_json(base + "/auth/anonymous/token", {}, {"User-Agent": "bench"})["accessToken"]
        bootstrap = post_json(base + "/auth/anonymous/session", {}, {"Authorization": f"Bearer {token}", "User-Agent": "bench"})
        server.path = f"/v1/mcp/anonymous?workspaceId={bootstrap['workspaceId']}"
        server.headers = {"X-API-Key": bootstrap["apiKey"]}
    elif kind == "sdk":
        server = Server(f"sdk-{mode}", [str(BENCH_PYTHON), "peer_sdk.py", "{port}", mode], {}, log_path)
    elif kind == "fastmcp":
        server = Server(f"fastmcp-{mode}", [str(FASTMCP_PYTHON), "peer_fastmcp.py", "{port}", mode], {}, log_path)
    elif kind == "tornado":
        server = Server("tornado", [str(BENCH_PYTHON), "peer_tornado.py", "{port}"], {}, log_path)
    else:
        raise ValueError(f"unknown server kind {kind!r}")
    try:
        yield server
    finally:
        server.stop()


def run_loadgen(job: dict[str, Any], server: Server | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Run one load generator process; add the server's CPU use (cores) over the run."""
    before = cpu_seconds(server.process.pid) if server else 0.0
    started = time.monotonic()
    completed = subprocess.run(
        [str(BENCH_PYTHON), str(BENCH_DIR / "loadgen.py"), json.dumps(job)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    elapsed = time.monotonic() - started
    if completed.returncode != 0:
        raise RuntimeError(f"load generator failed on {job['kind']}: {completed.stderr[-2000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])["result"]
    if server:
        result["server_cpu"] = (cpu_seconds(server.process.pid) - before) / elapsed
    return result


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


# -- figures ----------------------------------------------------------------------------


def bench_calls(server: Server, sessions: int, seconds: float, repeats: int, tool: str = "echo", arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    runs = [
        run_loadgen(server.job("calls", sessions=sessions, seconds=seconds, tool=tool, arguments=arguments or {}), server)
        for _ in range(repeats)
    ]
    return {
        "per_second": median_of(runs, "per_second"),
        "p50_ms": median_of(runs, "p50_ms"),
        "p99_ms": median_of(runs, "p99_ms"),
        "server_cpu": median_of(runs, "server_cpu"),
        "loadgen_cpu": median_of(runs, "loadgen_cpu"),
        "runs": runs,
    }


def bench_setup(server: Server, seconds: float, repeats: int) -> dict[str, Any]:
    runs = [run_loadgen(server.job("setup", concurrency=16, seconds=seconds), server) for _ in range(repeats)]
    return {"per_second": median_of(runs, "per_second"), "server_cpu": median_of(runs, "server_cpu"), "runs": runs}


def bench_streams(server: Server, steps: list[int]) -> dict[str, Any]:
    """Resident memory per idle session with its GET stream: (RSS(n) - RSS(0)) / n."""
    pid = server.process.pid
    run_loadgen(server.job("calls", sessions=4, seconds=0.5, tool="echo"))  # warm-up, then let it settle
    time.sleep(1.0)
    baseline = rss_kib(pid)
    process = subprocess.Popen(
        [str(BENCH_PYTHON), str(BENCH_DIR / "loadgen.py"), json.dumps(server.job("streams", steps=steps))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    per_stream: dict[str, float] = {}
    try:
        for _ in steps:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError("stream load generator exited early")
            opened = json.loads(line)["open"]
            time.sleep(2.0)  # idle: let set-up garbage be collected and buffers settle
            per_stream[str(opened)] = (rss_kib(pid) - baseline) / opened
            process.stdin.write("\n")
            process.stdin.flush()
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return {"baseline_kib": baseline, "kib_per_stream": per_stream}


def bench_notify(server: Server, count: int) -> dict[str, Any]:
    return run_loadgen(server.job("notify", count=count), server)


# -- table --------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def ratio(ours: float | None, peer: float | None) -> str:
    if not ours or not peer:
        return "–"
    return f"{ours / peer:.2f}x"


def render_calls(results: dict[str, Any]) -> list[str]:
    calls = results["calls"]
    lines = [
        "### tools/call round trips (median of runs)",
        "",
        "| server | mode | sessions | calls/s | p50 ms | p99 ms | server CPU | loadgen CPU | ours/peer calls/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, by_sessions in calls.items():
        kind, _, mode = key.partition("-")
        for sessions, figure in by_sessions.items():
            # Peers compare with ours in the same response mode; the bare Tornado handler with ours in JSON mode.
            ours = calls.get(f"ours-{mode or 'json'}", {}).get(sessions)
            ours_ratio = "" if kind == "ours" else ratio(ours["per_second"] if ours else None, figure["per_second"])
            lines.append(
                f"| {kind} | {mode or 'json'} | {sessions} | {fmt(figure['per_second'])} | {fmt(figure['p50_ms'], 2)} | "
                f"{fmt(figure['p99_ms'], 2)} | {figure['server_cpu']:.2f} | {figure['loadgen_cpu']:.2f} | {ours_ratio} |"
            )
    return lines


def render_sessions(results: dict[str, Any]) -> list[str]:
    lines = [
        "### Session set-up, idle streams, notifications",
        "",
        "| server | set-ups/s (16 workers) | ours/peer | KiB RSS per idle session + GET stream | notification to GET stream, p50 / p99 ms |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for key, figure in results["setup"].items():
        kind, _, mode = key.partition("-")
        ours_setup = results["setup"].get(f"ours-{mode}", {}).get("per_second")
        # Streams and notifications are measured once per server, in SSE mode.
        measured_here = mode == "sse"
        memory = results["streams"].get(kind, {}).get("kib_per_stream", {}) if measured_here else {}
        memory_text = ", ".join(f"{fmt(value, 1)} at {count}" for count, value in memory.items()) or "–"
        notify = results["notify"].get(kind) if measured_here else None
        notify_text = f"{notify['p50_ms']:.2f} / {notify['p99_ms']:.2f}" if notify else "–"
        setup_ratio = "" if kind == "ours" else ratio(ours_setup, figure["per_second"])
        lines.append(f"| {key} | {fmt(figure['per_second'])} | {setup_ratio} | {memory_text} | {notify_text} |")
    return lines


def render_micro(results: dict[str, Any]) -> list[str]:
    lines = ["### Tokens, rate limit, execute", "", "| figure | value |", "| --- | ---: |"]
    for name, value in results.get("micro", {}).items():
        lines.append(f"| {name} | {value} |")
    for name, figure in results.get("execute", {}).items():
        lines.append(
            f"| execute, {name} (16 sessions): calls/s, p50 / p99 ms | "
            f"{fmt(figure['per_second'])}, {figure['p50_ms']:.1f} / {figure['p99_ms']:.1f} |"
        )
    return lines


def render(results: dict[str, Any]) -> str:
    """Format the results as Markdown tables, one per group of figures."""
    return "\n\n".join("\n".join(part) for part in (render_calls(results), render_sessions(results), render_micro(results)))


def machine_description() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return f"{os.cpu_count()} cores ({model}), {memory_kib / 1024 / 1024:.0f} GiB RAM, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one timed run, in seconds (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the table shows the median (default 3)")
    parser.add_argument("--streams", default="1000,5000", help="open idle GET streams at which memory is read (default 1000,5000)")
    parser.add_argument("--sessions", default="1,16,64", help="concurrent sessions for tools/call (default 1,16,64)")
    parser.add_argument("--only", default="", help="comma-separated sections to run: calls,setup,streams,notify,micro,execute (default all)")
    parser.add_argument("--servers", default="ours-sse,ours-json,sdk-sse,sdk-json,fastmcp-sse,fastmcp-json,tornado", help="servers for calls, setup, notify and execute (default all)")
    parser.add_argument("--ours-source", type=Path, help="run executor-tornado from this checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results.json", help="where to write the raw results")
    parser.add_argument("--render", type=Path, help="print the table of a saved results file and exit, running nothing")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        print(f"Date: {saved['date']}\nMachine: {saved['machine']}\nCommand: {saved['command']}\nElapsed: {saved['elapsed_seconds']} s\n")
        print(render(saved))
        return
    if args.ours_source:
        OURS_SOURCE.append(str(args.ours_source.resolve()))
    sections = set(args.only.split(",")) if args.only else {"calls", "setup", "streams", "notify", "micro", "execute"}
    session_counts = [int(value) for value in args.sessions.split(",")]
    steps = [int(value) for value in args.streams.split(",")]

    started = time.monotonic()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_description(),
        "command": " ".join(["bench/run.sh", *sys.argv[1:]]),
        "calls": {}, "setup": {}, "streams": {}, "notify": {}, "micro": {}, "execute": {},
    }
    servers = [tuple(name.partition("-")[::2]) for name in args.servers.split(",")]
    work_dir = Path(tempfile.mkdtemp(prefix="executor-bench-"))
    try:
        for kind, mode in servers:
            key = f"{kind}-{mode}" if mode else kind
            if not sections & {"calls", "setup", "notify", "execute"}:
                break
            with start_server(kind, mode or "json", work_dir) as server:
                print(f"# {key}", file=sys.stderr, flush=True)
                if "calls" in sections:
                    results["calls"][key] = {
                        str(count): bench_calls(server, count, args.seconds, args.repeats) for count in session_counts
                    }
                if kind == "tornado":
                    continue
                if "setup" in sections:
                    results["setup"][key] = bench_setup(server, args.seconds, args.repeats)
                if "notify" in sections and mode == "sse":
                    results["notify"][kind] = bench_notify(server, 200)
                if "execute" in sections and key == "ours-json":
                    results["execute"]["trivial snippet `1 + 1`"] = bench_calls(server, 16, args.seconds, args.repeats, "execute", {"code": "1 + 1"})
                    results["execute"]["one tool call `tools.kv.get(...)`"] = bench_calls(
                        server, 16, args.seconds, args.repeats, "execute", {"code": "tools.kv.get(key='bench')"}
                    )
        if "streams" in sections:
            for kind in ("ours", "sdk", "fastmcp"):
                with start_server(kind, "sse", work_dir) as server:
                    print(f"# streams {kind}", file=sys.stderr, flush=True)
                    results["streams"][kind] = bench_streams(server, steps)
        if "micro" in sections:
            micro = subprocess.run(
                [str(BENCH_PYTHON), str(BENCH_DIR / "micro.py"), "--seconds", str(args.seconds)],
                capture_output=True, text=True, timeout=300, check=True, cwd=REPO_DIR,
            )
            results["micro"] = json.loads(micro.stdout.strip().splitlines()[-1])
            with start_server("ours", "json", work_dir) as server:
                tokens = [
                    run_loadgen({"kind": "post", "host": HOST, "port": server.port, "path": "/auth/anonymous/token", "concurrency": 16, "seconds": args.seconds}, server)
                    for _ in range(args.repeats)
                ]
                results["micro"]["anonymous tokens/s over HTTP (16 connections)"] = fmt(median_of(tokens, "per_second"))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    results["elapsed_seconds"] = round(time.monotonic() - started)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"Date: {results['date']}\nMachine: {results['machine']}\nCommand: {results['command']}\nElapsed: {results['elapsed_seconds']} s\n")
    print(render(results))


if __name__ == "__main__":
    main()
