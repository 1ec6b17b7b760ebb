"""MCP tools that exercise the transport: slow replies, notifications, bulk output.

Loaded by tests with ``mcp_plugins=["transport_plugin:register"]``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import mcp_types as types

from executor_tornado.mcp.registry import McpRegistry


def _text(value: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=value)])


def register(registry: McpRegistry) -> None:
    async def whoami(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        caller = ctx.request
        return _text(f"{caller.principal} {caller.workspace_id} {caller.session_id}")

    async def sleep(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        await asyncio.sleep(float(arguments.get("seconds", 0.2)))
        return _text("slept")

    async def progress(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        steps = int(arguments.get("steps", 3))
        meta = ctx.meta or {}
        token = meta.get("progress_token", meta.get("progressToken"))
        for step in range(steps):
            if token is not None:
                await ctx.session.send_progress_notification(token, step + 1, steps, related_request_id=ctx.request_id)
            else:
                await ctx.session.send_log_message("info", f"step {step + 1}", related_request_id=ctx.request_id)
            await asyncio.sleep(float(arguments.get("pause", 0.0)))
        return _text(f"done {steps}")

    async def flood(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        count = int(arguments.get("count", 100))
        payload = "x" * int(arguments.get("size", 100))
        for index in range(count):
            await ctx.session.send_log_message("info", f"{index} {payload}", related_request_id=ctx.request_id)
        return _text(f"flooded {count}")

    async def announce(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        await ctx.session.send_tool_list_changed()
        return _text("announced")

    schema = {"type": "object", "properties": {}, "additionalProperties": True}
    for name, handler in (
        ("whoami", whoami),
        ("sleep", sleep),
        ("progress", progress),
        ("flood", flood),
        ("announce", announce),
    ):
        registry.add_tool(types.Tool(name=name, description=f"Transport test tool {name}", input_schema=schema), handler)
