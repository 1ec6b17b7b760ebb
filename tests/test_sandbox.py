"""Tests of :mod:`executor_tornado.sandbox` against real pydantic-monty workers.

Each test starts its own :class:`SandboxPool` (a few milliseconds) and
closes it at the end. Tool calls are handled by small host functions
written in each test. The tests are coroutines run by pytest-tornasync; the
``timeout`` mark is its per-test limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from executor_tornado.sandbox import (
    PAUSE,
    CallReply,
    RunOutcome,
    RunStatus,
    SandboxLimits,
    SandboxPool,
    ToolCall,
    to_json_compatible,
)

pytestmark = pytest.mark.timeout(seconds=60)

TOOL_PATHS = ["kv.get", "kv.set", "slow.wait", "discover"]


@contextlib.asynccontextmanager
async def started_pool(**limits: Any) -> AsyncIterator[SandboxPool]:
    pool = SandboxPool(SandboxLimits(**limits))
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


class Recorder:
    """A call handler over an in-memory dict that records every call it gets."""

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        self.values = dict(values or {})
        self.calls: list[ToolCall] = []

    async def __call__(self, call: ToolCall) -> Any:
        self.calls.append(call)
        if call.path == "kv.get":
            return self.values.get(call.kwargs.get("key", call.args[0] if call.args else None))
        if call.path == "kv.set":
            self.values[call.kwargs["key"]] = call.kwargs["value"]
            return None
        raise LookupError(f"no tool {call.path}")


async def run(pool: SandboxPool, code: str, handler: Any = None, timeout_secs: float = 20.0) -> RunOutcome:
    return await pool.run(code, tool_paths=TOOL_PATHS, on_call=handler or Recorder(), timeout_secs=timeout_secs)


async def assert_pool_serves(pool: SandboxPool) -> None:
    outcome = await run(pool, "x = 40\nx + 2")
    assert outcome.status is RunStatus.COMPLETED, outcome.error
    assert outcome.value == 42


# -- completing runs -----------------------------------------------------------------------


async def test_run_returns_final_expression(io_loop: Any) -> None:
    async with started_pool() as pool:
        outcome = await run(pool, "x = 40\nx + 2")

    assert outcome.status is RunStatus.COMPLETED
    assert outcome.value == 42
    assert outcome.error is None
    assert outcome.host_calls == 0


async def test_run_without_final_expression_returns_none(io_loop: Any) -> None:
    async with started_pool() as pool:
        outcome = await run(pool, "x = 1")

    assert outcome.status is RunStatus.COMPLETED
    assert outcome.value is None


async def test_tool_calls_need_no_await(io_loop: Any) -> None:
    recorder = Recorder({"a": 41})
    async with started_pool() as pool:
        outcome = await run(pool, "tools.kv.set(key='b', value=[1, 2])\ntools.kv.get(key='a') + 1", recorder)

    assert outcome.status is RunStatus.COMPLETED, outcome.error
    assert outcome.value == 42
    assert outcome.host_calls == 2
    assert [call.path for call in recorder.calls] == ["kv.set", "kv.get"]
    assert recorder.calls[0].kwargs == {"key": "b", "value": [1, 2]}
    assert recorder.values["b"] == [1, 2]
    assert recorder.calls[0].sandbox_pid is not None


async def test_awaited_tool_call_also_works(io_loop: Any) -> None:
    async with started_pool() as pool:
        outcome = await run(pool, "x = await tools.kv.get(key='a')\nx * 2", Recorder({"a": 21}))

    assert outcome.status is RunStatus.COMPLETED, outcome.error
    assert outcome.value == 42


async def test_tools_reachable_from_functions_and_imports(io_loop: Any) -> None:
    code = "from tools import kv\ndef read(name):\n    return kv.get(key=name)\n[read('a'), tools.kv.get('b')]"
    async with started_pool() as pool:
        outcome = await run(pool, code, Recorder({"a": 1, "b": 2}))

    assert outcome.status is RunStatus.COMPLETED, outcome.error
    assert outcome.value == [1, 2]


async def test_tool_args_converted_to_json(io_loop: Any) -> None:
    recorder = Recorder()
    async with started_pool() as pool:
        outcome = await run(pool, "tools.kv.set(key='t', value=(1, {2: 'x'}, {3}))", recorder)

    assert outcome.status is RunStatus.COMPLETED, outcome.error
    assert recorder.calls[0].kwargs == {"key": "t", "value": [1, {"2": "x"}, [3]]}


async def test_host_exception_raised_at_call_site(io_loop: Any) -> None:
    async def handler(call: ToolCall) -> Any:
        raise KeyError("no such key: a")

    code = "try:\n    tools.kv.get(key='a')\nexcept KeyError as error:\n    result = 'caught ' + str(error)\nresult"
    async with started_pool() as pool:
        outcome = await run(pool, code, handler)

    assert outcome.status is RunStatus.COMPLETED, outcome.error
    assert outcome.value == "caught 'no such key: a'"


async def test_unknown_tool_fails_with_attribute_error(io_loop: Any) -> None:
    async with started_pool() as pool:
        outcome = await run(pool, "tools.nope.run()")

    assert outcome.status is RunStatus.FAILED
    assert outcome.error_type == "AttributeError"
    assert "nope" in (outcome.error or "")


# -- output and result caps ----------------------------------------------------------------


async def test_print_output_captured_not_written(io_loop: Any, capfd: Any) -> None:
    async with started_pool() as pool:
        outcome = await run(pool, "print('hello', 42)\nprint('second')\n1")

    assert outcome.status is RunStatus.COMPLETED
    assert outcome.output == "hello 42\nsecond\n"
    assert outcome.output_truncated is False
    captured = capfd.readouterr()
    assert "hello" not in captured.out
    assert "hello" not in captured.err


async def test_print_output_capped(io_loop: Any) -> None:
    async with started_pool(max_output_bytes=1000) as pool:
        outcome = await run(pool, "for i in range(100):\n    print('x' * 99)\n'done'")

    assert outcome.status is RunStatus.COMPLETED
    assert outcome.value == "done"
    assert outcome.output_truncated is True
    assert len(outcome.output.encode()) == 1000


async def test_result_over_cap_fails(io_loop: Any) -> None:
    async with started_pool(max_result_bytes=1000) as pool:
        outcome = await run(pool, "'a' * 5000")

    assert outcome.status is RunStatus.FAILED
    assert outcome.error_type == "ResultTooLarge"
    assert "above the limit of 1000 bytes" in (outcome.error or "")


async def test_result_converted_to_json(io_loop: Any) -> None:
    code = "import datetime\nclass P:\n    def __init__(self):\n        self.x = 1\n" "[(1, 2), {3}, P(), datetime.date(2026, 1, 2), float('inf')]"
    async with started_pool() as pool:
        outcome = await run(pool, code)

    assert outcome.status is RunStatus.COMPLETED, outcome.error
    assert outcome.value == [[1, 2], [3], {"x": 1}, "2026-01-02", "inf"]


def test_to_json_compatible_values() -> None:
    assert to_json_compatible({1: (1, 2), None: {3, 1}}) == {"1": [1, 2], "null": [1, 3]}
    assert to_json_compatible(datetime.datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05"
    assert to_json_compatible(float("nan")) == "nan"
    assert to_json_compatible(b"ab") == "b'ab'"

    nested: list[Any] = []
    for _ in range(300):
        nested = [nested]
    with pytest.raises(ValueError, match="nested deeper"):
        to_json_compatible(nested)


# -- errors -----------------------------------------------------------------------------------


async def test_syntax_error_reports_line(io_loop: Any) -> None:
    async with started_pool() as pool:
        outcome = await run(pool, "x = 1\ny = 2\nz = (\n")

    assert outcome.status is RunStatus.FAILED
    assert outcome.error_type == "SyntaxError"
    assert outcome.error_line == 4
    assert (outcome.error or "").startswith("SyntaxError on line 4")


async def test_syntax_error_indentation_line(io_loop: Any) -> None:
    async with started_pool() as pool:
        outcome = await run(pool, "x = 1\n  y = 2")

    assert outcome.error_type == "SyntaxError"
    assert outcome.error_line == 2
    assert "Unexpected indentation" in (outcome.error or "")


async def test_runtime_error_has_traceback(io_loop: Any) -> None:
    async with started_pool() as pool:
        outcome = await run(pool, "def f():\n    return 1 / 0\n\nf()")

    assert outcome.status is RunStatus.FAILED
    assert outcome.error_type == "ZeroDivisionError"
    assert outcome.error_line == 2
    assert 'File "<code>", line 2, in f' in (outcome.error or "")
    assert (outcome.error or "").endswith("ZeroDivisionError: division by zero")


# -- isolation ---------------------------------------------------------------------------------

DENIED_ACCESS = [
    ("open('/etc/passwd').read()", "PermissionError", "Permission denied: '/etc/passwd'"),
    ("import os\nos.listdir('/')", "PermissionError", "Permission denied: '/'"),
    ("import os\nos.getenv('HOME')", "RuntimeError", "'os.getenv' is not supported"),
    ("import os\nos.environ['HOME']", "RuntimeError", "'os.environ' is not supported"),
    ("import socket", "ModuleNotFoundError", "No module named 'socket'"),
    ("import subprocess", "ModuleNotFoundError", "No module named 'subprocess'"),
    ("import pathlib\npathlib.Path('/root').mkdir()", "PermissionError", "Permission denied"),
]


@pytest.mark.parametrize(("code", "error_type", "message"), DENIED_ACCESS)
async def test_sandbox_denies_os_access(io_loop: Any, code: str, error_type: str, message: str) -> None:
    async with started_pool() as pool:
        outcome = await run(pool, code)

    assert outcome.status is RunStatus.FAILED
    assert outcome.error_type == error_type
    assert message in (outcome.error or "")


# -- limits ----------------------------------------------------------------------------------------


async def test_endless_loop_times_out(io_loop: Any) -> None:
    async with started_pool(max_duration_secs=1) as pool:
        started = time.monotonic()
        outcome = await run(pool, "while True:\n    pass")
        elapsed = time.monotonic() - started

        assert outcome.status is RunStatus.TIMED_OUT
        assert "Timed out" in (outcome.error or "")
        assert elapsed < 10
        await assert_pool_serves(pool)


async def test_slow_tool_hits_wall_clock(io_loop: Any) -> None:
    async def handler(call: ToolCall) -> Any:
        await asyncio.sleep(30)

    async with started_pool() as pool:
        started = time.monotonic()
        outcome = await run(pool, "tools.slow.wait()", handler, timeout_secs=1)
        elapsed = time.monotonic() - started

        assert outcome.status is RunStatus.TIMED_OUT
        assert "wall-clock limit of 1 s" in (outcome.error or "")
        assert elapsed < 10
        await assert_pool_serves(pool)


async def test_memory_bomb_stopped(io_loop: Any) -> None:
    async with started_pool(max_memory_bytes=64 * 1024 * 1024) as pool:
        outcome = await run(pool, "chunks = []\nwhile True:\n    chunks.append('a' * 1000000)")

        assert outcome.status is RunStatus.FAILED
        assert outcome.error_type == "MemoryError"
        assert "memory limit exceeded" in (outcome.error or "")
        await assert_pool_serves(pool)


async def test_deep_recursion_stopped(io_loop: Any) -> None:
    async with started_pool(max_recursion_depth=200) as pool:
        outcome = await run(pool, "def down(n):\n    return down(n + 1)\ndown(0)")

        assert outcome.status is RunStatus.FAILED
        assert outcome.error_type == "RecursionError"
        await assert_pool_serves(pool)


async def test_host_call_limit(io_loop: Any) -> None:
    recorder = Recorder()
    async with started_pool(max_host_calls=5) as pool:
        outcome = await run(pool, "for i in range(10):\n    tools.kv.get(key='a')", recorder)

    assert outcome.status is RunStatus.FAILED
    assert outcome.error_type == "HostCallLimit"
    assert len(recorder.calls) == 5


async def test_sleep_counts_against_limit(io_loop: Any) -> None:
    async with started_pool(max_sleep_secs=0.5) as pool:
        short = await run(pool, "import time\ntime.sleep(0.05)\n'slept'")
        long = await run(pool, "import time\ntime.sleep(5)")

    assert short.status is RunStatus.COMPLETED, short.error
    assert short.value == "slept"
    assert long.status is RunStatus.TIMED_OUT
    assert "sleep limit exceeded" in (long.error or "")


def test_limits_reject_non_positive() -> None:
    with pytest.raises(ValueError, match="workers must be positive"):
        SandboxLimits(workers=0)
    with pytest.raises(ValueError, match="max_memory_bytes must be positive"):
        SandboxLimits(max_memory_bytes=-1)


async def test_run_before_start_raises(io_loop: Any) -> None:
    pool = SandboxPool()
    with pytest.raises(RuntimeError, match="not running"):
        await run(pool, "1")


# -- crashes ---------------------------------------------------------------------------------------


async def test_killed_worker_fails_only_its_run(io_loop: Any) -> None:
    killed = asyncio.Event()

    async def kill_own_worker(call: ToolCall) -> Any:
        assert call.sandbox_pid is not None
        os.kill(call.sandbox_pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        killed.set()
        return 1

    async def wait_for_kill(call: ToolCall) -> Any:
        await killed.wait()
        return 41

    async with started_pool(workers=2) as pool:
        victim, survivor = await asyncio.gather(
            run(pool, "tools.slow.wait() + 1", kill_own_worker),
            run(pool, "tools.slow.wait() + 1", wait_for_kill),
        )

        assert victim.status is RunStatus.FAILED
        assert victim.error_type == "WorkerCrashed"
        assert "crashed" in (victim.error or "")
        assert survivor.status is RunStatus.COMPLETED, survivor.error
        assert survivor.value == 42
        await assert_pool_serves(pool)


# -- pause and resume -----------------------------------------------------------------------------


async def pause_on_set(call: ToolCall) -> Any:
    if call.path == "kv.set":
        return PAUSE
    return 5


PAUSING_CODE = "print('before')\nx = tools.kv.get(key='a')\nok = tools.kv.set(key='b', value=x)\nprint('after')\n[x, ok]"


async def test_pause_releases_worker(io_loop: Any) -> None:
    async with started_pool(workers=1, checkout_timeout_secs=5) as pool:
        paused = await run(pool, PAUSING_CODE, pause_on_set)

        assert paused.status is RunStatus.PAUSED
        assert paused.snapshot
        assert paused.pending_call == ToolCall(
            path="kv.set", args=(), kwargs={"key": "b", "value": 5}, sandbox_pid=paused.pending_call.sandbox_pid
        )
        assert paused.output == "before\n"
        assert paused.host_calls == 2
        # The only worker is free again while the first run waits.
        await assert_pool_serves(pool)


async def test_resume_with_value_in_new_pool(io_loop: Any) -> None:
    async with started_pool() as pool:
        paused = await run(pool, PAUSING_CODE, pause_on_set)
    assert paused.snapshot is not None

    async with started_pool() as other_pool:
        outcome = await other_pool.resume(
            paused.snapshot,
            tool_paths=TOOL_PATHS,
            on_call=pause_on_set,
            timeout_secs=10,
            reply=CallReply.returned("stored"),
            output=paused.output,
            host_calls=paused.host_calls,
        )

    assert outcome.status is RunStatus.COMPLETED, outcome.error
    assert outcome.value == [5, "stored"]
    assert outcome.output == "before\nafter\n"
    assert outcome.host_calls == 2


async def test_resume_with_exception_raises_in_code(io_loop: Any) -> None:
    async with started_pool() as pool:
        paused = await run(pool, PAUSING_CODE, pause_on_set)
        assert paused.snapshot is not None
        outcome = await pool.resume(
            paused.snapshot,
            tool_paths=TOOL_PATHS,
            on_call=pause_on_set,
            timeout_secs=10,
            reply=CallReply.raised(PermissionError("denied by the operator")),
        )

    assert outcome.status is RunStatus.FAILED
    assert outcome.error_type == "PermissionError"
    assert outcome.error_line == 3
    assert (outcome.error or "").endswith("PermissionError: denied by the operator")


async def test_resume_without_reply_asks_handler(io_loop: Any) -> None:
    seen: list[ToolCall] = []

    async def answer(call: ToolCall) -> Any:
        seen.append(call)
        return "from handler"

    async with started_pool() as pool:
        paused = await run(pool, PAUSING_CODE, pause_on_set)
        assert paused.snapshot is not None
        outcome = await pool.resume(paused.snapshot, tool_paths=TOOL_PATHS, on_call=answer, timeout_secs=10)

    assert outcome.status is RunStatus.COMPLETED, outcome.error
    assert outcome.value == [5, "from handler"]
    assert [(call.path, call.kwargs) for call in seen] == [("kv.set", {"key": "b", "value": 5})]


async def test_resume_awaited_call(io_loop: Any) -> None:
    async with started_pool() as pool:
        paused = await run(pool, "x = await tools.kv.set(key='a', value=1)\nx", pause_on_set)
        assert paused.snapshot is not None
        outcome = await pool.resume(
            paused.snapshot,
            tool_paths=TOOL_PATHS,
            on_call=pause_on_set,
            timeout_secs=10,
            reply=CallReply.returned(7),
        )

    assert outcome.status is RunStatus.COMPLETED, outcome.error
    assert outcome.value == 7


async def test_resume_corrupt_snapshot_fails(io_loop: Any) -> None:
    async with started_pool() as pool:
        outcome = await pool.resume(
            b"not a snapshot", tool_paths=TOOL_PATHS, on_call=pause_on_set, timeout_secs=10
        )
        assert outcome.status is RunStatus.FAILED
        assert outcome.error_type in ("RestoreFailed", "WorkerCrashed")
        await assert_pool_serves(pool)
