"""Operator commands for approvals, approval policies and tasks.

``approvals approve`` and ``approvals deny`` record the decision and then
resume the paused run in this process (a sandbox pool is started for it),
so a task completes even when no client is waiting. A service process that
keeps the client's call open reads the outcome from the store.

Example::

    executor-tornado approvals list --status pending
    executor-tornado approvals approve appr_0123... --reason "checked the recipient"
    executor-tornado policies set ws_123 'demo.*' required
    executor-tornado tasks show task_0123...
"""

from __future__ import annotations

import argparse
from typing import Any

from executor_tornado.cli_admin import AdminError, as_json, load_settings, run_command, with_store
from executor_tornado.clock import SystemClock
from store import Store
from store.records import ApprovalPolicy

__all__ = ["add_commands"]

POLICY_MODES = ("auto", "required", "deny")


def add_commands(subparsers: Any) -> None:
    """Add ``approvals``, ``policies`` and ``tasks`` to the ``executor-tornado`` parser."""
    approvals = subparsers.add_parser("approvals", help="list and decide tool calls waiting for approval")
    approval_commands = approvals.add_subparsers(dest="approvals_command", required=True)
    listing = approval_commands.add_parser("list", help="print approvals as JSON, oldest first")
    listing.add_argument("--status", choices=("pending", "approved", "denied"), help="only approvals in this state")
    listing.add_argument("--workspace", help="only approvals of this workspace id")
    listing.set_defaults(func=_cmd_approvals_list)
    for verb in ("approve", "deny"):
        command = approval_commands.add_parser(verb, help=f"{verb} a pending approval and resume its task")
        command.add_argument("approval_id", metavar="ID", help="approval id (appr_...)")
        command.add_argument("--reason", help="note stored with the decision")
        command.add_argument("--by", default="operator", help="who decided (default: operator)")
        command.set_defaults(func=_cmd_decide, approve=verb == "approve")

    policies = subparsers.add_parser("policies", help="manage per-workspace approval policies")
    policy_commands = policies.add_subparsers(dest="policies_command", required=True)
    policy_set = policy_commands.add_parser("set", help="map a tool path pattern (fnmatch syntax) to a mode")
    policy_set.add_argument("workspace_id", metavar="WORKSPACE")
    policy_set.add_argument("pattern", metavar="PATTERN", help="tool path or pattern, such as demo.send or 'demo.*'")
    policy_set.add_argument("mode", choices=POLICY_MODES)
    policy_set.set_defaults(func=_cmd_policy_set)
    policy_list = policy_commands.add_parser("list", help="print a workspace's policies as JSON")
    policy_list.add_argument("workspace_id", metavar="WORKSPACE")
    policy_list.set_defaults(func=_cmd_policy_list)
    policy_delete = policy_commands.add_parser("delete", help="remove a policy")
    policy_delete.add_argument("workspace_id", metavar="WORKSPACE")
    policy_delete.add_argument("pattern", metavar="PATTERN")
    policy_delete.set_defaults(func=_cmd_policy_delete)

    tasks = subparsers.add_parser("tasks", help="inspect execute tasks")
    task_commands = tasks.add_subparsers(dest="tasks_command", required=True)
    task_show = task_commands.add_parser("show", help="print a task (without its sandbox snapshot) as JSON")
    task_show.add_argument("task_id", metavar="ID")
    task_show.set_defaults(func=_cmd_task_show)
    task_list = task_commands.add_parser("list", help="print a workspace's latest tasks as JSON")
    task_list.add_argument("workspace_id", metavar="WORKSPACE")
    task_list.add_argument("--status", help="only tasks in this status")
    task_list.add_argument("--limit", type=int, default=20, help="number of tasks (default 20)")
    task_list.set_defaults(func=_cmd_task_list)


def _task_json(task: Any) -> dict[str, Any] | None:
    data = as_json(task)
    if data is not None:
        data.pop("snapshot", None)
    return data


def _cmd_approvals_list(args: argparse.Namespace) -> int:
    async def listing(store: Store) -> list[dict[str, Any]]:
        approvals = await store.list_approvals(status=args.status, workspace_id=args.workspace)
        return [as_json(approval) for approval in approvals]

    return run_command(lambda: with_store(listing))


def _cmd_decide(args: argparse.Namespace) -> int:
    from executor_tornado.execution import Execution
    from executor_tornado.tasks import ApprovalConflictError, ApprovalNotFoundError

    async def decide(store: Store) -> dict[str, Any]:
        execution = Execution(store, load_settings(), SystemClock())
        try:
            approval = await execution.tasks.decide(args.approval_id, args.approve, args.by, args.reason)
        except (ApprovalNotFoundError, ApprovalConflictError) as exc:
            raise AdminError(str(exc)) from None
        await execution.start()
        try:
            task = await execution.tasks.resume_task(approval.task_id)
        finally:
            await execution.close()
        return {"approval": as_json(approval), "task": _task_json(task)}

    return run_command(lambda: with_store(decide))


def _cmd_policy_set(args: argparse.Namespace) -> int:
    async def put(store: Store) -> list[dict[str, Any]]:
        if await store.get_workspace(args.workspace_id) is None:
            raise AdminError(f"Workspace {args.workspace_id!r} not found")
        await store.put_approval_policy(
            ApprovalPolicy(
                workspace_id=args.workspace_id, pattern=args.pattern, mode=args.mode, created_at=SystemClock().time()
            )
        )
        return [as_json(policy) for policy in await store.list_approval_policies(args.workspace_id)]

    return run_command(lambda: with_store(put))


def _cmd_policy_list(args: argparse.Namespace) -> int:
    async def listing(store: Store) -> list[dict[str, Any]]:
        return [as_json(policy) for policy in await store.list_approval_policies(args.workspace_id)]

    return run_command(lambda: with_store(listing))


def _cmd_policy_delete(args: argparse.Namespace) -> int:
    async def delete(store: Store) -> dict[str, Any]:
        if not await store.delete_approval_policy(args.workspace_id, args.pattern):
            raise AdminError(f"No policy {args.pattern!r} in workspace {args.workspace_id!r}")
        return {"deleted": {"workspaceId": args.workspace_id, "pattern": args.pattern}}

    return run_command(lambda: with_store(delete))


def _cmd_task_show(args: argparse.Namespace) -> int:
    async def show(store: Store) -> dict[str, Any] | None:
        task = await store.get_task(args.task_id)
        if task is None:
            raise AdminError(f"Task {args.task_id!r} not found")
        return _task_json(task)

    return run_command(lambda: with_store(show))


def _cmd_task_list(args: argparse.Namespace) -> int:
    async def listing(store: Store) -> list[dict[str, Any] | None]:
        tasks = await store.list_tasks(args.workspace_id, status=args.status, limit=args.limit)
        return [_task_json(task) for task in tasks]

    return run_command(lambda: with_store(listing))
