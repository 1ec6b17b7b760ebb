"""The MCP conformance suite (``@modelcontextprotocol/conformance``, server mode) against the real service.

The suite's CLI runs as a subprocess against a real service that loads the
reference tools of tests/conformance_plugin.py. The CLI cannot send an API
key, so it talks to the loopback proxy of tests/conformance_proxy.py, which
adds ``X-API-Key`` and forwards everything else unchanged.

The CLI and the Node.js 22 it needs are installed from
tests/conformance/package-lock.json with ``npm ci --prefix tests/conformance``.
Scenarios that cannot pass are listed, each with its reason, in
tests/conformance/expected-failures.yml. The CLI also fails a run when a
listed scenario passes, so the list stays exact.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from conformance_proxy import ApiKeyProxy
from conftest import anonymous_key, running

CONFORMANCE_DIR = Path(__file__).resolve().parent / "conformance"
NODE_BIN_DIR = CONFORMANCE_DIR / "node_modules" / ".bin"
CONFORMANCE_CLI = NODE_BIN_DIR / "conformance"
EXPECTED_FAILURES = CONFORMANCE_DIR / "expected-failures.yml"
INSTALL_COMMAND = "npm ci --prefix tests/conformance"

PLUGIN = "conformance_plugin:register"
SUITE_TIMEOUT_SECONDS = 240.0
# One run of the active suite here sent 124 MCP requests in about two
# seconds, from one address and one user agent. That is just inside the
# default bucket (120 tokens, refilled at 2 per second), so a higher limit
# keeps the run off that edge.
MCP_RATE_PER_MINUTE = 100_000

SUMMARY_MARKER = "=== SUMMARY ==="
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# The CLI names each result folder server-<scenario>-<ISO timestamp>.
RESULT_FOLDER = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$")


@dataclass
class SuiteRun:
    returncode: int
    output: str


async def run_suite(url: str, results_dir: Path) -> SuiteRun:
    """Run the active server suite against ``url`` and return the CLI's exit status and output."""
    command = [
        str(CONFORMANCE_CLI),
        "server",
        "--url",
        url,
        "--suite",
        "active",
        "--expected-failures",
        str(EXPECTED_FAILURES),
        "-o",
        str(results_dir),
    ]
    env = dict(os.environ)
    # The CLI's `#!/usr/bin/env node` must find the pinned Node.js 22.
    env["PATH"] = f"{NODE_BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    # Keep the CLI's loopback traffic direct even where the environment names an HTTP proxy.
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=CONFORMANCE_DIR,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), timeout=SUITE_TIMEOUT_SECONDS)
    except asyncio.TimeoutError:
        process.kill()
        stdout, _ = await process.communicate()
        output = ANSI_ESCAPE.sub("", stdout.decode(errors="replace"))
        pytest.fail(f"The conformance CLI timed out after {SUITE_TIMEOUT_SECONDS:.0f} s; its output:\n{output}")
    assert process.returncode is not None
    return SuiteRun(returncode=process.returncode, output=ANSI_ESCAPE.sub("", stdout.decode(errors="replace")))


def summary(output: str) -> str:
    """Return the CLI's summary section (per-scenario results and the baseline verdict), or all output without one."""
    start = output.find(SUMMARY_MARKER)
    return output[start:] if start >= 0 else output


def failed_checks(results_dir: Path) -> list[str]:
    """List the FAILURE and WARNING checks of every scenario the CLI wrote under ``results_dir``."""
    lines = []
    for checks_file in sorted(results_dir.rglob("checks.json")):
        folder = RESULT_FOLDER.match(checks_file.parent.name)
        scenario = folder.group("scenario") if folder else checks_file.parent.name
        for check in json.loads(checks_file.read_text()):
            if check.get("status") in ("FAILURE", "WARNING"):
                message = check.get("errorMessage") or check.get("description", "")
                lines.append(f"{scenario}: {check['status']} {check.get('id')}: {message}")
    return lines


@pytest.mark.timeout(seconds=SUITE_TIMEOUT_SECONDS + 60)
@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")
async def test_conformance_active_suite(data_dir: Path, tmp_path: Path) -> None:
    assert CONFORMANCE_CLI.exists(), (
        f"The MCP conformance CLI is missing at {CONFORMANCE_CLI}: run `{INSTALL_COMMAND}` from the repository root"
    )
    results_dir = tmp_path / "conformance-results"

    # The proxy's port must be known first: the suite sends Host 127.0.0.1:<proxy port>,
    # which the service's DNS-rebinding check accepts only as a configured allowed host.
    async with ApiKeyProxy() as proxy, running(
        data_dir,
        mcp_plugins=[PLUGIN],
        allowed_hosts=[f"127.0.0.1:{proxy.port}"],
        mcp_rate_per_minute=MCP_RATE_PER_MINUTE,
    ) as service:
        bootstrap = await anonymous_key(service)
        assert service.port is not None
        proxy.start(upstream_port=service.port, api_key=bootstrap["apiKey"])
        url = f"{proxy.base_url}/v1/mcp/anonymous?workspaceId={bootstrap['workspaceId']}"
        suite = await run_suite(url, results_dir)

    problems = "\n".join(failed_checks(results_dir)) or "(no failing checks were written)"
    assert suite.returncode == 0, (
        f"The conformance suite exited with {suite.returncode}.\n"
        f"Failing and warning checks:\n{problems}\n\nCLI summary:\n{summary(suite.output)}"
    )
