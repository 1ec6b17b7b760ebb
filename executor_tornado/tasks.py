"""The task service behind the ``execute`` tool: runs, approvals and resumption.

Every run of agent code is a :class:`~store.records.Task` in the store. Its
status moves ``queued`` (created, waiting for a sandbox worker) ->
``running`` -> ``completed``, ``failed``, ``timed_out`` or ``denied``. A run
paused on a tool call that needs approval is ``waiting_approval`` until a
decision resumes it (back to ``running``).

Approval of one tool call:

* The mode comes from the workspace's approval policies (``fnmatch``
  patterns over the tool path, such as ``kv.*`` or ``demo.echo``), else from
  the tool's default. When several policies match, an exact path beats any
  pattern, then the pattern with more literal characters wins, then the
  oldest policy. The listing tools (``catalog.*``, ``discover``) are never
  subject to policies.
* ``auto`` runs the tool. ``deny`` never runs it and raises
  ``PermissionError`` inside the sandbox code.
* ``required`` pauses the run: the sandbox snapshot is saved in the task,
  an :class:`~store.records.Approval` (``appr_<hex>``) is created with the
  tool input redacted, and the worker is released. :meth:`TaskService.decide`
  records a decision and :meth:`TaskService.resume_task` continues the run
  from the stored snapshot, in any process and after a restart. Approved,
  the tool runs and the code gets its value. Denied, the code gets a
  ``PermissionError`` at the call.
* A task ends ``denied`` when its code fails from a denial it did not catch
  (policy or person). Code that catches the ``PermissionError`` goes on and
  its task ends by what happens next.

Example::

    service = TaskService(store, pool, catalog)
    task = await service.execute("ws_1", "anon_1", "apikey:anon_1:ws_1", "tools.kv.set(key='a', value=1)")
    if task.status == "waiting_approval":
        await service.decide(task.result["approvalId"], approve=True, decided_by="operator")
        task = await service.resume_task(task.id)
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from executor_tornado.sandbox import PAUSE, RunOutcome, RunStatus, SandboxPool, ToolCall
from executor_tornado.tools import CATALOG_PATHS, ToolCatalog, ToolContext, ToolSpec
from store.records import Approval, ApprovalPolicy, Task

if TYPE_CHECKING:
    from executor_tornado.clock import Clock
    from store.base import Store

__all__ = [
    "DEFAULT_TIMEOUT_MS",
    "MAX_TIMEOUT_MS",
    "ApprovalCallback",
    "ApprovalConflictError",
    "ApprovalNotFoundError",
    "ProgressCallback",
    "TaskError",
    "TaskNotFoundError",
    "TaskService",
    "TaskStatus",
    "new_approval_id",
    "new_task_id",
    "redact_secrets",
    "resolve_approval_mode",
]

tasks_log = logging.getLogger("executor_tornado.tasks")

DEFAULT_TIMEOUT_MS: Final = 300_000
ABANDONED_GRACE_SECONDS: Final = 120.0
"""Slack past a task's time limit before a queued or running task counts as abandoned."""
MAX_TIMEOUT_MS: Final = 600_000
REDACTED: Final = "[redacted]"


class TaskStatus:
    """The values of ``Task.status``."""

    QUEUED: Final = "queued"
    RUNNING: Final = "running"
    WAITING_APPROVAL: Final = "waiting_approval"
    COMPLETED: Final = "completed"
    FAILED: Final = "failed"
    TIMED_OUT: Final = "timed_out"
    DENIED: Final = "denied"

    FINISHED: Final = frozenset({COMPLETED, FAILED, TIMED_OUT, DENIED})


ApprovalAnswer = str | tuple[str, str | None] | None
ApprovalCallback = Callable[[Approval], Awaitable[ApprovalAnswer]]
"""Ask the client for a decision: return ``"approve"`` or ``"deny"`` (optionally as
``(decision, reason)``), or ``None`` when the client cannot respond."""

