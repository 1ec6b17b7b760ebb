"""Anonymous identities: tokens, JWKS, session bootstrap, persistence across restarts."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import anonymous_key, fetch, json_body, running
from executor_tornado.clock import ManualClock
from executor_tornado.keys import rotate_signing_key
from executor_tornado.settings import Settings


def verify_with_jwks(token: str, jwks: dict, issuer: str) -> dict:
    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    return jwt.decode(token, key.key, algorithms=["ES256"], audience="executor-anonymous", issuer=issuer)


async def test_token_verifies_against_served_jwks(data_dir: Path) -> None:
    async with running(data_dir) as service:
        response = await fetch(service, "/auth/anonymous/token", method="POST")
        assert response.code == 200
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["Cache-Control"] == "no-store"
        body = json_body(response)
        assert set(body) == {"tokenType", "accessToken", "accountId", "expiresAtMs"}
        assert body["tokenType"] == "Bearer"
        assert re.fullmatch(r"anon_[0-9a-f]{32}", body["accountId"])

        jwks_response = await fetch(service, "/.well-known/jwks.json")
        assert jwks_response.code == 200
        jwks = json_body(jwks_response)
        assert len(jwks["keys"]) == 1
        key = jwks["keys"][0]
        assert set(key) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
        assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")

        header = jwt.get_unverified_header(body["accessToken"])
        assert header == {"alg": "ES256", "kid": key["kid"], "typ": "JWT"}
        claims = verify_with_jwks(body["accessToken"], jwks, service.base_url)
        assert set(claims) == {"iss", "sub", "aud", "provider", "iat", "nbf", "exp"}
        assert claims["sub"] == body["accountId"]
        assert claims["provider"] == "anonymous"
        assert claims["nbf"] == claims["iat"] - 5
        assert claims["exp"] - claims["iat"] == 604800
        assert body["expiresAtMs"] == claims["exp"] * 1000

        account = await service.store.get_account(body["accountId"])
        assert account is not None
        assert account.kind == "anonymous"


async def test_token_get_for_old_clients(data_dir: Path) -> None:
    async with running(data_dir, anonymous_token_ttl_seconds="60") as service:
        response = await fetch(service, "/auth/anonymous/token")
        assert response.code == 200
        claims = jwt.decode(json_body(response)["accessToken"], options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 60


async def test_required_mode_without_keys(data_dir: Path) -> None:
    async with running(data_dir, deployment_mode="cloud") as service:
        response = await fetch(service, "/auth/anonymous/token", method="POST")
        assert response.code == 503
        assert json_body(response) == {"error": "Anonymous auth is not configured: set ANONYMOUS_AUTH_PRIVATE_KEY_PEM"}
        session = await fetch(service, "/auth/anonymous/session", method="POST", body={})
        assert session.code == 503
    generated = [name for name in os.listdir(data_dir) if name.endswith((".pem", "secret"))]
    assert generated == [], "cloud mode generates no key material"


async def test_required_mode_with_env_keys(data_dir: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    escaped = pem.replace("\n", "\\n")
    async with running(
        data_dir,
        deployment_mode="cloud",
        anonymous_private_key_pem=escaped,
        anonymous_issuer="https://issuer.example",
        api_key_secret="s" * 40,
    ) as service:
        body = json_body(await fetch(service, "/auth/anonymous/token", method="POST"))
        jwks = json_body(await fetch(service, "/.well-known/jwks.json"))
        claims = verify_with_jwks(body["accessToken"], jwks, "https://issuer.example")
        assert claims["iss"] == "https://issuer.example"
        public = jwt.PyJWKSet.from_dict(jwks).keys[0].key
        assert public.public_numbers() == private.public_key().public_numbers()


async def test_generated_secrets_persist_with_mode_0600(data_dir: Path) -> None:
    async with running(data_dir) as service:
        first_kid = json_body(await fetch(service, "/.well-known/jwks.json"))["keys"][0]["kid"]
    for name in ("anonymous-signing-key.pem", "api-key-secret"):
        mode = stat.S_IMODE((data_dir / name).stat().st_mode)
        assert mode == 0o600, name
    async with running(data_dir) as service:
        second_kid = json_body(await fetch(service, "/.well-known/jwks.json"))["keys"][0]["kid"]
    assert first_kid == second_kid


async def test_rotated_key_stays_in_jwks(data_dir: Path) -> None:
    async with running(data_dir) as service:
        old_token = json_body(await fetch(service, "/auth/anonymous/token", method="POST"))["accessToken"]
        port = service.port
    settings = Settings(_env_file=None, data_dir=data_dir, port=port)
    new_kid = rotate_signing_key(settings, ManualClock())
    async with running(data_dir, port=port) as service:
        jwks = json_body(await fetch(service, "/.well-known/jwks.json"))
        assert [key["kid"] for key in jwks["keys"]][0] == new_kid
        assert len(jwks["keys"]) == 2
        verify_with_jwks(old_token, jwks, service.base_url)
        bootstrap = await fetch(
            service, "/auth/anonymous/session", method="POST", body={},
            headers={"Authorization": f"Bearer {old_token}"},
        )
        assert bootstrap.code == 200


async def test_session_bootstrap_body(data_dir: Path) -> None:
    async with running(data_dir) as service:
        first = await anonymous_key(service)
        assert set(first) == {"sessionId", "accountId", "workspaceId", "apiKey", "mcpUrl", "accessToken"}
        assert first["mcpUrl"] == f"{service.base_url}/v1/mcp/anonymous?workspaceId={first['workspaceId']}"
        claims = jwt.decode(first["apiKey"], options={"verify_signature": False})
        assert set(claims) == {"aud", "iss", "sub", "accountId", "workspaceId", "jti", "iat", "exp"}
        assert claims["aud"] == "executor-mcp"
        assert claims["iss"] == service.base_url
        assert claims["sub"] == claims["accountId"] == first["accountId"]
        assert claims["workspaceId"] == first["workspaceId"]
        assert jwt.get_unverified_header(first["apiKey"])["alg"] == "HS256"

        again = await fetch(
            service, "/auth/anonymous/session", method="POST", body={"sessionId": first["sessionId"]},
            headers={"Authorization": f"Bearer {first['accessToken']}"},
        )
        assert again.code == 200
        again_body = json_body(again)
        assert again_body["sessionId"] == first["sessionId"]
        assert again_body["workspaceId"] == first["workspaceId"]
        assert again_body["apiKey"] != first["apiKey"]

        other = await anonymous_key(service, user_agent="another")
        stolen = await fetch(
            service, "/auth/anonymous/session", method="POST", body={"sessionId": first["sessionId"]},
            headers={"Authorization": f"Bearer {other['accessToken']}"},
        )
        assert stolen.code == 200
        assert json_body(stolen)["workspaceId"] == other["workspaceId"] != first["workspaceId"]


async def test_session_bootstrap_rejects_bad_input(data_dir: Path) -> None:
    async with running(data_dir) as service:
        token = json_body(await fetch(service, "/auth/anonymous/token", method="POST"))["accessToken"]
        auth = {"Authorization": f"Bearer {token}"}

        missing = await fetch(service, "/auth/anonymous/session", method="POST", body={})
        assert missing.code == 401
        assert json_body(missing) == {"error": "Missing anonymous token: send Authorization: Bearer <accessToken>"}

        forged = jwt.encode({"sub": "anon_x", "provider": "anonymous"}, "k" * 32, algorithm="HS256")
        invalid = await fetch(
            service, "/auth/anonymous/session", method="POST", body={}, headers={"Authorization": f"Bearer {forged}"}
        )
        assert invalid.code == 401

        not_json = await fetch(service, "/auth/anonymous/session", method="POST", body="{", headers=auth)
        assert not_json.code == 400
        assert "Invalid JSON body" in json_body(not_json)["error"]

        wrong_type = await fetch(service, "/auth/anonymous/session", method="POST", body={"sessionId": 7}, headers=auth)
        assert wrong_type.code == 400
        assert await service.store.list_workspaces() == []


async def test_restart_keeps_accounts_sessions_and_keys(data_dir: Path) -> None:
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        port = service.port
    async with running(data_dir, port=port) as service:
        assert await service.store.get_account(bootstrap["accountId"]) is not None
        session = await service.store.get_anonymous_session(bootstrap["sessionId"])
        assert session is not None
        assert session.workspace_id == bootstrap["workspaceId"]
        jti = jwt.decode(bootstrap["apiKey"], options={"verify_signature": False})["jti"]
        assert (await service.store.get_api_key(jti)) is not None
        response = await fetch(
            service,
            f"/v1/mcp/anonymous?workspaceId={bootstrap['workspaceId']}",
            method="POST",
            body=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}),
            headers={
                "X-API-Key": bootstrap["apiKey"],
                "Accept": "application/json, text/event-stream",
                "Content-Type": "application/json",
            },
        )
        assert response.code == 200
        assert time.time() < json_body(await fetch(service, "/auth/anonymous/token", method="POST"))["expiresAtMs"] / 1000
