"""Service configuration from environment variables (and an optional ``.env``).

One :class:`Settings` class reads every variable. Names that operators of
the original platform already use (``MCP_AUTHORIZATION_SERVER``,
``ANONYMOUS_AUTH_*``, ``MCP_API_KEY_*``, ``STRIPE_*``, ``WORKOS_*``) keep
their meaning; the service's own settings use the ``EXECUTOR_`` prefix.

Example::

    settings = Settings()                    # reads os.environ and .env
    settings = Settings(port=0, data_dir=tmp)  # explicit values win
    if settings.oauth_required and not settings.authorization_server:
        ...
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

__all__ = ["Settings", "SECRET_FIELDS"]

_REQUIRED_MODES = {"cloud", "hosted", "production", "prod"}
_OPTIONAL_MODES = {"self-hosted", "self_hosted", "selfhosted"}
_TRUTHY = {"1", "true", "yes", "on"}

DEFAULT_TOKEN_TTL_SECONDS = 604800

SECRET_FIELDS = frozenset(
    {
        "anonymous_private_key_pem",
        "api_key_secret",
        "stripe_webhook_secret",
        "stripe_secret_key",
        "workos_api_key",
        "workos_webhook_secret",
    }
)
"""Settings that ``executor-tornado config`` masks."""


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of the service; see the README for the variable table."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    # -- listening and public address ----------------------------------------
    host: str = Field("127.0.0.1", validation_alias=_env("EXECUTOR_HOST"))
    port: int = Field(8080, ge=0, le=65535, validation_alias=_env("EXECUTOR_PORT"))
    public_url: str | None = Field(None, validation_alias=_env("EXECUTOR_PUBLIC_URL"))
    data_dir: Path | None = Field(None, validation_alias=_env("EXECUTOR_DATA_DIR"))
    store_url: str | None = Field(None, validation_alias=_env("EXECUTOR_STORE_URL"))
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("EXECUTOR_TRUSTED_PROXIES")
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("EXECUTOR_ALLOWED_ORIGINS")
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("EXECUTOR_ALLOWED_HOSTS")
    )

    # -- authentication --------------------------------------------------------
    authorization_server: str | None = Field(
        None,
        validation_alias=_env(
            "MCP_AUTHORIZATION_SERVER",
            "MCP_AUTHORIZATION_SERVER_URL",
            "WORKOS_AUTHKIT_ISSUER",
            "WORKOS_AUTHKIT_DOMAIN",
        ),
    )
    deployment_mode: str | None = Field(None, validation_alias=_env("EXECUTOR_DEPLOYMENT_MODE"))
    enforce_mcp_auth: str | None = Field(None, validation_alias=_env("EXECUTOR_ENFORCE_MCP_AUTH"))
    oauth_audience: str | None = Field(None, validation_alias=_env("EXECUTOR_OAUTH_AUDIENCE"))
    oauth_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384", "PS512", "EdDSA"],
        validation_alias=_env("EXECUTOR_OAUTH_ALGORITHMS"),
    )
    jwks_timeout_seconds: float = Field(5.0, gt=0, validation_alias=_env("EXECUTOR_JWKS_TIMEOUT_SECONDS"))
    metadata_cache_seconds: float = Field(60.0, ge=0, validation_alias=_env("EXECUTOR_METADATA_CACHE_SECONDS"))

    anonymous_issuer: str | None = Field(None, validation_alias=_env("ANONYMOUS_AUTH_ISSUER"))
    anonymous_private_key_pem: str | None = Field(None, validation_alias=_env("ANONYMOUS_AUTH_PRIVATE_KEY_PEM"))
    anonymous_public_key_pem: str | None = Field(None, validation_alias=_env("ANONYMOUS_AUTH_PUBLIC_KEY_PEM"))
    anonymous_token_ttl_seconds: Any = Field(
        DEFAULT_TOKEN_TTL_SECONDS, validation_alias=_env("ANONYMOUS_AUTH_TOKEN_TTL_SECONDS")
    )
    api_key_secret: str | None = Field(None, validation_alias=_env("MCP_API_KEY_SECRET"))
    api_key_ttl_seconds: Any = Field(DEFAULT_TOKEN_TTL_SECONDS, validation_alias=_env("MCP_API_KEY_TTL_SECONDS"))

    # -- webhooks ----------------------------------------------------------------
    stripe_webhook_secret: str | None = Field(None, validation_alias=_env("STRIPE_WEBHOOK_SECRET"))
    stripe_secret_key: str | None = Field(None, validation_alias=_env("STRIPE_SECRET_KEY"))
    workos_client_id: str | None = Field(None, validation_alias=_env("WORKOS_CLIENT_ID"))
    workos_api_key: str | None = Field(None, validation_alias=_env("WORKOS_API_KEY"))
    workos_webhook_secret: str | None = Field(None, validation_alias=_env("WORKOS_WEBHOOK_SECRET"))

    # -- MCP transport -----------------------------------------------------------
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, validation_alias=_env("EXECUTOR_MAX_BODY_BYTES"))
    session_idle_seconds: float = Field(1800.0, gt=0, validation_alias=_env("EXECUTOR_SESSION_IDLE_SECONDS"))
    max_sessions: int = Field(10000, gt=0, validation_alias=_env("EXECUTOR_MAX_SESSIONS"))
    max_sessions_per_principal: int = Field(
        100, gt=0, validation_alias=_env("EXECUTOR_MAX_SESSIONS_PER_PRINCIPAL")
    )
    sse_keepalive_seconds: float = Field(15.0, gt=0, validation_alias=_env("EXECUTOR_SSE_KEEPALIVE_SECONDS"))
    sse_retry_ms: int = Field(3000, gt=0, validation_alias=_env("EXECUTOR_SSE_RETRY_MS"))
    sse_buffer_bytes: int = Field(1024 * 1024, gt=0, validation_alias=_env("EXECUTOR_SSE_BUFFER_BYTES"))
    event_log_max_events: int = Field(1000, gt=0, validation_alias=_env("EXECUTOR_EVENT_LOG_MAX_EVENTS"))
    event_log_max_bytes: int = Field(4 * 1024 * 1024, gt=0, validation_alias=_env("EXECUTOR_EVENT_LOG_MAX_BYTES"))
    event_log_max_age_seconds: float = Field(
        600.0, gt=0, validation_alias=_env("EXECUTOR_EVENT_LOG_MAX_AGE_SECONDS")
    )
    json_response_timeout_seconds: float = Field(
        0.05, ge=0, validation_alias=_env("EXECUTOR_JSON_RESPONSE_TIMEOUT_SECONDS")
    )

    # -- rate limits ------------------------------------------------------------
    rate_limit_enabled: bool = Field(True, validation_alias=_env("EXECUTOR_RATE_LIMIT_ENABLED"))
    mcp_rate_per_minute: int = Field(120, gt=0, validation_alias=_env("EXECUTOR_MCP_RATE_PER_MINUTE"))
    token_rate_per_minute: int = Field(30, gt=0, validation_alias=_env("EXECUTOR_TOKEN_RATE_PER_MINUTE"))
    bootstrap_global_per_minute: int = Field(
        180, gt=0, validation_alias=_env("EXECUTOR_BOOTSTRAP_GLOBAL_PER_MINUTE")
    )
    bootstrap_rate_per_minute: int = Field(24, gt=0, validation_alias=_env("EXECUTOR_BOOTSTRAP_RATE_PER_MINUTE"))
    ip_ceiling_factor: float = Field(4.0, ge=1, validation_alias=_env("EXECUTOR_IP_CEILING_FACTOR"))

    # -- sandbox -------------------------------------------------------------------
    sandbox_workers: int = Field(2, gt=0, validation_alias=_env("EXECUTOR_SANDBOX_WORKERS"))
    sandbox_max_duration_seconds: float = Field(
        30.0, gt=0, validation_alias=_env("EXECUTOR_SANDBOX_MAX_DURATION_SECONDS")
    )
    approval_wait_seconds: float = Field(300.0, ge=0, validation_alias=_env("EXECUTOR_APPROVAL_WAIT_SECONDS"))
    sandbox_max_memory_bytes: int = Field(
        256 * 1024 * 1024, gt=0, validation_alias=_env("EXECUTOR_SANDBOX_MAX_MEMORY_BYTES")
    )
    sandbox_max_recursion_depth: int = Field(1000, gt=0, validation_alias=_env("EXECUTOR_SANDBOX_MAX_RECURSION"))
    sandbox_max_host_calls: int = Field(1000, gt=0, validation_alias=_env("EXECUTOR_SANDBOX_MAX_HOST_CALLS"))
    sandbox_max_output_bytes: int = Field(
        1024 * 1024, gt=0, validation_alias=_env("EXECUTOR_SANDBOX_MAX_OUTPUT_BYTES")
    )
    sandbox_max_result_bytes: int = Field(
        1024 * 1024, gt=0, validation_alias=_env("EXECUTOR_SANDBOX_MAX_RESULT_BYTES")
    )

    # -- operations ---------------------------------------------------------------
    log_format: str = Field("auto", validation_alias=_env("EXECUTOR_LOG_FORMAT"))
    log_level: str = Field("INFO", validation_alias=_env("EXECUTOR_LOG_LEVEL"))
    shutdown_grace_seconds: float = Field(10.0, ge=0, validation_alias=_env("EXECUTOR_SHUTDOWN_GRACE_SECONDS"))
    mcp_plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("EXECUTOR_MCP_PLUGINS")
    )

    # -- validators ------------------------------------------------------------------

    @field_validator("trusted_proxies", "allowed_origins", "allowed_hosts", "oauth_algorithms", "mcp_plugins",
                     mode="before")
    @classmethod
    def _parse_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _check_cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"EXECUTOR_TRUSTED_PROXIES: {cidr!r} is not a CIDR such as 10.0.0.0/8") from None
        return value

    @field_validator("anonymous_token_ttl_seconds", "api_key_ttl_seconds", mode="before")
    @classmethod
    def _positive_or_default(cls, value: Any) -> int:
        try:
            number = int(str(value).strip())
        except (TypeError, ValueError):
            return DEFAULT_TOKEN_TTL_SECONDS
        return number if number > 0 else DEFAULT_TOKEN_TTL_SECONDS

    @field_validator("anonymous_private_key_pem", "anonymous_public_key_pem", mode="before")
    @classmethod
    def _unescape_newlines(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("\\n", "\n")
        return value

    @field_validator("authorization_server", "public_url", "anonymous_issuer", mode="before")
    @classmethod
    def _strip_url(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().rstrip("/")
            return value or None
        return value

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, value: str) -> str:
        if value not in {"auto", "json", "text"}:
            raise ValueError("EXECUTOR_LOG_FORMAT must be auto, json or text")
        return value

    # -- derived values -----------------------------------------------------------------

    @property
    def oauth_required(self) -> bool:
        """Whether OAuth (and every secret) must be configured: cloud mode."""
        mode = (self.deployment_mode or "").strip().lower()
        if mode in _REQUIRED_MODES:
            return True
        if mode in _OPTIONAL_MODES:
            return False
        return (self.enforce_mcp_auth or "").strip().lower() in _TRUTHY

    @property
    def issuer_url(self) -> str | None:
        """The authorization server's issuer URL, with a scheme even when only a domain was given."""
        value = self.authorization_server
        if value and "://" not in value:
            return f"https://{value}"
        return value

    @property
    def base_url(self) -> str:
        """The public base URL (no trailing slash)."""
        if self.public_url:
            return self.public_url
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def anonymous_iss(self) -> str:
        return self.anonymous_issuer or self.base_url

    @property
    def resolved_data_dir(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir
        state_directory = os.environ.get("STATE_DIRECTORY")
        if state_directory:
            return Path(state_directory.split(":")[0])
        return Path(".executor")

    @property
    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        return f"sqlite:///{(self.resolved_data_dir / 'executor.db').resolve()}"

    @property
    def public_host(self) -> str:
        """Host (and port) of the public URL, as a client sends it in ``Host``."""
        return urlsplit(self.base_url).netloc.lower()

    def masked(self) -> dict[str, Any]:
        """Return the effective settings with secrets replaced by ``***``."""
        values = self.model_dump(mode="json")
        for name in SECRET_FIELDS:
            if values.get(name):
                values[name] = "***"
        values["oauth_required"] = self.oauth_required
        values["base_url"] = self.base_url
        values["store_url"] = _mask_url_password(self.resolved_store_url)
        values["data_dir"] = str(self.resolved_data_dir)
        return values


def _mask_url_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url
