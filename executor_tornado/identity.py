"""Anonymous identities and MCP caller authentication.

Functions here hold the rules; the handlers only parse and render.

Example::

    identity = await issue_anonymous_identity(store, signer, clock)
    bootstrap = await bootstrap_anonymous_session(store, api_keys, clock, account_id, session_id=None, base_url=url)
    caller = await authenticate_api_key(store, api_keys, key, workspace_id)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from executor_tornado.clock import Clock
from executor_tornado.keys import AnonymousSigner, ApiKeyError, ApiKeys, new_id
from executor_tornado.mcp.transport import McpCaller
from executor_tornado.oauth import OAuthPrincipal
from store.base import Store
from store.records import Account, AnonymousSession, Workspace

__all__ = [
    "AuthFailure",
    "BootstrapResult",
    "authenticate_api_key",
    "authorize_oauth",
    "bootstrap_anonymous_session",
    "issue_anonymous_identity",
]

log = logging.getLogger("executor_tornado.auth")


class AuthFailure(Exception):
    """Authentication or authorization failed; ``status`` is 401 or 403."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def issue_anonymous_identity(store: Store, signer: AnonymousSigner, clock: Clock) -> dict[str, Any]:
    """Create an anonymous account and return the token response body."""
    account_id = new_id("anon")
    token, claims = signer.issue_anonymous(account_id)
    await store.put_account(Account(id=account_id, kind="anonymous", created_at=clock.time()))
    return {
        "tokenType": "Bearer",
        "accessToken": token,
        "accountId": account_id,
        "expiresAtMs": int(claims["exp"]) * 1000,
    }


@dataclass(frozen=True)
class BootstrapResult:
    session_id: str
    account_id: str
    workspace_id: str
    api_key: str
    mcp_url: str

    def to_json(self) -> dict[str, str]:
        return {
            "sessionId": self.session_id,
            "accountId": self.account_id,
            "workspaceId": self.workspace_id,
            "apiKey": self.api_key,
            "mcpUrl": self.mcp_url,
        }


async def bootstrap_anonymous_session(
    store: Store,
    api_keys: ApiKeys,
    clock: Clock,
    account_id: str,
    *,
    session_id: str | None,
    base_url: str,
) -> BootstrapResult:
    """Create or refresh the anonymous session of ``account_id`` and issue an API key.

    A ``session_id`` of the same account returns that session's workspace.
    An unknown ``session_id``, or one of another account, starts a new
    session (the caller learns nothing about other accounts' sessions). The
    account keeps one personal workspace across sessions.
    """
    now = clock.time()
    account = await store.get_account(account_id)
    if account is None:
        account = Account(id=account_id, kind="anonymous", created_at=now)
        await store.put_account(account)
    if account.disabled:
        raise AuthFailure(403, "This anonymous account is disabled")

    session = await store.get_anonymous_session(session_id) if session_id else None
    if session is not None and session.account_id != account_id:
        session = None

    if session is None:
        workspaces = await store.list_workspaces(owner_account_id=account_id)
        if workspaces:
            workspace = workspaces[0]
        else:
            workspace = Workspace(id=new_id("ws"), name="Personal workspace", created_at=now, owner_account_id=account_id)
            await store.put_workspace(workspace)
        session = AnonymousSession(
            id=new_id("asess"), account_id=account_id, workspace_id=workspace.id, created_at=now, updated_at=now
        )
    else:
        session.updated_at = now
    await store.put_anonymous_session(session)

    api_key, record = api_keys.issue(account_id, session.workspace_id, label=f"anonymous session {session.id}")
    await store.insert_api_key(record)
    return BootstrapResult(
        session_id=session.id,
        account_id=account_id,
        workspace_id=session.workspace_id,
        api_key=api_key,
        mcp_url=f"{base_url}/v1/mcp/anonymous?workspaceId={session.workspace_id}",
    )


async def authenticate_api_key(store: Store, api_keys: ApiKeys, key: str, workspace_id: str) -> McpCaller:
    """Check an API key for ``workspace_id``; raise :class:`AuthFailure` (401 or 403)."""
    try:
        claims = api_keys.decode(key)
    except ApiKeyError as exc:
        raise AuthFailure(401, str(exc)) from None
    record = await store.get_api_key(claims.jti)
    if record is None:
        raise AuthFailure(401, "API key is invalid")
    if record.revoked_at is not None:
        raise AuthFailure(401, "API key was revoked")
    if claims.workspace_id != workspace_id:
        raise AuthFailure(403, "API key belongs to another workspace")
    account = await store.get_account(claims.account_id)
    if account is None or account.disabled:
        raise AuthFailure(401, "API key's account is disabled or deleted")
    if account.kind != "anonymous":
        raise AuthFailure(403, "API keys on this endpoint must belong to an anonymous account")
    return McpCaller(
        principal=f"apikey|{claims.account_id}|{claims.workspace_id}",
        account_id=claims.account_id,
        workspace_id=claims.workspace_id,
        auth_kind="api_key",
    )


async def authorize_oauth(store: Store, principal: OAuthPrincipal, workspace_id: str) -> McpCaller:
    """Check that the OAuth subject is an active member of the workspace's organization (403 otherwise)."""
    account = await store.get_account(principal.subject)
    if account is not None and account.disabled:
        raise AuthFailure(401, "Account is disabled")
    workspace = await store.get_workspace(workspace_id)
    if workspace is None or workspace.organization_id is None:
        raise AuthFailure(403, "You are not a member of this workspace's organization")
    organization = await store.get_organization(workspace.organization_id)
    if organization is not None and organization.deleted:
        raise AuthFailure(403, "This workspace's organization was deleted")
    membership = await store.get_membership(workspace.organization_id, principal.subject)
    if membership is None or membership.status != "active":
        raise AuthFailure(403, "You are not a member of this workspace's organization")
    return McpCaller(
        principal=principal.key,
        account_id=principal.subject,
        workspace_id=workspace_id,
        auth_kind="oauth",
    )
