"""Operator commands for billing records and accounts: ``billing show`` and ``account ...``.

They open the store the service uses (``EXECUTOR_STORE_URL``, else the
SQLite file in ``EXECUTOR_DATA_DIR``) and print JSON. An operator sees what
the Stripe and WorkOS webhooks stored and creates the accounts that API keys
need (``executor-tornado keys`` issues the keys).

Example::

    executor-tornado billing show org_01H...
    executor-tornado account show user_01H...
    executor-tornado account create --id acct_ci --name "CI bot"
    executor-tornado account disable acct_ci
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from executor_tornado.settings import Settings
from store import Store, StoreError, open_store
from store.records import Account

__all__ = ["AdminError", "add_commands", "as_json", "load_settings", "run_command", "with_store"]

T = TypeVar("T")

ACCOUNT_KINDS = ("anonymous", "workos")


class AdminError(Exception):
    """A command failed in a way the operator can fix; printed as one line."""


def add_commands(subparsers: Any) -> None:
    """Add the ``billing`` and ``account`` commands to the ``executor-tornado`` parser."""
    billing = subparsers.add_parser("billing", help="show the Stripe billing records of organizations")
    billing_commands = billing.add_subparsers(dest="billing_command", required=True)
    billing_show = billing_commands.add_parser(
        "show", help="print an organization and its billing records (customer, subscriptions, ...) as JSON"
    )
    billing_show.add_argument("organization_id", metavar="ORG", help="organization id, such as a WorkOS org_... id")
    billing_show.set_defaults(func=_cmd_billing_show)

    account = subparsers.add_parser("account", help="create, list, show, disable and enable accounts")
    account_commands = account.add_subparsers(dest="account_command", required=True)
    account_show = account_commands.add_parser(
        "show", help="print an account, its personal workspaces and its API keys (without key bytes) as JSON"
    )
    account_show.add_argument("account_id", metavar="ID", help="account id: anon_... or a WorkOS user_... id")
    account_show.set_defaults(func=_cmd_account_show)

    account_create = account_commands.add_parser(
        "create", help="create an account for API keys and print it as JSON"
    )
    account_create.add_argument("--id", help="account id (default: a new anon_... id)")
    account_create.add_argument("--name", help="display name, such as the service that uses the keys")
    account_create.add_argument("--email", help="contact address")
    account_create.add_argument(
        "--kind",
        choices=ACCOUNT_KINDS,
        default="anonymous",
        help="anonymous (default): authenticates with API keys on /v1/mcp/anonymous; "
        "workos: an OAuth subject, whose id must be its WorkOS user id",
    )
    account_create.set_defaults(func=_cmd_account_create)
    account_list = account_commands.add_parser("list", help="print every account as JSON, oldest first")
    account_list.add_argument("--kind", choices=ACCOUNT_KINDS, help="only accounts of this kind")
    account_list.set_defaults(func=_cmd_account_list)
    for verb in ("disable", "enable"):
        command = account_commands.add_parser(
            verb,
            help="disable an account: its API keys and tokens get 401 on every MCP path"
            if verb == "disable"
            else "enable a disabled account",
        )
        command.add_argument("account_id", metavar="ID")
        command.set_defaults(func=_cmd_account_set_disabled, disabled=verb == "disable")


def _cmd_billing_show(args: argparse.Namespace) -> int:
    organization_id = args.organization_id

    async def show(store: Store) -> dict[str, Any]:
        organization = await store.get_organization(organization_id)
        records = await store.list_billing_records(organization_id)
        if organization is None and not records:
            raise AdminError(f"No organization or billing records found for {organization_id!r}")
        return {
            "organization": as_json(organization),
            "billingRecords": [as_json(record) for record in records],
        }

    return run_command(lambda: with_store(show))


def _cmd_account_show(args: argparse.Namespace) -> int:
    account_id = args.account_id

    async def show(store: Store) -> dict[str, Any]:
        account = await store.get_account(account_id)
        if account is None:
            raise AdminError(f"Account {account_id!r} not found")
        workspaces = await store.list_workspaces(owner_account_id=account_id)
        keys = await store.list_api_keys(account_id=account_id)
        return {
            "account": as_json(account),
            "workspaces": [as_json(workspace) for workspace in workspaces],
            "apiKeys": [as_json(key) for key in keys],
        }

    return run_command(lambda: with_store(show))


def _cmd_account_create(args: argparse.Namespace) -> int:
    from executor_tornado.cli_keys import validate_record_id
    from executor_tornado.keys import new_id

    def command() -> dict[str, Any]:
        account_id = validate_record_id("account", args.id) if args.id else new_id("anon")

        async def create(store: Store) -> dict[str, Any]:
            if await store.get_account(account_id) is not None:
                raise AdminError(f"Account {account_id!r} already exists")
            account = Account(
                id=account_id, kind=args.kind, created_at=time.time(), email=args.email, name=args.name
            )
            await store.put_account(account)
            return as_json(account)

        return with_store(create)

    return run_command(command)


def _cmd_account_list(args: argparse.Namespace) -> int:
    async def listing(store: Store) -> list[dict[str, Any]]:
        accounts = await store.list_accounts()
        return [as_json(account) for account in accounts if args.kind is None or account.kind == args.kind]

    return run_command(lambda: with_store(listing))


def _cmd_account_set_disabled(args: argparse.Namespace) -> int:
    account_id = args.account_id

    async def update(store: Store) -> dict[str, Any]:
        account = await store.get_account(account_id)
        if account is None:
            raise AdminError(f"Account {account_id!r} not found")
        if account.disabled != args.disabled:
            account.disabled = args.disabled
            account.updated_at = time.time()
            await store.put_account(account)
        return as_json(account)

    return run_command(lambda: with_store(update))


def with_store(action: Callable[[Store], Awaitable[T]]) -> T:
    """Open the configured store, run ``action`` on it and close it."""
    settings = load_settings()
    url = settings.resolved_store_url
    if url.startswith("sqlite:///"):
        # Opening a missing SQLite file would create an empty store.
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            raise AdminError(
                f"No store at {path}: set EXECUTOR_DATA_DIR or EXECUTOR_STORE_URL to the service's store"
            )

    try:
        store = open_store(url)
    except ValueError as exc:
        raise AdminError(str(exc)) from None

    async def run() -> T:
        try:
            await store.open()
            return await action(store)
        except StoreError as exc:
            raise AdminError(f"Reading the store failed: {exc}") from None
        finally:
            await store.close()

    return asyncio.run(run())


def load_settings(**overrides: object) -> Settings:
    """Read the settings, with ``overrides`` that are not ``None`` taking precedence; raise :class:`AdminError`."""
    try:
        return Settings(**{name: value for name, value in overrides.items() if value is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(part) for part in first.get("loc", ()))
        raise AdminError(f"Invalid setting {location}: {first.get('msg')}") from None


def run_command(command: Callable[[], Any]) -> int:
    """Print the command's result as JSON and return 0, or print its error as one line and return 1."""
    try:
        result = command()
    except AdminError as exc:
        print(f"executor-tornado: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def as_json(record: Any) -> dict[str, Any] | None:
    return None if record is None else dataclasses.asdict(record)

