"""The store interface: one async API over every record the service keeps.

Both backends (:mod:`store.sqlite` and :mod:`store.mongo`) implement
:class:`Store` and pass the same conformance suite
(``tests/test_store_conformance.py``). The store has no dependency on HTTP.

Example::

    store = open_store("sqlite:///var/lib/executor/executor.db")
    await store.open()
    try:
        await store.put_account(Account(id="anon_1", kind="anonymous", created_at=now))
        account = await store.get_account("anon_1")
    finally:
        await store.close()

Contract shared by all methods:

* Every write is durable when the awaited call returns (SQLite commits in
  WAL mode with ``synchronous=FULL``; MongoDB writes with majority write
  concern where the deployment has one).
* Methods documented as *atomic* stay correct when several coroutines,
  processes or hosts call them concurrently on the same store.
* ``get_*`` methods return ``None`` for a missing record; they never raise
  for absence.
* Conflicting inserts raise :class:`DuplicateError`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from store.records import (
    Account,
    AnonymousSession,
    ApiKeyRecord,
    Approval,
    ApprovalPolicy,
    BillingRecord,
    BucketSpec,
    McpSessionRecord,
    Membership,
    Organization,
    RateDecision,
    StoredEvent,
    Task,
    Workspace,
)

__all__ = ["DuplicateError", "Store", "StoreError"]


class StoreError(Exception):
    """A store operation failed (connection lost, corrupt file, ...)."""


class DuplicateError(StoreError):
    """An insert collided with an existing record's unique key."""


