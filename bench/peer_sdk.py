"""The mcp SDK's own Streamable HTTP server (low-level Server, session manager, uvicorn, one worker).

Usage: python peer_sdk.py PORT {sse,json}
"""

from __future__ import annotations

import sys
import time
from typing import Any

import mcp_types as types
import uvicorn
from mcp.server.lowlevel import Server

SCHEMA = {"type": "object", "properties": {}, "additionalProperties": True}
TOOLS = [
    types.Tool(name="echo", description="Return ok", input_schema=SCHEMA),
    types.Tool(name="notify", description="Send a stamped log notification", input_schema=SCHEMA),
]


async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
    return types.ListToolsResult(tools=TOOLS)


async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
    if params.name == "notify":
        # No related_request_id, so the session manager routes it to the GET stream.
        await ctx.session.send_log_message("info", {"bench-stamp": True, "stamp": time.monotonic()})
        return types.CallToolResult(content=[types.TextContent(type="text", text="sent")])
    return types.CallToolResult(content=[types.TextContent(type="text", text="ok")])


def main() -> None:
    port, mode = int(sys.argv[1]), sys.argv[2]
    server = Server("bench-sdk", on_list_tools=list_tools, on_call_tool=call_tool)
    app = server.streamable_http_app(json_response=(mode == "json"))
    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
