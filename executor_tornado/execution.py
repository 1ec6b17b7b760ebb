"""The ``execute`` and ``get_task`` MCP tools over the task service.

:class:`Execution` owns the sandbox pool and the tool catalog for the
lifetime of the service and registers the MCP tools. Approvals reach the
client the way its protocol era allows:

* handshake era, client declared ``elicitation``: an ``elicitation/create``
  form on the request's stream;
* handshake era without it: the call waits (up to
  ``EXECUTOR_APPROVAL_WAIT_SECONDS``) for an operator's decision from
  ``executor-tornado approvals``, then finishes or returns the task as
  ``waiting_approval`` for a later ``get_task``;
* 2026-07-28: an input-required result; the client retries with the
  answer and the echoed ``requestState`` (the approval id).

Example::

    execution = Execution(store, settings, clock)
    await execution.start()
    execution.register(registry)
    ...
    await execution.close()
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import mcp_types as types
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from executor_tornado.clock import Clock
from executor_tornado.mcp.registry import McpRegistry
from executor_tornado.sandbox import SandboxLimits, SandboxPool
from executor_tornado.settings import Settings
from executor_tornado.tasks import (
    DEFAULT_TIMEOUT_MS,
    MAX_TIMEOUT_MS,
    ApprovalConflictError,
    TaskNotFoundError,
    TaskService,
    TaskStatus,
)
from executor_tornado.tools import ToolCatalog, kv_tools, load_plugin_tools
from store.base import Store
from store.records import Approval, Task

__all__ = ["APPROVAL_INPUT_KEY", "Execution", "sandbox_limits"]

log = logging.getLogger("executor_tornado.tasks")

APPROVAL_INPUT_KEY = "approval"
APPROVAL_POLL_SECONDS = 0.5
FAILED_STATUSES = {TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.DENIED}

EXECUTE_DESCRIPTION = (
    "Run Python code in a sandbox and return the value of its last expression. "
    "The code reaches the workspace's tools through the preloaded `tools` module, "
    "called without await: tools.kv.set(key='a', value=1), tools.kv.get(key='a'), "
    "tools.catalog.namespaces(), tools.catalog.tools(namespace=None, query=None, limit=50), "
    "tools.discover(query='...', limit=10). Files, network, environment variables and "
    "processes are not available. Some tools need a human's approval; a denied call "
    "raises PermissionError inside the code."
)

EXECUTE_INPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "minLength": 1, "description": "Python source to run"},
        "timeoutMs": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_TIMEOUT_MS,
            "default": DEFAULT_TIMEOUT_MS,
            "description": "Wall-clock limit of the run in milliseconds, time waiting for approval excluded",
        },
    },
    "required": ["code"],
    "additionalProperties": False,
}

TASK_OUTPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "taskId": {"type": "string"},
        "status": {"type": "string"},
        "result": {},
        "error": {"type": ["string", "null"]},
        "output": {"type": "string"},
        "workspaceId": {"type": "string"},
        "accountId": {"type": "string"},
    },
    "required": ["taskId", "status", "workspaceId", "accountId"],
}

APPROVAL_FORM = {
    "type": "object",
    "properties": {
        "decision": {
            "type": "string",
            "title": "Decision",
            "enum": ["approve", "deny"],
            "description": "Approve runs the tool call; deny raises PermissionError in the code",
        },
        "reason": {"type": "string", "title": "Reason", "description": "Optional note kept with the decision"},
    },
    "required": ["decision"],
}


def sandbox_limits(settings: Settings) -> SandboxLimits:
    return SandboxLimits(
        workers=settings.sandbox_workers,
        max_duration_secs=settings.sandbox_max_duration_seconds,
        max_memory_bytes=settings.sandbox_max_memory_bytes,
        max_recursion_depth=settings.sandbox_max_recursion_depth,
        max_host_calls=settings.sandbox_max_host_calls,
        max_output_bytes=settings.sandbox_max_output_bytes,
        max_result_bytes=settings.sandbox_max_result_bytes,
    )


def approval_message(approval: Approval) -> str:
    arguments = json.dumps(approval.redacted_input, sort_keys=True)[:2000]
    return f"Approve the call to {approval.tool_path} with {arguments}?"


def render_task(task: Task) -> types.CallToolResult:
    """Build the tool result of a task: a one-line summary and the task as structured content."""
    structured: dict[str, Any] = {
        "taskId": task.id,
        "status": task.status,
        "result": task.result,
        "error": task.error,
        "output": task.output,
        "workspaceId": task.workspace_id,
        "accountId": task.account_id,
    }
    if task.status == TaskStatus.COMPLETED:
        summary = f"Task {task.id} completed: {json.dumps(task.result)[:4000]}"
    elif task.status == TaskStatus.WAITING_APPROVAL:
        info = task.result if isinstance(task.result, dict) else {}
        approval_id = info.get("approvalId")
        summary = (
            f"Task {task.id} is waiting for approval {approval_id} of {info.get('tool')}. "
            f"An operator can run `executor-tornado approvals approve {approval_id}`; "
            f"then call get_task with taskId {task.id}."
        )
    else:
        summary = f"Task {task.id} {task.status}: {task.error}"
    if task.output:
        summary += f"\nOutput:\n{task.output[:4000]}"
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=summary)],
        structured_content=structured,
        is_error=task.status in FAILED_STATUSES,
    )


def _tool_error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


class Execution:
    """The sandbox pool, the catalog and the task service, with their MCP tools."""

    def __init__(self, store: Store, settings: Settings, clock: Clock) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.pool = SandboxPool(sandbox_limits(settings))
        self.catalog = ToolCatalog([*kv_tools(store, clock), *load_plugin_tools()])
        self.tasks = TaskService(store, self.pool, self.catalog, clock=clock)

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()

    def register(self, registry: McpRegistry) -> None:
        registry.add_tool(
            types.Tool(
                name="execute",
                title="Run Python in the sandbox",
                description=EXECUTE_DESCRIPTION,
                input_schema=EXECUTE_INPUT_SCHEMA,
                output_schema=TASK_OUTPUT_SCHEMA,
            ),
            self._execute,
        )
        registry.add_tool(
            types.Tool(
                name="get_task",
                title="Get a task",
                description="Return a task of this workspace by id; a task whose approval was decided is resumed first.",
                input_schema={
                    "type": "object",
                    "properties": {"taskId": {"type": "string", "minLength": 1}},
                    "required": ["taskId"],
                    "additionalProperties": False,
                },
                output_schema=TASK_OUTPUT_SCHEMA,
            ),
            self._get_task,
        )

    # -- tools -------------------------------------------------------------------------

    async def _execute(self, ctx: Any, arguments: dict[str, Any]) -> Any:
        caller = ctx.request
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        params = ctx.params or {}
        if modern and params.get("requestState"):
            return await self._answer_input(ctx, params)

        code = arguments.get("code")
        timeout_ms = arguments.get("timeoutMs", DEFAULT_TIMEOUT_MS)
        try:
            task = await self.tasks.execute(
                caller.workspace_id,
                caller.account_id,
                caller.principal,
                code,
                timeout_ms,
                ask_approval=None if modern else self._elicitation_asker(ctx),
                progress=self._progress_reporter(ctx),
            )
        except ValueError as exc:
            return _tool_error(f"Invalid input: {exc}")
        return await self._settle(ctx, task)

    async def _get_task(self, ctx: Any, arguments: dict[str, Any]) -> Any:
        caller = ctx.request
        try:
            task = await self.tasks.resume_task(
                str(arguments.get("taskId", "")),
                workspace_id=caller.workspace_id,
                progress=self._progress_reporter(ctx),
            )
        except TaskNotFoundError as exc:
            return _tool_error(str(exc))
        return render_task(task)

    async def _settle(self, ctx: Any, task: Task) -> Any:
        """Finish the call for a task that may be waiting for approval."""
        if task.status != TaskStatus.WAITING_APPROVAL:
            return render_task(task)
        approval_id = (task.result or {}).get("approvalId")
        approval = await self.store.get_approval(approval_id) if approval_id else None
        if approval is None:
            return render_task(task)
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return types.InputRequiredResult(
                input_requests={
                    APPROVAL_INPUT_KEY: types.ElicitRequest(
                        params=types.ElicitRequestFormParams(
                            message=approval_message(approval), requested_schema=APPROVAL_FORM
                        )
                    )
                },
                request_state=approval.id,
            )
        return await self._wait_for_operator(ctx, task, approval)

    async def _wait_for_operator(self, ctx: Any, task: Task, approval: Approval) -> types.CallToolResult:
        """Hold the call open while an operator decides, polling the store (any process may decide)."""
        deadline = self.clock.time() + self.settings.approval_wait_seconds
        log.info("Task %s waits for an operator to decide approval %s", task.id, approval.id)
        while self.clock.time() < deadline:
            current = await self.store.get_approval(approval.id)
            if current is None or current.status != "pending":
                break
            await asyncio.sleep(APPROVAL_POLL_SECONDS)
        for _ in range(int(60 / APPROVAL_POLL_SECONDS)):
            task = await self.tasks.resume_task(task.id, progress=self._progress_reporter(ctx))
            if task.status != TaskStatus.RUNNING:
                break
            # Another process claimed the resumed run; wait for it to record the outcome.
            await asyncio.sleep(APPROVAL_POLL_SECONDS)
        return render_task(task)

    async def _answer_input(self, ctx: Any, params: dict[str, Any]) -> Any:
        """Apply a 2026-07-28 client's response to an approval request and continue the task."""
        caller = ctx.request
        approval = await self.store.get_approval(str(params["requestState"]))
        if approval is None or approval.principal != caller.principal or approval.workspace_id != caller.workspace_id:
            return _tool_error("Unknown requestState: retry the original call without it")
        answer = (params.get("inputResponses") or {}).get(APPROVAL_INPUT_KEY)
        decision = _decision_from_elicit_result(answer)
        if decision is not None and approval.status == "pending":
            approve, reason = decision
            try:
                await self.tasks.decide(approval.id, approve, decided_by=caller.principal, reason=reason)
            except ApprovalConflictError:
                log.info("Approval %s was decided elsewhere before the client's response", approval.id)
        task = await self.tasks.resume_task(
            approval.task_id, workspace_id=caller.workspace_id, progress=self._progress_reporter(ctx)
        )
        return await self._settle(ctx, task)

    # -- callbacks -----------------------------------------------------------------------

    def _elicitation_asker(self, ctx: Any):
        capabilities = getattr(ctx.session, "client_capabilities", None)
        if capabilities is None or capabilities.elicitation is None:
            return None

        async def ask(approval: Approval) -> Any:
            result = await ctx.session.elicit_form(
                approval_message(approval), APPROVAL_FORM, related_request_id=ctx.request_id
            )
            return _decision_answer(result.model_dump(mode="json", by_alias=True))

        return ask

    def _progress_reporter(self, ctx: Any):
        meta = ctx.meta or {}
        token = meta.get("progress_token", meta.get("progressToken"))
        if token is None:
            return None
        counter = {"done": 0}

        async def report(done: float, total: float | None, message: str | None) -> None:
            counter["done"] = max(counter["done"], done)
            await ctx.session.send_progress_notification(
                token, counter["done"], total, message, related_request_id=ctx.request_id
            )

        return report


def _decision_from_elicit_result(answer: Any) -> tuple[bool, str | None] | None:
    decided = _decision_answer(answer)
    if decided is None:
        return None
    decision, reason = decided
    return decision == "approve", reason


def _decision_answer(answer: Any) -> tuple[str, str | None] | None:
    """Map an elicitation result to ``("approve"|"deny", reason)``; ``None`` leaves the approval pending."""
    if not isinstance(answer, dict):
        return None
    action = answer.get("action")
    if action == "decline":
        return "deny", "declined by the client"
    if action != "accept":
        return None
    content = answer.get("content") or {}
    decision = content.get("decision")
    reason = content.get("reason") if isinstance(content.get("reason"), str) else None
    if decision in ("approve", "deny"):
        return decision, reason
    return None