class Store(abc.ABC):
    """The persistence API of the service."""

    # -- lifecycle ---------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create tables or collections and indexes. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and release every resource. Safe to call twice."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store completes a trivial query."""

    # -- accounts, organizations, memberships, workspaces -----------------

    @abc.abstractmethod
    async def put_account(self, account: Account) -> None:
        """Insert or replace the account with ``account.id``."""

    @abc.abstractmethod
    async def get_account(self, account_id: str) -> Account | None: ...

    @abc.abstractmethod
    async def list_accounts(self) -> list[Account]:
        """Return all accounts ordered by ``created_at``."""

    @abc.abstractmethod
    async def put_organization(self, organization: Organization) -> None:
        """Insert or replace the organization with ``organization.id``."""

    @abc.abstractmethod
    async def get_organization(self, organization_id: str) -> Organization | None: ...

    @abc.abstractmethod
    async def put_membership(self, membership: Membership) -> None:
        """Insert or replace the membership keyed by (organization, account)."""

    @abc.abstractmethod
    async def get_membership(self, organization_id: str, account_id: str) -> Membership | None: ...

    @abc.abstractmethod
    async def delete_membership(self, organization_id: str, account_id: str) -> bool:
        """Delete the membership; return whether one existed."""

    @abc.abstractmethod
    async def put_workspace(self, workspace: Workspace) -> None:
        """Insert or replace the workspace with ``workspace.id``."""

    @abc.abstractmethod
    async def get_workspace(self, workspace_id: str) -> Workspace | None: ...

    @abc.abstractmethod
    async def list_workspaces(
        self, *, organization_id: str | None = None, owner_account_id: str | None = None
    ) -> list[Workspace]:
        """Return workspaces matching every given filter, ordered by ``created_at``."""

    # -- anonymous sessions ------------------------------------------------

    @abc.abstractmethod
    async def put_anonymous_session(self, session: AnonymousSession) -> None:
        """Insert or replace the anonymous session with ``session.id``."""

    @abc.abstractmethod
    async def get_anonymous_session(self, session_id: str) -> AnonymousSession | None: ...

    # -- API keys -------------------------------------------------------------

    @abc.abstractmethod
    async def insert_api_key(self, key: ApiKeyRecord) -> None:
        """Insert a key record; raise :class:`DuplicateError` on a reused ``jti``."""

    @abc.abstractmethod
    async def get_api_key(self, jti: str) -> ApiKeyRecord | None: ...

    @abc.abstractmethod
    async def list_api_keys(
        self, *, workspace_id: str | None = None, account_id: str | None = None
    ) -> list[ApiKeyRecord]:
        """Return keys matching every given filter, ordered by ``created_at``."""

    @abc.abstractmethod
    async def revoke_api_key(self, jti: str, revoked_at: float) -> bool:
        """Mark the key revoked (atomic). Return ``False`` if unknown or already revoked."""

    # -- rate limits -------------------------------------------------------

    @abc.abstractmethod
    async def take_token(
        self, key: str, *, capacity: float, refill_per_second: float, now: float, cost: float = 1.0
    ) -> RateDecision:
        """Take ``cost`` tokens from the token bucket ``key`` (atomic).

        A missing bucket starts full. The bucket refills continuously at
        ``refill_per_second`` up to ``capacity``; the stored state is the token
        count and the time it was computed, so no background task is needed.
        When fewer than ``cost`` tokens are left, nothing is taken and
        ``retry_after`` is the exact time until ``cost`` tokens are there.
        """

    async def take_tokens(self, buckets: Sequence[BucketSpec], *, now: float) -> list[RateDecision]:
        """Take tokens from several token buckets in order, stopping at the first that rejects.

        Each bucket behaves as in :meth:`take_token`. Return one decision per
        bucket checked: all of them when every bucket admits, else up to and
        including the rejecting one, whose tokens stay untouched while the
        earlier buckets keep what was taken from them. Backends that can do
        it commit all the buckets at once; this default takes them one by one,
        each atomically.
        """
        decisions = []
        for bucket in buckets:
            decision = await self.take_token(
                bucket.key, capacity=bucket.capacity, refill_per_second=bucket.refill_per_second, now=now,
                cost=bucket.cost,
            )
            decisions.append(decision)
            if not decision.allowed:
                break
        return decisions

    @abc.abstractmethod
    async def hit_window(self, key: str, *, limit: int, window_seconds: float, now: float) -> RateDecision:
        """Count one hit in the fixed window containing ``now`` (atomic).

        Windows start at multiples of ``window_seconds``. Past ``limit`` the
        hit is not counted and ``retry_after`` is the time to the next window.
        """

    # -- MCP sessions and their SSE event log --------------------------------

    @abc.abstractmethod
    async def insert_mcp_session(self, record: McpSessionRecord) -> None:
        """Insert a new session; raise :class:`DuplicateError` on a reused id."""

    @abc.abstractmethod
    async def get_mcp_session(self, session_id: str) -> McpSessionRecord | None: ...

    @abc.abstractmethod
    async def activate_mcp_session(self, session_id: str, now: float) -> bool:
        """Move ``initializing`` to ``active`` (atomic). Return whether it moved."""

    @abc.abstractmethod
    async def touch_mcp_session(self, session_id: str, now: float) -> bool:
        """Set ``last_seen_at`` of a session that is not closed. Return whether it exists open."""

    @abc.abstractmethod
    async def close_mcp_session(self, session_id: str, now: float, reason: str) -> bool:
        """Close a session that is not closed yet (atomic).

        Return ``True`` only for the call that closed it. Its event log is
        deleted with it.
        """

    @abc.abstractmethod
    async def count_open_mcp_sessions(self, *, principal: str | None = None) -> int:
        """Count sessions that are not closed, optionally for one principal."""

    @abc.abstractmethod
    async def close_idle_mcp_sessions(self, idle_before: float, now: float) -> list[str]:
        """Close every open session with ``last_seen_at < idle_before``; return their ids."""

    @abc.abstractmethod
    async def append_event(self, session_id: str, stream_id: str, data: str | None, now: float) -> int:
        """Append an event to the session's log and return its ``seq`` (atomic).

        ``seq`` values of one session are strictly increasing.
        """

    @abc.abstractmethod
    async def events_after(self, session_id: str, after_seq: int, *, limit: int = 1000) -> list[StoredEvent]:
        """Return the session's events with ``seq > after_seq`` in order, at most ``limit``."""

    @abc.abstractmethod
    async def get_event(self, session_id: str, seq: int) -> StoredEvent | None:
        """Return one event of the session's log."""

    @abc.abstractmethod
    async def trim_events(self, session_id: str, *, max_count: int, max_bytes: int, min_created_at: float) -> int:
        """Drop the session's oldest events until at most ``max_count`` events and
        ``max_bytes`` bytes of data remain and none is older than
        ``min_created_at``. Return how many were dropped."""

    # -- webhooks and billing --------------------------------------------

    @abc.abstractmethod
    async def record_webhook_receipt(self, provider: str, event_id: str, now: float) -> bool:
        """Record that an event was received (atomic). Return ``False`` if it was already."""

    @abc.abstractmethod
    async def has_webhook_receipt(self, provider: str, event_id: str) -> bool:
        """Return whether the event's receipt is recorded."""

    @abc.abstractmethod
    async def forget_webhook_receipt(self, provider: str, event_id: str) -> None:
        """Delete a receipt, so a delivery whose processing failed can be retried."""

    @abc.abstractmethod
    async def apply_billing_record(self, record: BillingRecord) -> bool:
        """Store ``record`` unless a stored record of the same object is newer (atomic).

        Newer means a larger ``event_created``. Return whether it was stored.
        """

    @abc.abstractmethod
    async def get_billing_record(self, object_type: str, object_id: str) -> BillingRecord | None: ...

    @abc.abstractmethod
    async def list_billing_records(self, organization_id: str) -> list[BillingRecord]:
        """Return an organization's billing records ordered by type and id."""

    # -- tasks and approvals -------------------------------------------------

    @abc.abstractmethod
    async def insert_task(self, task: Task) -> None:
        """Insert a task; raise :class:`DuplicateError` on a reused id."""

    @abc.abstractmethod
    async def get_task(self, task_id: str) -> Task | None: ...

    @abc.abstractmethod
    async def update_task(self, task_id: str, *, expected_status: str | None = None, **fields: Any) -> bool:
        """Set ``fields`` on the task (atomic).

        With ``expected_status`` the update happens only while the task has
        that status; return whether it happened.
        """

    @abc.abstractmethod
    async def list_tasks(self, workspace_id: str, *, status: str | None = None, limit: int = 100) -> list[Task]:
        """Return a workspace's tasks, newest first."""

    @abc.abstractmethod
    async def insert_approval(self, approval: Approval) -> None:
        """Insert an approval; raise :class:`DuplicateError` on a reused id."""

    @abc.abstractmethod
    async def get_approval(self, approval_id: str) -> Approval | None: ...

    @abc.abstractmethod
    async def list_approvals(self, *, status: str | None = None, workspace_id: str | None = None) -> list[Approval]:
        """Return approvals matching every given filter, oldest first."""

    @abc.abstractmethod
    async def decide_approval(
        self, approval_id: str, *, status: str, decided_at: float, decided_by: str, reason: str | None
    ) -> bool:
        """Move a ``pending`` approval to ``approved`` or ``denied`` (atomic).

        Return ``True`` only for the call that decided it.
        """

    @abc.abstractmethod
    async def put_approval_policy(self, policy: ApprovalPolicy) -> None:
        """Insert or replace the policy keyed by (workspace, pattern)."""

    @abc.abstractmethod
    async def delete_approval_policy(self, workspace_id: str, pattern: str) -> bool: ...

    @abc.abstractmethod
    async def list_approval_policies(self, workspace_id: str) -> list[ApprovalPolicy]:
        """Return a workspace's policies ordered by ``created_at``."""

    # -- workspace key-value store ------------------------------------------

    @abc.abstractmethod
    async def kv_get(self, workspace_id: str, key: str) -> Any | None:
        """Return the JSON value stored under ``key``, or ``None``."""

    @abc.abstractmethod
    async def kv_set(self, workspace_id: str, key: str, value: Any, now: float) -> None:
        """Store a JSON-serializable value."""

    @abc.abstractmethod
    async def kv_delete(self, workspace_id: str, key: str) -> bool: ...

    @abc.abstractmethod
    async def kv_list(self, workspace_id: str, *, prefix: str = "", limit: int = 1000) -> list[str]:
        """Return keys starting with ``prefix`` in sorted order."""