ProgressCallback = Callable[[float, float | None, str | None], Awaitable[None]]
"""``await progress(done, total, message)``: report progress of a run (``total`` is ``None``: unknown)."""


class TaskError(Exception):
    """A task or approval request cannot be served."""


class TaskNotFoundError(TaskError, LookupError):
    """No task with that id in the caller's workspace."""


class ApprovalNotFoundError(TaskError, LookupError):
    """No approval with that id in the caller's workspace."""


class ApprovalConflictError(TaskError):
    """The approval was already decided."""


def new_task_id() -> str:
    return "task_" + secrets.token_hex(16)


def new_approval_id() -> str:
    return "appr_" + secrets.token_hex(16)


# -- approval policies -------------------------------------------------------------

_WILDCARDS = re.compile(r"[*?\[\]]")


def resolve_approval_mode(policies: list[ApprovalPolicy], path: str, default: str) -> tuple[str, str | None]:
    """Return the approval mode of the tool ``path`` and the pattern that set it.

    ``policies`` are in store order (oldest first). An exact path beats any
    pattern, then the pattern with more literal characters wins, then the
    oldest. Without a match the mode is ``default`` and the pattern ``None``.
    A policy with an unknown mode counts as ``required``.
    """
    best: ApprovalPolicy | None = None
    best_rank = (-1, -1)
    for policy in policies:
        if not fnmatch.fnmatchcase(path, policy.pattern):
            continue
        literal = _WILDCARDS.sub("", policy.pattern)
        rank = (1 if literal == policy.pattern else 0, len(literal))
        if rank > best_rank:
            best, best_rank = policy, rank
    if best is None:
        return default, None
    if best.mode not in ("auto", "required", "deny"):
        tasks_log.warning(
            "Approval policy %r of workspace %s has the unknown mode %r, so it counts as 'required'",
            best.pattern,
            best.workspace_id,
            best.mode,
        )
        return "required", best.pattern
    return best.mode, best.pattern


# -- redaction -----------------------------------------------------------------------

_SECRET_WORDS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "authorization",
    "credential",
    "cookie",
    "apikey",
    "api_key",
    "privatekey",
    "private_key",
    "accesskey",
    "access_key",
    "signature",
)


def _is_secret_name(name: str) -> bool:
    normalized = name.lower().replace("-", "_")
    if normalized in ("auth", "pwd", "pin"):
        return True
    # A bare "key" is a name (as in tools.kv.set(key=...)), so it is shown.
    # "*_key" names such as "stripe_key" or "signing_key" are hidden.
    if normalized.endswith("_key"):
        return True
    return any(word in normalized for word in _SECRET_WORDS)


