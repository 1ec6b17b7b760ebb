"""Show what an idle MCP session with its GET stream allocates in executor-tornado, by tracemalloc.

Starts the service in this process with tracemalloc on, opens ``--streams``
sessions with GET streams from a bench/loadgen.py process, and prints the
allocation sites that grew the most, grouped by file and line, per session.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import tracemalloc
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from run import RAISED_LIMITS  # noqa: E402


async def fetch_json(url: str, headers: dict[str, str]) -> dict:
    def post() -> dict:
        request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json", **headers}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    return await asyncio.get_running_loop().run_in_executor(None, post)


async def main(streams: int, top: int) -> None:
    os.environ.update(RAISED_LIMITS)
    from executor_tornado.app import Service
    from executor_tornado.settings import Settings

    data_dir = Path(tempfile.mkdtemp(prefix="memory-profile-"))
    settings = Settings(_env_file=None, host="127.0.0.1", port=0, data_dir=data_dir, mcp_plugins=["bench_plugin:register"])
    service = Service(settings)
    await service.start()
    try:
        token = (await fetch_json(service.base_url + "/auth/anonymous/token", {"User-Agent": "bench"}))["accessToken"]
        bootstrap = await fetch_json(service.base_url + "/auth/anonymous/session", {"Authorization": f"Bearer {token}", "User-Agent": "bench"})
        job = {
            "kind": "streams", "host": "127.0.0.1", "port": service.port, "steps": [10, 10 + streams],
            "path": f"/v1/mcp/anonymous?workspaceId={bootstrap['workspaceId']}", "headers": {"X-API-Key": bootstrap["apiKey"]},
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(BENCH_DIR / "loadgen.py"), json.dumps(job), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert process.stdout is not None and process.stdin is not None
        await process.stdout.readline()  # 10 warm-up sessions open
        await asyncio.sleep(1)
        tracemalloc.start(12)
        before = tracemalloc.take_snapshot()
        process.stdin.write(b"\n")
        await process.stdin.drain()
        await process.stdout.readline()
        await asyncio.sleep(2)
        after = tracemalloc.take_snapshot()
        total = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        print(f"Python heap growth per session: {total / streams / 1024:.1f} KiB over {streams} sessions")
        # Charge each allocation to the innermost frame in this repository, or in the mcp SDK, that led to it.
        by_owner: dict[str, list[float]] = {}
        for stat in after.compare_to(before, "traceback"):
            owner = "other"
            for frame in reversed(stat.traceback):  # innermost first
                name = frame.filename
                if "/mcp/" in name or "/work/" in name and "/site-packages/" not in name:
                    owner = f"{name.split('site-packages/')[-1].split('/main/')[-1]}:{frame.lineno}"
                    break
            sizes = by_owner.setdefault(owner, [0.0, 0.0])
            sizes[0] += stat.size_diff
            sizes[1] += stat.count_diff
        ranked = sorted(by_owner.items(), key=lambda item: -item[1][0])
        for owner, (size, count) in ranked[:top]:
            print(f"{size / streams:8.0f} B/session  {count / streams:6.1f} blocks  {owner}")
        process.stdin.write(b"\n")
        await process.stdin.drain()
        await process.wait()
    finally:
        await service.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=500, help="sessions with GET streams to open (default 500)")
    parser.add_argument("--top", type=int, default=30, help="allocation sites to print (default 30)")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.streams, arguments.top))
