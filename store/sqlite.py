"""The embedded SQLite backend of :class:`~store.base.Store`.

One database file contains every record. Several processes on one host may
share it: the file is in WAL mode, every write that reads before it writes
runs in a ``BEGIN IMMEDIATE`` transaction (so it holds the write lock from
its first read), and ``busy_timeout`` makes a writer wait for the lock
instead of failing at once. Commits use ``synchronous=FULL``, so a write is
on disk when the awaited call returns.

The blocking :mod:`sqlite3` calls run on one dedicated thread per store,
which owns the store's only connection; the event loop never blocks on
disk I/O.

Example::

    store = SQLiteStore("/var/lib/executor/executor.db")
    await store.open()
    try:
        decision = await store.take_token("mcp:203.0.113.9", capacity=120,
                                          refill_per_second=2.0, now=time.time())
    finally:
        await store.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from store.base import DuplicateError, Store, StoreError
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

__all__ = ["SQLiteStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000

# A take_token request that arrives less than this many seconds before enough
# tokens are there is admitted. It absorbs float rounding in ``now +
# retry_after`` (at POSIX times near 2**31 one ulp is about 2.4e-7 s), so a
# request sent exactly ``retry_after`` seconds later is never rejected.
TOKEN_TIME_TOLERANCE = 1e-6

# Each rate-limit write deletes at most this many expired rows of its table,
# so abandoned keys do not pile up and no single call does unbounded work.
RATE_PRUNE_BATCH = 100

_CLOSED = "closed"
_IDLE_CLOSE_REASON = "idle"


@dataclasses.dataclass(frozen=True)
class _Table:
    """The mapping of one record dataclass to a table with a column per field.

    JSON columns hold ``json.dumps`` text, boolean columns hold 0 or 1, and
    ``bytes`` fields are stored as BLOBs unchanged.
    """

    name: str
    record_type: type
    json_columns: frozenset[str] = frozenset()
    bool_columns: frozenset[str] = frozenset()

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(self.record_type))

    @property
    def select(self) -> str:
        return f"SELECT {', '.join(self.columns)} FROM {self.name}"

    def insert(self, verb: str = "INSERT") -> str:
        placeholders = ", ".join("?" for _ in self.columns)
        return f"{verb} INTO {self.name} ({', '.join(self.columns)}) VALUES ({placeholders})"

    def encode(self, column: str, value: Any) -> Any:
        if column in self.json_columns:
            return json.dumps(value)
        if column in self.bool_columns:
            return int(value)
        return value

    def to_row(self, record: Any) -> tuple[Any, ...]:
        return tuple(self.encode(column, getattr(record, column)) for column in self.columns)

    def from_row(self, row: tuple[Any, ...]) -> Any:
        values = {}
        for column, value in zip(self.columns, row, strict=True):
            if column in self.json_columns:
                value = json.loads(value)
            elif column in self.bool_columns:
                value = bool(value)
            values[column] = value
        return self.record_type(**values)


_ACCOUNTS = _Table("accounts", Account, bool_columns=frozenset({"disabled"}))
_ORGANIZATIONS = _Table("organizations", Organization, bool_columns=frozenset({"deleted"}))
_MEMBERSHIPS = _Table("memberships", Membership)
_WORKSPACES = _Table("workspaces", Workspace)
_ANONYMOUS_SESSIONS = _Table("anonymous_sessions", AnonymousSession)
_API_KEYS = _Table("api_keys", ApiKeyRecord)
_MCP_SESSIONS = _Table(
    "mcp_sessions", McpSessionRecord, json_columns=frozenset({"client_capabilities", "client_info"})
)
_BILLING_RECORDS = _Table("billing_records", BillingRecord, json_columns=frozenset({"data"}))
_TASKS = _Table("tasks", Task, json_columns=frozenset({"result"}))
_APPROVALS = _Table("approvals", Approval, json_columns=frozenset({"redacted_input"}))
_APPROVAL_POLICIES = _Table("approval_policies", ApprovalPolicy)

_TASK_UPDATABLE_FIELDS = frozenset(_TASKS.columns) - {"id"}
_APPROVAL_DECISIONS = frozenset({"approved", "denied"})

# Schema migrations by the version they produce. ``open()`` applies every
# step above the file's ``PRAGMA user_version`` in one transaction. A schema
# change gets a new numbered step, because released steps must not change.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE accounts (
            id TEXT PRIMARY KEY, kind TEXT NOT NULL, created_at REAL NOT NULL,
            email TEXT, name TEXT, external_id TEXT, disabled INTEGER NOT NULL,
            updated_at REAL)""",
        "CREATE INDEX accounts_created_at ON accounts (created_at, id)",
        """CREATE TABLE organizations (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at REAL NOT NULL,
            external_id TEXT, deleted INTEGER NOT NULL, updated_at REAL)""",
        """CREATE TABLE memberships (
            organization_id TEXT NOT NULL, account_id TEXT NOT NULL, status TEXT NOT NULL,
            role TEXT, external_id TEXT, updated_at REAL,
            PRIMARY KEY (organization_id, account_id))""",
        """CREATE TABLE workspaces (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at REAL NOT NULL,
            organization_id TEXT, owner_account_id TEXT)""",
        "CREATE INDEX workspaces_organization ON workspaces (organization_id, created_at)",
        "CREATE INDEX workspaces_owner ON workspaces (owner_account_id, created_at)",
        """CREATE TABLE anonymous_sessions (
            id TEXT PRIMARY KEY, account_id TEXT NOT NULL, workspace_id TEXT NOT NULL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL)""",
        """CREATE TABLE api_keys (
            jti TEXT PRIMARY KEY, account_id TEXT NOT NULL, workspace_id TEXT NOT NULL,
            created_at REAL NOT NULL, expires_at REAL NOT NULL, label TEXT, revoked_at REAL)""",
        "CREATE INDEX api_keys_workspace ON api_keys (workspace_id, created_at)",
        "CREATE INDEX api_keys_account ON api_keys (account_id, created_at)",
        """CREATE TABLE rate_buckets (
            key TEXT PRIMARY KEY, tokens REAL NOT NULL, updated_at REAL NOT NULL,
            expire_at REAL NOT NULL)""",
        "CREATE INDEX rate_buckets_expire_at ON rate_buckets (expire_at)",
        """CREATE TABLE rate_windows (
            key TEXT PRIMARY KEY, window_start REAL NOT NULL, count INTEGER NOT NULL,
            expire_at REAL NOT NULL)""",
        "CREATE INDEX rate_windows_expire_at ON rate_windows (expire_at)",
        """CREATE TABLE mcp_sessions (
            id TEXT PRIMARY KEY, principal TEXT NOT NULL, workspace_id TEXT NOT NULL,
            protocol_version TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,
            last_seen_at REAL NOT NULL, client_capabilities TEXT NOT NULL,
            client_info TEXT NOT NULL, closed_at REAL, close_reason TEXT)""",
        "CREATE INDEX mcp_sessions_principal ON mcp_sessions (principal, state)",
        "CREATE INDEX mcp_sessions_idle ON mcp_sessions (state, last_seen_at)",
        # AUTOINCREMENT never reuses a seq, even after the newest events are
        # trimmed, so seq grows strictly within every session.
        """CREATE TABLE mcp_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL,
            stream_id TEXT NOT NULL, data TEXT, data_bytes INTEGER NOT NULL,
            created_at REAL NOT NULL)""",
        "CREATE INDEX mcp_events_session ON mcp_events (session_id, seq)",
        """CREATE TABLE webhook_receipts (
            provider TEXT NOT NULL, event_id TEXT NOT NULL, received_at REAL NOT NULL,
            PRIMARY KEY (provider, event_id))""",
        """CREATE TABLE billing_records (
            object_type TEXT NOT NULL, object_id TEXT NOT NULL, organization_id TEXT,
            status TEXT, data TEXT NOT NULL, event_id TEXT NOT NULL,
            event_created REAL NOT NULL, updated_at REAL NOT NULL,
            PRIMARY KEY (object_type, object_id))""",
        "CREATE INDEX billing_records_organization ON billing_records (organization_id, object_type, object_id)",
        """CREATE TABLE tasks (
            id TEXT PRIMARY KEY, workspace_id TEXT NOT NULL, account_id TEXT NOT NULL,
            principal TEXT NOT NULL, code TEXT NOT NULL, status TEXT NOT NULL,
            created_at REAL NOT NULL, timeout_ms INTEGER NOT NULL, started_at REAL,
            finished_at REAL, result TEXT NOT NULL, error TEXT, output TEXT NOT NULL,
            snapshot BLOB)""",
        "CREATE INDEX tasks_workspace ON tasks (workspace_id, created_at)",
        """CREATE TABLE approvals (
            id TEXT PRIMARY KEY, task_id TEXT NOT NULL, workspace_id TEXT NOT NULL,
            principal TEXT NOT NULL, tool_path TEXT NOT NULL, redacted_input TEXT NOT NULL,
            status TEXT NOT NULL, created_at REAL NOT NULL, decided_at REAL,
            decided_by TEXT, reason TEXT)""",
        "CREATE INDEX approvals_status ON approvals (status, created_at)",
        "CREATE INDEX approvals_workspace ON approvals (workspace_id, created_at)",
        """CREATE TABLE approval_policies (
            workspace_id TEXT NOT NULL, pattern TEXT NOT NULL, mode TEXT NOT NULL,
            created_at REAL NOT NULL, PRIMARY KEY (workspace_id, pattern))""",
        """CREATE TABLE kv (
            workspace_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
            updated_at REAL NOT NULL, PRIMARY KEY (workspace_id, key))""",
    ),
    # The claim time of a task's current run, so a run whose process died
    # can be told from one that is still within its time limit.
    2: ("ALTER TABLE tasks ADD COLUMN claimed_at REAL",),
}