def redact_secrets(value: Any) -> Any:
    """Return a copy of ``value`` with secret-looking entries replaced by ``"[redacted]"``.

    A dict value is replaced, at any depth, when its key (lower-cased, with
    ``-`` read as ``_``) contains password, passwd, passphrase, secret,
    token, authorization, credential, cookie, api_key, apikey, private_key,
    privatekey, access_key, accesskey or signature, ends in ``_key``, or is
    auth, pwd or pin. Strings starting with ``Bearer `` are replaced too.
    """
    if isinstance(value, Mapping):
        return {
            key: REDACTED if isinstance(key, str) and _is_secret_name(key) else redact_secrets(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_secrets(item) for item in value]
    if isinstance(value, str) and value[:7].lower() == "bearer ":
        return REDACTED
    return value


# -- one segment of a run --------------------------------------------------------------


@dataclass
class _PendingApproval:
    spec: ToolSpec
    arguments: dict[str, Any]
    pattern: str | None


@dataclass
class _Segment:
    """Host state of one run segment: from start or resume to the end or the next pause."""

    service: TaskService
    task: Task
    progress: ProgressCallback | None
    host_calls: int
    resumed_approval: Approval | None = None
    policies: list[ApprovalPolicy] | None = None
    denials: set[str] = field(default_factory=set)
    pending: _PendingApproval | None = None

    async def on_call(self, call: ToolCall) -> Any:
        """Handle one tool call of the sandbox: run the tool, deny the call or pause for approval."""
        self.host_calls += 1
        await self._report(f"Calling tools.{call.path}")
        catalog = self.service.catalog
        # Only the first call of a resumed segment is the paused one.
        decided_approval, self.resumed_approval = self.resumed_approval, None

        spec = catalog.get(call.path)
        if spec is None:
            raise LookupError(f"tools.{call.path} is not installed in this service: see tools.catalog.tools()")
        arguments = catalog.arguments(spec, call.args, call.kwargs)
        catalog.validate(spec, arguments)
        context = ToolContext(
            workspace_id=self.task.workspace_id,
            account_id=self.task.account_id,
            principal=self.task.principal,
            task_id=self.task.id,
            sandbox_pid=call.sandbox_pid,
        )

        if decided_approval is not None:
            return await self._call_decided(decided_approval, spec, arguments, context)

        if spec.path in CATALOG_PATHS:
            return await self._list_catalog(spec, arguments)

        policies = await self._policies()
        mode, pattern = resolve_approval_mode(policies, spec.path, spec.approval)
        if mode == "deny":
            source = f"the workspace approval policy {pattern!r}" if pattern else "the tool's default approval mode"
            raise self._deny(f"Calling tools.{spec.path} is denied by {source}.")
        if mode == "required":
            self.pending = _PendingApproval(spec=spec, arguments=arguments, pattern=pattern)
            await self._report(f"Waiting for approval of tools.{spec.path}")
            return PAUSE
        return await catalog.invoke(spec, arguments, context)

    async def _call_decided(
        self, approval: Approval, spec: ToolSpec, arguments: dict[str, Any], context: ToolContext
    ) -> Any:
        if spec.path != approval.tool_path:
            raise self._deny(
                f"The paused call is tools.{spec.path} but approval {approval.id} is for tools.{approval.tool_path}."
            )
        if approval.status != "approved":
            who = f" by {approval.decided_by}" if approval.decided_by else ""
            why = f": {approval.reason}" if approval.reason else "."
            raise self._deny(f"Calling tools.{spec.path} was denied{who}{why}")
        return await self.service.catalog.invoke(spec, arguments, context)

    async def _list_catalog(self, spec: ToolSpec, arguments: dict[str, Any]) -> Any:
        catalog = self.service.catalog
        if spec.path == "catalog.namespaces":
            return catalog.namespaces()
        policies = await self._policies()

        def approval_for(listed: ToolSpec) -> str:
            if listed.path in CATALOG_PATHS:
                return "auto"
            return resolve_approval_mode(policies, listed.path, listed.approval)[0]

        if spec.path == "catalog.tools":
            return catalog.tools(**arguments, approval_for=approval_for)
        return catalog.discover(**arguments, approval_for=approval_for)

    async def _policies(self) -> list[ApprovalPolicy]:
        if self.policies is None:
            self.policies = await self.service.store.list_approval_policies(self.task.workspace_id)
        return self.policies

    def _deny(self, message: str) -> PermissionError:
        self.denials.add(message)
        return PermissionError(message)

    def failed_from_denial(self, outcome: RunOutcome) -> bool:
        """Tell whether the run failed from a denial raised in this segment and not caught by the code."""
        if outcome.error_type != "PermissionError" or not outcome.error:
            return False
        error = outcome.error.rstrip()
        return any(error.endswith(f"PermissionError: {message}") for message in self.denials)

    async def _report(self, message: str) -> None:
        if self.progress is None:
            return
        try:
            await self.progress(self.host_calls, None, message)
        except Exception:  # noqa: BLE001 - a failing progress sink never fails the run
            tasks_log.warning("Progress callback failed for task %s", self.task.id, exc_info=True)


# -- the service -------------------------------------------------------------------------


class _SystemClock:
    def time(self) -> float:
        return time.time()


class TaskService:
    """Runs agent code as tasks, with approvals that pause and resume runs.

    Methods raise :class:`ValueError` for invalid arguments and
    :class:`TaskError` subclasses for unknown ids or decided approvals.
    Failures of the code, of a limit or of a sandbox worker are recorded in
    the task, not raised. An unexpected error of the pool or a cancellation
    marks the task failed and propagates.
    """

    def __init__(self, store: Store, pool: SandboxPool, catalog: ToolCatalog, *, clock: Clock | None = None) -> None:
        self.store = store
        self.pool = pool
        self.catalog = catalog
        self.clock = clock or _SystemClock()
        self.on_status: Callable[[str], None] | None = None
        """Called with the new status each time a run finishes or pauses (for metrics)."""

    def _report_status(self, status: str) -> None:
        if self.on_status is not None:
            self.on_status(status)

    # -- execute -------------------------------------------------------------------

    async def execute(
        self,
        workspace_id: str,
        account_id: str,
        principal: str,
        code: str,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        *,
        ask_approval: ApprovalCallback | None = None,
        progress: ProgressCallback | None = None,
    ) -> Task:
        """Run ``code`` as a new task of the workspace and return the task as stored.

        The task is finished, or ``waiting_approval`` with
        ``task.result == {"approvalId", "tool", "input", ...}`` when a call
        needs approval that ``ask_approval`` did not give (the callback is
        missing, returned ``None`` or raised). ``timeout_ms`` (1 to 600000)
        is the wall-clock limit of the run, time waiting for approval
        excluded. Raise :class:`ValueError` for empty code or a timeout out
        of range.
        """
        if not isinstance(code, str) or not code.strip():
            raise ValueError("code must be a non-empty string of Python source")
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or not 1 <= timeout_ms <= MAX_TIMEOUT_MS:
            raise ValueError(f"timeout_ms must be an integer from 1 to {MAX_TIMEOUT_MS}, got {timeout_ms!r}")

        task = Task(
            id=new_task_id(),
            workspace_id=workspace_id,
            account_id=account_id,
            principal=principal,
            code=code,
            status=TaskStatus.QUEUED,
            created_at=self.clock.time(),
            timeout_ms=timeout_ms,
        )
        await self.store.insert_task(task)

        async def mark_running() -> None:
            task.started_at = task.claimed_at = self.clock.time()
            task.status = TaskStatus.RUNNING
            await self.store.update_task(
                task.id, status=TaskStatus.RUNNING, started_at=task.started_at, claimed_at=task.claimed_at
            )
            tasks_log.info("Task %s started in workspace %s", task.id, workspace_id)

        segment = _Segment(service=self, task=task, progress=progress, host_calls=0)
        try:
            outcome = await self.pool.run(
                code,
                tool_paths=self.catalog.paths(),
                on_call=segment.on_call,
                timeout_secs=timeout_ms / 1000,
                on_start=mark_running,
            )
        except BaseException as error:
            await self._abandon(task, error)
            raise
        task = await self._record(task, outcome, segment, elapsed_before=0.0, truncated_before=False)
        return await self._ask_until_settled(task, ask_approval, progress)

    # -- approvals ---------------------------------------------------------------------

    async def decide(
        self,
        approval_id: str,
        approve: bool,
        decided_by: str,
        reason: str | None = None,
        *,
        workspace_id: str | None = None,
    ) -> Approval:
        """Approve or deny a pending approval (atomic) and return it as stored.

        The run does not continue until :meth:`resume_task` is called. With
        ``workspace_id`` an approval of another workspace counts as missing.
        Raise :class:`ApprovalNotFoundError` or, when it was already decided,
        :class:`ApprovalConflictError`.
        """
        approval = await self.store.get_approval(approval_id)
        if approval is None or (workspace_id is not None and approval.workspace_id != workspace_id):
            raise ApprovalNotFoundError(f"Approval {approval_id!r} not found")

        status = "approved" if approve else "denied"
        decided = await self.store.decide_approval(
            approval_id, status=status, decided_at=self.clock.time(), decided_by=decided_by, reason=reason
        )
        current = await self.store.get_approval(approval_id)
        if current is None:
            raise ApprovalNotFoundError(f"Approval {approval_id!r} not found")
        if not decided:
            raise ApprovalConflictError(
                f"Approval {approval_id} was already decided: {current.status} by {current.decided_by}"
            )
        tasks_log.info(
            "Approval %s of task %s %s by %s", approval_id, approval.task_id, status, decided_by
        )
        return current

    async def resume_task(
        self,
        task_id: str,
        *,
        workspace_id: str | None = None,
        ask_approval: ApprovalCallback | None = None,
        progress: ProgressCallback | None = None,
    ) -> Task:
        """Continue a task paused for approval once its approval is decided, and return the task.

        A task that is not ``waiting_approval`` (finished, or resumed by
        another caller) is returned unchanged, and so is one whose approval
        is still pending unless ``ask_approval`` decides it. Safe to call
        from several processes at once: one of them resumes the run.
        Raise :class:`TaskNotFoundError` for an unknown task.
        """
        task = await self._get_task(task_id, workspace_id)
        if task.status != TaskStatus.WAITING_APPROVAL:
            return task
        if ask_approval is not None:
            # The settling loop resumes the task itself after each decision.
            return await self._ask_until_settled(task, ask_approval, progress)
        return await self._resume_decided(task, progress)

    async def get_task(self, task_id: str, *, workspace_id: str | None = None) -> Task:
        """Return a task, or raise :class:`TaskNotFoundError` if it is missing or in another workspace."""
        return await self._get_task(task_id, workspace_id)

    async def _get_task(self, task_id: str, workspace_id: str | None) -> Task:
        task = await self.store.get_task(task_id)
        if task is None or (workspace_id is not None and task.workspace_id != workspace_id):
            raise TaskNotFoundError(f"Task {task_id!r} not found")
        if task.status in (TaskStatus.QUEUED, TaskStatus.RUNNING):
            return await self._fail_if_abandoned(task)
        return task

    async def _fail_if_abandoned(self, task: Task) -> Task:
        """Mark failed a queued or running task whose time limit passed long ago.

        No live run outlasts its ``timeout_ms`` from its claim (or, while
        queued, from its creation) by more than :data:`ABANDONED_GRACE_SECONDS`,
        which covers the wait for a worker and the kill of a stuck one. Such
        a task belonged to a process that died; without this it would stay
        queued or running for good.
        """
        since = task.claimed_at if task.claimed_at is not None else task.created_at
        if self.clock.time() < since + task.timeout_ms / 1000 + ABANDONED_GRACE_SECONDS:
            return task
        error = "The process running this task stopped before it finished; run the code again."
        ended = await self.store.update_task(
            task.id, expected_status=task.status, status=TaskStatus.FAILED, error=error,
            finished_at=self.clock.time(), snapshot=None,
        )
        if ended:
            tasks_log.warning("Task %s was %s past its time limit; marked failed", task.id, task.status)
            self._report_status(TaskStatus.FAILED)
        stored = await self.store.get_task(task.id)
        return stored if stored is not None else task

    async def _resume_decided(self, task: Task, progress: ProgressCallback | None) -> Task:
        info = dict(task.result or {})
        approval = await self.store.get_approval(info.get("approvalId", ""))
        if approval is None:
            return await self._finish_without_run(
                task, TaskStatus.FAILED, f"The approval {info.get('approvalId')!r} of this paused task is missing."
            )
        if approval.status == "pending":
            return task
        if task.snapshot is None:
            return await self._finish_without_run(task, TaskStatus.FAILED, "The paused run's snapshot is missing.")
        if not self.pool.running:
            raise RuntimeError("The sandbox pool is not running: call start() first")

        # A process that dies after this claim leaves the task running; the
        # claim time lets _get_task end it once its time limit has passed.
        claimed_at = self.clock.time()
        claimed = await self.store.update_task(
            task.id, expected_status=TaskStatus.WAITING_APPROVAL, status=TaskStatus.RUNNING, claimed_at=claimed_at
        )
        if not claimed:
            return await self._get_task(task.id, None)
        task.status = TaskStatus.RUNNING
        task.claimed_at = claimed_at

        elapsed = float(info.get("elapsedMs", 0)) / 1000
        remaining = task.timeout_ms / 1000 - elapsed
        if remaining <= 0:
            return await self._finish_without_run(
                task, TaskStatus.TIMED_OUT, f"Timed out: the run used its {task.timeout_ms} ms before the pause."
            )
        tasks_log.info("Task %s resumed after approval %s was %s", task.id, approval.id, approval.status)

        # The restored run makes the paused call again, so it is counted again.
        # The segment resolves that call from the decision and runs the tool
        # only when it was approved.
        host_calls = int(info.get("hostCalls", 0)) - 1
        segment = _Segment(
            service=self, task=task, progress=progress, host_calls=host_calls, resumed_approval=approval
        )
        try:
            outcome = await self.pool.resume(
                task.snapshot,
                tool_paths=self.catalog.paths(),
                on_call=segment.on_call,
                timeout_secs=remaining,
                output=task.output,
                host_calls=host_calls,
            )
        except BaseException as error:
            await self._abandon(task, error)
            raise
        return await self._record(
            task, outcome, segment, elapsed_before=elapsed, truncated_before=bool(info.get("outputTruncated"))
        )

    async def _ask_until_settled(
        self, task: Task, ask_approval: ApprovalCallback | None, progress: ProgressCallback | None
    ) -> Task:
        """Ask ``ask_approval`` about each pending approval and resume the task.

        Stop when the task is no longer waiting or the callback gives no decision.
        """
        while task.status == TaskStatus.WAITING_APPROVAL and ask_approval is not None:
            approval = await self.store.get_approval(dict(task.result or {}).get("approvalId", ""))
            if approval is not None and approval.status == "pending":
                decision = await self._ask(ask_approval, approval, task)
                if decision is None:
                    return task
                approve, reason = decision
                try:
                    await self.decide(approval.id, approve, decided_by=task.principal, reason=reason)
                except ApprovalConflictError:
                    tasks_log.info("Approval %s was decided elsewhere while the client was asked", approval.id)
            resumed = await self._resume_decided(task, progress)
            if resumed.status == TaskStatus.WAITING_APPROVAL and resumed.result == task.result:
                return resumed
            task = resumed
        return task

    async def _ask(
        self, ask_approval: ApprovalCallback, approval: Approval, task: Task
    ) -> tuple[bool, str | None] | None:
        try:
            answer = await ask_approval(approval)
        except Exception:  # noqa: BLE001 - a client that fails to answer leaves the approval pending
            tasks_log.warning(
                "Asking the client about approval %s of task %s failed", approval.id, task.id, exc_info=True
            )
            return None
        reason = None
        if isinstance(answer, tuple):
            answer, reason = answer
        if answer in ("approve", "approved"):
            return True, reason
        if answer in ("deny", "denied"):
            return False, reason
        if answer is not None:
            tasks_log.warning(
                "Approval callback returned the invalid decision %r for approval %s, so it stays pending",
                answer,
                approval.id,
            )
        return None

    # -- recording outcomes ---------------------------------------------------------------

    async def _record(
        self, task: Task, outcome: RunOutcome, segment: _Segment, *, elapsed_before: float, truncated_before: bool
    ) -> Task:
        now = self.clock.time()
        elapsed_ms = round((elapsed_before + outcome.duration_secs) * 1000)
        truncated = truncated_before or outcome.output_truncated

        if outcome.status is RunStatus.PAUSED and segment.pending is not None:
            return await self._record_pause(task, outcome, segment.pending, elapsed_ms, truncated)

        output = outcome.output
        if truncated:
            output += f"\n[output truncated at {self.pool.limits.max_output_bytes} bytes]"
        fields: dict[str, Any] = {"finished_at": now, "output": output, "snapshot": None}
        if outcome.status is RunStatus.COMPLETED:
            fields.update(status=TaskStatus.COMPLETED, result=outcome.value, error=None)
        elif outcome.status is RunStatus.TIMED_OUT:
            fields.update(status=TaskStatus.TIMED_OUT, result=None, error=outcome.error)
        elif segment.failed_from_denial(outcome):
            fields.update(status=TaskStatus.DENIED, result=None, error=outcome.error)
        elif outcome.status is RunStatus.PAUSED:
            fields.update(status=TaskStatus.FAILED, result=None, error="The run paused without a pending approval.")
        else:
            fields.update(status=TaskStatus.FAILED, result=None, error=outcome.error)
        if task.started_at is None:
            fields["started_at"] = task.started_at = now

        await self.store.update_task(task.id, **fields)
        self._report_status(fields["status"])
        tasks_log.info(
            "Task %s finished: %s after %d ms and %d tool calls",
            task.id,
            fields["status"],
            elapsed_ms,
            outcome.host_calls,
        )
        return await self._get_task(task.id, None)

    async def _record_pause(
        self, task: Task, outcome: RunOutcome, pending: _PendingApproval, elapsed_ms: int, truncated: bool
    ) -> Task:
        approval = Approval(
            id=new_approval_id(),
            task_id=task.id,
            workspace_id=task.workspace_id,
            principal=task.principal,
            tool_path=pending.spec.path,
            redacted_input=redact_secrets(pending.arguments),
            status="pending",
            created_at=self.clock.time(),
        )
        info = {
            "approvalId": approval.id,
            "tool": pending.spec.path,
            "input": approval.redacted_input,
            "policy": pending.pattern,
            "elapsedMs": elapsed_ms,
            "hostCalls": outcome.host_calls,
            "outputTruncated": truncated,
        }
        # The task is marked waiting before the approval exists, so a decision
        # (which needs the approval) always finds the task ready to resume.
        await self.store.update_task(
            task.id,
            status=TaskStatus.WAITING_APPROVAL,
            snapshot=outcome.snapshot,
            output=outcome.output,
            result=info,
            error=None,
        )
        await self.store.insert_approval(approval)
        self._report_status(TaskStatus.WAITING_APPROVAL)
        tasks_log.info(
            "Task %s is waiting for approval %s of tools.%s", task.id, approval.id, pending.spec.path
        )
        return await self._get_task(task.id, None)

    async def _abandon(self, task: Task, error: BaseException) -> None:
        """Mark a task failed whose run raised instead of returning an outcome (a bug or a shutdown)."""
        if isinstance(error, asyncio.CancelledError):
            message = "The run was cancelled, for example by a service shutdown."
        else:
            message = f"The run stopped because of an internal error ({type(error).__name__})."
        cancelled = isinstance(error, asyncio.CancelledError)
        tasks_log.error("Task %s abandoned: %s", task.id, message, exc_info=not cancelled)
        self._report_status(TaskStatus.FAILED)
        try:
            await self.store.update_task(
                task.id, status=TaskStatus.FAILED, error=message, finished_at=self.clock.time(), snapshot=None
            )
        except Exception:  # noqa: BLE001 - the original error is re-raised by the caller
            tasks_log.exception("Task %s could not be marked failed", task.id)

    async def _finish_without_run(self, task: Task, status: str, error: str) -> Task:
        await self.store.update_task(
            task.id, status=status, error=error, finished_at=self.clock.time(), snapshot=None
        )
        tasks_log.warning("Task %s ended %s without resuming: %s", task.id, status, error)
        self._report_status(status)
        return await self._get_task(task.id, None)
