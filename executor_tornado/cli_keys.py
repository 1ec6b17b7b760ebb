"""Operator commands for API keys and workspaces.

``keys create`` prints the key once, with the MCP URL and configuration
snippets for Claude Desktop, Cursor and the MCP Inspector; the store keeps
only the key's ``jti``, so a lost key is revoked and replaced, never shown
again. The commands open the store the service uses (``EXECUTOR_STORE_URL``,
else the SQLite file in ``EXECUTOR_DATA_DIR``) and read the same API key
secret and issuer, so run them with the service's environment.

Example::

    executor-tornado account create --id acct_ci --name "CI bot"
    executor-tornado workspace create --id ws_ci --name CI --owner acct_ci
    executor-tornado keys create --account acct_ci --workspace ws_ci --label deploy
    executor-tornado keys list --workspace ws_ci
    executor-tornado keys revoke 3f2a...
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from typing import Any

from executor_tornado.cli_admin import AdminError, as_json, load_settings, run_command, with_store
from executor_tornado.clock import SystemClock
from executor_tornado.keys import API_KEY_SECRET_FILE, ApiKeys, new_id
from executor_tornado.settings import Settings
from store import Store
from store.records import Workspace

__all__ = ["add_commands", "api_keys_for", "client_snippets", "validate_record_id"]

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
SERVER_NAME = "executor"


def add_commands(subparsers: Any) -> None:
    """Add ``keys`` and ``workspace`` to the ``executor-tornado`` parser."""
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys for /v1/mcp/anonymous")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)

    create = key_commands.add_parser(
        "create", help="issue an API key; it is printed once, with MCP client configuration snippets"
    )
    create.add_argument("--account", required=True, help="account id; the account must be of kind anonymous")
    create.add_argument("--workspace", required=True, help="workspace id the key grants access to")
    create.add_argument("--label", help="note stored with the key, such as where it is used")
    create.add_argument(
        "--ttl", type=int, metavar="SECONDS", help="lifetime in seconds (default: MCP_API_KEY_TTL_SECONDS)"
    )
    create.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    create.set_defaults(func=_cmd_keys_create)

    listing = key_commands.add_parser("list", help="print API key records (never the keys) as JSON")
    listing.add_argument("--account", help="only keys of this account id")
    listing.add_argument("--workspace", help="only keys of this workspace id")
    listing.add_argument("--all", action="store_true", help="include revoked and expired keys")
    listing.set_defaults(func=_cmd_keys_list)

    revoke = key_commands.add_parser("revoke", help="revoke an API key by its jti; the next request with it gets 401")
    revoke.add_argument("jti", metavar="JTI", help="key id, as printed by keys create and keys list")
    revoke.set_defaults(func=_cmd_keys_revoke)

    workspace = subparsers.add_parser("workspace", help="create and list workspaces")
    workspace_commands = workspace.add_subparsers(dest="workspace_command", required=True)
    workspace_create = workspace_commands.add_parser("create", help="create a workspace and print it as JSON")
    workspace_create.add_argument("--name", required=True, help="display name")
    workspace_create.add_argument("--id", help="workspace id (default: a new ws_... id)")
    workspace_create.add_argument("--owner", help="account id owning this personal workspace")
    workspace_create.add_argument("--organization", help="organization id owning the workspace")
    workspace_create.set_defaults(func=_cmd_workspace_create)
    workspace_list = workspace_commands.add_parser("list", help="print workspaces as JSON")
    workspace_list.add_argument("--owner", help="only workspaces owned by this account id")
    workspace_list.add_argument("--organization", help="only workspaces of this organization id")
    workspace_list.set_defaults(func=_cmd_workspace_list)
    workspace_show = workspace_commands.add_parser("show", help="print a workspace and its API keys as JSON")
    workspace_show.add_argument("workspace_id", metavar="ID")
    workspace_show.set_defaults(func=_cmd_workspace_show)


# -- keys ------------------------------------------------------------------------------


def api_keys_for(settings: Settings) -> ApiKeys:
    """Return the signer the service uses, without generating a secret.

    A secret generated here would be one the running service does not
    know, so a missing secret is an error.
    """
    secret = settings.api_key_secret
    if not secret:
        path = settings.resolved_data_dir / API_KEY_SECRET_FILE
        if not path.exists():
            raise AdminError(
                f"No API key secret: set MCP_API_KEY_SECRET or start the service once so it generates {path}"
            )
        try:
            secret = path.read_text().strip()
        except OSError as exc:
            raise AdminError(f"Cannot read the API key secret {path}: {exc.strerror}; run as the service's user") from None
    if not settings.public_url and not settings.anonymous_issuer:
        print(
            f"executor-tornado: warning: EXECUTOR_PUBLIC_URL is not set, so keys get the issuer {settings.anonymous_iss}; "
            "a service listening on another address rejects them",
            file=sys.stderr,
        )
    return ApiKeys(secret, issuer=settings.anonymous_iss, ttl_seconds=settings.api_key_ttl_seconds, clock=SystemClock())


def client_snippets(mcp_url: str, api_key: str) -> dict[str, Any]:
    """MCP client configurations for ``mcp_url`` with ``api_key`` sent as ``X-API-Key``."""
    return {
        "claudeDesktop": {
            "mcpServers": {
                SERVER_NAME: {
                    "command": "npx",
                    "args": ["-y", "mcp-remote", mcp_url, "--header", "X-API-Key:${EXECUTOR_API_KEY}"],
                    "env": {"EXECUTOR_API_KEY": api_key},
                }
            }
        },
        "cursor": {"mcpServers": {SERVER_NAME: {"url": mcp_url, "headers": {"X-API-Key": api_key}}}},
        "inspector": (
            f"npx @modelcontextprotocol/inspector --cli '{mcp_url}' --transport http "
            f"--header 'X-API-Key: {api_key}' --method tools/list"
        ),
    }


def _cmd_keys_create(args: argparse.Namespace) -> int:
    if args.ttl is not None and args.ttl <= 0:
        print(f"executor-tornado: --ttl must be a positive number of seconds, not {args.ttl}", file=sys.stderr)
        return 1
    settings = load_settings()
    try:
        api_keys = api_keys_for(settings)

        async def create(store: Store) -> dict[str, Any]:
            await check_key_owner(store, args.account, args.workspace)
            api_key, record = api_keys.issue(args.account, args.workspace, ttl_seconds=args.ttl, label=args.label)
            await store.insert_api_key(record)
            mcp_url = f"{settings.base_url}/v1/mcp/anonymous?workspaceId={args.workspace}"
            return {
                "apiKey": api_key,
                "jti": record.jti,
                "accountId": record.account_id,
                "workspaceId": record.workspace_id,
                "expiresAt": _iso(record.expires_at),
                "mcpUrl": mcp_url,
                "clients": client_snippets(mcp_url, api_key),
            }

        created = with_store(create)
    except AdminError as exc:
        print(f"executor-tornado: {exc}", file=sys.stderr)
        return 1

    if args.json:
        print(json.dumps(created, indent=2))
    else:
        print(_render_created(created))
    return 0


async def check_key_owner(store: Store, account_id: str, workspace_id: str) -> None:
    """Raise :class:`AdminError` unless a key for this account and workspace would authenticate."""
    account = await store.get_account(account_id)
    if account is None:
        raise AdminError(f"Account {account_id!r} not found: create it with `executor-tornado account create`")
    if account.disabled:
        raise AdminError(f"Account {account_id!r} is disabled: enable it with `executor-tornado account enable`")
    if account.kind != "anonymous":
        raise AdminError(
            f"Account {account_id!r} is of kind {account.kind!r}; API keys authenticate only accounts of kind "
            "'anonymous' (OAuth accounts use /v1/mcp)"
        )
    if await store.get_workspace(workspace_id) is None:
        raise AdminError(f"Workspace {workspace_id!r} not found: create it with `executor-tornado workspace create`")


def _render_created(created: dict[str, Any]) -> str:
    clients = created["clients"]
    return "\n".join(
        [
            "API key (shown only now; store it in a secret manager):",
            "",
            f"  {created['apiKey']}",
            "",
            f"Key id (jti): {created['jti']}    expires: {created['expiresAt']}",
            f"MCP URL:      {created['mcpUrl']}",
            "Send the key in the X-API-Key header (or Authorization: Bearer).",
            "",
            "Claude Desktop (claude_desktop_config.json; needs Node.js for mcp-remote):",
            json.dumps(clients["claudeDesktop"], indent=2),
            "",
            "Cursor (~/.cursor/mcp.json or .cursor/mcp.json):",
            json.dumps(clients["cursor"], indent=2),
            "",
            "MCP Inspector (or open `npx @modelcontextprotocol/inspector`, pick Streamable HTTP,",
            "paste the URL and add the X-API-Key header):",
            f"  {clients['inspector']}",
        ]
    )


def _cmd_keys_list(args: argparse.Namespace) -> int:
    async def listing(store: Store) -> list[dict[str, Any]]:
        now = SystemClock().time()
        records = await store.list_api_keys(account_id=args.account, workspace_id=args.workspace)
        if not args.all:
            records = [r for r in records if r.revoked_at is None and r.expires_at > now]
        return [as_json(record) for record in records]

    return run_command(lambda: with_store(listing))


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    jti = args.jti

    async def revoke(store: Store) -> dict[str, Any]:
        record = await store.get_api_key(jti)
        if record is None:
            raise AdminError(f"API key {jti!r} not found: list keys with `executor-tornado keys list --all`")
        if record.revoked_at is None:
            await store.revoke_api_key(jti, SystemClock().time())
            record = await store.get_api_key(jti)
        return as_json(record)

    return run_command(lambda: with_store(revoke))


# -- workspaces ----------------------------------------------------------------------------


def validate_record_id(kind: str, value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise AdminError(
            f"Invalid {kind} id {value[:60]!r}: use 1 to 128 letters, digits or _.:- starting with a letter or digit"
        )
    return value


def _cmd_workspace_create(args: argparse.Namespace) -> int:
    def command() -> dict[str, Any]:
        workspace_id = validate_record_id("workspace", args.id) if args.id else new_id("ws")
        if not args.name.strip():
            raise AdminError("--name must not be empty")

        async def create(store: Store) -> dict[str, Any]:
            if await store.get_workspace(workspace_id) is not None:
                raise AdminError(f"Workspace {workspace_id!r} already exists")
            if args.owner and await store.get_account(args.owner) is None:
                raise AdminError(f"Owner account {args.owner!r} not found")
            if args.organization and await store.get_organization(args.organization) is None:
                raise AdminError(f"Organization {args.organization!r} not found")
            workspace = Workspace(
                id=workspace_id,
                name=args.name.strip(),
                created_at=SystemClock().time(),
                organization_id=args.organization,
                owner_account_id=args.owner,
            )
            await store.put_workspace(workspace)
            return as_json(workspace)

        return with_store(create)

    return run_command(command)


def _cmd_workspace_list(args: argparse.Namespace) -> int:
    async def listing(store: Store) -> list[dict[str, Any]]:
        workspaces = await store.list_workspaces(organization_id=args.organization, owner_account_id=args.owner)
        return [as_json(workspace) for workspace in workspaces]

    return run_command(lambda: with_store(listing))


def _cmd_workspace_show(args: argparse.Namespace) -> int:
    workspace_id = args.workspace_id

    async def show(store: Store) -> dict[str, Any]:
        workspace = await store.get_workspace(workspace_id)
        if workspace is None:
            raise AdminError(f"Workspace {workspace_id!r} not found")
        keys = await store.list_api_keys(workspace_id=workspace_id)
        return {"workspace": as_json(workspace), "apiKeys": [as_json(key) for key in keys]}

    return run_command(lambda: with_store(show))


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat().replace("+00:00", "Z")

