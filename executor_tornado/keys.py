"""Signing keys, anonymous identity tokens and API keys.

The service signs two kinds of JWT of its own:

* anonymous identity tokens, ES256 with a P-256 key pair whose public half is
  published at ``/.well-known/jwks.json``;
* API keys, HS256 with ``MCP_API_KEY_SECRET``, recorded by ``jti`` in the
  store so they can be listed and revoked.

Example::

    material = load_key_material(settings, clock)   # generates in self-hosted mode
    token, claims = material.signer.issue_anonymous("anon_ab12...")
    api_key, record = material.api_keys.issue("anon_ab12...", "ws_1")
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from executor_tornado.clock import Clock
from executor_tornado.settings import Settings
from store.records import ApiKeyRecord

__all__ = [
    "ANONYMOUS_AUDIENCE",
    "API_KEY_AUDIENCE",
    "AnonymousSigner",
    "ApiKeyClaims",
    "ApiKeyError",
    "ApiKeys",
    "KeyMaterial",
    "load_key_material",
    "new_id",
]

log = logging.getLogger("executor_tornado.keys")

ANONYMOUS_AUDIENCE = "executor-anonymous"
API_KEY_AUDIENCE = "executor-mcp"

PRIVATE_KEY_FILE = "anonymous-signing-key.pem"
RETIRED_KEYS_FILE = "anonymous-retired-keys.json"
API_KEY_SECRET_FILE = "api-key-secret"
# Issued keys are under 1 KiB; anything far larger is rejected before parsing.
MAX_API_KEY_BYTES = 4096


def new_id(prefix: str) -> str:
    """Return ``<prefix>_<32 hex>`` from the OS random source (128 bits)."""
    return f"{prefix}_{secrets.token_hex(16)}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """Return the JWK of a P-256 public key with its RFC 7638 thumbprint as ``kid``."""
    numbers = public_key.public_numbers()
    x = _b64url(numbers.x.to_bytes(32, "big"))
    y = _b64url(numbers.y.to_bytes(32, "big"))
    canonical = json.dumps({"crv": "P-256", "kty": "EC", "x": x, "y": y}, separators=(",", ":"), sort_keys=True)
    kid = _b64url(hashlib.sha256(canonical.encode()).digest())
    return {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "sig"}


def _write_secret_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@dataclass
class RetiredKey:
    """A former signing key whose tokens may still be valid until ``valid_until``."""

    jwk: dict[str, str]
    valid_until: float


class AnonymousSigner:
    """Issues ES256 anonymous identity tokens and publishes the JWKS."""

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey,
        *,
        issuer: str,
        ttl_seconds: int,
        clock: Clock,
        retired: list[RetiredKey] | None = None,
    ) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("ANONYMOUS_AUTH_PRIVATE_KEY_PEM must be a P-256 (secp256r1) key")
        self._private_key = private_key
        self.public_key = private_key.public_key()
        self.jwk = public_jwk(self.public_key)
        self.kid = self.jwk["kid"]
        header = {"alg": "ES256", "kid": self.kid, "typ": "JWT"}
        self._encoded_header = _b64url(json.dumps(header, separators=(",", ":")).encode())
        self.issuer = issuer
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._retired = retired or []

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """Return the JWKS: the current key, then retired keys whose tokens may still be live."""
        now = self._clock.time()
        keys = [self.jwk]
        keys.extend(r.jwk for r in self._retired if r.valid_until > now and r.jwk["kid"] != self.kid)
        return {"keys": keys}

    def issue_anonymous(self, account_id: str) -> tuple[str, dict[str, Any]]:
        """Sign an anonymous token for ``account_id``; return it and its claims."""
        now = int(self._clock.time())
        claims = {
            "iss": self.issuer,
            "sub": account_id,
            "aud": ANONYMOUS_AUDIENCE,
            "provider": "anonymous",
            "iat": now,
            "nbf": now - 5,
            "exp": now + self.ttl_seconds,
        }
        return self._sign(claims), claims

    def _sign(self, claims: dict[str, Any]) -> str:
        """Sign ``claims`` as a compact ES256 JWS.

        This is what ``jwt.encode`` produces for the same header, built by
        hand with a header encoded once per key, because issuance is a hot
        path. ``verify_anonymous`` and the tests verify tokens with PyJWT.
        """
        payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{self._encoded_header}.{payload}".encode("ascii")
        der = self._private_key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        return f"{signing_input.decode('ascii')}.{signature}"

    def verify_anonymous(self, token: str) -> dict[str, Any]:
        """Return the claims of a valid anonymous token; raise ``jwt.InvalidTokenError`` otherwise."""
        header = jwt.get_unverified_header(token)
        if header.get("alg") != "ES256":
            raise jwt.InvalidAlgorithmError("anonymous tokens are ES256")
        key = self._key_for(header.get("kid"))
        claims = jwt.decode(
            token,
            key,
            algorithms=["ES256"],
            audience=ANONYMOUS_AUDIENCE,
            issuer=self.issuer,
            options={"verify_exp": False, "verify_nbf": False, "require": ["exp", "iat", "sub", "iss", "aud"]},
        )
        check_token_times(claims, self._clock.time())
        if claims.get("provider") != "anonymous" or not str(claims.get("sub", "")).startswith("anon_"):
            raise jwt.InvalidTokenError("not an anonymous identity token")
        return claims

    def _key_for(self, kid: Any) -> ec.EllipticCurvePublicKey:
        if kid == self.kid:
            return self.public_key
        now = self._clock.time()
        for retired in self._retired:
            if retired.jwk["kid"] == kid and retired.valid_until > now:
                return jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(retired.jwk))  # type: ignore[return-value]
        raise jwt.InvalidKeyError("unknown key id")


def check_token_times(claims: dict[str, Any], now: float, leeway: float = 0.0) -> None:
    """Check ``exp`` and ``nbf`` against the injected clock (PyJWT reads the wall clock)."""
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or now >= exp + leeway:
        raise jwt.ExpiredSignatureError("token expired")
    nbf = claims.get("nbf")
    if nbf is not None and (not isinstance(nbf, (int, float)) or now + leeway < nbf):
        raise jwt.ImmatureSignatureError("token not yet valid")


class ApiKeyError(Exception):
    """An API key is invalid, expired or revoked; the message names which."""


@dataclass(frozen=True)
class ApiKeyClaims:
    jti: str
    account_id: str
    workspace_id: str
    expires_at: float


class ApiKeys:
    """Signs and checks HS256 API keys; the store records them by ``jti``."""

    def __init__(self, secret: str, *, issuer: str | None, ttl_seconds: int, clock: Clock) -> None:
        self._secret = secret
        self.issuer = issuer
        self.ttl_seconds = ttl_seconds
        self._clock = clock

    def issue(
        self, account_id: str, workspace_id: str, *, ttl_seconds: int | None = None, label: str | None = None
    ) -> tuple[str, ApiKeyRecord]:
        """Sign a key; the caller inserts the returned record into the store."""
        now = int(self._clock.time())
        expires = now + (ttl_seconds or self.ttl_seconds)
        jti = secrets.token_hex(16)
        claims: dict[str, Any] = {
            "aud": API_KEY_AUDIENCE,
            "sub": account_id,
            "accountId": account_id,
            "workspaceId": workspace_id,
            "jti": jti,
            "iat": now,
            "exp": expires,
        }
        if self.issuer:
            claims["iss"] = self.issuer
        token = jwt.encode(claims, self._secret, algorithm="HS256", headers={"typ": "JWT"})
        record = ApiKeyRecord(
            jti=jti, account_id=account_id, workspace_id=workspace_id, created_at=float(now),
            expires_at=float(expires), label=label,
        )
        return token, record

    def decode(self, token: str) -> ApiKeyClaims:
        """Verify signature, audience, issuer and lifetime; the caller checks revocation."""
        if len(token) > MAX_API_KEY_BYTES:
            raise ApiKeyError("API key is invalid")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                audience=API_KEY_AUDIENCE,
                issuer=self.issuer,
                options={"verify_exp": False, "verify_nbf": False, "require": ["exp", "jti", "sub"]},
            )
            check_token_times(claims, self._clock.time())
        except jwt.ExpiredSignatureError:
            raise ApiKeyError("API key expired") from None
        except jwt.PyJWTError:
            raise ApiKeyError("API key is invalid") from None
        account_id = claims.get("accountId") or claims.get("sub")
        workspace_id = claims.get("workspaceId")
        if not isinstance(account_id, str) or not isinstance(workspace_id, str) or not account_id or not workspace_id:
            raise ApiKeyError("API key is invalid")
        return ApiKeyClaims(
            jti=str(claims["jti"]), account_id=account_id, workspace_id=workspace_id, expires_at=float(claims["exp"])
        )


@dataclass
class KeyMaterial:
    """Key material that :func:`load_key_material` found or generated; ``None`` means not configured."""

    signer: AnonymousSigner | None
    api_keys: ApiKeys | None
    generated: list[str] = field(default_factory=list)


def load_key_material(settings: Settings, clock: Clock) -> KeyMaterial:
    """Load the anonymous key pair and API key secret.

    In self-hosted mode a missing value is generated once into the data
    directory (mode 0600) and reused on restart. In required (cloud) mode
    nothing is generated, and a missing value leaves that part ``None``.
    Raise ``ValueError`` for a malformed or mismatched key.
    """
    generated: list[str] = []
    data_dir = settings.resolved_data_dir
    may_generate = not settings.oauth_required

    private_key = _load_private_key(settings, data_dir, may_generate, generated)
    signer = None
    if private_key is not None:
        signer = AnonymousSigner(
            private_key,
            issuer=settings.anonymous_iss,
            ttl_seconds=settings.anonymous_token_ttl_seconds,
            clock=clock,
            retired=_load_retired(data_dir),
        )

    secret = settings.api_key_secret
    if not secret:
        path = data_dir / API_KEY_SECRET_FILE
        if path.exists():
            secret = path.read_text().strip()
        elif may_generate:
            secret = secrets.token_urlsafe(48)
            _write_secret_file(path, secret.encode())
            generated.append(str(path))
    api_keys = None
    if secret:
        api_keys = ApiKeys(
            secret, issuer=settings.anonymous_iss, ttl_seconds=settings.api_key_ttl_seconds, clock=clock
        )
    return KeyMaterial(signer=signer, api_keys=api_keys, generated=generated)


def _load_private_key(
    settings: Settings, data_dir: Path, may_generate: bool, generated: list[str]
) -> ec.EllipticCurvePrivateKey | None:
    pem = settings.anonymous_private_key_pem
    if pem:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("ANONYMOUS_AUTH_PRIVATE_KEY_PEM is not an EC private key")
        if settings.anonymous_public_key_pem:
            public = serialization.load_pem_public_key(settings.anonymous_public_key_pem.encode())
            if public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ) != key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ):
                raise ValueError("ANONYMOUS_AUTH_PUBLIC_KEY_PEM does not match ANONYMOUS_AUTH_PRIVATE_KEY_PEM")
        return key

    path = data_dir / PRIVATE_KEY_FILE
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC private key")
        return key
    if not may_generate:
        return None
    key = ec.generate_private_key(ec.SECP256R1())
    pem_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_secret_file(path, pem_bytes)
    generated.append(str(path))
    return key


def _load_retired(data_dir: Path) -> list[RetiredKey]:
    path = data_dir / RETIRED_KEYS_FILE
    if not path.exists():
        return []
    entries = json.loads(path.read_text())
    return [RetiredKey(jwk=entry["jwk"], valid_until=float(entry["validUntil"])) for entry in entries]


def rotate_signing_key(settings: Settings, clock: Clock) -> str:
    """Replace the generated anonymous signing key in the data directory.

    The old public key is kept in the JWKS until its last token expires.
    Return the new key id. Raise ``ValueError`` when the key comes from the
    environment, where the operator rotates it.
    """
    if settings.anonymous_private_key_pem:
        raise ValueError("The signing key comes from ANONYMOUS_AUTH_PRIVATE_KEY_PEM; rotate it there")
    data_dir = settings.resolved_data_dir
    path = data_dir / PRIVATE_KEY_FILE
    retired = _load_retired(data_dir)
    now = clock.time()
    if path.exists():
        old = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(old, ec.EllipticCurvePrivateKey)
        retired.append(RetiredKey(jwk=public_jwk(old.public_key()), valid_until=now + settings.anonymous_token_ttl_seconds))
    retired = [r for r in retired if r.valid_until > now]
    (data_dir / RETIRED_KEYS_FILE).write_text(
        json.dumps([{"jwk": r.jwk, "validUntil": r.valid_until} for r in retired], indent=2)
    )
    replacement = path.with_suffix(".new")
    if replacement.exists():
        replacement.unlink()
    key = ec.generate_private_key(ec.SECP256R1())
    _write_secret_file(
        replacement,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    os.replace(replacement, path)
    return public_jwk(key.public_key())["kid"]
