"""The official TypeScript SDK client (npm, run by the Node.js of tests/conformance) against the service."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from conftest import anonymous_key, running

NODE_DIR = Path(__file__).resolve().parent / "conformance"
NODE = NODE_DIR / "node_modules" / ".bin" / "node"
SCRIPT = NODE_DIR / "ts_client.mjs"


async def test_typescript_sdk_client_session(data_dir: Path) -> None:
    assert NODE.exists(), f"Node.js 22 is missing: run `npm ci --prefix {NODE_DIR}`"
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        process = await asyncio.create_subprocess_exec(
            str(NODE), str(SCRIPT), bootstrap["mcpUrl"], bootstrap["apiKey"],
            cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, err.decode()[-2000:]
        seen = json.loads(out.decode().strip().splitlines()[-1])

        assert "execute" in seen["tools"]
        assert seen["structuredContent"]["result"] == 42
        assert seen["structuredContent"]["status"] == "completed"
        assert seen["protocolVersion"] == "2025-11-25"
        record = await service.store.get_mcp_session(seen["sessionId"])
        assert record is not None
        assert record.state == "closed", "the client's DELETE closed the session"
        assert record.client_info["name"] == "executor-tornado-ts-test"
