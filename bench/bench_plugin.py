"""The benchmark's tools for executor-tornado, loaded with EXECUTOR_MCP_PLUGINS=bench_plugin:register."""

from __future__ import annotations

import time
from typing import Any

import mcp_types as types

from executor_tornado.mcp.registry import McpRegistry

SCHEMA = {"type": "object", "properties": {}, "additionalProperties": True}


def register(registry: McpRegistry) -> None:
    async def echo(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        return types.CallToolResult(content=[types.TextContent(type="text", text="ok")])

    async def notify(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        # No related_request_id, so the transport routes it to the GET stream.
        await ctx.session.send_log_message("info", {"bench-stamp": True, "stamp": time.monotonic()})
        return types.CallToolResult(content=[types.TextContent(type="text", text="sent")])

    registry.add_tool(types.Tool(name="echo", description="Return ok", input_schema=SCHEMA), echo)
    registry.add_tool(types.Tool(name="notify", description="Send a stamped log notification", input_schema=SCHEMA), notify)