SCHEMA_VERSION = max(_MIGRATIONS)


@contextlib.contextmanager
def _write_transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """Run the block in a ``BEGIN IMMEDIATE`` transaction and commit it.

    ``IMMEDIATE`` takes the database's write lock before the first read, so
    a read-then-write block cannot interleave with another process's. Inside
    a group commit the batch's transaction already holds that lock, and the
    operation's savepoint undoes the block if it raises.
    """
    if connection.in_transaction:
        yield
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def check_bucket_arguments(capacity: float, refill_per_second: float, cost: float) -> None:
    """Raise ``ValueError`` unless the token bucket could ever admit a request."""
    if capacity <= 0 or refill_per_second <= 0 or cost <= 0:
        raise ValueError(
            f"Invalid token bucket: capacity {capacity}, refill_per_second {refill_per_second}"
            f" and cost {cost} must all be positive"
        )
    if cost > capacity:
        raise ValueError(f"Invalid token bucket: cost {cost} exceeds capacity {capacity}, so no request could pass")


def check_window_arguments(limit: int, window_seconds: float) -> None:
    """Raise ``ValueError`` for a negative limit or a window that is not positive."""
    if limit < 0 or window_seconds <= 0:
        raise ValueError(
            f"Invalid fixed window: limit {limit} must be at least 0 and window_seconds {window_seconds} positive"
        )


