"""Operator commands and the seed script against a real service and its SQLite store.

The service runs in-process on a loopback port; every command runs as a
child process with the operator's environment (the service's data
directory and public URL), as an operator or a cron job would run it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import MCP_HEADERS, fetch, initialize_body, running
from service_process import REPOSITORY, service_env

SEED_SCRIPT = REPOSITORY / "scripts" / "seed.py"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def run(argv: list[str], env: dict[str, str]) -> Result:
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=REPOSITORY, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    return Result(process.returncode, stdout.decode(), stderr.decode())


async def cli(env: dict[str, str], *args: str) -> Result:
    return await run([sys.executable, "-m", "executor_tornado.cli", *args], env)


async def seed(env: dict[str, str], path: Path) -> Result:
    return await run([sys.executable, str(SEED_SCRIPT), str(path)], env)


def operator_env(service: Any, data_dir: Path) -> dict[str, str]:
    return service_env(data_dir, EXECUTOR_PUBLIC_URL=service.base_url)


async def mcp_status(service: Any, workspace_id: str, api_key: str) -> int:
    response = await fetch(
        service,
        f"/v1/mcp/anonymous?workspaceId={workspace_id}",
        method="POST",
        body=initialize_body(),
        headers={**MCP_HEADERS, "X-API-Key": api_key},
    )
    return response.code


async def store_snapshot(env: dict[str, str]) -> dict[str, Any]:
    snapshot = {}
    for name, args in (
        ("accounts", ("account", "list")),
        ("workspaces", ("workspace", "list")),
        ("keys", ("keys", "list", "--all")),
    ):
        result = await cli(env, *args)
        assert result.returncode == 0, result.stderr
        snapshot[name] = result.json()
    return snapshot


SEED = {
    "accounts": [{"id": "acct_ci", "name": "CI pipeline"}, {"id": "acct_bot", "name": "Bot", "email": "bot@example.com"}],
    "workspaces": [{"id": "ws_ci", "name": "CI", "owner": "acct_ci"}, {"id": "ws_bot", "name": "Bot", "owner": "acct_bot"}],
    "keys": [
        {"account": "acct_ci", "workspace": "ws_ci", "label": "deploy", "output": "KEYDIR/deploy.key"},
        {"account": "acct_bot", "workspace": "ws_bot", "label": "bot", "ttl_seconds": 3600},
    ],
}


def write_seed(tmp_path: Path, seed_data: dict[str, Any], name: str = "seed.json") -> Path:
    text = json.dumps(seed_data).replace("KEYDIR", str(tmp_path / "keys"))
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(text)
    else:
        import yaml

        path.write_text(yaml.safe_dump(json.loads(text)))
    return path


async def test_seed_twice_leaves_same_records(tmp_path: Path, data_dir: Path) -> None:
    async with running(data_dir) as service:
        env = operator_env(service, data_dir)
        path = write_seed(tmp_path, SEED)

        first = await seed(env, path)
        assert first.returncode == 0, first.stderr
        report = first.json()
        records = [entry.split(" (")[0] for entry in report["created"]]
        assert sorted(records) == sorted(
            ["account:acct_ci", "account:acct_bot", "workspace:ws_ci", "workspace:ws_bot",
             "key:acct_ci/ws_ci/deploy", "key:acct_bot/ws_bot/bot"]
        )
        assert len(report["created"]) == 6
        assert report["updated"] == []
        assert report["unchanged"] == []
        after_first = await store_snapshot(env)

        second = await seed(env, path)
        assert second.returncode == 0, second.stderr
        again = second.json()
        assert again["created"] == []
        assert again["updated"] == []
        assert again["new_keys"] == []
        assert sorted(again["unchanged"]) == sorted(
            ["account:acct_ci", "account:acct_bot", "workspace:ws_ci", "workspace:ws_bot",
             "key:acct_ci/ws_ci/deploy", "key:acct_bot/ws_bot/bot"]
        )
        assert await store_snapshot(env) == after_first

        # The same seed as YAML is the same state, so it changes nothing either.
        third = await seed(env, write_seed(tmp_path, SEED, "seed.yaml"))
        assert third.returncode == 0, third.stderr
        assert third.json()["created"] == []
        assert await store_snapshot(env) == after_first

        key_file = tmp_path / "keys" / "deploy.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        deploy_key = key_file.read_text().strip()
        assert deploy_key not in first.stdout, "a key written to a file is not printed"
        assert await mcp_status(service, "ws_ci", deploy_key) == 200

        (printed,) = [k for k in report["new_keys"] if "apiKey" in k]
        assert await mcp_status(service, "ws_bot", printed["apiKey"]) == 200
        assert await mcp_status(service, "ws_ci", printed["apiKey"]) == 403, "a key works only for its workspace"


async def test_seed_revoked_entry_revokes_key(tmp_path: Path, data_dir: Path) -> None:
    async with running(data_dir) as service:
        env = operator_env(service, data_dir)
        created = await seed(env, write_seed(tmp_path, SEED))
        assert created.returncode == 0, created.stderr
        deploy_key = (tmp_path / "keys" / "deploy.key").read_text().strip()
        assert await mcp_status(service, "ws_ci", deploy_key) == 200

        revoking = json.loads(json.dumps(SEED))
        revoking["keys"][0]["revoked"] = True
        revoked = await seed(env, write_seed(tmp_path, revoking))
        assert revoked.returncode == 0, revoked.stderr
        assert len(revoked.json()["revoked"]) == 1
        assert await mcp_status(service, "ws_ci", deploy_key) == 401

        repeated = await seed(env, write_seed(tmp_path, revoking))
        assert repeated.json()["revoked"] == []


async def test_seed_unknown_reference_changes_nothing(tmp_path: Path, data_dir: Path) -> None:
    async with running(data_dir) as service:
        env = operator_env(service, data_dir)
        before = await store_snapshot(env)
        broken = json.loads(json.dumps(SEED))
        broken["keys"].append({"account": "acct_ci", "workspace": "ws_missing", "label": "x"})

        result = await seed(env, write_seed(tmp_path, broken))

        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.strip() == (
            "executor-tornado: keys: 'x' names workspace 'ws_missing', which is neither in the seed file nor in the store"
        )
        assert await store_snapshot(env) == before


async def test_seed_invalid_file_is_one_line_error(tmp_path: Path, data_dir: Path) -> None:
    async with running(data_dir) as service:
        env = operator_env(service, data_dir)
        cases = {
            "unknown-field.json": ({"accounts": [{"id": "a", "colour": "red"}]}, "unknown field 'colour'"),
            "bad-ttl.json": (
                {"keys": [{"account": "a", "workspace": "w", "label": "l", "ttl_seconds": -5}]},
                "ttl_seconds -5",
            ),
            "twice.json": ({"accounts": [{"id": "a"}, {"id": "a"}]}, "appears twice"),
        }
        for name, (content, expected) in cases.items():
            path = tmp_path / name
            path.write_text(json.dumps(content))
            result = await seed(env, path)
            assert result.returncode == 1, name
            assert expected in result.stderr, (name, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)

        (tmp_path / "broken.yaml").write_text("accounts: [unclosed")
        result = await seed(env, tmp_path / "broken.yaml")
        assert result.returncode == 1
        assert "is not valid YAML" in result.stderr


async def test_keys_create_list_revoke(tmp_path: Path, data_dir: Path) -> None:
    async with running(data_dir) as service:
        env = operator_env(service, data_dir)
        account = await cli(env, "account", "create", "--id", "acct_ops", "--name", "Ops")
        assert account.returncode == 0, account.stderr
        assert account.json()["kind"] == "anonymous"
        workspace = await cli(env, "workspace", "create", "--id", "ws_ops", "--name", "Ops", "--owner", "acct_ops")
        assert workspace.returncode == 0, workspace.stderr

        created = await cli(env, "keys", "create", "--account", "acct_ops", "--workspace", "ws_ops", "--label", "laptop", "--json")
        assert created.returncode == 0, created.stderr
        body = created.json()
        api_key = body["apiKey"]
        mcp_url = f"{service.base_url}/v1/mcp/anonymous?workspaceId=ws_ops"
        assert body["mcpUrl"] == mcp_url
        assert body["clients"]["cursor"] == {"mcpServers": {"executor": {"url": mcp_url, "headers": {"X-API-Key": api_key}}}}
        desktop = body["clients"]["claudeDesktop"]["mcpServers"]["executor"]
        assert desktop["args"] == ["-y", "mcp-remote", mcp_url, "--header", "X-API-Key:${EXECUTOR_API_KEY}"]
        assert desktop["env"] == {"EXECUTOR_API_KEY": api_key}
        assert f"--header 'X-API-Key: {api_key}'" in body["clients"]["inspector"]
        assert await mcp_status(service, "ws_ops", api_key) == 200

        listed = await cli(env, "keys", "list", "--workspace", "ws_ops")
        assert listed.returncode == 0
        (record,) = listed.json()
        assert record["jti"] == body["jti"]
        assert record["label"] == "laptop"
        assert api_key not in listed.stdout

        revoked = await cli(env, "keys", "revoke", body["jti"])
        assert revoked.returncode == 0, revoked.stderr
        assert revoked.json()["revoked_at"] is not None
        assert await mcp_status(service, "ws_ops", api_key) == 401
        assert (await cli(env, "keys", "list", "--workspace", "ws_ops")).json() == []
        assert len((await cli(env, "keys", "list", "--all", "--workspace", "ws_ops")).json()) == 1

        again = await cli(env, "keys", "revoke", body["jti"])
        assert again.returncode == 0, "revoking twice is harmless"
        unknown = await cli(env, "keys", "revoke", "0" * 32)
        assert unknown.returncode == 1
        assert unknown.stderr.startswith(f"executor-tornado: API key '{'0' * 32}' not found")


async def test_keys_create_text_shows_key_once_with_snippets(data_dir: Path) -> None:
    async with running(data_dir) as service:
        env = operator_env(service, data_dir)
        assert (await cli(env, "account", "create", "--id", "acct_t")).returncode == 0
        assert (await cli(env, "workspace", "create", "--id", "ws_t", "--name", "T")).returncode == 0

        created = await cli(env, "keys", "create", "--account", "acct_t", "--workspace", "ws_t")

        assert created.returncode == 0, created.stderr
        lines = created.stdout.splitlines()
        key = lines[2].strip()
        assert await mcp_status(service, "ws_t", key) == 200
        assert "Claude Desktop (claude_desktop_config.json; needs Node.js for mcp-remote):" in lines
        assert "Cursor (~/.cursor/mcp.json or .cursor/mcp.json):" in lines
        assert any(line.startswith("  npx @modelcontextprotocol/inspector --cli") for line in lines)


async def test_keys_create_rejects_bad_owner(data_dir: Path) -> None:
    async with running(data_dir) as service:
        env = operator_env(service, data_dir)
        assert (await cli(env, "account", "create", "--id", "user_01", "--kind", "workos")).returncode == 0
        assert (await cli(env, "workspace", "create", "--id", "ws_x", "--name", "X")).returncode == 0
        cases = [
            (["--account", "nobody", "--workspace", "ws_x"], "Account 'nobody' not found"),
            (["--account", "user_01", "--workspace", "ws_x"], "API keys authenticate only accounts of kind 'anonymous'"),
            (["--account", "user_01", "--workspace", "ws_x", "--ttl", "0"], "--ttl must be a positive number of seconds"),
        ]
        for args, expected in cases:
            result = await cli(env, "keys", "create", *args)
            assert result.returncode == 1, args
            assert expected in result.stderr, (args, result.stderr)
            assert result.stdout == ""
        assert (await cli(env, "keys", "list", "--all")).json() == []

        assert (await cli(env, "account", "create", "--id", "acct_y")).returncode == 0
        missing_workspace = await cli(env, "keys", "create", "--account", "acct_y", "--workspace", "ws_missing")
        assert missing_workspace.returncode == 1
        assert "Workspace 'ws_missing' not found" in missing_workspace.stderr

        invalid_id = await cli(env, "workspace", "create", "--id", "bad id!", "--name", "X")
        assert invalid_id.returncode == 1
        assert "Invalid workspace id 'bad id!'" in invalid_id.stderr
        duplicate = await cli(env, "account", "create", "--id", "acct_y")
        assert duplicate.returncode == 1
        assert "Account 'acct_y' already exists" in duplicate.stderr


async def test_account_disable_rejects_its_keys(data_dir: Path) -> None:
    async with running(data_dir) as service:
        env = operator_env(service, data_dir)
        assert (await cli(env, "account", "create", "--id", "acct_d")).returncode == 0
        assert (await cli(env, "workspace", "create", "--id", "ws_d", "--name", "D", "--owner", "acct_d")).returncode == 0
        api_key = (await cli(env, "keys", "create", "--account", "acct_d", "--workspace", "ws_d", "--json")).json()["apiKey"]
        assert await mcp_status(service, "ws_d", api_key) == 200

        disabled = await cli(env, "account", "disable", "acct_d")
        assert disabled.returncode == 0, disabled.stderr
        assert disabled.json()["disabled"] is True
        assert await mcp_status(service, "ws_d", api_key) == 401

        enabled = await cli(env, "account", "enable", "acct_d")
        assert enabled.json()["disabled"] is False
        assert await mcp_status(service, "ws_d", api_key) == 200


async def test_keys_create_without_secret_fails(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    data_dir.mkdir()
    (data_dir / "executor.db").touch()
    env = service_env(data_dir)
    env.pop("MCP_API_KEY_SECRET", None)

    result = await cli(env, "keys", "create", "--account", "a", "--workspace", "w")

    assert result.returncode == 1
    assert "No API key secret" in result.stderr
    assert not (data_dir / "api-key-secret").exists(), "the command never generates a secret"
    assert os.listdir(data_dir) == ["executor.db"]


async def test_keys_create_warns_without_public_url(data_dir: Path) -> None:
    async with running(data_dir) as service:
        env = service_env(data_dir)
        assert (await cli(env, "account", "create", "--id", "acct_w")).returncode == 0
        assert (await cli(env, "workspace", "create", "--id", "ws_w", "--name", "W")).returncode == 0

        created = await cli(env, "keys", "create", "--account", "acct_w", "--workspace", "ws_w", "--json")

        assert created.returncode == 0, created.stderr
        assert created.stderr.startswith("executor-tornado: warning: EXECUTOR_PUBLIC_URL is not set")
        # The service's issuer names its own port, so the key is rejected there.
        assert await mcp_status(service, "ws_w", created.json()["apiKey"]) == 401
