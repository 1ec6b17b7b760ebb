"""A local OAuth authorization server for tests, on a loopback port.

It serves RFC 8414 metadata at ``/.well-known/oauth-authorization-server``
and its signing keys at ``/oauth2/jwks`` (the WorkOS AuthKit layout), and
signs access tokens with real RS256 and ES256 keys. Keys can be rotated to
exercise the service's unknown-``kid`` refresh.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import jwt
import tornado.httpserver
import tornado.netutil
import tornado.web
from cryptography.hazmat.primitives.asymmetric import ec, rsa


class _Metadata(tornado.web.RequestHandler):
    def get(self) -> None:
        server: LocalAuthServer = self.settings["auth_server"]
        server.metadata_requests += 1
        if server.metadata_status != 200:
            self.set_status(server.metadata_status)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": "upstream failure"}))
            return
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(server.metadata()))


class _Jwks(tornado.web.RequestHandler):
    def get(self) -> None:
        server: LocalAuthServer = self.settings["auth_server"]
        server.jwks_requests += 1
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"keys": server.public_jwks()}))


class _SigningKey:
    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self.kid = f"{algorithm.lower()}-{uuid.uuid4().hex[:8]}"
        if algorithm == "RS256":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key()))
        self.jwk = {**jwk, "kid": self.kid, "alg": algorithm, "use": "sig"}


class LocalAuthServer:
    """An authorization server on 127.0.0.1 with RS256 and ES256 keys."""

    def __init__(self) -> None:
        self.keys = [_SigningKey("RS256"), _SigningKey("ES256")]
        self.metadata_status = 200
        self.metadata_requests = 0
        self.jwks_requests = 0
        self._server: tornado.httpserver.HTTPServer | None = None
        self.port = 0

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/oauth2/authorize",
            "token_endpoint": f"{self.issuer}/oauth2/token",
            "jwks_uri": f"{self.issuer}/oauth2/jwks",
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
        }

    def public_jwks(self) -> list[dict[str, Any]]:
        return [key.jwk for key in self.keys]

    def start(self) -> None:
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        app = tornado.web.Application([
            (r"/\.well-known/oauth-authorization-server", _Metadata),
            (r"/oauth2/jwks", _Jwks),
        ], auth_server=self)
        self._server = tornado.httpserver.HTTPServer(app)
        self._server.add_sockets(sockets)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None

    def rotate(self, algorithm: str = "ES256") -> _SigningKey:
        """Add a new key (its ``kid`` is unknown to anyone who cached the JWKS)."""
        key = _SigningKey(algorithm)
        self.keys.append(key)
        return key

    def token(
        self,
        subject: str = "user_01",
        *,
        algorithm: str = "RS256",
        key: _SigningKey | None = None,
        lifetime: int = 300,
        **claims: Any,
    ) -> str:
        signing = key or next(k for k in self.keys if k.algorithm == algorithm)
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": "client_test",
            "iat": now,
            "nbf": now - 5,
            "exp": now + lifetime,
            "sid": uuid.uuid4().hex,
        }
        body.update(claims)
        return jwt.encode(body, signing.private, algorithm=signing.algorithm, headers={"kid": signing.kid})
