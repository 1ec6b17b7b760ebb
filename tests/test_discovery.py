"""OAuth discovery routes against the real service and a local authorization server."""

from __future__ import annotations

from pathlib import Path

import pytest

from authserver import LocalAuthServer
from conftest import fetch, json_body, running


def expected_metadata(service, resource: str, issuer: str) -> dict:
    return {
        "resource": resource,
        "authorization_servers": [issuer],
        "bearer_methods_supported": ["header"],
        "resource_name": "executor-tornado MCP",
    }


@pytest.mark.parametrize(
    ("mode", "status", "message"),
    [
        ({}, 404, "MCP OAuth is not configured"),
        ({"deployment_mode": "self-hosted"}, 404, "MCP OAuth is not configured"),
        ({"deployment_mode": "cloud"}, 503, "MCP OAuth must be configured for cloud deployments"),
        ({"enforce_mcp_auth": "YES"}, 503, "MCP OAuth must be configured for cloud deployments"),
    ],
)
async def test_discovery_not_configured(data_dir: Path, mode: dict, status: int, message: str) -> None:
    async with running(data_dir, **mode) as service:
        for path in (
            "/.well-known/oauth-protected-resource",
            "/.well-known/oauth-protected-resource/v1/mcp",
            "/.well-known/oauth-protected-resource/mcp",
            "/.well-known/oauth-authorization-server",
        ):
            response = await fetch(service, path)
            assert response.code == status, path
            assert response.headers["Content-Type"] == "application/json"
            assert json_body(response) == {"error": message}


async def test_mcp_oauth_path_not_configured(data_dir: Path) -> None:
    async with running(data_dir) as service:
        response = await fetch(service, "/v1/mcp?workspaceId=ws_1", method="POST", body={})
        assert response.code == 503
        assert json_body(response) == {"error": "MCP OAuth is not configured"}
    async with running(data_dir, deployment_mode="prod") as service:
        response = await fetch(service, "/mcp?workspaceId=ws_1", method="POST", body={})
        assert response.code == 503
        assert json_body(response) == {"error": "MCP OAuth must be configured for cloud deployments"}


@pytest.mark.parametrize("mode", [{}, {"deployment_mode": "cloud"}])
async def test_protected_resource_metadata(data_dir: Path, mode: dict) -> None:
    auth = LocalAuthServer()
    auth.start()
    try:
        async with running(data_dir, authorization_server=auth.issuer, **mode) as service:
            base = service.base_url
            cases = {
                "/.well-known/oauth-protected-resource": f"{base}/v1/mcp",
                "/.well-known/oauth-protected-resource/v1/mcp": f"{base}/v1/mcp",
                "/.well-known/oauth-protected-resource/mcp": f"{base}/mcp",
                "/.well-known/oauth-protected-resource/v1/mcp?workspaceId=ws_1": f"{base}/v1/mcp?workspaceId=ws_1",
                "/.well-known/oauth-protected-resource?workspaceId=ws_2": f"{base}/v1/mcp?workspaceId=ws_2",
            }
            for path, resource in cases.items():
                response = await fetch(service, path)
                assert response.code == 200, path
                assert response.headers["Content-Type"] == "application/json"
                assert json_body(response) == expected_metadata(service, resource, auth.issuer), path
    finally:
        await auth.stop()


async def test_resource_hint_rules(data_dir: Path) -> None:
    auth = LocalAuthServer()
    auth.start()
    try:
        async with running(data_dir, authorization_server=auth.issuer) as service:
            base = service.base_url
            path = "/.well-known/oauth-protected-resource?resource="

            response = await fetch(service, path + f"{base}/mcp?workspaceId=ws_9")
            assert response.code == 200
            assert json_body(response)["resource"] == f"{base}/v1/mcp?workspaceId=ws_9"

            response = await fetch(service, path + f"{base}/v1/mcp")
            assert response.code == 200
            assert json_body(response)["resource"] == f"{base}/v1/mcp"

            response = await fetch(service, path + "http://other.example:8080/v1/mcp")
            assert response.code == 400
            assert json_body(response) == {"error": f"Invalid resource parameter: it must be on {base}"}

            for anonymous in ("/v1/mcp/anonymous", "/mcp/anonymous"):
                response = await fetch(service, path + f"{base}{anonymous}?workspaceId=ws_1")
                assert response.code == 404
                assert json_body(response) == {"error": "Anonymous MCP does not use OAuth discovery"}

            for unparsable in ("http://[::1", "not a url", "/v1/mcp"):
                response = await fetch(service, path + unparsable.replace(" ", "%20"))
                assert response.code == 400, unparsable
                assert json_body(response) == {"error": "Invalid resource parameter: it must be an absolute URL"}

            response = await fetch(service, "/.well-known/oauth-protected-resource/mcp/anonymous")
            assert response.code == 404
            assert json_body(response) == {"error": "Anonymous MCP does not use OAuth discovery"}
    finally:
        await auth.stop()


