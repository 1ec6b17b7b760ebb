"""The MongoDB backend of :class:`~store.base.Store`, on ``pymongo.AsyncMongoClient``.

Every atomic method is one single-document operation (a conditional
``update_one``, a ``find_one_and_update`` with a pipeline update, or an
insert against a unique index), so the backend needs no sessions or
transactions and stays correct with many processes on many hosts.

Rate buckets and windows carry an ``expire_at`` date with a TTL index, so
MongoDB deletes them once they are back in their initial state. JSON-valued
fields are stored as JSON text because user data may contain keys that BSON
documents cannot store (``$``-prefixed keys, integers beyond 64 bits).

NOTE: the conformance suite has run this backend only on mongomock here. It
runs against a real server when ``EXECUTOR_TEST_MONGODB_URI`` is set.

Example::

    store = MongoStore("mongodb://db1,db2,db3/executor?replicaSet=rs0")
    await store.open()
    try:
        await store.kv_set("ws_1", "greeting", {"text": "hello"}, now=time.time())
    finally:
        await store.close()
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import math
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from bson import Binary
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument, WriteConcern
from pymongo.errors import DuplicateKeyError, PyMongoError

from store.base import DuplicateError, Store, StoreError
from store.records import (
    Account,
    AnonymousSession,
    ApiKeyRecord,
    Approval,
    ApprovalPolicy,
    BillingRecord,
    McpSessionRecord,
    Membership,
    Organization,
    RateDecision,
    StoredEvent,
    Task,
    Workspace,
)

# The argument checks and the trim rule come from the SQLite backend, so both
# backends accept the same arguments and drop the same events.
from store.sqlite import (
    TOKEN_TIME_TOLERANCE,
    check_bucket_arguments,
    check_limit,
    check_window_arguments,
    count_events_to_drop,
    event_data_bytes,
)

__all__ = ["MongoStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_DATABASE = "executor"

# TTL deletion compares ``expire_at`` with the MongoDB server's clock, while
# the times in the records come from the service's clock. This margin keeps a
# record alive while the two clocks differ by less than it.
EXPIRY_MARGIN_SECONDS = 300.0

# How long the seq counter of a closed session is kept, so an event appended
# during or just after the close still gets a seq above the earlier ones.
CLOSED_COUNTER_RETENTION_SECONDS = 3600.0

_CLOSED = "closed"
_IDLE_CLOSE_REASON = "idle"
_APPROVAL_DECISIONS = frozenset({"approved", "denied"})

# datetime.datetime.max as POSIX seconds; later expiry times are clamped to it.
_MAX_TIMESTAMP = 253402300799.0


@dataclasses.dataclass(frozen=True)
class _Collection:
    """The mapping of one record dataclass to documents of a collection.

    Documents hold every field of the record. With a single ``key_fields``
    entry that field's value is also the ``_id``; a composite key is
    enforced by a unique index instead. JSON fields are stored as JSON text
    and ``bytes`` fields as ``bson.Binary``.
    """

    name: str
    record_type: type
    key_fields: tuple[str, ...]
    json_fields: frozenset[str] = frozenset()
    bytes_fields: frozenset[str] = frozenset()

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(self.record_type))

    def key_filter(self, *key_values: Any) -> dict[str, Any]:
        if len(self.key_fields) == 1:
            return {"_id": key_values[0]}
        return dict(zip(self.key_fields, key_values, strict=True))

    def encode(self, field: str, value: Any) -> Any:
        if field in self.json_fields:
            return json.dumps(value)
        if field in self.bytes_fields and value is not None:
            return Binary(value)
        return value

    def to_document(self, record: Any) -> dict[str, Any]:
        document = {field: self.encode(field, getattr(record, field)) for field in self.fields}
        if len(self.key_fields) == 1:
            document["_id"] = document[self.key_fields[0]]
        return document

    def from_document(self, document: dict[str, Any]) -> Any:
        values = {}
        for field in self.fields:
            value = document.get(field)
            if field in self.json_fields:
                value = json.loads(value)
            elif field in self.bytes_fields and value is not None:
                value = bytes(value)
            values[field] = value
        return self.record_type(**values)


_ACCOUNTS = _Collection("accounts", Account, ("id",))
_ORGANIZATIONS = _Collection("organizations", Organization, ("id",))
_MEMBERSHIPS = _Collection("memberships", Membership, ("organization_id", "account_id"))
_WORKSPACES = _Collection("workspaces", Workspace, ("id",))
_ANONYMOUS_SESSIONS = _Collection("anonymous_sessions", AnonymousSession, ("id",))
_API_KEYS = _Collection("api_keys", ApiKeyRecord, ("jti",))
_MCP_SESSIONS = _Collection(
    "mcp_sessions", McpSessionRecord, ("id",), json_fields=frozenset({"client_capabilities", "client_info"})
)
_BILLING_RECORDS = _Collection(
    "billing_records", BillingRecord, ("object_type", "object_id"), json_fields=frozenset({"data"})
)
_TASKS = _Collection("tasks", Task, ("id",), json_fields=frozenset({"result"}), bytes_fields=frozenset({"snapshot"}))
_APPROVALS = _Collection("approvals", Approval, ("id",), json_fields=frozenset({"redacted_input"}))
_APPROVAL_POLICIES = _Collection("approval_policies", ApprovalPolicy, ("workspace_id", "pattern"))

_TASK_UPDATABLE_FIELDS = frozenset(_TASKS.fields) - {"id"}

_RATE_BUCKETS = "rate_buckets"
_RATE_WINDOWS = "rate_windows"
_MCP_EVENTS = "mcp_events"
_MCP_EVENT_COUNTERS = "mcp_event_counters"
_WEBHOOK_RECEIPTS = "webhook_receipts"
_KV = "kv"

# (collection, key pattern, options) created by open(); create_index is a
# no-op for an index that already exists with the same options.
_INDEXES: tuple[tuple[str, list[tuple[str, int]], dict[str, Any]], ...] = (
    (_ACCOUNTS.name, [("created_at", ASCENDING), ("_id", ASCENDING)], {}),
    (_MEMBERSHIPS.name, [("organization_id", ASCENDING), ("account_id", ASCENDING)], {"unique": True}),
    (_WORKSPACES.name, [("organization_id", ASCENDING), ("created_at", ASCENDING)], {}),
    (_WORKSPACES.name, [("owner_account_id", ASCENDING), ("created_at", ASCENDING)], {}),
    (_API_KEYS.name, [("workspace_id", ASCENDING), ("created_at", ASCENDING)], {}),
    (_API_KEYS.name, [("account_id", ASCENDING), ("created_at", ASCENDING)], {}),
    (_RATE_BUCKETS, [("expire_at", ASCENDING)], {"expireAfterSeconds": 0}),
    (_RATE_WINDOWS, [("expire_at", ASCENDING)], {"expireAfterSeconds": 0}),
    (_MCP_SESSIONS.name, [("principal", ASCENDING), ("state", ASCENDING)], {}),
    (_MCP_SESSIONS.name, [("state", ASCENDING), ("last_seen_at", ASCENDING)], {}),
    (_MCP_EVENTS, [("session_id", ASCENDING), ("seq", ASCENDING)], {"unique": True}),
    (_MCP_EVENT_COUNTERS, [("expire_at", ASCENDING)], {"expireAfterSeconds": 0}),
    (_WEBHOOK_RECEIPTS, [("provider", ASCENDING), ("event_id", ASCENDING)], {"unique": True}),
    (_BILLING_RECORDS.name, [("object_type", ASCENDING), ("object_id", ASCENDING)], {"unique": True}),
    (
        _BILLING_RECORDS.name,
        [("organization_id", ASCENDING), ("object_type", ASCENDING), ("object_id", ASCENDING)],
        {},
    ),
    (_TASKS.name, [("workspace_id", ASCENDING), ("created_at", DESCENDING)], {}),
    (_APPROVALS.name, [("status", ASCENDING), ("created_at", ASCENDING)], {}),
    (_APPROVALS.name, [("workspace_id", ASCENDING), ("created_at", ASCENDING)], {}),
    (_APPROVAL_POLICIES.name, [("workspace_id", ASCENDING), ("pattern", ASCENDING)], {"unique": True}),
    (_KV, [("workspace_id", ASCENDING), ("key", ASCENDING)], {"unique": True}),
)


def _database_name_from_url(url: str) -> str:
    """Return the database named by the URL path, or ``executor`` when it names none."""
    path = urllib.parse.urlsplit(url).path
    return urllib.parse.unquote(path.lstrip("/")) or DEFAULT_DATABASE


def _expiry_date(timestamp: float) -> datetime.datetime:
    """Return the TTL date for POSIX ``timestamp`` plus the clock margin."""
    seconds = min(timestamp + EXPIRY_MARGIN_SECONDS, _MAX_TIMESTAMP)
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)


def _prefix_upper_bound(prefix: str) -> str | None:
    """Return the least string above every string that starts with ``prefix``.

    Return ``None`` when there is none (the prefix is all U+10FFFF). MongoDB
    compares strings by their UTF-8 bytes, which orders them as code points.
    """
    characters = list(prefix)
    while characters:
        code_point = ord(characters.pop()) + 1
        if 0xD800 <= code_point <= 0xDFFF:
            code_point = 0xE000  # surrogates cannot be encoded in UTF-8
        if code_point <= 0x10FFFF:
            return "".join(characters) + chr(code_point)
    return None


def _translate_driver_errors(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Raise :class:`DuplicateError` or :class:`StoreError` for a PyMongo error of ``method``."""

    @functools.wraps(method)
    async def translated(*args: Any, **kwargs: Any) -> T:
        try:
            return await method(*args, **kwargs)
        except DuplicateKeyError as error:
            raise DuplicateError(f"MongoDB {method.__name__} hit an existing unique key: {error}") from error
        except PyMongoError as error:
            raise StoreError(f"MongoDB {method.__name__} failed: {error}") from error

    return translated


