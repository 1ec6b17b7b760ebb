"""FastMCP's HTTP server (Streamable HTTP on uvicorn, one worker), run from bench/.venv-fastmcp.

Usage: python peer_fastmcp.py PORT {sse,json}
"""

from __future__ import annotations

import sys
import time

import uvicorn
from fastmcp import Context, FastMCP

mcp = FastMCP("bench-fastmcp")


@mcp.tool
def echo() -> str:
    """Return ok."""
    return "ok"


@mcp.tool
async def notify(ctx: Context) -> str:
    """Send a stamped log notification."""
    # The SDK session underneath FastMCP; no related_request_id routes it to the GET stream.
    await ctx.session.send_log_message("info", {"bench-stamp": True, "stamp": time.monotonic()})
    return "sent"


def main() -> None:
    port, mode = int(sys.argv[1]), sys.argv[2]
    app = mcp.http_app(path="/mcp", json_response=(mode == "json"))
    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
