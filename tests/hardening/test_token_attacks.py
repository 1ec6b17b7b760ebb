"""Token attacks on both authentication paths: every one is 401 and never logged in full.

The OAuth path verifies tokens against a local authorization server with
real RS256 and ES256 keys. The API key path verifies HS256 keys signed with
the service's own secret. The tests read that secret from the data
directory to build keys that are well signed but wrong in one claim.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import MCP_HEADERS, anonymous_key, fetch, initialize_body, json_body, running
from executor_tornado.keys import API_KEY_AUDIENCE, API_KEY_SECRET_FILE
from test_mcp_oauth import MEMBER, oauth_service, url


def _segment(value: dict[str, Any]) -> bytes:
    return jwt.utils.base64url_encode(json.dumps(value).encode())


def unsigned_token(claims: dict[str, Any], header: dict[str, Any]) -> str:
    return f"{_segment(header).decode()}.{_segment(claims).decode()}."


def hs256_token(claims: dict[str, Any], secret: bytes, header: dict[str, Any]) -> str:
    """Sign with HMAC-SHA256 by hand, because PyJWT rejects a PEM key as an HMAC secret."""
    signing_input = _segment({"alg": "HS256", "typ": "JWT", **header}) + b"." + _segment(claims)
    signature = base64.urlsafe_b64encode(hmac.new(secret, signing_input, hashlib.sha256).digest()).rstrip(b"=")
    return (signing_input + b"." + signature).decode()


def assert_not_logged(records: list[logging.LogRecord], token: str, case: str) -> None:
    """Fail when a log line contains the whole token or its signature segment."""
    signature = token.rsplit(".", 1)[-1]
    for record in records:
        line = record.getMessage() + " " + json.dumps(getattr(record, "__dict__", {}), default=str)
        assert token not in line, f"{case}: token logged in full by {record.name}"
        if len(signature) >= 16:
            assert signature not in line, f"{case}: token signature logged by {record.name}"


async def test_oauth_path_token_attacks(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with oauth_service(data_dir, oauth_audience="client_test") as (service, auth):
        now = int(time.time())
        rsa_key = next(k for k in auth.keys if k.algorithm == "RS256")
        es_key = next(k for k in auth.keys if k.algorithm == "ES256")
        claims = {"iss": auth.issuer, "sub": MEMBER, "aud": "client_test", "iat": now, "exp": now + 300}
        public_pem = rsa_key.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        foreign_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        foreign_ec = ec.generate_private_key(ec.SECP256R1())
        anonymous = await anonymous_key(service)

        good = auth.token(MEMBER, aud="client_test")
        accepted = await fetch(
            url(service), method="POST", body=initialize_body(),
            headers={**MCP_HEADERS, "Authorization": f"Bearer {good}"},
        )
        assert accepted.code == 200, "the baseline token must pass, or every 401 below proves nothing"

        attacks = {
            "alg none": unsigned_token(claims, {"alg": "none", "kid": rsa_key.kid}),
            "HS256 signed with the public key": hs256_token(claims, public_pem, {"kid": rsa_key.kid}),
            "foreign RSA key with a known kid": jwt.encode(
                claims, foreign_rsa, algorithm="RS256", headers={"kid": rsa_key.kid}
            ),
            "foreign EC key with a known kid": jwt.encode(
                claims, foreign_ec, algorithm="ES256", headers={"kid": es_key.kid}
            ),
            "expired": auth.token(MEMBER, aud="client_test", lifetime=-120),
            "not yet valid": auth.token(MEMBER, aud="client_test", nbf=now + 600),
            "wrong issuer": auth.token(MEMBER, aud="client_test", iss="https://issuer.invalid"),
            "wrong audience": auth.token(MEMBER, aud="someone-else"),
            "anonymous token": anonymous["accessToken"],
            "API key": anonymous["apiKey"],
            "kid with path characters": jwt.encode(
                claims, rsa_key.private, algorithm="RS256", headers={"kid": "../../../etc/passwd"}
            ),
            "kid with a URL": jwt.encode(
                claims, rsa_key.private, algorithm="RS256", headers={"kid": "http://127.0.0.1:9/oauth2/jwks"}
            ),
            "oversized": jwt.encode(
                {**claims, "pad": "x" * 40000}, rsa_key.private, algorithm="RS256", headers={"kid": rsa_key.kid}
            ),
        }
        jwks_requests = auth.jwks_requests
        caplog.clear()
        for case, token in attacks.items():
            response = await fetch(
                url(service), method="POST", body=initialize_body(),
                headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"},
            )
            assert response.code == 401, case
            assert json_body(response) == {"error": "Invalid or expired bearer token"}, case
            assert 'error="invalid_token"' in response.headers["WWW-Authenticate"], case
            assert_not_logged(caplog.records, token, case)

        assert auth.jwks_requests <= jwks_requests + 1, "forged kids refresh the JWKS at most once a minute"
        assert await service.store.count_open_mcp_sessions() == 1, "no attack opened a session"


def _api_key_secret(data_dir: Path) -> bytes:
    return (data_dir / API_KEY_SECRET_FILE).read_text().strip().encode()


async def test_api_key_path_token_attacks(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(data_dir) as service:
        mine = await anonymous_key(service)
        workspace = mine["workspaceId"]
        account = mine["accountId"]
        secret = _api_key_secret(data_dir)
        now = int(time.time())
        claims = {
            "aud": API_KEY_AUDIENCE, "iss": service.settings.anonymous_iss, "sub": account, "accountId": account,
            "workspaceId": workspace, "jti": "0" * 32, "iat": now, "exp": now + 300,
        }
        real_jti = (await service.store.list_api_keys(workspace_id=workspace))[0].jti
        signer_pem = (data_dir / "anonymous-signing-key.pem").read_bytes()
        signing_key = serialization.load_pem_private_key(signer_pem, password=None)
        public_pem = signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

        revoked = await anonymous_key(service, user_agent="revoked")
        revoked_jti = (await service.store.list_api_keys(workspace_id=revoked["workspaceId"]))[0].jti
        assert await service.store.revoke_api_key(revoked_jti, time.time())

        def signed(**changes: Any) -> str:
            return hs256_token({**claims, "jti": real_jti, **changes}, secret, {})

        attacks = {
            "alg none": unsigned_token({**claims, "jti": real_jti}, {"alg": "none", "typ": "JWT"}),
            "HS256 signed with the anonymous public key": hs256_token({**claims, "jti": real_jti}, public_pem, {}),
            "foreign secret": hs256_token({**claims, "jti": real_jti}, b"not-the-service-secret" * 3, {}),
            "ES256 signed by the anonymous key": jwt.encode(
                {**claims, "jti": real_jti}, signing_key, algorithm="ES256"
            ),
            "expired": signed(exp=now - 120, iat=now - 400),
            "not yet valid": signed(nbf=now + 600),
            "wrong issuer": signed(iss="https://issuer.invalid"),
            "wrong audience": signed(aud="executor-anonymous"),
            "unrecorded jti": signed(jti="f" * 32),
            "anonymous token": mine["accessToken"],
            "revoked key": revoked["apiKey"],
            "oversized": signed(pad="x" * 40000),
            "kid with path characters": hs256_token(
                {**claims, "jti": "../../etc/passwd"}, secret, {"kid": "../../etc/passwd"}
            ),
            "kid with a URL": hs256_token(
                {**claims, "jti": "http://127.0.0.1:9/x"}, secret, {"kid": "http://127.0.0.1:9/keys"}
            ),
        }
        baseline = await fetch(
            service, f"/v1/mcp/anonymous?workspaceId={workspace}", method="POST", body=initialize_body(),
            headers={**MCP_HEADERS, "X-API-Key": signed()},
        )
        assert baseline.code == 200, "a key built by hand must pass, or every 401 below proves nothing"

        caplog.clear()
        for case, token in attacks.items():
            query_workspace = revoked["workspaceId"] if case == "revoked key" else workspace
            for header in ({"X-API-Key": token}, {"Authorization": f"Bearer {token}"}):
                response = await fetch(
                    service, f"/v1/mcp/anonymous?workspaceId={query_workspace}", method="POST",
                    body=initialize_body(), headers={**MCP_HEADERS, **header},
                )
                assert response.code == 401, (case, list(header))
                assert "error" in json_body(response), case
                assert "WWW-Authenticate" not in response.headers, case
                assert_not_logged(caplog.records, token, case)

        assert await service.store.count_open_mcp_sessions() == 1, "only the baseline opened a session"
