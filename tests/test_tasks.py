"""Tests of the task service, the tool catalog and plug-ins, on a real SQLite file and real sandbox workers.

The demo plug-in under ``tests/plugins/demo_tools`` must be installed
(``pip install -e tests/plugins/demo_tools``) so its ``executor_tornado.tools``
entry point is visible. The tests are coroutines run by pytest-tornasync;
the ``timeout`` mark is its per-test limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from executor_tornado.sandbox import SandboxLimits, SandboxPool
from executor_tornado.tasks import (
    ApprovalConflictError,
    ApprovalNotFoundError,
    TaskNotFoundError,
    TaskService,
    redact_secrets,
    resolve_approval_mode,
)
from executor_tornado.tools import (
    ENTRY_POINT_GROUP,
    ToolCatalog,
    ToolContext,
    ToolSpec,
    kv_tools,
    load_plugin_tools,
)
from store.records import Approval, ApprovalPolicy, Task
from store.sqlite import SQLiteStore

pytestmark = pytest.mark.timeout(seconds=90)

WS_A = "ws_a"
WS_B = "ws_b"
ACCOUNT = "anon_0123"
PRINCIPAL = "apikey:anon_0123:ws_a"
T0 = 1_800_000_000.0

PLUGIN_INSTALL_HINT = "install the demo plug-in first: pip install -e tests/plugins/demo_tools"


def demo_plugin_installed() -> bool:
    return any(entry_point.name == "demo" for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def demo_calls() -> list[tuple[str, dict[str, Any]]]:
    import demo_tools

    return demo_tools.CALLS


@pytest.fixture(autouse=True)
def require_demo_plugin() -> None:
    if not demo_plugin_installed():
        pytest.fail(f"The entry point 'demo' of group {ENTRY_POINT_GROUP} is missing; {PLUGIN_INSTALL_HINT}")
    demo_calls().clear()


async def sleep_tool(arguments: dict[str, Any], context: ToolContext) -> Any:
    await asyncio.sleep(arguments.get("seconds", 30))
    return "woke up"


async def kill_sandbox_tool(arguments: dict[str, Any], context: ToolContext) -> Any:
    assert context.sandbox_pid is not None
    os.kill(context.sandbox_pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    return "killed"


TEST_TOOLS = [
    ToolSpec(
        path="testing.sleep",
        description="Sleep on the host for a number of seconds.",
        handler=sleep_tool,
        input_schema={"type": "object", "properties": {"seconds": {"type": "number"}}},
    ),
    ToolSpec(
        path="testing.kill_sandbox",
        description="Kill the sandbox worker that runs the calling code.",
        handler=kill_sandbox_tool,
    ),
]


@dataclass
class Services:
    store: SQLiteStore
    pool: SandboxPool
    catalog: ToolCatalog
    tasks: TaskService


@contextlib.asynccontextmanager
async def opened(db_path: Path, **limits: Any) -> AsyncIterator[Services]:
    """Open the SQLite store at ``db_path``, a sandbox pool and a task service; close them afterwards."""
    store = SQLiteStore(str(db_path))
    await store.open()
    pool = SandboxPool(SandboxLimits(**limits))
    await pool.start()
    catalog = ToolCatalog([*kv_tools(store), *load_plugin_tools(), *TEST_TOOLS])
    try:
        yield Services(store=store, pool=pool, catalog=catalog, tasks=TaskService(store, pool, catalog))
    finally:
        await pool.close()
        await store.close()


async def execute(services: Services, code: str, workspace_id: str = WS_A, **kwargs: Any) -> Any:
    return await services.tasks.execute(workspace_id, ACCOUNT, PRINCIPAL, code, **kwargs)


async def add_policy(services: Services, pattern: str, mode: str, workspace_id: str = WS_A, order: int = 0) -> None:
    await services.store.put_approval_policy(
        ApprovalPolicy(workspace_id=workspace_id, pattern=pattern, mode=mode, created_at=T0 + order)
    )


# -- plain runs ---------------------------------------------------------------------------------


async def test_execute_returns_final_value(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        task = await execute(services, "x = 40\nx + 2")
        stored = await services.store.get_task(task.id)

    assert re.fullmatch(r"task_[0-9a-f]{32}", task.id)
    assert task.status == "completed"
    assert task.result == 42
    assert task.error is None
    assert stored is not None
    assert stored.status == "completed"
    assert stored.code == "x = 40\nx + 2"
    assert stored.workspace_id == WS_A
    assert stored.account_id == ACCOUNT
    assert stored.principal == PRINCIPAL
    assert stored.started_at is not None
    assert stored.finished_at is not None
    assert stored.created_at <= stored.started_at <= stored.finished_at
    assert stored.snapshot is None


async def test_execute_captures_output(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        task = await execute(services, "print('one')\nprint('two')\n3")

    assert task.status == "completed"
    assert task.output == "one\ntwo\n"


async def test_execute_marks_truncated_output(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db", max_output_bytes=100) as services:
        task = await execute(services, "for i in range(50):\n    print('line', i)")

    assert task.status == "completed"
    assert task.output.endswith("\n[output truncated at 100 bytes]")


async def test_execute_rejects_invalid_arguments(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        with pytest.raises(ValueError, match="non-empty"):
            await execute(services, "   ")
        with pytest.raises(ValueError, match="timeout_ms"):
            await execute(services, "1", timeout_ms=0)
        with pytest.raises(ValueError, match="timeout_ms"):
            await execute(services, "1", timeout_ms=600_001)


async def test_progress_reported_per_tool_call(io_loop: Any, tmp_path: Path) -> None:
    reports: list[tuple[float, float | None, str | None]] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        reports.append((done, total, message))

    async with opened(tmp_path / "executor.db") as services:
        task = await execute(
            services, "tools.kv.set(key='p', value=1)\ntools.kv.get(key='p')", progress=progress
        )

    assert task.status == "completed"
    assert reports == [(1, None, "Calling tools.kv.set"), (2, None, "Calling tools.kv.get")]


# -- kv -------------------------------------------------------------------------------------------


async def test_kv_round_trip_survives_reopen(io_loop: Any, tmp_path: Path) -> None:
    db_path = tmp_path / "executor.db"
    async with opened(db_path) as services:
        written = await execute(services, "tools.kv.set(key='greeting', value={'text': 'hi', 'n': [1, 2]})\n'ok'")
        read = await execute(services, "tools.kv.get(key='greeting')")
    assert written.status == "completed", written.error
    assert read.result == {"text": "hi", "n": [1, 2]}

    async with opened(db_path) as services:
        again = await execute(services, "tools.kv.get(key='greeting')['text']")
        listed = await execute(services, "tools.kv.list(prefix='gr')")
        deleted = await execute(services, "[tools.kv.delete(key='greeting'), tools.kv.get(key='greeting')]")

    assert again.result == "hi"
    assert listed.result == ["greeting"]
    assert deleted.result == [True, None]


async def test_kv_rejects_invalid_input(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        missing_key = await execute(services, "tools.kv.get()")
        too_big = await execute(services, "tools.kv.set(key='big', value='x' * 300000)")

    assert missing_key.status == "failed"
    assert "Invalid input for tools.kv.get: 'key' is a required property" in (missing_key.error or "")
    assert too_big.status == "failed"
    assert "above the limit of 262144 bytes" in (too_big.error or "")


async def test_workspaces_isolated(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        task_a = await execute(services, "tools.kv.set(key='secret', value='a only')\ntools.kv.list()", WS_A)
        task_b = await execute(services, "[tools.kv.get(key='secret'), tools.kv.list()]", WS_B)
        tasks_of_b = await services.store.list_tasks(WS_B)

        with pytest.raises(TaskNotFoundError):
            await services.tasks.get_task(task_a.id, workspace_id=WS_B)
        with pytest.raises(TaskNotFoundError):
            await services.tasks.resume_task(task_a.id, workspace_id=WS_B)
        own = await services.tasks.get_task(task_a.id, workspace_id=WS_A)

    assert task_a.result == ["secret"]
    assert task_b.status == "completed"
    assert task_b.result == [None, []]
    assert [task.id for task in tasks_of_b] == [task_b.id]
    assert own.id == task_a.id


# -- failures -------------------------------------------------------------------------------------

DENIED_ACCESS = [
    ("open('/etc/passwd').read()", "PermissionError: Permission denied: '/etc/passwd'"),
    ("import os\nos.listdir('/')", "PermissionError: Permission denied: '/'"),
    ("import os\nos.getenv('HOME')", "RuntimeError: 'os.getenv' is not supported in this environment"),
    ("import socket", "ModuleNotFoundError: No module named 'socket'"),
]


@pytest.mark.parametrize(("code", "message"), DENIED_ACCESS)
async def test_os_access_fails_task(io_loop: Any, tmp_path: Path, code: str, message: str) -> None:
    async with opened(tmp_path / "executor.db") as services:
        task = await execute(services, code)

    assert task.status == "failed"
    assert (task.error or "").endswith(message)


async def test_endless_loop_times_out(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db", max_duration_secs=1) as services:
        started = time.monotonic()
        task = await execute(services, "n = 0\nwhile True:\n    n += 1")
        elapsed = time.monotonic() - started

    assert task.status == "timed_out"
    assert "Timed out" in (task.error or "")
    assert elapsed < 10


async def test_task_timeout_covers_tool_calls(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        started = time.monotonic()
        task = await execute(services, "tools.testing.sleep(seconds=30)", timeout_ms=1000)
        elapsed = time.monotonic() - started

    assert task.status == "timed_out"
    assert "wall-clock limit of 1 s" in (task.error or "")
    assert elapsed < 10


async def test_syntax_error_reports_line(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        task = await execute(services, "a = 1\nb = 2\nif a == b\n    c = 3")

    assert task.status == "failed"
    assert (task.error or "").startswith("SyntaxError on line 3")


async def test_memory_bomb_and_recursion_stopped(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db", max_memory_bytes=64 * 1024 * 1024, max_recursion_depth=300) as services:
        bomb = await execute(services, "blocks = []\nwhile True:\n    blocks.append(' ' * 1000000)")
        recursion = await execute(services, "def f(n):\n    return f(n + 1)\nf(0)")
        after = await execute(services, "x = 40\nx + 2")

    assert bomb.status == "failed"
    assert "MemoryError: memory limit exceeded" in (bomb.error or "")
    assert recursion.status == "failed"
    assert "RecursionError" in (recursion.error or "")
    assert after.status == "completed"
    assert after.result == 42


async def test_killed_worker_fails_only_its_task(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db", workers=2) as services:
        victim, bystander = await asyncio.gather(
            execute(services, "tools.testing.kill_sandbox()\n'unreachable'"),
            execute(services, "tools.testing.sleep(seconds=0.5)\ntools.kv.set(key='k', value=2)\ntools.kv.get(key='k')"),
        )
        after = await execute(services, "x = 40\nx + 2")

    assert victim.status == "failed"
    assert "sandbox worker crashed" in (victim.error or "")
    assert bystander.status == "completed", bystander.error
    assert bystander.result == 2
    assert after.result == 42


# -- approvals --------------------------------------------------------------------------------------


async def test_paused_tasks_release_workers(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db", workers=2) as services:
        await add_policy(services, "kv.set", "required")
        codes = [f"tools.kv.set(key='k{i}', value={i})\ntools.kv.get(key='k{i}') * 2" for i in range(20)]

        paused = await asyncio.gather(*(execute(services, code) for code in codes))
        assert [task.status for task in paused] == ["waiting_approval"] * 20
        pending = await services.store.list_approvals(status="pending", workspace_id=WS_A)
        assert len(pending) == 20
        assert await services.store.kv_list(WS_A) == []

        for task in paused:
            await services.tasks.decide(task.result["approvalId"], True, decided_by="operator")
        finished = await asyncio.gather(*(services.tasks.resume_task(task.id) for task in paused))
        stored_values = [await services.store.kv_get(WS_A, f"k{i}") for i in range(20)]

    assert [task.status for task in finished] == ["completed"] * 20
    assert [task.result for task in finished] == [2 * i for i in range(20)]
    assert stored_values == list(range(20))


async def test_approved_call_runs_tool(io_loop: Any, tmp_path: Path) -> None:
    code = "print('sending')\nreceipt = tools.demo.send(to='ops', message='deploy', api_key='sk-live-123')\nreceipt"
    async with opened(tmp_path / "executor.db") as services:
        task = await execute(services, code)
        approval = await services.store.get_approval(task.result["approvalId"])
        calls_before = list(demo_calls())

        decided = await services.tasks.decide(approval.id, True, decided_by="operator", reason="looks fine")
        finished = await services.tasks.resume_task(task.id)

    assert task.status == "waiting_approval"
    assert task.output == "sending\n"
    assert re.fullmatch(r"appr_[0-9a-f]{32}", approval.id)
    assert approval.task_id == task.id
    assert approval.principal == PRINCIPAL
    assert approval.tool_path == "demo.send"
    assert approval.redacted_input == {"to": "ops", "message": "deploy", "api_key": "[redacted]"}
    assert task.result["input"] == approval.redacted_input
    assert calls_before == []
    assert decided.status == "approved"
    assert decided.decided_by == "operator"
    assert finished.status == "completed", finished.error
    assert finished.result == {"sent": True, "to": "ops"}
    assert finished.output == "sending\n"
    assert finished.snapshot is None
    assert demo_calls() == [("demo.send", {"to": "ops", "message": "deploy", "api_key": "sk-live-123"})]


async def test_denied_call_never_runs(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        task = await execute(services, "tools.demo.send(to='ops', message='drop tables')")
        await services.tasks.decide(task.result["approvalId"], False, decided_by="operator", reason="too risky")
        finished = await services.tasks.resume_task(task.id)

    assert finished.status == "denied"
    assert (finished.error or "").endswith("PermissionError: Calling tools.demo.send was denied by operator: too risky")
    assert demo_calls() == []


async def test_caught_denial_lets_code_continue(io_loop: Any, tmp_path: Path) -> None:
    code = "try:\n    tools.demo.send(to='ops', message='m')\nexcept PermissionError as error:\n    result = str(error)\nresult"
    async with opened(tmp_path / "executor.db") as services:
        task = await execute(services, code)
        await services.tasks.decide(task.result["approvalId"], False, decided_by="operator")
        finished = await services.tasks.resume_task(task.id)

    assert finished.status == "completed"
    assert finished.result == "Calling tools.demo.send was denied by operator."


async def test_policy_deny_never_runs_tool(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        await add_policy(services, "demo.*", "deny")
        task = await execute(services, "tools.demo.echo(text='hi')")
        approvals = await services.store.list_approvals(workspace_id=WS_A)

    assert task.status == "denied"
    assert "Calling tools.demo.echo is denied by the workspace approval policy 'demo.*'." in (task.error or "")
    assert approvals == []
    assert demo_calls() == []


async def test_policy_auto_overrides_default(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        await add_policy(services, "demo.send", "auto")
        task = await execute(services, "tools.demo.send(to='ops', message='m')['sent']")

    assert task.status == "completed"
    assert task.result is True


async def test_pending_approval_left_for_operator(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        task = await execute(services, "tools.demo.send(to='ops', message='m')")
        unchanged = await services.tasks.resume_task(task.id)
        with pytest.raises(ApprovalNotFoundError):
            await services.tasks.decide("appr_missing", True, decided_by="operator")
        await services.tasks.decide(task.result["approvalId"], True, decided_by="operator")
        with pytest.raises(ApprovalConflictError, match="already decided: approved by operator"):
            await services.tasks.decide(task.result["approvalId"], False, decided_by="someone else")
        with pytest.raises(ApprovalNotFoundError):
            await services.tasks.decide(task.result["approvalId"], True, decided_by="x", workspace_id=WS_B)

    assert unchanged.status == "waiting_approval"
    assert unchanged.result == task.result


async def test_resume_after_restart(io_loop: Any, tmp_path: Path) -> None:
    db_path = tmp_path / "executor.db"
    code = "a = tools.kv.get(key='base')\nb = tools.kv.set(key='out', value=a + 1)\nprint('done')\n[a, b, tools.kv.get(key='out')]"
    async with opened(db_path) as services:
        await services.store.kv_set(WS_A, "base", 41, T0)
        await add_policy(services, "kv.set", "required")
        task = await execute(services, code)
    assert task.status == "waiting_approval"

    async with opened(db_path) as services:
        await services.tasks.decide(task.result["approvalId"], True, decided_by="operator")
        finished = await services.tasks.resume_task(task.id)
        twice = await services.tasks.resume_task(task.id)

    assert finished.status == "completed", finished.error
    assert finished.result == [41, None, 42]
    assert finished.output == "done\n"
    assert twice.status == "completed"


async def test_concurrent_resumes_run_once(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        task = await execute(services, "tools.demo.send(to='ops', message='once')['to']")
        await services.tasks.decide(task.result["approvalId"], True, decided_by="operator")
        results = await asyncio.gather(*(services.tasks.resume_task(task.id) for _ in range(5)))
        final = await services.tasks.get_task(task.id)

    assert final.status == "completed"
    assert final.result == "ops"
    assert {result.status for result in results} <= {"running", "completed"}
    assert len(demo_calls()) == 1


async def test_second_approval_pauses_again(io_loop: Any, tmp_path: Path) -> None:
    code = "tools.demo.send(to='a', message='1')\ntools.demo.send(to='b', message='2')['to']"
    async with opened(tmp_path / "executor.db") as services:
        task = await execute(services, code)
        await services.tasks.decide(task.result["approvalId"], True, decided_by="operator")
        second = await services.tasks.resume_task(task.id)
        await services.tasks.decide(second.result["approvalId"], True, decided_by="operator")
        finished = await services.tasks.resume_task(task.id)

    assert second.status == "waiting_approval"
    assert second.result["approvalId"] != task.result["approvalId"]
    assert second.result["input"] == {"to": "b", "message": "2"}
    assert finished.status == "completed"
    assert finished.result == "b"
    assert [call[1]["to"] for call in demo_calls()] == ["a", "b"]


async def test_ask_approval_inline(io_loop: Any, tmp_path: Path) -> None:
    requested: list[Approval] = []

    async def approve(approval: Approval) -> Any:
        requested.append(approval)
        return "approve"

    async def deny_with_reason(approval: Approval) -> Any:
        return ("deny", "not today")

    async def cannot_answer(approval: Approval) -> Any:
        return None

    async def broken(approval: Approval) -> Any:
        raise ConnectionError("client went away")

    code = "tools.demo.send(to='ops', message='m')['sent']"
    async with opened(tmp_path / "executor.db") as services:
        approved = await execute(services, code, ask_approval=approve)
        denied = await execute(services, code, ask_approval=deny_with_reason)
        left = await execute(services, code, ask_approval=cannot_answer)
        failed_ask = await execute(services, code, ask_approval=broken)
        decided = await services.store.get_approval(requested[0].id)

    assert approved.status == "completed"
    assert approved.result is True
    assert decided.status == "approved"
    assert decided.decided_by == PRINCIPAL
    assert denied.status == "denied"
    assert (denied.error or "").endswith(f"was denied by {PRINCIPAL}: not today")
    assert left.status == "waiting_approval"
    assert failed_ask.status == "waiting_approval"


def test_resolve_approval_mode_specificity() -> None:
    def policy(pattern: str, mode: str, order: int) -> ApprovalPolicy:
        return ApprovalPolicy(workspace_id=WS_A, pattern=pattern, mode=mode, created_at=T0 + order)

    policies = [
        policy("*", "required", 0),
        policy("demo.*", "deny", 1),
        policy("demo.echo", "auto", 2),
        policy("kv.*", "auto", 3),
        policy("kv.?et", "deny", 4),
        policy("kv.s*", "required", 5),
    ]

    assert resolve_approval_mode(policies, "demo.echo", "required") == ("auto", "demo.echo")
    assert resolve_approval_mode(policies, "demo.send", "auto") == ("deny", "demo.*")
    assert resolve_approval_mode(policies, "other.tool", "auto") == ("required", "*")
    # "kv.?et" and "kv.s*" both keep four literal characters; the older one wins.
    assert resolve_approval_mode(policies, "kv.set", "auto") == ("deny", "kv.?et")
    assert resolve_approval_mode(policies, "kv.list", "auto") == ("auto", "kv.*")
    assert resolve_approval_mode([], "kv.get", "auto") == ("auto", None)
    assert resolve_approval_mode([policy("kv.get", "sometimes", 0)], "kv.get", "auto") == ("required", "kv.get")


def test_redact_secrets_hides_secret_values() -> None:
    redacted = redact_secrets(
        {
            "key": "name-of-entry",
            "password": "p",
            "api_key": "k",
            "apiKey": "k",
            "Authorization": "Basic abc",
            "headers": {"X-Auth-Token": "t", "Accept": "json"},
            "stripe_key": "sk",
            "items": [{"client_secret": "s", "value": 1}],
            "note": "Bearer abc.def",
            "text": "hello",
        }
    )

    assert redacted == {
        "key": "name-of-entry",
        "password": "[redacted]",
        "api_key": "[redacted]",
        "apiKey": "[redacted]",
        "Authorization": "[redacted]",
        "headers": {"X-Auth-Token": "[redacted]", "Accept": "json"},
        "stripe_key": "[redacted]",
        "items": [{"client_secret": "[redacted]", "value": 1}],
        "note": "[redacted]",
        "text": "hello",
    }


# -- catalog and plug-ins -----------------------------------------------------------------------------


async def test_plugin_listed_in_catalog(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        await add_policy(services, "demo.echo", "required")
        catalog = services.catalog
        listed = catalog.tools(namespace="demo")
        found = catalog.discover(query="echo text")
        namespaces = catalog.namespaces()
        from_code = await execute(
            services,
            "[[t['path'] + ':' + t['approval'] for t in tools.catalog.tools(namespace='demo')],"
            " tools.discover(query='echo')[0]['path'], tools.catalog.namespaces()]",
        )

    assert [tool["path"] for tool in listed] == ["demo.echo", "demo.fail", "demo.send"]
    assert listed[0]["description"] == "Echo a text back, repeated a number of times."
    assert listed[0]["inputSchema"]["required"] == ["text"]
    assert listed[2]["approval"] == "required"
    assert found[0]["path"] == "demo.echo"
    assert {"name": "demo", "tools": 3} in namespaces
    assert {"name": "kv", "tools": 4} in namespaces
    assert from_code.status == "completed", from_code.error
    assert from_code.result[0] == ["demo.echo:required", "demo.fail:auto", "demo.send:required"]
    assert from_code.result[1] == "demo.echo"
    assert {"name": "demo", "tools": 3} in from_code.result[2]


async def test_plugin_tool_runs(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        task = await execute(services, "tools.demo.echo(text='ab', repeat=2)")
        positional = await execute(services, "tools.demo.echo('x')['text']")

    assert task.status == "completed", task.error
    assert task.result == {"text": "abab", "workspace": WS_A}
    assert positional.result == "x"
    assert demo_calls() == [("demo.echo", {"text": "ab", "repeat": 2}), ("demo.echo", {"text": "x"})]


async def test_plugin_input_validated(io_loop: Any, tmp_path: Path) -> None:
    caught_code = "try:\n    tools.demo.echo(text='a', repeat=0)\nexcept ValueError as error:\n    message = str(error)\nmessage"
    async with opened(tmp_path / "executor.db") as services:
        missing = await execute(services, "tools.demo.echo(repeat=2)")
        caught = await execute(services, caught_code)
        extra = await execute(services, "tools.demo.echo(text='a', volume=11)")
        too_many = await execute(services, "tools.demo.echo('a', 2, 3)")

    assert missing.status == "failed"
    assert (missing.error or "").endswith("ValueError: Invalid input for tools.demo.echo: 'text' is a required property")
    assert caught.result == "Invalid input for tools.demo.echo at 'repeat': 0 is less than the minimum of 1"
    assert "Additional properties are not allowed ('volume' was unexpected)" in (extra.error or "")
    assert "TypeError: tools.demo.echo() takes at most 2 positional arguments (text, repeat) but 3 were given" in (
        too_many.error or ""
    )
    assert demo_calls() == []


async def test_plugin_internal_error_hidden(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        task = await execute(services, "tools.demo.fail()")

    assert task.status == "failed"
    assert "RuntimeError: tools.demo.fail failed with an internal error (DemoFailure)" in (task.error or "")
    assert "postgres://" not in (task.error or "")


def test_load_plugin_tools_from_entry_point() -> None:
    specs = load_plugin_tools()

    assert [spec.path for spec in specs] == ["demo.echo", "demo.send", "demo.fail"]
    assert [spec.approval for spec in specs] == ["auto", "required", "auto"]
    assert load_plugin_tools(group="executor_tornado.tools.unused") == []


def test_tool_spec_rejects_invalid_declarations() -> None:
    async def handler(arguments: dict[str, Any], context: ToolContext) -> Any:
        return None

    with pytest.raises(ValueError, match="Invalid tool path"):
        ToolSpec(path="demo.bad-name", description="d", handler=handler)
    with pytest.raises(ValueError, match="approval mode 'maybe'"):
        ToolSpec(path="demo.x", description="d", handler=handler, approval="maybe")
    with pytest.raises(ValueError, match="invalid input schema"):
        ToolSpec(path="demo.x", description="d", handler=handler, input_schema={"type": "object", "minProperties": -1})
    with pytest.raises(ValueError, match="has no description"):
        ToolSpec(path="demo.x", description=" ", handler=handler)

    catalog = ToolCatalog([ToolSpec(path="demo.x", description="d", handler=handler)])
    with pytest.raises(ValueError, match="Duplicate tool path 'demo.x'"):
        catalog.add(ToolSpec(path="demo.x", description="d", handler=handler))
    with pytest.raises(ValueError, match="clashes with the tool 'demo.x'"):
        catalog.add(ToolSpec(path="demo.x.y", description="d", handler=handler))
    with pytest.raises(ValueError, match="Duplicate tool path 'discover'"):
        catalog.add(ToolSpec(path="discover", description="d", handler=handler))


async def test_pool_not_running_fails_task(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        await services.pool.close()
        with pytest.raises(RuntimeError, match="not running"):
            await execute(services, "1 + 1")
        tasks = await services.store.list_tasks(WS_A)

    assert len(tasks) == 1
    assert tasks[0].status == "failed"
    assert tasks[0].error == "The run stopped because of an internal error (RuntimeError)."


# -- abandoned runs ------------------------------------------------------------------------------


async def test_abandoned_running_task_fails(io_loop: Any, tmp_path: Path) -> None:
    async with opened(tmp_path / "executor.db") as services:
        now = time.time()
        for task_id, status, claimed_at in (
            ("task_dead", "running", now - 1000),
            ("task_alive", "running", now - 10),
            ("task_lost_in_queue", "queued", None),
        ):
            await services.store.insert_task(
                Task(
                    id=task_id, workspace_id=WS_A, account_id=ACCOUNT, principal=PRINCIPAL, code="1",
                    status=status, created_at=now - 1000, timeout_ms=60_000, claimed_at=claimed_at,
                )
            )

        dead = await services.tasks.get_task("task_dead")
        assert dead.status == "failed"
        assert "stopped before it finished" in dead.error
        assert (await services.store.get_task("task_dead")).status == "failed"

        alive = await services.tasks.get_task("task_alive")
        assert alive.status == "running", "a run within its time limit is left alone"

        lost = await services.tasks.get_task("task_lost_in_queue")
        assert lost.status == "failed"
