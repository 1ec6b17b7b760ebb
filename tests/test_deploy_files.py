"""The deploy samples: systemd units pass ``systemd-analyze verify``, nginx ``nginx -t``.

Both tools come from Debian (``apt-get install -y systemd nginx``; ``make
test`` installs them). A missing tool fails the test with that command
rather than skipping it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = REPOSITORY / "deploy" / "systemd"
INSTALLED_BINARY = "/opt/executor-tornado/venv/bin/executor-tornado"


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `apt-get update && apt-get install -y {package}`")
    return path


def install_units(target: Path) -> None:
    """Copy the units into ``target`` with ExecStart pointing at a stand-in executable.

    ``systemd-analyze verify`` rejects a unit whose ExecStart binary is
    missing, and the test host has no /opt/executor-tornado.
    """
    binary = target / "bin" / "executor-tornado"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    for unit in SYSTEMD_DIR.glob("*.service"):
        text = unit.read_text()
        assert INSTALLED_BINARY in text, f"{unit.name} does not start {INSTALLED_BINARY}"
        (target / unit.name).write_text(text.replace(INSTALLED_BINARY, str(binary)))


def verify(analyze: str, unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("unit", ["executor-tornado.service", "executor-tornado@8081.service"])
def test_systemd_unit_verifies_cleanly(tmp_path: Path, unit: str) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    install_units(tmp_path)

    result = verify(analyze, tmp_path / unit)

    # verify exits 0 even for unknown keys and invalid values; it only
    # prints a warning, so any output is a failure.
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert result.stdout == "", result.stdout


def test_systemd_verify_reports_invalid_setting(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    install_units(tmp_path)
    unit = tmp_path / "executor-tornado.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=everything"))

    result = verify(analyze, unit)

    assert "ProtectSystem" in result.stderr or "protect system" in result.stderr.lower(), result.stderr


def test_systemd_units_declare_notify_and_hardening() -> None:
    for name in ("executor-tornado.service", "executor-tornado@.service"):
        lines = set((SYSTEMD_DIR / name).read_text().splitlines())
        for directive in (
            "Type=notify",
            "WatchdogSec=30s",
            "DynamicUser=yes",
            "User=executor-tornado",
            "ProtectSystem=strict",
            "StateDirectory=executor-tornado",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
        ):
            assert directive in lines, f"{name} lacks {directive}"
    template = (SYSTEMD_DIR / "executor-tornado@.service").read_text()
    assert "serve --port %i" in template


def test_grace_period_fits_stop_timeout() -> None:
    """The sample grace period must end before systemd sends SIGKILL."""
    env = dict(
        line.split("=", 1)
        for line in (SYSTEMD_DIR / "executor-tornado.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    grace = float(env["EXECUTOR_SHUTDOWN_GRACE_SECONDS"])
    unit = (SYSTEMD_DIR / "executor-tornado.service").read_text()
    stop_timeout = next(line for line in unit.splitlines() if line.startswith("TimeoutStopSec="))
    assert grace < float(stop_timeout.removeprefix("TimeoutStopSec=").removesuffix("s"))