def check_limit(limit: int) -> None:
    """Raise ``ValueError`` for a negative result limit (SQLite would read it as no limit)."""
    if limit < 0:
        raise ValueError(f"Invalid limit {limit}: use 0 or more")


def event_data_bytes(data: str | None) -> int:
    """Return the size that ``trim_events`` counts: the UTF-8 length of ``data``."""
    return 0 if data is None else len(data.encode("utf-8"))


def count_events_to_drop(
    events_newest_first: list[tuple[int, float]], *, max_count: int, max_bytes: int, min_created_at: float
) -> int:
    """Return how many of the oldest events to drop so the rest meet every limit.

    ``events_newest_first`` contains ``(data_bytes, created_at)`` pairs. The
    kept events are the longest run of newest events that stays within
    ``max_count`` and ``max_bytes`` and has no event older than
    ``min_created_at``.
    """
    kept = 0
    kept_bytes = 0
    for data_bytes, created_at in events_newest_first:
        if kept + 1 > max_count or kept_bytes + data_bytes > max_bytes or created_at < min_created_at:
            break
        kept += 1
        kept_bytes += data_bytes
    return len(events_newest_first) - kept


def _take_from_bucket(connection: sqlite3.Connection, bucket: BucketSpec, now: float) -> RateDecision:
    """Refill ``bucket`` for the time since it was stored and take its cost if there is enough.

    Runs inside the caller's write transaction.
    """
    key, capacity, refill_per_second, cost = bucket.key, bucket.capacity, bucket.refill_per_second, bucket.cost
    row = connection.execute("SELECT tokens, updated_at FROM rate_buckets WHERE key = ?", (key,)).fetchone()
    tokens, updated_at = (capacity, now) if row is None else row

    # Refill for the time since the last computation. A ``now``
    # behind the stored time (clocks of two processes) adds nothing.
    elapsed = max(0.0, now - updated_at)
    tokens = min(capacity, tokens + refill_per_second * elapsed)
    updated_at = max(updated_at, now)

    allowed = tokens >= cost - refill_per_second * TOKEN_TIME_TOLERANCE
    if allowed:
        tokens -= cost
    full_at = updated_at + max(0.0, capacity - tokens) / refill_per_second

    connection.execute(
        "INSERT OR REPLACE INTO rate_buckets (key, tokens, updated_at, expire_at) VALUES (?, ?, ?, ?)",
        (key, tokens, updated_at, full_at),
    )
    if allowed:
        return RateDecision(allowed=True, remaining=tokens, retry_after=0.0)
    return RateDecision(allowed=False, remaining=tokens, retry_after=(cost - tokens) / refill_per_second)


def _prune_rate_buckets(connection: sqlite3.Connection, now: float) -> None:
    # A bucket past its expire_at is full, the same as a missing one.
    connection.execute(
        "DELETE FROM rate_buckets WHERE key IN (SELECT key FROM rate_buckets WHERE expire_at < ? LIMIT ?)",
        (now, RATE_PRUNE_BATCH),
    )


# Operations one group commit runs at most, which bounds the wait of the last one.
MAX_GROUP_COMMIT = 64


@dataclasses.dataclass(slots=True)
class _Job:
    operation: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _settle(future: asyncio.Future[Any], succeeded: bool, value: Any) -> None:
    """Set a job's result or exception on its event loop, unless the caller stopped waiting."""
    if future.cancelled():
        return
    if succeeded:
        future.set_result(value)
    else:
        future.set_exception(value)


