"""Records kept by the store.

Every record is a plain dataclass so both backends can map it to rows or
documents field by field. Times are POSIX seconds as ``float``; the caller
passes them in (from an injected clock), the store never reads the time
itself, except where a method says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Account",
    "AnonymousSession",
    "ApiKeyRecord",
    "Approval",
    "ApprovalPolicy",
    "BillingRecord",
    "BucketSpec",
    "McpSessionRecord",
    "Membership",
    "Organization",
    "RateDecision",
    "StoredEvent",
    "Task",
    "Workspace",
]


@dataclass
class Account:
    """A person or an anonymous identity.

    ``kind`` is ``"anonymous"`` for accounts made by ``/auth/anonymous/token``
    and ``"workos"`` for accounts of an OAuth subject. ``disabled`` accounts
    lose access on every MCP path.
    """

    id: str
    kind: str
    created_at: float
    email: str | None = None
    name: str | None = None
    external_id: str | None = None
    disabled: bool = False
    updated_at: float | None = None


@dataclass
class Organization:
    """An organization that owns workspaces (a WorkOS organization)."""

    id: str
    name: str
    created_at: float
    external_id: str | None = None
    deleted: bool = False
    updated_at: float | None = None


@dataclass
class Membership:
    """An account's membership of an organization; only ``active`` grants access."""

    organization_id: str
    account_id: str
    status: str
    role: str | None = None
    external_id: str | None = None
    updated_at: float | None = None


@dataclass
class Workspace:
    """A workspace: the scope of API keys, tools, tasks and kv values.

    Personal workspaces of anonymous accounts have ``owner_account_id`` set
    and no organization.
    """

    id: str
    name: str
    created_at: float
    organization_id: str | None = None
    owner_account_id: str | None = None


@dataclass
class AnonymousSession:
    """The bootstrap record linking an anonymous account to its workspace."""

    id: str
    account_id: str
    workspace_id: str
    created_at: float
    updated_at: float


@dataclass
class ApiKeyRecord:
    """An issued API key, recorded by its JWT ``jti``; the key itself is never stored."""

    jti: str
    account_id: str
    workspace_id: str
    created_at: float
    expires_at: float
    label: str | None = None
    revoked_at: float | None = None


@dataclass
class RateDecision:
    """The outcome of one rate-limit check.

    ``retry_after`` is the number of seconds after which the same request
    would be admitted (0.0 when ``allowed``).
    """

    allowed: bool
    remaining: float
    retry_after: float


@dataclass(frozen=True)
class BucketSpec:
    """One token bucket of a :meth:`~store.base.Store.take_tokens` call."""

    key: str
    capacity: float
    refill_per_second: float
    cost: float = 1.0


@dataclass
class McpSessionRecord:
    """A handshake-era MCP session.

    ``state`` is ``initializing``, ``active`` or ``closed``. ``principal`` is
    the identity that created the session (issuer and subject for OAuth,
    account and workspace for API keys), never the credential bytes.
    """

    id: str
    principal: str
    workspace_id: str
    protocol_version: str
    state: str
    created_at: float
    last_seen_at: float
    client_capabilities: dict[str, Any] = field(default_factory=dict)
    client_info: dict[str, Any] = field(default_factory=dict)
    closed_at: float | None = None
    close_reason: str | None = None


@dataclass
class StoredEvent:
    """One SSE event of a session's event log.

    ``seq`` grows within a session and is what the transport puts in the
    event id; ``data`` is ``None`` for a priming event.
    """

    session_id: str
    stream_id: str
    seq: int
    data: str | None
    created_at: float


@dataclass
class BillingRecord:
    """Billing state of one Stripe object attached to an organization.

    ``object_type`` is ``customer``, ``checkout_session``, ``subscription``
    or ``invoice``; ``event_created`` is the Stripe event's ``created``
    time, used so an older event never overwrites newer state.
    """

    object_type: str
    object_id: str
    organization_id: str | None
    status: str | None
    data: dict[str, Any]
    event_id: str
    event_created: float
    updated_at: float


@dataclass
class Task:
    """One run of the ``execute`` tool.

    ``status`` is ``queued``, ``running``, ``waiting_approval``,
    ``completed``, ``failed``, ``timed_out`` or ``denied``.
    """

    id: str
    workspace_id: str
    account_id: str
    principal: str
    code: str
    status: str
    created_at: float
    timeout_ms: int
    started_at: float | None = None
    finished_at: float | None = None
    result: Any = None
    error: str | None = None
    output: str = ""
    snapshot: bytes | None = None
    claimed_at: float | None = None
    """When the current run (the first one or a resumed one) took a sandbox worker."""


@dataclass
class Approval:
    """A request for a human decision on one tool call of a paused task.

    ``status`` is ``pending``, ``approved`` or ``denied``.
    """

    id: str
    task_id: str
    workspace_id: str
    principal: str
    tool_path: str
    redacted_input: dict[str, Any]
    status: str
    created_at: float
    decided_at: float | None = None
    decided_by: str | None = None
    reason: str | None = None


@dataclass
class ApprovalPolicy:
    """A workspace rule mapping a tool path pattern (``fnmatch`` syntax) to a mode.

    ``mode`` is ``auto``, ``required`` or ``deny``.
    """

    workspace_id: str
    pattern: str
    mode: str
    created_at: float
