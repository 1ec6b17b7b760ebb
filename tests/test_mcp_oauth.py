"""The OAuth MCP path against a local authorization server with real RS256 and ES256 keys."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from authserver import LocalAuthServer
from executor_tornado.clock import ManualClock
from conftest import MCP_HEADERS, anonymous_key, fetch, initialize_body, json_body, running
from mcp_client import sdk_client
from store.records import Account, Membership, Organization, Workspace

WORKSPACE = "ws_org"
MEMBER = "user_member"


@contextlib.asynccontextmanager
async def oauth_service(data_dir: Path, **settings: Any) -> AsyncIterator[tuple[Any, LocalAuthServer]]:
    auth = LocalAuthServer()
    auth.start()
    try:
        async with running(
            data_dir, authorization_server=auth.issuer, mcp_plugins=["transport_plugin:register"], **settings
        ) as service:
            store = service.store
            now = time.time()
            await store.put_organization(Organization(id="org_1", name="Org", created_at=now))
            await store.put_workspace(Workspace(id=WORKSPACE, name="Team", created_at=now, organization_id="org_1"))
            for user, status in ((MEMBER, "active"), ("user_pending", "pending")):
                await store.put_account(Account(id=user, kind="workos", created_at=now))
                await store.put_membership(Membership(organization_id="org_1", account_id=user, status=status))
            yield service, auth
    finally:
        await auth.stop()


def url(service: Any, path: str = "/v1/mcp", workspace: str | None = WORKSPACE) -> str:
    query = f"?workspaceId={workspace}" if workspace else ""
    return f"{service.base_url}{path}{query}"


@pytest.mark.parametrize("path", ["/v1/mcp", "/mcp"])
@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_sdk_session_on_oauth_path(data_dir: Path, path: str, mode: str, algorithm: str) -> None:
    async with oauth_service(data_dir) as (service, auth):
        token = auth.token(MEMBER, algorithm=algorithm)
        async with sdk_client(url(service, path), {"Authorization": f"Bearer {token}"}, mode=mode) as client:
            names = [tool.name for tool in (await client.list_tools()).tools]
            assert "whoami" in names
            result = await client.call_tool("whoami", {})
            principal = result.content[0].text.split(" ")[0]
            assert principal == f"oauth|{auth.issuer}|{MEMBER}"


async def test_key_rotation_with_unknown_kid(data_dir: Path) -> None:
    clock = ManualClock()
    async with oauth_service(data_dir, clock=clock) as (service, auth):
        first = auth.token(MEMBER)
        async with sdk_client(url(service), {"Authorization": f"Bearer {first}"}) as client:
            await client.list_tools()
        assert auth.jwks_requests == 1

        too_soon = await fetch(
            url(service), method="POST", body=initialize_body(),
            headers={**MCP_HEADERS, "Authorization": f"Bearer {auth.token(MEMBER, key=auth.rotate('RS256'))}"},
        )
        assert too_soon.code == 401, "a new kid within a minute of the last fetch is not looked up"
        assert auth.jwks_requests == 1

        clock.advance(61)
        rotated = auth.rotate("ES256")
        second = auth.token(MEMBER, key=rotated)
        async with sdk_client(url(service), {"Authorization": f"Bearer {second}"}) as client:
            await client.list_tools()
        assert auth.jwks_requests == 2, "an unknown kid refreshes the JWKS once"

        forged = auth.token(MEMBER, key=auth.rotate("RS256"))
        rejected = await fetch(
            url(service), method="POST", body=initialize_body(),
            headers={**MCP_HEADERS, "Authorization": f"Bearer {forged}"},
        )
        assert rejected.code == 401
        assert auth.jwks_requests == 2, "refreshes happen at most once a minute"


async def test_refreshed_token_keeps_session(data_dir: Path) -> None:
    async with oauth_service(data_dir) as (service, auth):
        async with httpx2.AsyncClient(timeout=30) as client:
            headers = {**MCP_HEADERS, "Authorization": f"Bearer {auth.token(MEMBER)}"}
            response = await client.post(url(service), json=initialize_body(), headers=headers)
            session_id = response.headers["Mcp-Session-Id"]
            refreshed = {**MCP_HEADERS, "Authorization": f"Bearer {auth.token(MEMBER, algorithm='ES256')}", "Mcp-Session-Id": session_id}
            call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
            assert (await client.post(url(service), json=call, headers=refreshed)).status_code == 200

            other = {**MCP_HEADERS, "Authorization": f"Bearer {auth.token('user_pending')}", "Mcp-Session-Id": session_id}
            assert (await client.post(url(service), json=call, headers=other)).status_code == 403


async def test_membership_and_workspace_checks(data_dir: Path) -> None:
    async with oauth_service(data_dir) as (service, auth):
        member = {**MCP_HEADERS, "Authorization": f"Bearer {auth.token(MEMBER)}"}

        missing = await fetch(url(service, workspace=None), method="POST", body=initialize_body(), headers=member)
        assert missing.code == 400

        for subject, workspace in (("user_pending", WORKSPACE), ("user_stranger", WORKSPACE), (MEMBER, "ws_unknown")):
            headers = {**MCP_HEADERS, "Authorization": f"Bearer {auth.token(subject)}"}
            response = await fetch(url(service, workspace=workspace), method="POST", body=initialize_body(), headers=headers)
            assert response.code == 403, (subject, workspace)
            assert json_body(response) == {"error": "You are not a member of this workspace's organization"}


def _unsigned(claims: dict[str, Any], header: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return jwt.utils.base64url_encode(json.dumps(value).encode()).decode()

    return f"{part(header)}.{part(claims)}."


async def test_token_attacks_are_401(data_dir: Path) -> None:
    async with oauth_service(data_dir) as (service, auth):
        now = int(time.time())
        rsa_key = next(k for k in auth.keys if k.algorithm == "RS256")
        good_claims = {"iss": auth.issuer, "sub": MEMBER, "iat": now, "exp": now + 300}
        public_pem = rsa_key.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        anonymous = await anonymous_key(service)
        attacks = {
            "alg none": _unsigned(good_claims, {"alg": "none", "kid": rsa_key.kid}),
            "HS256 with the public key": _hs256_with_key(good_claims, public_pem, rsa_key.kid),
            "expired": auth.token(MEMBER, lifetime=-120),
            "not yet valid": auth.token(MEMBER, nbf=now + 600),
            "wrong issuer": auth.token(MEMBER, iss="https://evil.example"),
            "empty subject": auth.token(""),
            "anonymous provider": auth.token(MEMBER, provider="anonymous"),
            "anonymous token": anonymous["accessToken"],
            "API key": anonymous["apiKey"],
            "kid with path characters": _with_kid(auth, "../../etc/passwd"),
            "kid with a URL": _with_kid(auth, "http://127.0.0.1:1/jwks"),
            "oversized": "a" * 20000,
        }
        for name, token in attacks.items():
            response = await fetch(
                url(service), method="POST", body=initialize_body(),
                headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"},
            )
            assert response.code == 401, name
            assert 'error="invalid_token"' in response.headers["WWW-Authenticate"], name


def _hs256_with_key(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "kid": kid, "typ": "JWT"}).encode())
    payload = jwt.utils.base64url_encode(json.dumps(claims).encode())
    signing_input = header + b"." + payload
    signature = base64.urlsafe_b64encode(hmac.new(secret, signing_input, hashlib.sha256).digest()).rstrip(b"=")
    return (signing_input + b"." + signature).decode()


def _with_kid(auth: LocalAuthServer, kid: str) -> str:
    key = next(k for k in auth.keys if k.algorithm == "RS256")
    now = int(time.time())
    return jwt.encode({"iss": auth.issuer, "sub": MEMBER, "exp": now + 60}, key.private, algorithm="RS256", headers={"kid": kid})


async def test_audience_check_when_configured(data_dir: Path) -> None:
    async with oauth_service(data_dir, oauth_audience="https://api.example") as (service, auth):
        wrong = await fetch(
            url(service), method="POST", body=initialize_body(),
            headers={**MCP_HEADERS, "Authorization": f"Bearer {auth.token(MEMBER)}"},
        )
        assert wrong.code == 401
        right = await fetch(
            url(service), method="POST", body=initialize_body(),
            headers={**MCP_HEADERS, "Authorization": f"Bearer {auth.token(MEMBER, aud='https://api.example')}"},
        )
        assert right.code == 200


async def test_disabled_account_is_401(data_dir: Path) -> None:
    async with oauth_service(data_dir) as (service, auth):
        account = await service.store.get_account(MEMBER)
        account.disabled = True
        await service.store.put_account(account)
        response = await fetch(
            url(service), method="POST", body=initialize_body(),
            headers={**MCP_HEADERS, "Authorization": f"Bearer {auth.token(MEMBER)}"},
        )
        assert response.code == 401


async def test_deleted_organization_is_403(data_dir: Path) -> None:
    async with oauth_service(data_dir) as (service, auth):
        organization = await service.store.get_organization("org_1")
        organization.deleted = True
        await service.store.put_organization(organization)
        response = await fetch(
            url(service), method="POST", body=initialize_body(),
            headers={**MCP_HEADERS, "Authorization": f"Bearer {auth.token(MEMBER)}"},
        )
        assert response.code == 403
        assert json_body(response) == {"error": "This workspace's organization was deleted"}