def _with_driver_errors_translated(cls: type[Store]) -> type[Store]:
    """Wrap every :class:`Store` method that ``cls`` defines with :func:`_translate_driver_errors`."""
    for name in Store.__abstractmethods__:
        if name in cls.__dict__:
            setattr(cls, name, _translate_driver_errors(cls.__dict__[name]))
    return cls


@_with_driver_errors_translated
class MongoStore(Store):
    """A :class:`~store.base.Store` in the MongoDB database at ``url``.

    The database is ``database`` when given, else the one the URL path names,
    else ``executor``. ``client`` is an async client to use instead of a
    new ``AsyncMongoClient(url)``; the store then leaves closing it to the
    caller. A client the store makes writes with majority write concern
    unless the URL sets ``w``. Every method raises
    :class:`~store.base.StoreError` when the store is not open or the driver
    reports an error.
    """

    def __init__(self, url: str, *, client: Any = None, database: str | None = None) -> None:
        self._url = url
        self._client = client
        self._owns_client = client is None
        self._database_name = database or _database_name_from_url(url)
        self._database: Any = None

    def _collection(self, name: str) -> Any:
        if self._database is None:
            raise StoreError(f"MongoDB store {self._database_name} is not open: call open() first")
        return self._database[name]

    # -- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        if self._database is not None:
            return
        if self._client is None:
            self._client = AsyncMongoClient(self._url)
        write_concern = None
        if self._owns_client and self._client.write_concern.is_server_default:
            write_concern = WriteConcern(w="majority")
        database = self._client.get_database(self._database_name, write_concern=write_concern)

        try:
            for collection, keys, options in _INDEXES:
                await database[collection].create_index(keys, **options)
        except BaseException:
            await self._close_own_client()
            raise
        self._database = database
        log.info("Opened MongoDB store, database %s", self._database_name)

    async def close(self) -> None:
        if self._database is None:
            return
        self._database = None
        await self._close_own_client()
        log.info("Closed MongoDB store, database %s", self._database_name)

    async def _close_own_client(self) -> None:
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def ping(self) -> None:
        if self._database is None:
            raise StoreError(f"MongoDB store {self._database_name} is not open: call open() first")
        await self._database.command("ping")

    # -- generic record helpers ------------------------------------------------

    async def _put(self, spec: _Collection, record: Any) -> None:
        key_values = [getattr(record, field) for field in spec.key_fields]
        await self._collection(spec.name).replace_one(
            spec.key_filter(*key_values), spec.to_document(record), upsert=True
        )

    async def _insert(self, spec: _Collection, record: Any) -> None:
        try:
            await self._collection(spec.name).insert_one(spec.to_document(record))
        except DuplicateKeyError as error:
            key = ", ".join(f"{field} {getattr(record, field)!r}" for field in spec.key_fields)
            raise DuplicateError(f"{spec.name}: {key} already exists") from error

    async def _get(self, spec: _Collection, *key_values: Any) -> Any | None:
        document = await self._collection(spec.name).find_one(spec.key_filter(*key_values))
        return None if document is None else spec.from_document(document)

    async def _list(
        self, spec: _Collection, query: dict[str, Any], sort: list[tuple[str, int]], limit: int | None = None
    ) -> list[Any]:
        if limit is not None:
            check_limit(limit)
            if limit == 0:  # MongoDB reads limit(0) as "no limit"
                return []
        cursor = self._collection(spec.name).find(query).sort(sort)
        if limit is not None:
            cursor = cursor.limit(limit)
        return [spec.from_document(document) for document in await cursor.to_list(None)]

    # -- accounts, organizations, memberships, workspaces ----------------------

    async def put_account(self, account: Account) -> None:
        await self._put(_ACCOUNTS, account)

    async def get_account(self, account_id: str) -> Account | None:
        return await self._get(_ACCOUNTS, account_id)

    async def list_accounts(self) -> list[Account]:
        return await self._list(_ACCOUNTS, {}, [("created_at", ASCENDING), ("_id", ASCENDING)])

    async def put_organization(self, organization: Organization) -> None:
        await self._put(_ORGANIZATIONS, organization)

    async def get_organization(self, organization_id: str) -> Organization | None:
        return await self._get(_ORGANIZATIONS, organization_id)

    async def put_membership(self, membership: Membership) -> None:
        await self._put(_MEMBERSHIPS, membership)

    async def get_membership(self, organization_id: str, account_id: str) -> Membership | None:
        return await self._get(_MEMBERSHIPS, organization_id, account_id)

    async def delete_membership(self, organization_id: str, account_id: str) -> bool:
        result = await self._collection(_MEMBERSHIPS.name).delete_one(
            _MEMBERSHIPS.key_filter(organization_id, account_id)
        )
        return result.deleted_count > 0

    async def put_workspace(self, workspace: Workspace) -> None:
        await self._put(_WORKSPACES, workspace)

    async def get_workspace(self, workspace_id: str) -> Workspace | None:
        return await self._get(_WORKSPACES, workspace_id)

    async def list_workspaces(
        self, *, organization_id: str | None = None, owner_account_id: str | None = None
    ) -> list[Workspace]:
        filters = {"organization_id": organization_id, "owner_account_id": owner_account_id}
        query = {field: value for field, value in filters.items() if value is not None}
        return await self._list(_WORKSPACES, query, [("created_at", ASCENDING), ("_id", ASCENDING)])

    # -- anonymous sessions ------------------------------------------------------

    async def put_anonymous_session(self, session: AnonymousSession) -> None:
        await self._put(_ANONYMOUS_SESSIONS, session)

    async def get_anonymous_session(self, session_id: str) -> AnonymousSession | None:
        return await self._get(_ANONYMOUS_SESSIONS, session_id)

    # -- API keys ------------------------------------------------------------------

    async def insert_api_key(self, key: ApiKeyRecord) -> None:
        await self._insert(_API_KEYS, key)

    async def get_api_key(self, jti: str) -> ApiKeyRecord | None:
        return await self._get(_API_KEYS, jti)

    async def list_api_keys(
        self, *, workspace_id: str | None = None, account_id: str | None = None
    ) -> list[ApiKeyRecord]:
        filters = {"workspace_id": workspace_id, "account_id": account_id}
        query = {field: value for field, value in filters.items() if value is not None}
        return await self._list(_API_KEYS, query, [("created_at", ASCENDING), ("_id", ASCENDING)])

    async def revoke_api_key(self, jti: str, revoked_at: float) -> bool:
        # {"revoked_at": None} matches a null or missing field.
        result = await self._collection(_API_KEYS.name).update_one(
            {"_id": jti, "revoked_at": None}, {"$set": {"revoked_at": revoked_at}}
        )
        return result.matched_count > 0

    # -- rate limits -------------------------------------------------------------

    async def take_token(
        self, key: str, *, capacity: float, refill_per_second: float, now: float, cost: float = 1.0
    ) -> RateDecision:
        check_bucket_arguments(capacity, refill_per_second, cost)

        # A pipeline update computes the refill and the take inside one
        # document update, the same arithmetic as the SQLite backend. A
        # missing bucket (an upsert) starts with ``capacity`` tokens at ``now``.
        # The decision stays in the document as ``allowed`` for the caller to
        # read back. Removing it with an $unset stage is valid MongoDB, but
        # mongomock 4.3 does not implement that stage.
        stored_tokens = {"$ifNull": ["$tokens", capacity]}
        stored_at = {"$ifNull": ["$updated_at", now]}
        elapsed = {"$max": [0.0, {"$subtract": [now, stored_at]}]}
        refill = [
            {
                "$set": {
                    "tokens": {
                        "$min": [capacity, {"$add": [stored_tokens, {"$multiply": [refill_per_second, elapsed]}]}]
                    },
                    "updated_at": {"$max": [now, stored_at]},
                }
            },
            {"$set": {"allowed": {"$gte": ["$tokens", cost - refill_per_second * TOKEN_TIME_TOLERANCE]}}},
            {
                "$set": {
                    "tokens": {"$cond": ["$allowed", {"$subtract": ["$tokens", cost]}, "$tokens"]},
                    # Any bucket is full again ``capacity / refill_per_second``
                    # seconds after ``now`` (EXPIRY_MARGIN_SECONDS covers a
                    # stored time ahead of ``now``), and deleting a full bucket
                    # changes nothing.
                    "expire_at": _expiry_date(now + capacity / refill_per_second),
                }
            },
        ]
        bucket = await self._collection(_RATE_BUCKETS).find_one_and_update(
            {"_id": key}, refill, upsert=True, return_document=ReturnDocument.AFTER
        )

        tokens = bucket["tokens"]
        if bucket["allowed"]:
            return RateDecision(allowed=True, remaining=tokens, retry_after=0.0)
        return RateDecision(allowed=False, remaining=tokens, retry_after=(cost - tokens) / refill_per_second)

    async def hit_window(self, key: str, *, limit: int, window_seconds: float, now: float) -> RateDecision:
        check_window_arguments(limit, window_seconds)
        current_start = math.floor(now / window_seconds) * window_seconds

        # A stored window earlier than ``now``'s restarts the count; a later
        # one (clocks of two processes) keeps counting, as in the SQLite backend.
        stored_start = {"$ifNull": ["$window_start", current_start]}
        hit = [
            {
                "$set": {
                    "count": {"$cond": [{"$gte": [stored_start, current_start]}, {"$ifNull": ["$count", 0]}, 0]},
                    "window_start": {"$max": [stored_start, current_start]},
                }
            },
            {"$set": {"allowed": {"$lt": ["$count", limit]}}},
            {
                "$set": {
                    "count": {"$cond": ["$allowed", {"$add": ["$count", 1]}, "$count"]},
                    "expire_at": _expiry_date(current_start + window_seconds),
                }
            },
        ]
        window = await self._collection(_RATE_WINDOWS).find_one_and_update(
            {"_id": key}, hit, upsert=True, return_document=ReturnDocument.AFTER
        )

        remaining = float(limit - window["count"])
        if window["allowed"]:
            return RateDecision(allowed=True, remaining=remaining, retry_after=0.0)
        retry_after = window["window_start"] + window_seconds - now
        return RateDecision(allowed=False, remaining=remaining, retry_after=retry_after)

    # -- MCP sessions and their SSE event log --------------------------------------

    async def insert_mcp_session(self, record: McpSessionRecord) -> None:
        await self._insert(_MCP_SESSIONS, record)

    async def get_mcp_session(self, session_id: str) -> McpSessionRecord | None:
        return await self._get(_MCP_SESSIONS, session_id)

    async def activate_mcp_session(self, session_id: str, now: float) -> bool:
        result = await self._collection(_MCP_SESSIONS.name).update_one(
            {"_id": session_id, "state": "initializing"}, {"$set": {"state": "active", "last_seen_at": now}}
        )
        return result.matched_count > 0

    async def touch_mcp_session(self, session_id: str, now: float) -> bool:
        result = await self._collection(_MCP_SESSIONS.name).update_one(
            {"_id": session_id, "state": {"$ne": _CLOSED}}, {"$set": {"last_seen_at": now}}
        )
        return result.matched_count > 0

    async def close_mcp_session(self, session_id: str, now: float, reason: str) -> bool:
        result = await self._collection(_MCP_SESSIONS.name).update_one(
            {"_id": session_id, "state": {"$ne": _CLOSED}},
            {"$set": {"state": _CLOSED, "closed_at": now, "close_reason": reason}},
        )
        # Runs for an already closed session too, so a repeated close removes
        # what an earlier close left behind when it failed half-way.
        await self._delete_event_log(session_id, now)
        return result.matched_count > 0

    async def _delete_event_log(self, session_id: str, now: float) -> None:
        await self._collection(_MCP_EVENTS).delete_many({"session_id": session_id})
        await self._collection(_MCP_EVENT_COUNTERS).update_one(
            {"_id": session_id}, {"$set": {"expire_at": _expiry_date(now + CLOSED_COUNTER_RETENTION_SECONDS)}}
        )

    async def count_open_mcp_sessions(self, *, principal: str | None = None) -> int:
        query: dict[str, Any] = {"state": {"$ne": _CLOSED}}
        if principal is not None:
            query["principal"] = principal
        return await self._collection(_MCP_SESSIONS.name).count_documents(query)

    async def close_idle_mcp_sessions(self, idle_before: float, now: float) -> list[str]:
        """Close every open session with ``last_seen_at < idle_before`` with reason ``idle``."""
        sessions = self._collection(_MCP_SESSIONS.name)
        idle = {"state": {"$ne": _CLOSED}, "last_seen_at": {"$lt": idle_before}}
        cursor = sessions.find(idle, {"_id": 1}).sort([("last_seen_at", ASCENDING), ("_id", ASCENDING)])
        candidates = await cursor.to_list(None)

        closed = []
        for candidate in candidates:
            # The filter repeats the idle test: a session touched since the
            # find above stays open.
            result = await sessions.update_one(
                {"_id": candidate["_id"], **idle},
                {"$set": {"state": _CLOSED, "closed_at": now, "close_reason": _IDLE_CLOSE_REASON}},
            )
            if result.matched_count:
                await self._delete_event_log(candidate["_id"], now)
                closed.append(candidate["_id"])
        return closed

    async def append_event(self, session_id: str, stream_id: str, data: str | None, now: float) -> int:
        """Append an event to the session's log and return its ``seq`` (atomic).

        An event of a session that is already closed gets a ``seq`` but is
        not kept, because a closed session has no event log.
        """
        counter = await self._collection(_MCP_EVENT_COUNTERS).find_one_and_update(
            {"_id": session_id}, {"$inc": {"seq": 1}}, upsert=True, return_document=ReturnDocument.AFTER
        )
        seq = counter["seq"]
        await self._collection(_MCP_EVENTS).insert_one(
            {
                "session_id": session_id,
                "stream_id": stream_id,
                "seq": seq,
                "data": data,
                "data_bytes": event_data_bytes(data),
                "created_at": now,
            }
        )

        # close_mcp_session marks the session closed before it deletes the
        # log. Because the state is read after the insert, either that delete
        # removed this event or this read finds the session closed.
        session = await self._collection(_MCP_SESSIONS.name).find_one({"_id": session_id}, {"state": 1})
        if session is not None and session["state"] == _CLOSED:
            await self._collection(_MCP_EVENTS).delete_many({"session_id": session_id})
        return seq

    @staticmethod
    def _event_from_document(document: dict[str, Any]) -> StoredEvent:
        return StoredEvent(
            session_id=document["session_id"],
            stream_id=document["stream_id"],
            seq=document["seq"],
            data=document["data"],
            created_at=document["created_at"],
        )

    async def events_after(self, session_id: str, after_seq: int, *, limit: int = 1000) -> list[StoredEvent]:
        check_limit(limit)
        if limit == 0:  # MongoDB reads limit(0) as "no limit"
            return []
        cursor = (
            self._collection(_MCP_EVENTS)
            .find({"session_id": session_id, "seq": {"$gt": after_seq}})
            .sort("seq", ASCENDING)
            .limit(limit)
        )
        return [self._event_from_document(document) for document in await cursor.to_list(None)]

    async def get_event(self, session_id: str, seq: int) -> StoredEvent | None:
        document = await self._collection(_MCP_EVENTS).find_one({"session_id": session_id, "seq": seq})
        return None if document is None else self._event_from_document(document)

    async def trim_events(self, session_id: str, *, max_count: int, max_bytes: int, min_created_at: float) -> int:
        """Drop the session's oldest events until every limit holds; return how many were dropped.

        ``max_bytes`` counts the UTF-8 length of each event's ``data``.
        """
        events = self._collection(_MCP_EVENTS)
        cursor = events.find(
            {"session_id": session_id}, {"seq": 1, "data_bytes": 1, "created_at": 1}
        ).sort("seq", DESCENDING)
        newest_first = await cursor.to_list(None)
        dropped = count_events_to_drop(
            [(document["data_bytes"], document["created_at"]) for document in newest_first],
            max_count=max_count,
            max_bytes=max_bytes,
            min_created_at=min_created_at,
        )
        if not dropped:
            return 0

        # Events appended meanwhile have higher seqs and are kept.
        newest_dropped_seq = newest_first[len(newest_first) - dropped]["seq"]
        result = await events.delete_many({"session_id": session_id, "seq": {"$lte": newest_dropped_seq}})
        return result.deleted_count

    # -- webhooks and billing ------------------------------------------------------

    async def record_webhook_receipt(self, provider: str, event_id: str, now: float) -> bool:
        try:
            await self._collection(_WEBHOOK_RECEIPTS).insert_one(
                {"provider": provider, "event_id": event_id, "received_at": now}
            )
        except DuplicateKeyError:
            return False
        return True

    async def has_webhook_receipt(self, provider: str, event_id: str) -> bool:
        found = await self._collection(_WEBHOOK_RECEIPTS).find_one(
            {"provider": provider, "event_id": event_id}, projection={"_id": 1}
        )
        return found is not None

    async def forget_webhook_receipt(self, provider: str, event_id: str) -> None:
        await self._collection(_WEBHOOK_RECEIPTS).delete_one({"provider": provider, "event_id": event_id})

    async def apply_billing_record(self, record: BillingRecord) -> bool:
        collection = self._collection(_BILLING_RECORDS.name)
        not_newer = {
            **_BILLING_RECORDS.key_filter(record.object_type, record.object_id),
            "event_created": {"$lte": record.event_created},
        }
        update = {"$set": _BILLING_RECORDS.to_document(record)}
        try:
            await collection.update_one(not_newer, update, upsert=True)
        except DuplicateKeyError:
            # The upsert found no record it may replace and could not insert,
            # so one exists: a newer one, or one a concurrent call just
            # inserted. A plain conditional update then decides which.
            result = await collection.update_one(not_newer, update)
            return result.matched_count > 0
        return True

    async def get_billing_record(self, object_type: str, object_id: str) -> BillingRecord | None:
        return await self._get(_BILLING_RECORDS, object_type, object_id)

    async def list_billing_records(self, organization_id: str) -> list[BillingRecord]:
        return await self._list(
            _BILLING_RECORDS,
            {"organization_id": organization_id},
            [("object_type", ASCENDING), ("object_id", ASCENDING)],
        )

    # -- tasks and approvals ---------------------------------------------------------

    async def insert_task(self, task: Task) -> None:
        await self._insert(_TASKS, task)

    async def get_task(self, task_id: str) -> Task | None:
        return await self._get(_TASKS, task_id)

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

        query: dict[str, Any] = {"_id": task_id}
        if expected_status is not None:
            query["status"] = expected_status
        tasks = self._collection(_TASKS.name)
        if not fields:  # MongoDB rejects an empty $set
            return await tasks.find_one(query, {"_id": 1}) is not None

        changes = {field: _TASKS.encode(field, value) for field, value in fields.items()}
        result = await tasks.update_one(query, {"$set": changes})
        return result.matched_count > 0

    async def list_tasks(self, workspace_id: str, *, status: str | None = None, limit: int = 100) -> list[Task]:
        query: dict[str, Any] = {"workspace_id": workspace_id}
        if status is not None:
            query["status"] = status
        return await self._list(_TASKS, query, [("created_at", DESCENDING), ("_id", DESCENDING)], limit)

    async def insert_approval(self, approval: Approval) -> None:
        await self._insert(_APPROVALS, approval)

    async def get_approval(self, approval_id: str) -> Approval | None:
        return await self._get(_APPROVALS, approval_id)

    async def list_approvals(self, *, status: str | None = None, workspace_id: str | None = None) -> list[Approval]:
        filters = {"status": status, "workspace_id": workspace_id}
        query = {field: value for field, value in filters.items() if value is not None}
        return await self._list(_APPROVALS, query, [("created_at", ASCENDING), ("_id", ASCENDING)])

    async def decide_approval(
        self, approval_id: str, *, status: str, decided_at: float, decided_by: str, reason: str | None
    ) -> bool:
        """Move a ``pending`` approval to ``approved`` or ``denied`` (atomic).

        Return ``True`` only for the call that decided it; raise
        ``ValueError`` for any other ``status``.
        """
        if status not in _APPROVAL_DECISIONS:
            raise ValueError(f"Invalid approval decision {status!r}: use 'approved' or 'denied'")
        result = await self._collection(_APPROVALS.name).update_one(
            {"_id": approval_id, "status": "pending"},
            {"$set": {"status": status, "decided_at": decided_at, "decided_by": decided_by, "reason": reason}},
        )
        return result.matched_count > 0

    async def put_approval_policy(self, policy: ApprovalPolicy) -> None:
        await self._put(_APPROVAL_POLICIES, policy)

    async def delete_approval_policy(self, workspace_id: str, pattern: str) -> bool:
        result = await self._collection(_APPROVAL_POLICIES.name).delete_one(
            _APPROVAL_POLICIES.key_filter(workspace_id, pattern)
        )
        return result.deleted_count > 0

    async def list_approval_policies(self, workspace_id: str) -> list[ApprovalPolicy]:
        return await self._list(
            _APPROVAL_POLICIES, {"workspace_id": workspace_id}, [("created_at", ASCENDING), ("pattern", ASCENDING)]
        )

    # -- workspace key-value store ---------------------------------------------------

    async def kv_get(self, workspace_id: str, key: str) -> Any | None:
        document = await self._collection(_KV).find_one({"workspace_id": workspace_id, "key": key})
        return None if document is None else json.loads(document["value"])

    async def kv_set(self, workspace_id: str, key: str, value: Any, now: float) -> None:
        encoded = json.dumps(value)
        await self._collection(_KV).update_one(
            {"workspace_id": workspace_id, "key": key}, {"$set": {"value": encoded, "updated_at": now}}, upsert=True
        )

    async def kv_delete(self, workspace_id: str, key: str) -> bool:
        result = await self._collection(_KV).delete_one({"workspace_id": workspace_id, "key": key})
        return result.deleted_count > 0

    async def kv_list(self, workspace_id: str, *, prefix: str = "", limit: int = 1000) -> list[str]:
        check_limit(limit)
        if limit == 0:  # MongoDB reads limit(0) as "no limit"
            return []
        # A key range instead of a regex: exact for any prefix (a regex may not
        # contain NUL) and served by the (workspace_id, key) index.
        key_range: dict[str, str] = {"$gte": prefix}
        upper_bound = _prefix_upper_bound(prefix)
        if upper_bound is not None:
            key_range["$lt"] = upper_bound
        cursor = (
            self._collection(_KV)
            .find({"workspace_id": workspace_id, "key": key_range}, {"key": 1})
            .sort("key", ASCENDING)
            .limit(limit)
        )
        return [document["key"] for document in await cursor.to_list(None)]