class SQLiteStore(Store):
    """A :class:`~store.base.Store` kept in one SQLite database file at ``path``.

    :meth:`open` creates the parent directory and the file (mode 0600) when
    they are missing. Every method except :meth:`open` and :meth:`close`
    raises :class:`~store.base.StoreError` when the store is not open or
    SQLite reports an error.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None
        # Operations waiting for the store's thread, and whether a drain job is queued.
        self._queue: list[_Job] = []
        self._queue_lock = threading.Lock()
        self._drain_queued = False

    # -- plumbing ------------------------------------------------------------

    async def _run(self, operation: Callable[..., T], *args: Any) -> T:
        """Run ``operation(connection, *args)`` on the store's thread and return its result.

        Operations queue up while the thread is busy, and the thread runs
        everything queued as one group commit (see :meth:`_drain`). The
        result is set only after the commit, so a write is on disk when
        the awaited call returns, as with one transaction per operation.
        """
        if self._executor is None or self._connection is None:
            raise StoreError(f"SQLite store {self._path} is not open: call open() first")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._queue_lock:
            self._queue.append(_Job(operation, args, future, loop))
            submit = not self._drain_queued
            self._drain_queued = True
        # The thread runs jobs in order, so an operation queued before close()
        # still runs on the connection before close() closes it.
        if submit:
            self._executor.submit(self._drain, self._connection)
        return await future

    def _drain(self, connection: sqlite3.Connection) -> None:
        """Run queued operations on the store's thread until the queue is empty.

        One operation runs alone, with its own transactions. Several run in
        one ``BEGIN IMMEDIATE`` transaction, each inside a savepoint so a
        failing operation undoes only its own writes, and one ``COMMIT``
        (one WAL sync under ``synchronous=FULL``) covers them all.
        """
        while True:
            with self._queue_lock:
                batch = self._queue[:MAX_GROUP_COMMIT]
                del self._queue[:MAX_GROUP_COMMIT]
                if not batch:
                    self._drain_queued = False
                    return
            try:
                if len(batch) == 1:
                    outcomes = [self._outcome(connection, batch[0])]
                else:
                    outcomes = self._group_commit(connection, batch)
            except sqlite3.Error as error:  # a failed SAVEPOINT, RELEASE or ROLLBACK
                log.error("SQLite group commit of %d operations failed on %s: %s", len(batch), self._path, error)
                with contextlib.suppress(sqlite3.Error):
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                failure = StoreError(f"SQLite group commit failed on {self._path}: {error}")
                outcomes = [(False, failure)] * len(batch)
            for job, (succeeded, value) in zip(batch, outcomes):
                job.loop.call_soon_threadsafe(_settle, job.future, succeeded, value)

    def _outcome(self, connection: sqlite3.Connection, job: _Job) -> tuple[bool, Any]:
        try:
            return True, self._call(connection, job.operation, job.args)
        except Exception as error:  # delivered to the awaiting caller, which re-raises it
            return False, error

    def _group_commit(self, connection: sqlite3.Connection, batch: list[_Job]) -> list[tuple[bool, Any]]:
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            failure = StoreError(f"SQLite group commit failed to begin on {self._path}: {error}")
            return [(False, failure)] * len(batch)

        outcomes: list[tuple[bool, Any]] = []
        for job in batch:
            connection.execute("SAVEPOINT store_operation")
            succeeded, value = self._outcome(connection, job)
            if not connection.in_transaction:
                # Some errors (disk full, I/O) roll back the whole transaction,
                # so the batch's earlier writes are gone too: fail them all.
                failure = StoreError(f"SQLite group commit was rolled back on {self._path}: {value}")
                return [(False, failure)] * len(batch)
            if not succeeded:
                connection.execute("ROLLBACK TO store_operation")
            connection.execute("RELEASE store_operation")
            outcomes.append((succeeded, value))

        try:
            connection.execute("COMMIT")
        except sqlite3.Error as error:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            failure = StoreError(f"SQLite group commit failed on {self._path}: {error}")
            return [(False, failure)] * len(batch)
        return outcomes

    def _call(self, connection: sqlite3.Connection, operation: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            return operation(connection, *args)
        except sqlite3.Error as error:
            raise StoreError(f"SQLite operation {operation.__name__} failed on {self._path}: {error}") from error

    # -- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        if self._connection is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        loop = asyncio.get_running_loop()
        try:
            connection = await loop.run_in_executor(executor, self._connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor = executor
        self._connection = connection
        log.info("Opened SQLite store %s (schema version %d)", self._path, SCHEMA_VERSION)

    def _connect(self) -> sqlite3.Connection:
        """Create the file if needed, connect, set the PRAGMAs and migrate the schema."""
        try:
            directory = os.path.dirname(os.path.abspath(self._path))
            os.makedirs(directory, mode=0o700, exist_ok=True)
            # Create the file ourselves so it never exists with the umask's
            # mode; SQLite gives the -wal and -shm files the same mode.
            descriptor = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(descriptor)
        except OSError as error:
            raise StoreError(f"Cannot create the SQLite database file {self._path}: {error}") from error

        try:
            # isolation_level=None leaves transactions to the explicit BEGIN
            # IMMEDIATE / COMMIT of each write.
            connection = sqlite3.connect(self._path, isolation_level=None)
        except sqlite3.Error as error:
            raise StoreError(f"Cannot open the SQLite database {self._path}: {error}") from error
        try:
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            journal_mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if journal_mode.lower() != "wal":
                raise StoreError(f"SQLite database {self._path} cannot use WAL mode (journal_mode is {journal_mode})")
            connection.execute("PRAGMA synchronous = FULL")
            self._migrate(connection)
        except BaseException as error:
            connection.close()
            if isinstance(error, sqlite3.Error):
                raise StoreError(f"Cannot prepare the SQLite database {self._path}: {error}") from error
            raise
        return connection

    def _migrate(self, connection: sqlite3.Connection) -> None:
        with _write_transaction(connection):
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"SQLite database {self._path} has schema version {version}, newer than the"
                    f" {SCHEMA_VERSION} this build supports: upgrade executor-tornado"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target]:
                    connection.execute(statement)
                # PRAGMA takes no parameters; target is an int from _MIGRATIONS.
                connection.execute(f"PRAGMA user_version = {target}")
                log.info("Migrated SQLite store %s to schema version %d", self._path, target)

    async def close(self) -> None:
        executor, connection = self._executor, self._connection
        if executor is None or connection is None:
            return
        self._executor = None
        self._connection = None
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, connection.close)
        finally:
            executor.shutdown(wait=True)
        log.info("Closed SQLite store %s", self._path)

    async def ping(self) -> None:
        def select_one(connection: sqlite3.Connection) -> None:
            connection.execute("SELECT 1").fetchone()

        await self._run(select_one)

    # -- generic record helpers ------------------------------------------------

    async def _put(self, table: _Table, record: Any) -> None:
        def put(connection: sqlite3.Connection) -> None:
            connection.execute(table.insert("INSERT OR REPLACE"), table.to_row(record))

        await self._run(put)

    async def _insert(self, table: _Table, record: Any, key_description: str) -> None:
        def insert(connection: sqlite3.Connection) -> None:
            try:
                connection.execute(table.insert(), table.to_row(record))
            except sqlite3.IntegrityError as error:
                raise DuplicateError(f"{table.name}: {key_description} already exists") from error

        await self._run(insert)

    async def _get(self, table: _Table, where: str, parameters: tuple[Any, ...]) -> Any | None:
        def get(connection: sqlite3.Connection) -> Any | None:
            row = connection.execute(f"{table.select} WHERE {where}", parameters).fetchone()
            return None if row is None else table.from_row(row)

        return await self._run(get)

    async def _list(self, table: _Table, filters: dict[str, Any], order_by: str, limit: int | None = None) -> list[Any]:
        """Return the records whose columns equal every value in ``filters``."""
        conditions = [f"{column} = ?" for column in filters]
        parameters: list[Any] = list(filters.values())
        sql = table.select
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        sql += f" ORDER BY {order_by}"
        if limit is not None:
            sql += " LIMIT ?"
            parameters.append(limit)

        def list_records(connection: sqlite3.Connection) -> list[Any]:
            return [table.from_row(row) for row in connection.execute(sql, parameters)]

        return await self._run(list_records)

    async def _execute_count(self, sql: str, parameters: tuple[Any, ...]) -> int:
        """Run one data-changing statement and return how many rows it changed."""

        def execute(connection: sqlite3.Connection) -> int:
            return connection.execute(sql, parameters).rowcount

        return await self._run(execute)

    # -- accounts, organizations, memberships, workspaces ----------------------

    async def put_account(self, account: Account) -> None:
        await self._put(_ACCOUNTS, account)

    async def get_account(self, account_id: str) -> Account | None:
        return await self._get(_ACCOUNTS, "id = ?", (account_id,))

    async def list_accounts(self) -> list[Account]:
        return await self._list(_ACCOUNTS, {}, "created_at, id")

    async def put_organization(self, organization: Organization) -> None:
        await self._put(_ORGANIZATIONS, organization)

    async def get_organization(self, organization_id: str) -> Organization | None:
        return await self._get(_ORGANIZATIONS, "id = ?", (organization_id,))

    async def put_membership(self, membership: Membership) -> None:
        await self._put(_MEMBERSHIPS, membership)

    async def get_membership(self, organization_id: str, account_id: str) -> Membership | None:
        return await self._get(_MEMBERSHIPS, "organization_id = ? AND account_id = ?", (organization_id, account_id))

    async def delete_membership(self, organization_id: str, account_id: str) -> bool:
        deleted = await self._execute_count(
            "DELETE FROM memberships WHERE organization_id = ? AND account_id = ?", (organization_id, account_id)
        )
        return deleted > 0

    async def put_workspace(self, workspace: Workspace) -> None:
        await self._put(_WORKSPACES, workspace)

    async def get_workspace(self, workspace_id: str) -> Workspace | None:
        return await self._get(_WORKSPACES, "id = ?", (workspace_id,))

    async def list_workspaces(
        self, *, organization_id: str | None = None, owner_account_id: str | None = None
    ) -> list[Workspace]:
        filters = {"organization_id": organization_id, "owner_account_id": owner_account_id}
        given = {column: value for column, value in filters.items() if value is not None}
        return await self._list(_WORKSPACES, given, "created_at, id")

    # -- anonymous sessions ------------------------------------------------------

    async def put_anonymous_session(self, session: AnonymousSession) -> None:
        await self._put(_ANONYMOUS_SESSIONS, session)

    async def get_anonymous_session(self, session_id: str) -> AnonymousSession | None:
        return await self._get(_ANONYMOUS_SESSIONS, "id = ?", (session_id,))

    # -- API keys ------------------------------------------------------------------

    async def insert_api_key(self, key: ApiKeyRecord) -> None:
        await self._insert(_API_KEYS, key, f"jti {key.jti!r}")

    async def get_api_key(self, jti: str) -> ApiKeyRecord | None:
        return await self._get(_API_KEYS, "jti = ?", (jti,))

    async def list_api_keys(
        self, *, workspace_id: str | None = None, account_id: str | None = None
    ) -> list[ApiKeyRecord]:
        filters = {"workspace_id": workspace_id, "account_id": account_id}
        given = {column: value for column, value in filters.items() if value is not None}
        return await self._list(_API_KEYS, given, "created_at, jti")

    async def revoke_api_key(self, jti: str, revoked_at: float) -> bool:
        revoked = await self._execute_count(
            "UPDATE api_keys SET revoked_at = ? WHERE jti = ? AND revoked_at IS NULL", (revoked_at, jti)
        )
        return revoked > 0

    # -- rate limits -------------------------------------------------------------

    async def take_token(
        self, key: str, *, capacity: float, refill_per_second: float, now: float, cost: float = 1.0
    ) -> RateDecision:
        check_bucket_arguments(capacity, refill_per_second, cost)
        bucket = BucketSpec(key, capacity, refill_per_second, cost)

        def take(connection: sqlite3.Connection) -> RateDecision:
            with _write_transaction(connection):
                decision = _take_from_bucket(connection, bucket, now)
                _prune_rate_buckets(connection, now)
            return decision

        return await self._run(take)

    async def take_tokens(self, buckets: Sequence[BucketSpec], *, now: float) -> list[RateDecision]:
        """Take from every bucket in one transaction, so one commit covers them all."""
        for bucket in buckets:
            check_bucket_arguments(bucket.capacity, bucket.refill_per_second, bucket.cost)

        def take_all(connection: sqlite3.Connection) -> list[RateDecision]:
            decisions = []
            with _write_transaction(connection):
                for bucket in buckets:
                    decision = _take_from_bucket(connection, bucket, now)
                    decisions.append(decision)
                    if not decision.allowed:
                        break
                _prune_rate_buckets(connection, now)
            return decisions

        return await self._run(take_all)

    async def hit_window(self, key: str, *, limit: int, window_seconds: float, now: float) -> RateDecision:
        check_window_arguments(limit, window_seconds)
        current_start = math.floor(now / window_seconds) * window_seconds

        def hit(connection: sqlite3.Connection) -> RateDecision:
            with _write_transaction(connection):
                row = connection.execute(
                    "SELECT window_start, count FROM rate_windows WHERE key = ?", (key,)
                ).fetchone()
                # A stored window later than ``now``'s (clocks of two processes)
                # keeps counting, so a lagging clock cannot reopen a full window.
                if row is None or row[0] < current_start:
                    window_start, count = current_start, 0
                else:
                    window_start, count = row

                allowed = count < limit
                if allowed:
                    count += 1
                window_end = window_start + window_seconds

                connection.execute(
                    "INSERT OR REPLACE INTO rate_windows (key, window_start, count, expire_at) VALUES (?, ?, ?, ?)",
                    (key, window_start, count, window_end),
                )
                connection.execute(
                    "DELETE FROM rate_windows WHERE key IN"
                    " (SELECT key FROM rate_windows WHERE expire_at < ? LIMIT ?)",
                    (now, RATE_PRUNE_BATCH),
                )

            remaining = float(limit - count)
            if allowed:
                return RateDecision(allowed=True, remaining=remaining, retry_after=0.0)
            return RateDecision(allowed=False, remaining=remaining, retry_after=window_end - now)

        return await self._run(hit)

    # -- MCP sessions and their SSE event log --------------------------------------

    async def insert_mcp_session(self, record: McpSessionRecord) -> None:
        await self._insert(_MCP_SESSIONS, record, f"session {record.id!r}")

    async def get_mcp_session(self, session_id: str) -> McpSessionRecord | None:
        return await self._get(_MCP_SESSIONS, "id = ?", (session_id,))

    async def activate_mcp_session(self, session_id: str, now: float) -> bool:
        moved = await self._execute_count(
            "UPDATE mcp_sessions SET state = 'active', last_seen_at = ? WHERE id = ? AND state = 'initializing'",
            (now, session_id),
        )
        return moved > 0

    async def touch_mcp_session(self, session_id: str, now: float) -> bool:
        touched = await self._execute_count(
            "UPDATE mcp_sessions SET last_seen_at = ? WHERE id = ? AND state != ?", (now, session_id, _CLOSED)
        )
        return touched > 0

    async def close_mcp_session(self, session_id: str, now: float, reason: str) -> bool:
        def close(connection: sqlite3.Connection) -> bool:
            with _write_transaction(connection):
                closed = connection.execute(
                    "UPDATE mcp_sessions SET state = ?, closed_at = ?, close_reason = ? WHERE id = ? AND state != ?",
                    (_CLOSED, now, reason, session_id, _CLOSED),
                ).rowcount
                connection.execute("DELETE FROM mcp_events WHERE session_id = ?", (session_id,))
            return closed > 0

        return await self._run(close)

    async def count_open_mcp_sessions(self, *, principal: str | None = None) -> int:
        sql = "SELECT COUNT(*) FROM mcp_sessions WHERE state != ?"
        parameters: tuple[Any, ...] = (_CLOSED,)
        if principal is not None:
            sql += " AND principal = ?"
            parameters += (principal,)

        def count(connection: sqlite3.Connection) -> int:
            return connection.execute(sql, parameters).fetchone()[0]

        return await self._run(count)

    async def close_idle_mcp_sessions(self, idle_before: float, now: float) -> list[str]:
        """Close every open session with ``last_seen_at < idle_before`` with reason ``idle``."""

        def close_idle(connection: sqlite3.Connection) -> list[str]:
            with _write_transaction(connection):
                session_ids = [
                    row[0]
                    for row in connection.execute(
                        "SELECT id FROM mcp_sessions WHERE state != ? AND last_seen_at < ? ORDER BY last_seen_at, id",
                        (_CLOSED, idle_before),
                    )
                ]
                for session_id in session_ids:
                    connection.execute(
                        "UPDATE mcp_sessions SET state = ?, closed_at = ?, close_reason = ? WHERE id = ?",
                        (_CLOSED, now, _IDLE_CLOSE_REASON, session_id),
                    )
                    connection.execute("DELETE FROM mcp_events WHERE session_id = ?", (session_id,))
            return session_ids

        return await self._run(close_idle)

    async def append_event(self, session_id: str, stream_id: str, data: str | None, now: float) -> int:
        """Append an event to the session's log and return its ``seq`` (atomic).

        An event of a session that is already closed gets a ``seq`` but is
        not kept, because a closed session has no event log.
        """

        def append(connection: sqlite3.Connection) -> int:
            with _write_transaction(connection):
                cursor = connection.execute(
                    "INSERT INTO mcp_events (session_id, stream_id, data, data_bytes, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (session_id, stream_id, data, event_data_bytes(data), now),
                )
                seq = cursor.lastrowid
                state = connection.execute("SELECT state FROM mcp_sessions WHERE id = ?", (session_id,)).fetchone()
                if state is not None and state[0] == _CLOSED:
                    connection.execute("DELETE FROM mcp_events WHERE seq = ?", (seq,))
            return seq

        return await self._run(append)

    async def events_after(self, session_id: str, after_seq: int, *, limit: int = 1000) -> list[StoredEvent]:
        check_limit(limit)

        def select_after(connection: sqlite3.Connection) -> list[StoredEvent]:
            rows = connection.execute(
                "SELECT session_id, stream_id, seq, data, created_at FROM mcp_events"
                " WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (session_id, after_seq, limit),
            )
            return [StoredEvent(*row) for row in rows]

        return await self._run(select_after)

    async def get_event(self, session_id: str, seq: int) -> StoredEvent | None:
        def select_one(connection: sqlite3.Connection) -> StoredEvent | None:
            row = connection.execute(
                "SELECT session_id, stream_id, seq, data, created_at FROM mcp_events WHERE session_id = ? AND seq = ?",
                (session_id, seq),
            ).fetchone()
            return None if row is None else StoredEvent(*row)

        return await self._run(select_one)

    async def trim_events(self, session_id: str, *, max_count: int, max_bytes: int, min_created_at: float) -> int:
        """Drop the session's oldest events until every limit holds; return how many were dropped.

        ``max_bytes`` counts the UTF-8 length of each event's ``data``.
        """

        def trim(connection: sqlite3.Connection) -> int:
            with _write_transaction(connection):
                rows = connection.execute(
                    "SELECT seq, data_bytes, created_at FROM mcp_events WHERE session_id = ? ORDER BY seq DESC",
                    (session_id,),
                ).fetchall()
                dropped = count_events_to_drop(
                    [(data_bytes, created_at) for _, data_bytes, created_at in rows],
                    max_count=max_count,
                    max_bytes=max_bytes,
                    min_created_at=min_created_at,
                )
                if dropped:
                    newest_dropped_seq = rows[len(rows) - dropped][0]
                    connection.execute(
                        "DELETE FROM mcp_events WHERE session_id = ? AND seq <= ?", (session_id, newest_dropped_seq)
                    )
            return dropped

        return await self._run(trim)

    # -- webhooks and billing ------------------------------------------------------

    async def record_webhook_receipt(self, provider: str, event_id: str, now: float) -> bool:
        inserted = await self._execute_count(
            "INSERT OR IGNORE INTO webhook_receipts (provider, event_id, received_at) VALUES (?, ?, ?)",
            (provider, event_id, now),
        )
        return inserted > 0

    async def has_webhook_receipt(self, provider: str, event_id: str) -> bool:
        def exists(connection: sqlite3.Connection) -> bool:
            row = connection.execute(
                "SELECT 1 FROM webhook_receipts WHERE provider = ? AND event_id = ?", (provider, event_id)
            ).fetchone()
            return row is not None

        return await self._run(exists)

    async def forget_webhook_receipt(self, provider: str, event_id: str) -> None:
        await self._execute_count(
            "DELETE FROM webhook_receipts WHERE provider = ? AND event_id = ?", (provider, event_id)
        )

    async def apply_billing_record(self, record: BillingRecord) -> bool:
        # One upsert statement: its WHERE leaves a stored newer record alone.
        updates = ", ".join(
            f"{column} = excluded.{column}"
            for column in _BILLING_RECORDS.columns
            if column not in ("object_type", "object_id")
        )
        sql = (
            f"{_BILLING_RECORDS.insert()} ON CONFLICT (object_type, object_id) DO UPDATE SET {updates}"
            " WHERE billing_records.event_created <= excluded.event_created"
        )
        stored = await self._execute_count(sql, _BILLING_RECORDS.to_row(record))
        return stored > 0

    async def get_billing_record(self, object_type: str, object_id: str) -> BillingRecord | None:
        return await self._get(_BILLING_RECORDS, "object_type = ? AND object_id = ?", (object_type, object_id))

    async def list_billing_records(self, organization_id: str) -> list[BillingRecord]:
        return await self._list(_BILLING_RECORDS, {"organization_id": organization_id}, "object_type, object_id")

    # -- tasks and approvals ---------------------------------------------------------

    async def insert_task(self, task: Task) -> None:
        await self._insert(_TASKS, task, f"task {task.id!r}")

    async def get_task(self, task_id: str) -> Task | None:
        return await self._get(_TASKS, "id = ?", (task_id,))

    async def update_task(self, task_id: str, *, expected_status: str | None = None, **fields: Any) -> bool:
        """Set ``fields`` on the task (atomic); raise ``ValueError`` for a name that is not a Task field.

        With ``expected_status`` the update happens only while the task has
        that status. Return whether the task was found (with that status).
        """
        unknown = sorted(set(fields) - _TASK_UPDATABLE_FIELDS)
        if unknown:
            raise ValueError(
                f"Cannot update task fields {unknown}: updatable fields are {sorted(_TASK_UPDATABLE_FIELDS)}"
            )

        # Column names come from the Task dataclass (checked above), never from input.
        assignments = [f"{column} = ?" for column in fields]
        parameters: list[Any] = [_TASKS.encode(column, value) for column, value in fields.items()]
        # Assigning id to itself makes an empty ``fields`` a valid statement
        # that still reports whether the task matched.
        sql = f"UPDATE tasks SET {', '.join(assignments or ['id = id'])} WHERE id = ?"
        parameters.append(task_id)
        if expected_status is not None:
            sql += " AND status = ?"
            parameters.append(expected_status)

        updated = await self._execute_count(sql, tuple(parameters))
        return updated > 0

    async def list_tasks(self, workspace_id: str, *, status: str | None = None, limit: int = 100) -> list[Task]:
        check_limit(limit)
        filters: dict[str, Any] = {"workspace_id": workspace_id}
        if status is not None:
            filters["status"] = status
        return await self._list(_TASKS, filters, "created_at DESC, id DESC", limit)

    async def insert_approval(self, approval: Approval) -> None:
        await self._insert(_APPROVALS, approval, f"approval {approval.id!r}")

    async def get_approval(self, approval_id: str) -> Approval | None:
        return await self._get(_APPROVALS, "id = ?", (approval_id,))

    async def list_approvals(self, *, status: str | None = None, workspace_id: str | None = None) -> list[Approval]:
        filters = {"status": status, "workspace_id": workspace_id}
        given = {column: value for column, value in filters.items() if value is not None}
        return await self._list(_APPROVALS, given, "created_at, id")

    async def decide_approval(
        self, approval_id: str, *, status: str, decided_at: float, decided_by: str, reason: str | None
    ) -> bool:
        """Move a ``pending`` approval to ``approved`` or ``denied`` (atomic).

        Return ``True`` only for the call that decided it; raise
        ``ValueError`` for any other ``status``.
        """
        if status not in _APPROVAL_DECISIONS:
            raise ValueError(f"Invalid approval decision {status!r}: use 'approved' or 'denied'")
        decided = await self._execute_count(
            "UPDATE approvals SET status = ?, decided_at = ?, decided_by = ?, reason = ?"
            " WHERE id = ? AND status = 'pending'",
            (status, decided_at, decided_by, reason, approval_id),
        )
        return decided > 0

    async def put_approval_policy(self, policy: ApprovalPolicy) -> None:
        await self._put(_APPROVAL_POLICIES, policy)

    async def delete_approval_policy(self, workspace_id: str, pattern: str) -> bool:
        deleted = await self._execute_count(
            "DELETE FROM approval_policies WHERE workspace_id = ? AND pattern = ?", (workspace_id, pattern)
        )
        return deleted > 0

    async def list_approval_policies(self, workspace_id: str) -> list[ApprovalPolicy]:
        return await self._list(_APPROVAL_POLICIES, {"workspace_id": workspace_id}, "created_at, pattern")

    # -- workspace key-value store ---------------------------------------------------

    async def kv_get(self, workspace_id: str, key: str) -> Any | None:
        def select_value(connection: sqlite3.Connection) -> Any | None:
            row = connection.execute(
                "SELECT value FROM kv WHERE workspace_id = ? AND key = ?", (workspace_id, key)
            ).fetchone()
            return None if row is None else json.loads(row[0])

        return await self._run(select_value)

    async def kv_set(self, workspace_id: str, key: str, value: Any, now: float) -> None:
        encoded = json.dumps(value)
        await self._execute_count(
            "INSERT OR REPLACE INTO kv (workspace_id, key, value, updated_at) VALUES (?, ?, ?, ?)",
            (workspace_id, key, encoded, now),
        )

    async def kv_delete(self, workspace_id: str, key: str) -> bool:
        deleted = await self._execute_count("DELETE FROM kv WHERE workspace_id = ? AND key = ?", (workspace_id, key))
        return deleted > 0

    async def kv_list(self, workspace_id: str, *, prefix: str = "", limit: int = 1000) -> list[str]:
        check_limit(limit)

        def select_keys(connection: sqlite3.Connection) -> list[str]:
            # ``key >= prefix`` lets the primary key index skip ahead, and substr
            # then matches the prefix exactly. LIKE would treat % and _ as
            # wildcards and ignore ASCII case.
            rows = connection.execute(
                "SELECT key FROM kv WHERE workspace_id = ? AND key >= ? AND substr(key, 1, ?) = ?"
                " ORDER BY key LIMIT ?",
                (workspace_id, prefix, len(prefix), prefix, limit),
            )
            return [row[0] for row in rows]

        return await self._run(select_keys)
