"""Settings: the variable names operators already use, modes, fallbacks and masking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from executor_tornado.settings import Settings


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


def test_issuer_variables_first_one_set_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["MCP_AUTHORIZATION_SERVER", "MCP_AUTHORIZATION_SERVER_URL", "WORKOS_AUTHKIT_ISSUER", "WORKOS_AUTHKIT_DOMAIN"]
    for index, name in enumerate(names):
        env = {later: f"https://later-{later.lower()}.example" for later in names[index + 1 :]}
        env[name] = f"https://{index}.example/"
        for other in names[:index]:
            monkeypatch.delenv(other, raising=False)
        settings = settings_from(env, monkeypatch)
        assert settings.issuer_url == f"https://{index}.example", name
        for later in names[index + 1 :]:
            monkeypatch.delenv(later, raising=False)
        monkeypatch.delenv(name)


def test_bare_authkit_domain_gets_https(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from({"WORKOS_AUTHKIT_DOMAIN": "auth.example.com"}, monkeypatch)
    assert settings.issuer_url == "https://auth.example.com"


@pytest.mark.parametrize(
    ("env", "required"),
    [
        ({}, False),
        ({"EXECUTOR_DEPLOYMENT_MODE": "cloud"}, True),
        ({"EXECUTOR_DEPLOYMENT_MODE": "hosted"}, True),
        ({"EXECUTOR_DEPLOYMENT_MODE": "Production"}, True),
        ({"EXECUTOR_DEPLOYMENT_MODE": "prod"}, True),
        ({"EXECUTOR_DEPLOYMENT_MODE": "self-hosted", "EXECUTOR_ENFORCE_MCP_AUTH": "1"}, False),
        ({"EXECUTOR_DEPLOYMENT_MODE": "self_hosted"}, False),
        ({"EXECUTOR_DEPLOYMENT_MODE": "selfhosted"}, False),
        ({"EXECUTOR_ENFORCE_MCP_AUTH": "TRUE"}, True),
        ({"EXECUTOR_ENFORCE_MCP_AUTH": "on"}, True),
        ({"EXECUTOR_ENFORCE_MCP_AUTH": "Yes"}, True),
        ({"EXECUTOR_ENFORCE_MCP_AUTH": "0"}, False),
        ({"EXECUTOR_ENFORCE_MCP_AUTH": "nope"}, False),
    ],
)
def test_deployment_mode(env: dict[str, str], required: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from(env, monkeypatch).oauth_required is required


@pytest.mark.parametrize(("value", "expected"), [("60", 60), ("0", 604800), ("-5", 604800), ("soon", 604800), ("", 604800)])
def test_token_ttl_fallback(value: str, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from({"ANONYMOUS_AUTH_TOKEN_TTL_SECONDS": value, "MCP_API_KEY_TTL_SECONDS": value}, monkeypatch)
    assert settings.anonymous_token_ttl_seconds == expected
    assert settings.api_key_ttl_seconds == expected


def test_escaped_newlines_in_pem(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from({"ANONYMOUS_AUTH_PRIVATE_KEY_PEM": "-----BEGIN-----\\nabc\\n-----END-----"}, monkeypatch)
    assert settings.anonymous_private_key_pem == "-----BEGIN-----\nabc\n-----END-----"


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    settings = Settings(_env_file=None)
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.base_url == "http://127.0.0.1:8080"
    assert settings.resolved_data_dir == Path(".executor")
    assert settings.resolved_store_url == f"sqlite:///{Path('.executor/executor.db').resolve()}"
    assert settings.max_body_bytes == 4 * 1024 * 1024
    assert settings.max_sessions == 10000
    assert settings.sse_keepalive_seconds == 15.0


def test_state_directory_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from({"STATE_DIRECTORY": "/var/lib/executor-tornado"}, monkeypatch)
    assert settings.resolved_data_dir == Path("/var/lib/executor-tornado")


def test_invalid_trusted_proxy_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="EXECUTOR_TRUSTED_PROXIES"):
        settings_from({"EXECUTOR_TRUSTED_PROXIES": "10.0.0.0/8,not-a-cidr"}, monkeypatch)


def test_config_command_masks_secrets(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MCP_API_KEY_SECRET": "super-secret-value",
        "STRIPE_WEBHOOK_SECRET": "whsec_hidden",
        "EXECUTOR_STORE_URL": "mongodb://admin:hunter2@127.0.0.1/executor",
        "EXECUTOR_DATA_DIR": str(tmp_path),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "executor_tornado.cli", "config"], env=env, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    assert "super-secret-value" not in completed.stdout
    assert "whsec_hidden" not in completed.stdout
    assert "hunter2" not in completed.stdout
    printed = json.loads(completed.stdout)
    assert printed["api_key_secret"] == "***"
    assert printed["store_url"] == "mongodb://admin:***@127.0.0.1/executor"


def test_invalid_setting_prints_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "EXECUTOR_PORT": "eighty", "EXECUTOR_DATA_DIR": str(tmp_path)}
    completed = subprocess.run(
        [sys.executable, "-m", "executor_tornado.cli", "config"], env=env, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 1
    assert completed.stderr.count("\n") == 1
    assert completed.stderr.startswith("executor-tornado: Invalid setting")
