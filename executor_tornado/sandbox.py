"""The pool of Monty sandbox workers that runs agent code for the ``execute`` tool.

:class:`SandboxPool` owns a pool of ``pydantic-monty`` worker processes and
drives each run step by step with ``feed_start``. Every call the code makes
into the ``tools`` module stops the sandbox and reaches the host as a
:class:`ToolCall`. An async call handler returns the call's value, raises an
exception (which the sandbox raises at the call site) or returns
:data:`PAUSE`. The code goes on only after the host has returned the value,
so agent code calls tools without ``await`` (``tools.kv.get(key="a")``).
``await tools.kv.get(...)`` directly on the call works too.

A paused run is dumped to bytes and its worker is released at once, so a run
waiting minutes for a human decision holds no worker. :meth:`SandboxPool.resume`
restores those bytes on any worker of any pool, even after a restart.

Example::

    pool = SandboxPool(SandboxLimits(workers=2))
    await pool.start()
    try:
        async def on_call(call: ToolCall) -> Any:
            if call.path == "kv.get":
                return {"a": 1}.get(call.kwargs["key"])
            raise LookupError(f"unknown tool {call.path}")

        outcome = await pool.run(
            "x = tools.kv.get(key='a')\\nx + 41",
            tool_paths=["kv.get"],
            on_call=on_call,
            timeout_secs=10,
        )
        assert outcome.status is RunStatus.COMPLETED and outcome.value == 42
    finally:
        await pool.close()

The sandbox denies filesystem, environment, network and process access
(``open``, ``os.listdir``, ``os.getenv`` and ``os.environ`` raise, and
``socket`` and ``subprocess`` do not exist). It is a language sandbox, not an OS one: the
workers run as the service's user without seccomp.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import json
import logging
import math
import pathlib
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import pydantic_monty
from pydantic_monty import (
    AsyncFunctionSnapshot,
    AsyncFutureSnapshot,
    AsyncMonty,
    AsyncMontySession,
    AsyncNameLookupSnapshot,
    ExternalModule,
    MontyClassProxy,
    MontyComplete,
    MontyCrashedError,
    MontyError,
    MontySyntaxError,
)

__all__ = [
    "PAUSE",
    "CallHandler",
    "CallReply",
    "RunOutcome",
    "RunStatus",
    "SandboxLimits",
    "SandboxPool",
    "ToolCall",
    "json_size",
    "to_json_compatible",
]

sandbox_log = logging.getLogger("executor_tornado.sandbox")

TOOLS_MODULE: Final = "tools"
"""Name of the module that gives agent code its tools. The pool imports it before the code runs."""

_MIB = 1024 * 1024
_MAX_ERROR_CHARS = 8000
_MAX_JSON_DEPTH = 200
_TIME_LIMIT_MESSAGE = re.compile(r"^(feed|turn) time limit exceeded|^sleep limit exceeded")
_FEED_NAME = re.compile(r'"<python-input-\d+>"')
CODE_FILENAME: Final = "<code>"
"""File name that tracebacks give the agent's code."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of the worker pool and of every run in it.

    ``max_duration_secs`` bounds the time the code itself executes, because
    the sandbox clock stops while a tool call runs on the host. The
    wall-clock limit of a run is the ``timeout_secs`` given to
    :meth:`SandboxPool.run`.
    """

    workers: int = 2
    max_duration_secs: float = 30.0
    max_memory_bytes: int = 256 * _MIB
    max_recursion_depth: int = 1000
    max_host_calls: int = 1000
    max_output_bytes: int = _MIB
    max_result_bytes: int = _MIB
    max_sleep_secs: float = 10.0
    """Total seconds a run may spend in ``time.sleep`` / ``asyncio.sleep``."""
    gc_interval: int = 100_000
    """Allocations between garbage collections inside the sandbox."""
    checkout_timeout_secs: float = 60.0
    """Seconds a run waits for a free worker before it fails."""
    max_runs_per_worker: int | None = 1000
    """Runs after which a worker process is replaced, or ``None`` to keep workers forever."""
    crash_grace_secs: float = 5.0
    """Seconds past ``max_duration_secs`` after which the pool kills a worker that does not stop itself."""

    def __post_init__(self) -> None:
        positive = {
            "workers": self.workers,
            "max_duration_secs": self.max_duration_secs,
            "max_memory_bytes": self.max_memory_bytes,
            "max_recursion_depth": self.max_recursion_depth,
            "max_host_calls": self.max_host_calls,
            "max_output_bytes": self.max_output_bytes,
            "max_result_bytes": self.max_result_bytes,
            "gc_interval": self.gc_interval,
            "checkout_timeout_secs": self.checkout_timeout_secs,
            "crash_grace_secs": self.crash_grace_secs,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {value!r}")
        if self.max_sleep_secs < 0:
            raise ValueError(f"SandboxLimits.max_sleep_secs must be zero or positive, got {self.max_sleep_secs!r}")
        if self.max_runs_per_worker is not None and self.max_runs_per_worker <= 0:
            raise ValueError(
                f"SandboxLimits.max_runs_per_worker must be positive or None, got {self.max_runs_per_worker!r}"
            )


@dataclass(frozen=True)
class ToolCall:
    """One call the sandboxed code made into the ``tools`` module.

    ``path`` is the dotted name below ``tools`` (``kv.get`` for
    ``tools.kv.get(...)``). ``args`` and ``kwargs`` are already converted by
    :func:`to_json_compatible`. ``sandbox_pid`` is the process id of the
    worker running the code, for diagnostics.
    """

    path: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    sandbox_pid: int | None = None


class _Pause:
    def __repr__(self) -> str:
        return "PAUSE"


PAUSE: Final = _Pause()
"""Returned by a :data:`CallHandler` to pause the run at the current call."""

CallHandler = Callable[[ToolCall], Awaitable[Any]]
"""Handle one tool call: return its value, raise an exception for the sandbox, or return :data:`PAUSE`."""


@dataclass(frozen=True)
class CallReply:
    """The result of the pending call of a paused run, passed to :meth:`SandboxPool.resume`."""

    value: Any = None
    error: BaseException | None = None

    @classmethod
    def returned(cls, value: Any) -> CallReply:
        return cls(value=value)

    @classmethod
    def raised(cls, error: BaseException) -> CallReply:
        return cls(error=error)


class RunStatus(str, enum.Enum):
    """The end state of a run, or of one segment of a run between pauses."""

    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    PAUSED = "paused"


@dataclass
class RunOutcome:
    """The result of :meth:`SandboxPool.run` or :meth:`SandboxPool.resume`.

    ``value`` is the JSON-compatible value of the code's final expression
    (``completed``). ``error`` is a message for a person, with the traceback
    when the sandbox gave one. ``error_type`` is the exception class name
    inside the sandbox (``SyntaxError``, ``PermissionError``, ...) or one of
    ``WorkerCrashed``, ``HostCallLimit``, ``ResultTooLarge``, ``NoWorker``,
    ``RestoreFailed`` and ``UnsupportedCode``. ``error_line`` is the 1-based
    line of the code where the error was raised, when known.

    A ``paused`` outcome carries the dumped run in ``snapshot`` and the call
    it stopped at in ``pending_call``. ``output`` is everything printed so
    far, including the ``output`` passed to :meth:`SandboxPool.resume`, and
    ``host_calls`` counts tool calls the same way.
    """

    status: RunStatus
    value: Any = None
    error: str | None = None
    error_type: str | None = None
    error_line: int | None = None
    output: str = ""
    output_truncated: bool = False
    host_calls: int = 0
    duration_secs: float = 0.0
    snapshot: bytes | None = None
    pending_call: ToolCall | None = None


def to_json_compatible(value: Any, *, _depth: int = 0) -> Any:
    """Convert a value that left the sandbox into plain JSON types.

    Tuples and sets become lists, and dict keys become strings. Non-finite
    floats become ``"nan"``, ``"inf"`` or ``"-inf"``, and dates and times
    become ISO 8601 strings. An instance of a class defined in the sandbox
    becomes a dict of its attributes, and anything else becomes its
    ``repr``. Raise :class:`ValueError` for values nested deeper than 200
    levels.
    """
    if _depth > _MAX_JSON_DEPTH:
        raise ValueError(f"value is nested deeper than {_MAX_JSON_DEPTH} levels")
    depth = _depth + 1

    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [to_json_compatible(item, _depth=depth) for item in value]
    if isinstance(value, (set, frozenset)):
        items = [to_json_compatible(item, _depth=depth) for item in value]
        with contextlib.suppress(TypeError):
            items.sort()
        return items
    if isinstance(value, dict):
        return {_json_key(key): to_json_compatible(item, _depth=depth) for key, item in value.items()}
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, MontyClassProxy):
        return to_json_compatible(value.attributes, _depth=depth)
    return repr(value)


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)
    return repr(key)


def json_size(value: Any) -> int:
    """Return the size in bytes of ``value`` encoded as compact UTF-8 JSON."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