async def test_challenge_matches_metadata_resource(data_dir: Path) -> None:
    auth = LocalAuthServer()
    auth.start()
    try:
        async with running(data_dir, authorization_server=auth.issuer) as service:
            for called in ("/v1/mcp?workspaceId=ws_1", "/mcp?workspaceId=ws_1"):
                response = await fetch(service, called, method="POST", body={})
                assert response.code == 401
                challenge = response.headers["WWW-Authenticate"]
                metadata_url = f"{service.base_url}/.well-known/oauth-protected-resource{called}"
                assert challenge == f'Bearer resource_metadata="{metadata_url}"'

                metadata = json_body(await fetch(metadata_url))
                assert metadata["resource"] == service.base_url + called

                rejected = await fetch(
                    service, called, method="POST", body={}, headers={"Authorization": "Bearer not-a-jwt"}
                )
                assert rejected.code == 401
                assert rejected.headers["WWW-Authenticate"] == (
                    f'Bearer resource_metadata="{metadata_url}", error="invalid_token"'
                )
    finally:
        await auth.stop()


async def test_authorization_server_metadata_proxy(data_dir: Path) -> None:
    auth = LocalAuthServer()
    auth.start()
    try:
        async with running(data_dir, authorization_server=auth.issuer) as service:
            response = await fetch(service, "/.well-known/oauth-authorization-server")
            assert response.code == 200
            assert response.headers["Content-Type"] == "application/json; charset=utf-8"
            assert json_body(response) == auth.metadata()

            await fetch(service, "/.well-known/oauth-authorization-server")
            assert auth.metadata_requests == 1, "a 200 body is cached"
    finally:
        await auth.stop()


async def test_authorization_server_proxy_passes_errors(data_dir: Path) -> None:
    auth = LocalAuthServer()
    auth.start()
    auth.metadata_status = 500
    try:
        async with running(data_dir, authorization_server=auth.issuer) as service:
            response = await fetch(service, "/.well-known/oauth-authorization-server")
            assert response.code == 500
            assert json_body(response) == {"error": "upstream failure"}
            await fetch(service, "/.well-known/oauth-authorization-server")
            assert auth.metadata_requests == 2, "errors are not cached"
    finally:
        await auth.stop()


async def test_authorization_server_unreachable(data_dir: Path) -> None:
    auth = LocalAuthServer()
    auth.start()
    issuer = auth.issuer
    await auth.stop()
    async with running(data_dir, authorization_server=issuer, jwks_timeout_seconds=2) as service:
        response = await fetch(service, "/.well-known/oauth-authorization-server")
        assert response.code == 502
        assert json_body(response) == {"error": "The authorization server could not be reached; try again later"}


async def test_jwks_required_mode_without_key(data_dir: Path) -> None:
    async with running(data_dir, deployment_mode="cloud") as service:
        response = await fetch(service, "/.well-known/jwks.json")
        assert response.code == 503
        assert json_body(response) == {"error": "Anonymous auth key pair is not configured"}
        assert not (data_dir / "anonymous-signing-key.pem").exists(), "cloud mode generates nothing"


async def test_unknown_route_is_json_404(data_dir: Path) -> None:
    async with running(data_dir) as service:
        response = await fetch(service, "/nope")
        assert response.code == 404
        assert response.headers["Content-Type"] == "application/json"
        assert json_body(response) == {"error": "Not found: /nope"}
