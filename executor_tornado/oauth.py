"""OAuth 2.0 resource-server side: bearer token verification and metadata proxy.

The authorization server (WorkOS AuthKit, or any issuer with the same URL
layout) publishes its keys at ``<issuer>/oauth2/jwks`` and its RFC 8414
metadata at ``<issuer>/.well-known/oauth-authorization-server``. Both are
fetched with Tornado's ``AsyncHTTPClient`` with a bounded timeout and cached.

Example::

    verifier = OAuthVerifier(settings, clock)
    principal = await verifier.verify(token)     # raises TokenRejected
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import jwt
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from executor_tornado.clock import Clock
from executor_tornado.keys import check_token_times
from executor_tornado.settings import Settings

__all__ = ["MetadataProxy", "OAuthPrincipal", "OAuthVerifier", "TokenRejected", "UpstreamResponse"]

log = logging.getLogger("executor_tornado.oauth")

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
JWKS_REFRESH_INTERVAL_SECONDS = 60.0
MAX_TOKEN_BYTES = 16 * 1024


class TokenRejected(Exception):
    """A bearer token failed verification; the message is safe to log (no token bytes)."""


@dataclass(frozen=True)
class OAuthPrincipal:
    issuer: str
    subject: str
    claims: dict[str, Any]

    @property
    def key(self) -> str:
        """The principal string that MCP sessions are bound to."""
        return f"oauth|{self.issuer}|{self.subject}"


class OAuthVerifier:
    """Verifies OAuth access tokens against the issuer's JWKS.

    The JWKS is cached; a token with an unknown ``kid`` triggers a refetch at
    most once per :data:`JWKS_REFRESH_INTERVAL_SECONDS`, so a flood of forged
    ``kid`` values cannot hammer the issuer.
    """

    def __init__(self, settings: Settings, clock: Clock) -> None:
        issuer = settings.issuer_url
        if not issuer:
            raise ValueError("OAuth is not configured: set MCP_AUTHORIZATION_SERVER")
        self.issuer = issuer
        self.jwks_url = f"{issuer}/oauth2/jwks"
        self._audience = settings.oauth_audience
        self._algorithms = [alg for alg in settings.oauth_algorithms if alg in ASYMMETRIC_ALGORITHMS]
        self._timeout = settings.jwks_timeout_seconds
        self._clock = clock
        self._keys: dict[str, Any] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    async def verify(self, token: str) -> OAuthPrincipal:
        """Return the principal of a valid token; raise :class:`TokenRejected` otherwise."""
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenRejected("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejected("token is not a JWT") from None
        algorithm = header.get("alg")
        if algorithm not in self._algorithms:
            raise TokenRejected(f"algorithm {str(algorithm)[:16]!r} is not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise TokenRejected("token has no usable kid")

        key = await self._key_for(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self.issuer,
                audience=self._audience,
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_aud": self._audience is not None,
                    "require": ["exp", "iss", "sub"],
                },
            )
            check_token_times(claims, self._clock.time(), leeway=30.0)
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"token rejected: {type(exc).__name__}") from None

        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise TokenRejected("token has an empty subject")
        if claims.get("provider") == "anonymous":
            raise TokenRejected("anonymous tokens are not accepted on the OAuth path")
        return OAuthPrincipal(issuer=self.issuer, subject=subject, claims=claims)

    async def _key_for(self, kid: str) -> Any:
        key = self._keys.get(kid)
        if key is not None:
            return key
        async with self._lock:
            key = self._keys.get(kid)
            if key is not None:
                return key
            now = self._clock.time()
            if self._fetched_at is not None and now - self._fetched_at < JWKS_REFRESH_INTERVAL_SECONDS:
                raise TokenRejected("unknown kid")
            self._fetched_at = now
            await self._refresh()
        key = self._keys.get(kid)
        if key is None:
            raise TokenRejected("unknown kid")
        return key

    async def _refresh(self) -> None:
        client = AsyncHTTPClient()
        try:
            response = await client.fetch(
                HTTPRequest(self.jwks_url, request_timeout=self._timeout, connect_timeout=self._timeout)
            )
            document = json.loads(response.body)
        except (HTTPClientError, OSError, ValueError) as exc:
            log.warning("JWKS fetch failed from %s: %s", self.jwks_url, exc)
            raise TokenRejected("signing keys unavailable") from None
        keys: dict[str, Any] = {}
        for jwk in document.get("keys", []) if isinstance(document, dict) else []:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            if not isinstance(kid, str):
                continue
            try:
                keys[kid] = jwt.PyJWK.from_dict(jwk).key
            except jwt.PyJWTError as exc:
                log.warning("Skipping JWKS key %r: %s", kid[:64], exc)
        self._keys = keys
        log.info("Loaded %d signing keys from %s", len(keys), self.jwks_url)


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    content_type: str
    body: bytes


class MetadataProxy:
    """Fetches and briefly caches the authorization server's RFC 8414 metadata."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        issuer = settings.issuer_url
        if not issuer:
            raise ValueError("OAuth is not configured: set MCP_AUTHORIZATION_SERVER")
        self.url = f"{issuer}/.well-known/oauth-authorization-server"
        self._timeout = settings.jwks_timeout_seconds
        self._cache_seconds = settings.metadata_cache_seconds
        self._clock = clock
        self._cached: tuple[float, UpstreamResponse] | None = None

    async def fetch(self) -> UpstreamResponse | None:
        """Return the upstream response, or ``None`` when the upstream cannot be reached."""
        now = self._clock.time()
        if self._cached is not None and now - self._cached[0] < self._cache_seconds:
            return self._cached[1]
        client = AsyncHTTPClient()
        try:
            response = await client.fetch(
                HTTPRequest(self.url, request_timeout=self._timeout, connect_timeout=self._timeout),
                raise_error=False,
            )
        except (OSError, HTTPClientError) as exc:
            log.warning("Authorization server metadata fetch failed from %s: %s", self.url, exc)
            return None
        if response.code == 599:
            log.warning("Authorization server metadata fetch failed from %s: %s", self.url, response.error)
            return None
        result = UpstreamResponse(
            status=response.code,
            content_type=response.headers.get("Content-Type", "application/json"),
            body=response.body or b"",
        )
        if response.code == 200:
            self._cached = (now, result)
        return result