class _OutputBuffer:
    """Printed output of one run, cut at a byte limit that spans all its segments."""

    def __init__(self, max_bytes: int, initial: str = "") -> None:
        self._max_bytes = max_bytes
        self._parts: list[str] = []
        self._used = 0
        self.truncated = False
        if initial:
            self.write("stdout", initial)

    def write(self, stream: str, text: str) -> None:
        if self.truncated:
            return
        encoded = text.encode("utf-8", "replace")
        room = self._max_bytes - self._used
        if len(encoded) <= room:
            self._parts.append(text)
            self._used += len(encoded)
            return
        self._parts.append(encoded[:room].decode("utf-8", "ignore"))
        self._used = self._max_bytes
        self.truncated = True

    def text(self) -> str:
        return "".join(self._parts)


class _HostCallLimitError(Exception):
    pass


class _RestoreError(Exception):
    pass


class _UnsupportedCodeError(Exception):
    pass


@dataclass
class _RunState:
    on_call: CallHandler
    output: _OutputBuffer
    host_calls: int
    sleep_secs: float = 0.0
    started: float = field(default_factory=time.monotonic)
    pending_future: tuple[int, CallReply] | None = None
    paused_snapshot: bytes | None = None
    paused_call: ToolCall | None = None


class SandboxPool:
    """A pool of Monty worker processes owned by the application.

    Runs beyond ``limits.workers`` wait for a free worker, at most
    ``limits.checkout_timeout_secs``. :meth:`run` and :meth:`resume` return a
    :class:`RunOutcome` for a failure of the code, of a limit or of a worker.
    They raise :class:`RuntimeError` when the pool is not started,
    :class:`ValueError` for an invalid tool path or timeout, and let
    :class:`asyncio.CancelledError` through.
    """

    def __init__(self, limits: SandboxLimits | None = None, *, binary_path: str | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self._binary_path = binary_path
        self._pool: AsyncMonty | None = None
        self._modules: dict[frozenset[str], ExternalModule] = {}

    async def start(self) -> None:
        """Spawn the workers. Idempotent."""
        if self._pool is not None:
            return
        limits = self.limits
        pool = AsyncMonty(
            binary_path=self._binary_path,
            min_processes=limits.workers,
            max_processes=limits.workers,
            checkout_timeout=limits.checkout_timeout_secs,
            request_timeout=limits.max_duration_secs + limits.crash_grace_secs,
            max_checkouts_per_worker=limits.max_runs_per_worker,
        )
        await pool.__aenter__()
        self._pool = pool
        sandbox_log.info("Sandbox pool started with %d workers", limits.workers)

    async def close(self) -> None:
        """Stop the workers. Runs still in flight fail. Safe to call twice."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        await pool.__aexit__(None, None, None)
        # NOTE: pydantic-monty 1.4.0 can abort the process (SIGABRT) at exit when
        # a pool thread wakes the event loop after the pool closed. Measured on a
        # 2-core machine with Python 3.11.7: 17 of 40 exits aborted without this
        # sleep and 0 of 40 with it.
        await asyncio.sleep(0.1)
        sandbox_log.info("Sandbox pool stopped")

    @property
    def running(self) -> bool:
        return self._pool is not None

    async def run(
        self,
        code: str,
        *,
        tool_paths: Iterable[str],
        on_call: CallHandler,
        timeout_secs: float,
        on_start: Callable[[], Awaitable[None]] | None = None,
    ) -> RunOutcome:
        """Run ``code`` and return how it ended.

        ``tool_paths`` lists the dotted paths the code may call below
        ``tools`` (``kv.get``, ``discover``). ``timeout_secs`` is the
        wall-clock limit from the moment a worker is checked out, and time
        in tool calls counts. The code's own execution time is also capped by
        ``limits.max_duration_secs``. ``on_start`` is awaited once a worker
        is checked out, before the code starts.
        """
        state = _RunState(on_call=on_call, output=_OutputBuffer(self.limits.max_output_bytes), host_calls=0)

        async def drive(session: AsyncMontySession) -> Any:
            if on_start is not None:
                await on_start()
            await session.feed_run(f"import {TOOLS_MODULE}", print_callback=state.output.write)
            snapshot = await session.feed_start(code, print_callback=state.output.write)
            return await self._drive(session, snapshot, state)

        return await self._run_in_checkout(drive, state, tool_paths, timeout_secs, self._sandbox_limits(timeout_secs))

    async def resume(
        self,
        snapshot: bytes,
        *,
        tool_paths: Iterable[str],
        on_call: CallHandler,
        timeout_secs: float,
        reply: CallReply | None = None,
        output: str = "",
        host_calls: int = 0,
    ) -> RunOutcome:
        """Restore a paused run from ``snapshot`` and continue it.

        With ``reply`` the pending call gets that value or exception. Without
        it the pending call goes to ``on_call`` again, which may return a
        value, raise, or return :data:`PAUSE` once more. ``output`` and ``host_calls`` carry
        the earlier segments' totals, so the output cap and the host-call
        limit cover the whole run. The snapshot must come from the service's
        own store: Monty does not authenticate it.
        """
        state = _RunState(
            on_call=on_call,
            output=_OutputBuffer(self.limits.max_output_bytes, output),
            host_calls=host_calls,
        )

        async def drive(session: AsyncMontySession) -> Any:
            try:
                restored = await session.load_snapshot(snapshot, print_callback=state.output.write)
            except MontyCrashedError:
                raise
            except (MontyError, ValueError, RuntimeError) as error:
                raise _RestoreError(str(error)) from error
            if reply is not None:
                if not isinstance(restored, AsyncFunctionSnapshot) or restored.is_os_function:
                    raise _RestoreError(f"the snapshot is not paused at a tool call ({type(restored).__name__})")
                restored = await self._answer(restored, reply, state)
            return await self._drive(session, restored, state)

        return await self._run_in_checkout(drive, state, tool_paths, timeout_secs, None)

    # -- internals -----------------------------------------------------------

    def _sandbox_limits(self, timeout_secs: float) -> pydantic_monty.ResourceLimits:
        limits = self.limits
        duration = min(limits.max_duration_secs, timeout_secs)
        return {
            "max_feed_duration_secs": duration,
            "max_turn_duration_secs": duration,
            "max_memory": limits.max_memory_bytes,
            "max_recursion_depth": limits.max_recursion_depth,
            # The host counts tool calls itself, across pauses too. The
            # sandbox's count also covers imports, sleeps and name lookups.
            "max_suspensions": limits.max_host_calls + 100,
            "max_total_sleep_secs": limits.max_sleep_secs,
            "gc_interval": limits.gc_interval,
        }

    def _tools_module(self, tool_paths: Iterable[str]) -> ExternalModule:
        key = frozenset(tool_paths)
        module = self._modules.get(key)
        if module is None:
            module = _build_tools_module(key)
            if len(self._modules) > 64:
                self._modules.clear()
            self._modules[key] = module
        return module

    async def _run_in_checkout(
        self,
        drive: Callable[[AsyncMontySession], Awaitable[Any]],
        state: _RunState,
        tool_paths: Iterable[str],
        timeout_secs: float,
        sandbox_limits: pydantic_monty.ResourceLimits | None,
    ) -> RunOutcome:
        pool = self._pool
        if pool is None:
            raise RuntimeError("The sandbox pool is not running: call start() first")
        if timeout_secs <= 0:
            raise ValueError(f"timeout_secs must be positive, got {timeout_secs!r}")
        modules = {TOOLS_MODULE: self._tools_module(tool_paths)}

        checked_out = False
        try:
            async with pool.checkout(limits=sandbox_limits, external_modules=modules) as session:
                checked_out = True
                state.started = time.monotonic()
                value = await asyncio.wait_for(drive(session), timeout_secs)
        except TimeoutError:
            if not checked_out:
                sandbox_log.warning(
                    "No sandbox worker became free within %g s", self.limits.checkout_timeout_secs
                )
                return self._failure(
                    state,
                    "NoWorker",
                    f"No sandbox worker became free within {self.limits.checkout_timeout_secs:g} s "
                    "because the service is busy. Retry later.",
                )
            return self._timed_out(
                state,
                f"Timed out: the run did not finish within its wall-clock limit of {timeout_secs:g} s "
                "(time spent in tool calls counts).",
            )
        except MontyCrashedError as error:
            return self._crashed(state, error)
        except MontySyntaxError as error:
            return self._syntax_error(state, error)
        except MontyError as error:
            return self._runtime_error(state, error)
        except _HostCallLimitError:
            return self._failure(
                state,
                "HostCallLimit",
                f"Stopped after {self.limits.max_host_calls} tool calls, the limit per run. "
                "Do the work in fewer calls.",
            )
        except _RestoreError as error:
            sandbox_log.warning("A paused run could not be restored: %s", error)
            return self._failure(state, "RestoreFailed", f"The paused run could not be restored: {error}")
        except _UnsupportedCodeError as error:
            return self._failure(state, "UnsupportedCode", str(error))

        if state.paused_snapshot is not None:
            return RunOutcome(
                status=RunStatus.PAUSED,
                output=state.output.text(),
                output_truncated=state.output.truncated,
                host_calls=state.host_calls,
                duration_secs=time.monotonic() - state.started,
                snapshot=state.paused_snapshot,
                pending_call=state.paused_call,
            )
        return self._completed(state, value)

    async def _drive(self, session: AsyncMontySession, snapshot: Any, state: _RunState) -> Any:
        """Resume the sandbox at each suspension until the code completes or a call handler pauses it."""
        while not isinstance(snapshot, MontyComplete):
            if isinstance(snapshot, AsyncFunctionSnapshot):
                if snapshot.is_os_function:
                    snapshot = await self._answer_os_call(snapshot, state)
                    continue
                state.host_calls += 1
                if state.host_calls > self.limits.max_host_calls:
                    raise _HostCallLimitError()
                path = _tool_path(snapshot.function_name)
                try:
                    call = ToolCall(
                        path=path,
                        args=tuple(to_json_compatible(list(snapshot.args))),
                        kwargs=to_json_compatible(dict(snapshot.kwargs)),
                        sandbox_pid=session.worker_pid,
                    )
                except ValueError as error:
                    message = f"The arguments of tools.{path} cannot leave the sandbox: {error}"
                    snapshot = await self._answer(snapshot, CallReply.raised(TypeError(message)), state)
                    continue
                reply = await self._call_host(call, state)
                if reply is None:
                    state.paused_snapshot = snapshot.dump()
                    state.paused_call = call
                    return None
                snapshot = await self._answer(snapshot, reply, state)
            elif isinstance(snapshot, AsyncFutureSnapshot):
                snapshot = await self._settle_future(snapshot, state)
            elif isinstance(snapshot, AsyncNameLookupSnapshot):
                # An undefined name: resuming without a value raises NameError in the sandbox.
                snapshot = await snapshot.resume()
            else:
                state_name = type(snapshot).__name__
                raise _UnsupportedCodeError(f"The sandbox stopped in an unexpected state ({state_name}).")
        return snapshot.output

    async def _call_host(self, call: ToolCall, state: _RunState) -> CallReply | None:
        """Run the call handler and return its reply, or ``None`` when it pauses the run."""
        try:
            result = await state.on_call(call)
        except Exception as error:  # noqa: BLE001 - every handler error is raised inside the sandbox
            return CallReply.raised(error)
        if result is PAUSE:
            return None
        try:
            return CallReply.returned(to_json_compatible(result))
        except ValueError as error:
            message = f"tools.{call.path} returned a value that cannot cross into the sandbox: {error}"
            return CallReply.raised(TypeError(message))

    async def _answer(self, snapshot: AsyncFunctionSnapshot, reply: CallReply, state: _RunState) -> Any:
        """Resume a function snapshot with ``reply``.

        A call awaited at once (``await tools.x()``) is answered with a future
        that the next future snapshot settles, so both call styles work.
        """
        if snapshot.allow_eager_await:
            state.pending_future = (snapshot.call_id, reply)
            return await snapshot.resume({"future": ...})
        if reply.error is not None:
            return await snapshot.resume({"exception": reply.error})
        return await snapshot.resume({"return_value": reply.value})

    async def _settle_future(self, snapshot: AsyncFutureSnapshot, state: _RunState) -> Any:
        pending, state.pending_future = state.pending_future, None
        if pending is None or pending[0] not in snapshot.pending_call_ids:
            raise _UnsupportedCodeError(
                f"The code awaits tool results that were never requested (calls {snapshot.pending_call_ids}). "
                "Call tools one at a time, without await or asyncio.gather."
            )
        call_id, reply = pending
        if reply.error is not None:
            return await snapshot.resume({call_id: {"exception": reply.error}})
        return await snapshot.resume({call_id: {"return_value": reply.value}})

    async def _answer_os_call(self, snapshot: AsyncFunctionSnapshot, state: _RunState) -> Any:
        """Resolve imports and sleeps. Every other OS call gets Monty's default error."""
        name = snapshot.function_name
        if name == "import":
            # Imports resolve from the checkout's external modules (``tools``)
            # and Monty's built-in modules. Anything else is ModuleNotFoundError.
            return await snapshot.resume_auto()
        if name in ("system.sleep", "system.async_sleep"):
            return await self._sleep(snapshot, state)
        return await snapshot.resume_not_handled()

    async def _sleep(self, snapshot: AsyncFunctionSnapshot, state: _RunState) -> Any:
        requested = float(snapshot.args[0]) if snapshot.args else 0.0
        if snapshot.function_name == "system.async_sleep" and not snapshot.allow_eager_await:
            # A sleep inside gathered tasks would leave a second pending future.
            return await snapshot.resume_not_handled()
        if state.sleep_secs + requested > self.limits.max_sleep_secs:
            total = state.sleep_secs + requested
            message = f"sleep limit exceeded: {total:g}s > {self.limits.max_sleep_secs:g}s"
            reply = CallReply.raised(TimeoutError(message))
        else:
            state.sleep_secs += requested
            await asyncio.sleep(max(requested, 0.0))
            reply = CallReply.returned(None)
        if snapshot.function_name == "system.async_sleep":
            return await self._answer(snapshot, reply, state)
        if reply.error is not None:
            return await snapshot.resume({"exception": reply.error})
        return await snapshot.resume({"return_value": None})

    # -- outcomes --------------------------------------------------------------

    def _completed(self, state: _RunState, raw_value: Any) -> RunOutcome:
        try:
            value = to_json_compatible(raw_value)
        except ValueError as error:
            return self._failure(state, "ResultTooLarge", f"The result cannot be returned: {error}.")
        size = json_size(value)
        if size > self.limits.max_result_bytes:
            return self._failure(
                state,
                "ResultTooLarge",
                f"The result is {size} bytes of JSON, above the limit of {self.limits.max_result_bytes} bytes. "
                "Return a smaller value or store it with tools.kv.set.",
            )
        return RunOutcome(
            status=RunStatus.COMPLETED,
            value=value,
            output=state.output.text(),
            output_truncated=state.output.truncated,
            host_calls=state.host_calls,
            duration_secs=time.monotonic() - state.started,
        )

    def _failure(
        self,
        state: _RunState,
        error_type: str,
        message: str,
        *,
        line: int | None = None,
        status: RunStatus = RunStatus.FAILED,
    ) -> RunOutcome:
        if len(message) > _MAX_ERROR_CHARS:
            message = message[: _MAX_ERROR_CHARS // 2] + "\n[...]\n" + message[-_MAX_ERROR_CHARS // 2 :]
        return RunOutcome(
            status=status,
            error=message,
            error_type=error_type,
            error_line=line,
            output=state.output.text(),
            output_truncated=state.output.truncated,
            host_calls=state.host_calls,
            duration_secs=time.monotonic() - state.started,
        )

    def _timed_out(self, state: _RunState, message: str) -> RunOutcome:
        return self._failure(state, "TimeoutError", message, status=RunStatus.TIMED_OUT)

    def _crashed(self, state: _RunState, error: MontyCrashedError) -> RunOutcome:
        if error.timed_out:
            sandbox_log.warning("Sandbox worker killed after exceeding its time limit: %s", error)
            return self._timed_out(
                state,
                f"Timed out: the code did not stop within {self.limits.max_duration_secs:g} s "
                "and its sandbox worker was killed.",
            )
        sandbox_log.warning("Sandbox worker crashed: %s", error)
        return self._failure(
            state, "WorkerCrashed", f"The sandbox worker crashed and the run was stopped ({error}). Retry the task."
        )

    def _syntax_error(self, state: _RunState, error: MontySyntaxError) -> RunOutcome:
        frames = error.traceback()
        line = frames[-1].line if frames else None
        message = str(error)
        if line is not None:
            source = frames[-1].source_line or ""
            message = f"SyntaxError on line {line}, column {frames[-1].column}: {message}\n    {source.strip()}"
        else:
            message = f"SyntaxError: {message}"
        return self._failure(state, "SyntaxError", message, line=line)

    def _runtime_error(self, state: _RunState, error: MontyError) -> RunOutcome:
        inner = error.exception()
        error_type = type(inner).__name__
        text = str(inner) if str(inner) else str(error)
        display = error.display() if hasattr(error, "display") else str(error)
        display = _FEED_NAME.sub(f'"{CODE_FILENAME}"', display)
        frames = error.traceback() if hasattr(error, "traceback") else []
        line = frames[-1].line if frames else None
        if isinstance(inner, TimeoutError) and _TIME_LIMIT_MESSAGE.search(text):
            return self._timed_out(state, f"Timed out: the code exceeded its execution time limit ({text}).")
        return self._failure(state, error_type, display, line=line)


def _tool_path(function_name: Any) -> str:
    name = str(function_name)
    prefix = TOOLS_MODULE + "."
    return name[len(prefix) :] if name.startswith(prefix) else name


def _placeholder_tool(*args: Any, **kwargs: Any) -> Any:
    # The pool handles every tool call from a function snapshot, so Monty
    # never calls this function. It exists only to give the module its names.
    raise RuntimeError("Tool calls are handled by SandboxPool, so this placeholder never runs")


def _build_tools_module(tool_paths: frozenset[str]) -> ExternalModule:
    """Build the ``tools`` module tree (nested modules, placeholder functions) for ``tool_paths``."""
    tree: dict[str, Any] = {}
    for path in sorted(tool_paths):
        parts = path.split(".")
        if not all(part.isidentifier() and not part.startswith("_") for part in parts):
            raise ValueError(
                f"Invalid tool path {path!r}: use dotted Python identifiers without a leading underscore"
            )
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"Tool path {path!r} conflicts with the tool {part!r} of the same name")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise ValueError(f"Tool path {path!r} is also a namespace of other tools")
        node[parts[-1]] = _placeholder_tool

    def to_module(node: dict[str, Any]) -> ExternalModule:
        attrs = {name: to_module(child) if isinstance(child, dict) else child for name, child in node.items()}
        return ExternalModule(attrs)

    return to_module(tree)
