"""Idempotent seeding of accounts, workspaces and API keys from a seed file.

A seed file (JSON or YAML) states which records should exist; applying it
creates what is missing, updates names that changed and leaves the rest
alone, so a cron job or deploy pipeline can apply the same file again and
again. API keys are matched by (account, workspace, label): a live key with
that label is kept, a missing, revoked or expired one is issued anew, and a
key entry with ``revoked: true`` revokes every live key with that label.

Example seed file::

    accounts:
      - {id: acct_ci, name: CI bot}
    workspaces:
      - {id: ws_ci, name: CI, owner: acct_ci}
    keys:
      - {account: acct_ci, workspace: ws_ci, label: deploy, output: /run/secrets/executor-ci-key}

Example::

    seed = load_seed(Path("seed.yaml"))
    report = await apply_seed(store, api_keys, seed, now=time.time())
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from executor_tornado.keys import ApiKeys
from store import Store
from store.records import Account, Workspace

__all__ = ["SeedError", "SeedReport", "apply_seed", "load_seed"]

_ACCOUNT_FIELDS = {"id", "name", "email", "kind", "disabled"}
_WORKSPACE_FIELDS = {"id", "name", "owner", "organization"}
_KEY_FIELDS = {"account", "workspace", "label", "ttl_seconds", "output", "revoked"}


class SeedError(Exception):
    """The seed file is invalid or names a record that does not exist; nothing was written."""


@dataclass
class SeedReport:
    """The changes :func:`apply_seed` made, one ``kind:id`` entry per record."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    new_keys: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_seed(path: Path) -> dict[str, Any]:
    """Read and check a JSON (``.json``) or YAML seed file; raise :class:`SeedError` when it is invalid."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SeedError(f"Cannot read seed file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise SeedError(f"Seed file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SeedError(f"Seed file {path} must contain a mapping with accounts, workspaces and keys")
    unknown = set(data) - {"accounts", "workspaces", "keys"}
    if unknown:
        raise SeedError(f"Seed file {path}: unknown section {sorted(unknown)[0]!r}; use accounts, workspaces, keys")

    seed = {
        "accounts": _entries(data, "accounts", _ACCOUNT_FIELDS, required=("id",)),
        "workspaces": _entries(data, "workspaces", _WORKSPACE_FIELDS, required=("id", "name")),
        "keys": _entries(data, "keys", _KEY_FIELDS, required=("account", "workspace", "label")),
    }
    for account in seed["accounts"]:
        if account.get("kind", "anonymous") not in ("anonymous", "workos"):
            raise SeedError(f"accounts: {account['id']!r} has kind {account['kind']!r}; use anonymous or workos")
    for key in seed["keys"]:
        ttl = key.get("ttl_seconds")
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0):
            raise SeedError(f"keys: {key['label']!r} has ttl_seconds {ttl!r}; use a positive whole number")
    _check_unique(seed["accounts"], "accounts", lambda e: e["id"])
    _check_unique(seed["workspaces"], "workspaces", lambda e: e["id"])
    _check_unique(seed["keys"], "keys", lambda e: (e["account"], e["workspace"], e["label"]))
    return seed


def _entries(data: dict[str, Any], section: str, allowed: set[str], required: tuple[str, ...]) -> list[dict[str, Any]]:
    entries = data.get(section) or []
    if not isinstance(entries, list):
        raise SeedError(f"{section} must be a list")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise SeedError(f"{section}[{index}] must be a mapping")
        unknown = set(entry) - allowed
        if unknown:
            raise SeedError(f"{section}[{index}]: unknown field {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(allowed))}")
        for name in required:
            value = entry.get(name)
            if not isinstance(value, str) or not value.strip():
                raise SeedError(f"{section}[{index}]: {name} is missing or empty")
    return entries


def _check_unique(entries: list[dict[str, Any]], section: str, key: Any) -> None:
    seen = set()
    for entry in entries:
        identity = key(entry)
        if identity in seen:
            raise SeedError(f"{section}: {identity!r} appears twice")
        seen.add(identity)


async def apply_seed(store: Store, api_keys: ApiKeys, seed: dict[str, Any], *, now: float) -> SeedReport:
    """Make the store match ``seed`` (see the module docstring) and return what changed.

    References are checked before anything is written, so a seed file
    naming an unknown account or workspace raises :class:`SeedError` and
    changes nothing. New keys are written to their ``output`` file (mode
    0600) when one is given, else returned in ``new_keys``.
    """
    await _check_references(store, seed)
    report = SeedReport()

    for entry in seed["accounts"]:
        await _apply_account(store, entry, now, report)
    for entry in seed["workspaces"]:
        await _apply_workspace(store, entry, now, report)
    for entry in seed["keys"]:
        await _apply_key(store, api_keys, entry, now, report)
    return report


async def _check_references(store: Store, seed: dict[str, Any]) -> None:
    accounts = {entry["id"]: entry for entry in seed["accounts"]}
    workspaces = {entry["id"] for entry in seed["workspaces"]}

    async def account_kind(account_id: str) -> str | None:
        if account_id in accounts:
            return accounts[account_id].get("kind", "anonymous")
        stored = await store.get_account(account_id)
        return None if stored is None else stored.kind

    for entry in seed["workspaces"]:
        owner = entry.get("owner")
        if owner and await account_kind(owner) is None:
            raise SeedError(f"workspaces: {entry['id']!r} names owner {owner!r}, which is neither in the seed file nor in the store")
        organization = entry.get("organization")
        if organization and await store.get_organization(organization) is None:
            raise SeedError(f"workspaces: {entry['id']!r} names organization {organization!r}, which is not in the store")
    for entry in seed["keys"]:
        kind = await account_kind(entry["account"])
        if kind is None:
            raise SeedError(f"keys: {entry['label']!r} names account {entry['account']!r}, which is neither in the seed file nor in the store")
        if kind != "anonymous" and not entry.get("revoked"):
            raise SeedError(
                f"keys: {entry['label']!r} names account {entry['account']!r} of kind {kind!r}; "
                "API keys authenticate only accounts of kind 'anonymous'"
            )
        if entry["workspace"] not in workspaces and await store.get_workspace(entry["workspace"]) is None:
            raise SeedError(f"keys: {entry['label']!r} names workspace {entry['workspace']!r}, which is neither in the seed file nor in the store")


async def _apply_account(store: Store, entry: dict[str, Any], now: float, report: SeedReport) -> None:
    label = f"account:{entry['id']}"
    existing = await store.get_account(entry["id"])
    wanted = {
        "kind": entry.get("kind", "anonymous"),
        "name": entry.get("name"),
        "email": entry.get("email"),
        "disabled": bool(entry.get("disabled", False)),
    }
    if existing is None:
        await store.put_account(Account(id=entry["id"], created_at=now, **wanted))
        report.created.append(label)
        return
    current = {name: getattr(existing, name) for name in wanted}
    if current == wanted:
        report.unchanged.append(label)
        return
    await store.put_account(dataclasses.replace(existing, updated_at=now, **wanted))
    report.updated.append(label)


async def _apply_workspace(store: Store, entry: dict[str, Any], now: float, report: SeedReport) -> None:
    label = f"workspace:{entry['id']}"
    existing = await store.get_workspace(entry["id"])
    wanted = {
        "name": entry["name"],
        "owner_account_id": entry.get("owner"),
        "organization_id": entry.get("organization"),
    }
    if existing is None:
        await store.put_workspace(Workspace(id=entry["id"], created_at=now, **wanted))
        report.created.append(label)
        return
    if {name: getattr(existing, name) for name in wanted} == wanted:
        report.unchanged.append(label)
        return
    await store.put_workspace(dataclasses.replace(existing, **wanted))
    report.updated.append(label)


async def _apply_key(store: Store, api_keys: ApiKeys, entry: dict[str, Any], now: float, report: SeedReport) -> None:
    name = f"key:{entry['account']}/{entry['workspace']}/{entry['label']}"
    records = await store.list_api_keys(account_id=entry["account"], workspace_id=entry["workspace"])
    live = [r for r in records if r.label == entry["label"] and r.revoked_at is None and r.expires_at > now]

    if entry.get("revoked"):
        for record in live:
            await store.revoke_api_key(record.jti, now)
            report.revoked.append(f"{name} ({record.jti})")
        if not live:
            report.unchanged.append(name)
        return
    if live:
        report.unchanged.append(name)
        return

    api_key, record = api_keys.issue(
        entry["account"], entry["workspace"], ttl_seconds=entry.get("ttl_seconds"), label=entry["label"]
    )
    output = entry.get("output")
    if output:
        # Write the key before recording it: a key that could not be saved
        # is never recorded, so the next run issues it again.
        _write_secret(Path(output), api_key)
    await store.insert_api_key(record)
    report.created.append(f"{name} ({record.jti})")
    new_key: dict[str, Any] = {"key": name, "jti": record.jti}
    if output:
        new_key["output"] = output
    else:
        new_key["apiKey"] = api_key
    report.new_keys.append(new_key)


def _write_secret(path: Path, value: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(value + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        raise SeedError(f"Cannot write the new key to {path}: {exc.strerror}") from None
