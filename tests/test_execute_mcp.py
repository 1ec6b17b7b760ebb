"""The execute tool through the official SDK client over real HTTP, with the real sandbox."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest

from conftest import anonymous_key, running
from mcp_client import sdk_client

DEMO_CALLS = "demo_tools"


def structured(result: types.CallToolResult) -> dict[str, Any]:
    assert result.structured_content is not None, result
    return result.structured_content


async def run_code(client, code: str, **extra: Any) -> types.CallToolResult:
    return await client.call_tool("execute", {"code": code, **extra})


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_execute_returns_final_expression(data_dir: Path, mode: str) -> None:
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        async with sdk_client(bootstrap["mcpUrl"], {"X-API-Key": bootstrap["apiKey"]}, mode=mode) as client:
            names = [tool.name for tool in (await client.list_tools()).tools]
            assert "execute" in names
            result = await run_code(client, "x = 40\nx + 2")
        body = structured(result)
        assert result.is_error is False
        assert body["result"] == 42
        assert body["status"] == "completed"
        assert body["error"] is None
        assert body["workspaceId"] == bootstrap["workspaceId"]
        assert body["accountId"] == bootstrap["accountId"]
        assert body["taskId"].startswith("task_")
        task = await service.store.get_task(body["taskId"])
        assert task.status == "completed"
        assert task.result == 42


async def test_kv_round_trip_and_isolation(data_dir: Path) -> None:
    async with running(data_dir) as service:
        mine = await anonymous_key(service)
        other = await anonymous_key(service, user_agent="other")
        async with sdk_client(mine["mcpUrl"], {"X-API-Key": mine["apiKey"]}) as client:
            result = await run_code(client, "tools.kv.set(key='greeting', value={'n': 1})\ntools.kv.get(key='greeting')")
            assert structured(result)["result"] == {"n": 1}
        async with sdk_client(other["mcpUrl"], {"X-API-Key": other["apiKey"]}) as client:
            result = await run_code(client, "tools.kv.get(key='greeting')")
            assert structured(result)["result"] is None, "another workspace sees nothing"
            foreign = await client.call_tool("get_task", {"taskId": "task_" + "0" * 32})
            assert foreign.is_error is True


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("open('/etc/passwd').read()", "PermissionError"),
        ("import os\nos.listdir('/')", "PermissionError"),
        ("import os\nos.getenv('HOME')", "not supported"),
        ("import socket", "ModuleNotFoundError"),
    ],
)
async def test_sandbox_denies_host_access(data_dir: Path, code: str, message: str) -> None:
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        async with sdk_client(bootstrap["mcpUrl"], {"X-API-Key": bootstrap["apiKey"]}) as client:
            result = await run_code(client, code)
        body = structured(result)
        assert result.is_error is True
        assert body["status"] == "failed"
        assert message in body["error"]
        assert (await service.store.get_task(body["taskId"])).status == "failed"


async def test_endless_loop_times_out(data_dir: Path) -> None:
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        async with sdk_client(bootstrap["mcpUrl"], {"X-API-Key": bootstrap["apiKey"]}) as client:
            started = time.monotonic()
            result = await run_code(client, "while True:\n    pass", timeoutMs=1000)
            elapsed = time.monotonic() - started
        assert structured(result)["status"] == "timed_out"
        assert result.is_error is True
        assert elapsed < 10, "the run is stopped near its limit, not left running"


async def test_syntax_error_names_its_line(data_dir: Path) -> None:
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        async with sdk_client(bootstrap["mcpUrl"], {"X-API-Key": bootstrap["apiKey"]}) as client:
            result = await run_code(client, "x = 1\ny = (\n")
        body = structured(result)
        assert body["status"] == "failed"
        assert "line 2" in body["error"] or "line 3" in body["error"]


async def test_invalid_input_is_a_tool_error(data_dir: Path) -> None:
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        async with sdk_client(bootstrap["mcpUrl"], {"X-API-Key": bootstrap["apiKey"]}) as client:
            result = await client.call_tool("execute", {"code": "   "})
        assert result.is_error is True
        assert "Invalid input" in result.content[0].text
        assert await service.store.list_tasks(bootstrap["workspaceId"]) == []


def _approver(decision: str, seen: list[types.ElicitRequestParams]):
    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        seen.append(params)
        return types.ElicitResult(action="accept", content={"decision": decision, "reason": "test"})

    return elicit


SEND = "tools.demo.send(to='ops', message='hi', api_key='sk-secret')"


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_elicitation_approve_runs_tool(data_dir: Path, mode: str) -> None:
    import demo_tools

    demo_tools.CALLS.clear()
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        seen: list = []
        async with sdk_client(
            bootstrap["mcpUrl"], {"X-API-Key": bootstrap["apiKey"]}, mode=mode, elicitation_callback=_approver("approve", seen)
        ) as client:
            result = await run_code(client, SEND)
        body = structured(result)
        assert body["status"] == "completed", body
        assert body["result"] == {"sent": True, "to": "ops"}
        assert len(seen) == 1
        assert "demo.send" in seen[0].message
        assert "sk-secret" not in seen[0].message, "secrets in the tool input are redacted"
        assert demo_tools.CALLS == [("demo.send", {"to": "ops", "message": "hi", "api_key": "sk-secret"})]


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_elicitation_deny_never_runs_tool(data_dir: Path, mode: str) -> None:
    import demo_tools

    demo_tools.CALLS.clear()
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        seen: list = []
        async with sdk_client(
            bootstrap["mcpUrl"], {"X-API-Key": bootstrap["apiKey"]}, mode=mode, elicitation_callback=_approver("deny", seen)
        ) as client:
            result = await run_code(client, SEND)
        body = structured(result)
        assert body["status"] == "denied"
        assert result.is_error is True
        assert demo_tools.CALLS == []


async def _cli(data_dir: Path, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "EXECUTOR_DATA_DIR": str(data_dir)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "executor_tornado.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, out.decode(), err.decode()


async def _pending_approval(service, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = await service.store.list_approvals(status="pending")
        if pending:
            return pending[0]
        await asyncio.sleep(0.1)
    raise AssertionError("no approval became pending")


async def test_cli_approves_for_client_without_elicitation(data_dir: Path) -> None:
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        async with sdk_client(bootstrap["mcpUrl"], {"X-API-Key": bootstrap["apiKey"]}) as client:
            call = asyncio.ensure_future(run_code(client, SEND))
            approval = await _pending_approval(service)
            assert approval.redacted_input["api_key"] == "[redacted]"
            code, out, err = await _cli(data_dir, "approvals", "approve", approval.id, "--reason", "ok")
            assert code == 0, err
            result = await asyncio.wait_for(call, 60)
        body = structured(result)
        assert body["status"] == "completed"
        assert body["result"] == {"sent": True, "to": "ops"}
        stored = await service.store.get_approval(approval.id)
        assert (stored.status, stored.decided_by, stored.reason) == ("approved", "operator", "ok")


async def test_paused_run_survives_restart(data_dir: Path) -> None:
    async with running(data_dir, approval_wait_seconds=0) as service:
        bootstrap = await anonymous_key(service)
        port = service.port
        async with sdk_client(bootstrap["mcpUrl"], {"X-API-Key": bootstrap["apiKey"]}) as client:
            result = await run_code(client, "r = " + SEND + "\n[r['to'], 'after restart']")
        body = structured(result)
        assert body["status"] == "waiting_approval"
        approval_id = body["result"]["approvalId"]

    code, out, err = await _cli(data_dir, "approvals", "list", "--status", "pending")
    assert code == 0, err
    assert approval_id in out

    async with running(data_dir, port=port) as service:
        await service.store.decide_approval(
            approval_id, status="approved", decided_at=time.time(), decided_by="test", reason=None
        )
        async with sdk_client(bootstrap["mcpUrl"], {"X-API-Key": bootstrap["apiKey"]}) as client:
            result = await client.call_tool("get_task", {"taskId": body["taskId"]})
        resumed = structured(result)
        assert resumed["status"] == "completed"
        assert resumed["result"] == ["ops", "after restart"]


async def test_paused_runs_do_not_hold_workers(data_dir: Path) -> None:
    async with running(data_dir, approval_wait_seconds=0, sandbox_workers=2) as service:
        bootstrap = await anonymous_key(service)
        async with sdk_client(bootstrap["mcpUrl"], {"X-API-Key": bootstrap["apiKey"]}) as client:
            results = await asyncio.gather(*(run_code(client, SEND) for _ in range(20)))
            assert [structured(r)["status"] for r in results] == ["waiting_approval"] * 20
            quick = await run_code(client, "1 + 1")
            assert structured(quick)["result"] == 2, "workers are free while 20 runs wait"


async def test_progress_notifications(data_dir: Path) -> None:
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        updates: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            updates.append(progress)

        async with sdk_client(bootstrap["mcpUrl"], {"X-API-Key": bootstrap["apiKey"]}) as client:
            code = "for i in range(3):\n    tools.kv.set(key=f'k{i}', value=i)\n'done'"
            result = await client.call_tool("execute", {"code": code}, progress_callback=on_progress)
        assert structured(result)["result"] == "done"
        assert len(updates) >= 3
        assert updates == sorted(updates)
