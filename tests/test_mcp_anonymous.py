"""The anonymous MCP endpoints driven by the official SDK client and raw HTTP."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from executor_tornado.clock import ManualClock
from conftest import MCP_HEADERS, anonymous_key, fetch, initialize_body, json_body, running
from mcp_client import sdk_client


@pytest.mark.parametrize("path", ["/v1/mcp/anonymous", "/mcp/anonymous"])
@pytest.mark.parametrize("mode", ["legacy", "2026-07-28", "auto"])
async def test_sdk_client_full_flow(data_dir: Path, path: str, mode: str) -> None:
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        url = f"{service.base_url}{path}?workspaceId={bootstrap['workspaceId']}"
        async with sdk_client(url, {"X-API-Key": bootstrap["apiKey"]}, mode=mode) as client:
            tools = await client.list_tools()
            assert isinstance(tools.tools, list)
            if mode == "legacy":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    await client.send_ping()
        if mode == "legacy":
            assert await service.store.count_open_mcp_sessions() == 0, "the client's DELETE closed the session"


async def test_api_key_in_bearer_header(data_dir: Path) -> None:
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        async with sdk_client(bootstrap["mcpUrl"], {"Authorization": f"Bearer {bootstrap['apiKey']}"}) as client:
            await client.list_tools()


async def test_api_key_checks(data_dir: Path) -> None:
    async with running(data_dir) as service:
        mine = await anonymous_key(service)
        other = await anonymous_key(service, user_agent="other")
        url = f"/v1/mcp/anonymous?workspaceId={mine['workspaceId']}"

        missing_workspace = await fetch(
            service, "/v1/mcp/anonymous", method="POST", body=initialize_body(),
            headers={**MCP_HEADERS, "X-API-Key": mine["apiKey"]},
        )
        assert missing_workspace.code == 400
        assert json_body(missing_workspace) == {
            "error": "Missing workspaceId query parameter: call this endpoint as ...?workspaceId=<id>"
        }

        missing_key = await fetch(service, url, method="POST", body=initialize_body(), headers=MCP_HEADERS)
        assert missing_key.code == 401
        assert "WWW-Authenticate" not in missing_key.headers, "API-key routes send no OAuth challenge"
        assert json_body(missing_key) == {"error": "Missing API key: send it in X-API-Key or Authorization: Bearer"}

        wrong_key = await fetch(
            service, url, method="POST", body=initialize_body(),
            headers={**MCP_HEADERS, "X-API-Key": mine["apiKey"][:-4] + "AAAA"},
        )
        assert wrong_key.code == 401
        assert json_body(wrong_key) == {"error": "API key is invalid"}

        foreign = await fetch(
            service, url, method="POST", body=initialize_body(), headers={**MCP_HEADERS, "X-API-Key": other["apiKey"]}
        )
        assert foreign.code == 403
        assert json_body(foreign) == {"error": "API key belongs to another workspace"}

        anonymous_token = await fetch(
            service, url, method="POST", body=initialize_body(),
            headers={**MCP_HEADERS, "Authorization": f"Bearer {mine['accessToken']}"},
        )
        assert anonymous_token.code == 401, "an identity token is not an API key"
        assert await service.store.count_open_mcp_sessions() == 0


async def test_api_key_signing_not_configured(data_dir: Path) -> None:
    async with running(data_dir, deployment_mode="cloud") as service:
        response = await fetch(
            service, "/v1/mcp/anonymous?workspaceId=ws_1", method="POST", body=initialize_body(),
            headers={**MCP_HEADERS, "X-API-Key": "x"},
        )
        assert response.code == 503
        assert json_body(response) == {"error": "API key signing is not configured: set MCP_API_KEY_SECRET"}


async def test_revoked_key(data_dir: Path) -> None:
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        headers = {**MCP_HEADERS, "X-API-Key": bootstrap["apiKey"]}
        url = f"/v1/mcp/anonymous?workspaceId={bootstrap['workspaceId']}"
        keys = await service.store.list_api_keys(workspace_id=bootstrap["workspaceId"])
        assert len(keys) == 1
        assert await service.store.revoke_api_key(keys[0].jti, 0.0)
        response = await fetch(service, url, method="POST", body=initialize_body(), headers=headers)
        assert response.code == 401
        assert json_body(response) == {"error": "API key was revoked"}


async def test_expired_key(data_dir: Path) -> None:
    clock = ManualClock()
    async with running(data_dir, clock=clock, api_key_ttl_seconds=60) as service:
        bootstrap = await anonymous_key(service)
        headers = {**MCP_HEADERS, "X-API-Key": bootstrap["apiKey"]}
        url = f"/v1/mcp/anonymous?workspaceId={bootstrap['workspaceId']}"
        assert (await fetch(service, url, method="POST", body=initialize_body(), headers=headers)).code == 200
        clock.advance(61)
        response = await fetch(service, url, method="POST", body=initialize_body(), headers=headers)
        assert response.code == 401
        assert json_body(response) == {"error": "API key expired"}
