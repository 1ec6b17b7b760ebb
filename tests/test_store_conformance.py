"""Conformance tests that every :class:`store.base.Store` backend must pass.

The ``store`` fixture runs each test against SQLite (a real file under
``tmp_path``), against :class:`MongoStore` on ``mongomock_motor``'s
in-memory fake, and against a real MongoDB when
``EXECUTOR_TEST_MONGODB_URI`` is set. Each real-MongoDB test gets a
database of its own, dropped afterwards. Tests at the end of the file cover
what only one backend has (SQLite files, MongoDB indexes).

The tests are coroutines run by pytest-tornasync on the ``io_loop`` fixture;
the ``timeout`` mark is pytest-tornasync's per-test limit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import inspect
import math
import multiprocessing
import os
import sqlite3
import stat
import time
import uuid

import pytest
from mongomock_motor import AsyncMongoMockClient

from store.base import DuplicateError, StoreError
from store.mongo import MongoStore
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
    Task,
    Workspace,
)
from store.sqlite import SCHEMA_VERSION, SQLiteStore

MONGODB_URI_VARIABLE = "EXECUTOR_TEST_MONGODB_URI"
MONGODB_URI = os.environ.get(MONGODB_URI_VARIABLE)

# Far in the future (2096), so a real MongoDB's TTL monitor, which compares
# expire_at dates derived from these times with its own clock, never deletes
# a record in mid-test.
T0 = 4_000_000_000.0

SETUP_TIMEOUT_SECONDS = 30

pytestmark = pytest.mark.timeout(seconds=60)


# -- fixtures -------------------------------------------------------------------


class InterleavingClient:
    """Wrap a ``mongomock_motor`` client, database or collection so each awaited call yields first.

    mongomock runs every operation synchronously, so without the yield the
    coroutines of a concurrency test would run one after another and a
    non-atomic read-then-write would still pass.
    """

    def __init__(self, target):
        self._target = target

    def __getitem__(self, name):
        return InterleavingClient(self._target[name])

    def get_database(self, *args, **kwargs):
        return InterleavingClient(self._target.get_database(*args, **kwargs))

    def __getattr__(self, name):
        attribute = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        async def call_after_yield(*args, **kwargs):
            await asyncio.sleep(0)
            return await attribute(*args, **kwargs)

        return call_after_yield


def _open(io_loop, store):
    io_loop.run_sync(store.open, timeout=SETUP_TIMEOUT_SECONDS)
    return store


@pytest.fixture(
    params=[
        "sqlite",
        "mongo-fake",
        pytest.param(
            "mongo-real",
            marks=pytest.mark.skipif(
                not MONGODB_URI, reason=f"set {MONGODB_URI_VARIABLE} to a MongoDB URI to test a real server"
            ),
        ),
    ]
)
def store(request, io_loop, tmp_path):
    """Yield an open store of each backend, closed (and for real MongoDB dropped) afterwards."""
    if request.param == "sqlite":
        sqlite_store = _open(io_loop, SQLiteStore(str(tmp_path / "data" / "executor.db")))
        yield sqlite_store
        io_loop.run_sync(sqlite_store.close, timeout=SETUP_TIMEOUT_SECONDS)

    elif request.param == "mongo-fake":
        client = InterleavingClient(AsyncMongoMockClient())
        fake_store = _open(io_loop, MongoStore("mongodb://fake.invalid/executor", client=client))
        yield fake_store
        io_loop.run_sync(fake_store.close, timeout=SETUP_TIMEOUT_SECONDS)

    else:
        from pymongo import AsyncMongoClient

        database = f"executor_test_{uuid.uuid4().hex}"

        async def connect():
            return AsyncMongoClient(MONGODB_URI, serverSelectionTimeoutMS=5000)

        client = io_loop.run_sync(connect)
        real_store = _open(io_loop, MongoStore(MONGODB_URI, client=client, database=database))
        yield real_store

        async def drop_and_disconnect():
            await real_store.close()
            await client.drop_database(database)
            await client.close()

        io_loop.run_sync(drop_and_disconnect, timeout=SETUP_TIMEOUT_SECONDS)


@pytest.fixture
def database_path(tmp_path):
    return str(tmp_path / "data" / "executor.db")


# -- record factories -------------------------------------------------------------


def make_account(account_id="acct_1", created_at=T0, kind="anonymous", **fields):
    return Account(id=account_id, kind=kind, created_at=created_at, **fields)


def make_workspace(workspace_id="ws_1", created_at=T0, **fields):
    return Workspace(id=workspace_id, name=f"Workspace {workspace_id}", created_at=created_at, **fields)


def make_api_key(jti="jti_1", created_at=T0, **fields):
    values = {"account_id": "acct_1", "workspace_id": "ws_1", "expires_at": created_at + 3600.0}
    values.update(fields)
    return ApiKeyRecord(jti=jti, created_at=created_at, **values)


def make_session(session_id="sess_1", *, principal="key:acct_1:ws_1", state="initializing", last_seen_at=T0):
    return McpSessionRecord(
        id=session_id,
        principal=principal,
        workspace_id="ws_1",
        protocol_version="2025-11-25",
        state=state,
        created_at=T0,
        last_seen_at=last_seen_at,
        client_capabilities={"sampling": {}, "elicitation": {"form": {}}},
        client_info={"name": "inspector", "version": "0.17.0"},
    )


def make_billing(object_id="sub_1", *, event_created=T0, status="active", object_type="subscription", **fields):
    values = {"organization_id": "org_1", "data": {"plan": "team", "seats": 5}, "event_id": f"evt_{event_created}"}
    values.update(fields)
    return BillingRecord(
        object_type=object_type,
        object_id=object_id,
        status=status,
        event_created=event_created,
        updated_at=event_created + 1.0,
        **values,
    )


def make_task(
    task_id="task_1", *, workspace_id="ws_1", status="queued", created_at=T0, code="return 1 + 1", **fields
):
    return Task(
        id=task_id,
        workspace_id=workspace_id,
        account_id="acct_1",
        principal="key:acct_1:ws_1",
        code=code,
        status=status,
        created_at=created_at,
        timeout_ms=30000,
        **fields,
    )


def make_approval(approval_id="appr_1", *, workspace_id="ws_1", status="pending", created_at=T0):
    return Approval(
        id=approval_id,
        task_id="task_1",
        workspace_id=workspace_id,
        principal="key:acct_1:ws_1",
        tool_path="github.issues.create",
        redacted_input={"title": "Bug", "token": "[redacted]", "labels": ["a", "b"]},
        status=status,
        created_at=created_at,
    )


# -- lifecycle --------------------------------------------------------------------


async def test_open_twice_and_ping(store):
    await store.ping()
    await store.open()
    await store.ping()


async def test_close_twice_then_calls_fail(store):
    await store.close()
    await store.close()

    with pytest.raises(StoreError):
        await store.get_account("acct_1")
    with pytest.raises(StoreError):
        await store.ping()

    await store.open()
    assert await store.get_account("acct_1") is None


# -- accounts, organizations, memberships, workspaces -------------------------------


async def test_account_round_trip(store):
    account = make_account(
        email="ada@example.com", name="Ada", external_id="user_01", disabled=True, updated_at=T0 + 5
    )
    await store.put_account(account)

    assert await store.get_account("acct_1") == account
    assert await store.get_account("acct_missing") is None


async def test_account_put_replaces(store):
    await store.put_account(make_account(name="Before"))
    await store.put_account(make_account(name="After", kind="workos"))

    stored = await store.get_account("acct_1")
    assert stored.name == "After"
    assert stored.kind == "workos"
    assert stored.disabled is False
    assert len(await store.list_accounts()) == 1


async def test_list_accounts_by_created_at(store):
    await store.put_account(make_account("acct_c", created_at=T0 + 2))
    await store.put_account(make_account("acct_a", created_at=T0 + 1))
    await store.put_account(make_account("acct_b", created_at=T0 + 3))

    accounts = await store.list_accounts()

    assert [account.id for account in accounts] == ["acct_a", "acct_c", "acct_b"]


async def test_organization_round_trip(store):
    organization = Organization(id="org_1", name="Acme", created_at=T0, external_id="org_01H", deleted=True)
    await store.put_organization(organization)
    assert await store.get_organization("org_1") == organization
    assert await store.get_organization("org_missing") is None

    renamed = Organization(id="org_1", name="Acme Inc", created_at=T0, updated_at=T0 + 9)
    await store.put_organization(renamed)
    assert await store.get_organization("org_1") == renamed


async def test_membership_put_get_delete(store):
    membership = Membership(organization_id="org_1", account_id="acct_1", status="active", role="admin")
    other = Membership(organization_id="org_2", account_id="acct_1", status="pending")
    await store.put_membership(membership)
    await store.put_membership(other)

    assert await store.get_membership("org_1", "acct_1") == membership
    assert await store.get_membership("org_2", "acct_1") == other
    assert await store.get_membership("org_1", "acct_2") is None

    replaced = Membership(
        organization_id="org_1", account_id="acct_1", status="inactive", external_id="om_1", updated_at=T0
    )
    await store.put_membership(replaced)
    assert await store.get_membership("org_1", "acct_1") == replaced

    assert await store.delete_membership("org_1", "acct_1") is True
    assert await store.delete_membership("org_1", "acct_1") is False
    assert await store.get_membership("org_1", "acct_1") is None
    assert await store.get_membership("org_2", "acct_1") == other


async def test_workspace_round_trip(store):
    workspace = make_workspace(organization_id="org_1")
    await store.put_workspace(workspace)
    assert await store.get_workspace("ws_1") == workspace
    assert await store.get_workspace("ws_missing") is None

    moved = make_workspace(owner_account_id="acct_1")
    await store.put_workspace(moved)
    assert await store.get_workspace("ws_1") == moved


async def test_list_workspaces_filters_and_order(store):
    await store.put_workspace(make_workspace("ws_b", created_at=T0 + 2, organization_id="org_1"))
    await store.put_workspace(make_workspace("ws_a", created_at=T0 + 1, organization_id="org_1"))
    await store.put_workspace(make_workspace("ws_c", created_at=T0 + 3, organization_id="org_2"))
    await store.put_workspace(make_workspace("ws_d", created_at=T0, owner_account_id="acct_1"))
    await store.put_workspace(
        make_workspace("ws_e", created_at=T0 + 4, organization_id="org_1", owner_account_id="acct_1")
    )

    def ids(workspaces):
        return [workspace.id for workspace in workspaces]

    assert ids(await store.list_workspaces()) == ["ws_d", "ws_a", "ws_b", "ws_c", "ws_e"]
    assert ids(await store.list_workspaces(organization_id="org_1")) == ["ws_a", "ws_b", "ws_e"]
    assert ids(await store.list_workspaces(owner_account_id="acct_1")) == ["ws_d", "ws_e"]
    assert ids(await store.list_workspaces(organization_id="org_1", owner_account_id="acct_1")) == ["ws_e"]
    assert ids(await store.list_workspaces(organization_id="org_missing")) == []


# -- anonymous sessions ------------------------------------------------------------


async def test_anonymous_session_round_trip(store):
    session = AnonymousSession(id="anon_1", account_id="acct_1", workspace_id="ws_1", created_at=T0, updated_at=T0)
    await store.put_anonymous_session(session)
    assert await store.get_anonymous_session("anon_1") == session
    assert await store.get_anonymous_session("anon_missing") is None

    refreshed = AnonymousSession(
        id="anon_1", account_id="acct_1", workspace_id="ws_2", created_at=T0, updated_at=T0 + 60
    )
    await store.put_anonymous_session(refreshed)
    assert await store.get_anonymous_session("anon_1") == refreshed


# -- API keys ------------------------------------------------------------------------


async def test_api_key_round_trip(store):
    key = make_api_key(label="ci")
    await store.insert_api_key(key)

    assert await store.get_api_key("jti_1") == key
    assert await store.get_api_key("jti_missing") is None


async def test_api_key_reused_jti_raises(store):
    await store.insert_api_key(make_api_key(label="first"))

    with pytest.raises(DuplicateError):
        await store.insert_api_key(make_api_key(label="second"))

    assert (await store.get_api_key("jti_1")).label == "first"


async def test_list_api_keys_filters_and_order(store):
    await store.insert_api_key(make_api_key("jti_b", created_at=T0 + 2))
    await store.insert_api_key(make_api_key("jti_a", created_at=T0 + 1))
    await store.insert_api_key(make_api_key("jti_c", created_at=T0 + 3, workspace_id="ws_2"))
    await store.insert_api_key(make_api_key("jti_d", created_at=T0, account_id="acct_2"))

    def jtis(keys):
        return [key.jti for key in keys]

    assert jtis(await store.list_api_keys()) == ["jti_d", "jti_a", "jti_b", "jti_c"]
    assert jtis(await store.list_api_keys(workspace_id="ws_1")) == ["jti_d", "jti_a", "jti_b"]
    assert jtis(await store.list_api_keys(account_id="acct_1")) == ["jti_a", "jti_b", "jti_c"]
    assert jtis(await store.list_api_keys(workspace_id="ws_1", account_id="acct_2")) == ["jti_d"]


async def test_revoke_api_key_once(store):
    await store.insert_api_key(make_api_key())

    assert await store.revoke_api_key("jti_1", T0 + 10) is True
    assert await store.revoke_api_key("jti_1", T0 + 20) is False
    assert await store.revoke_api_key("jti_missing", T0 + 20) is False

    assert (await store.get_api_key("jti_1")).revoked_at == T0 + 10


# -- rate limits: token bucket -------------------------------------------------------


async def test_token_bucket_starts_full(store):
    first = await store.take_token("bucket", capacity=5, refill_per_second=1.0, now=T0)

    assert first.allowed is True
    assert first.remaining == 4
    assert first.retry_after == 0.0


async def test_token_bucket_empties_then_rejects(store):
    for expected_remaining in (2, 1, 0):
        decision = await store.take_token("bucket", capacity=3, refill_per_second=0.5, now=T0)
        assert decision.allowed is True
        assert decision.remaining == expected_remaining

    rejected = await store.take_token("bucket", capacity=3, refill_per_second=0.5, now=T0)

    assert rejected.allowed is False
    assert rejected.remaining == 0
    # One token at half a token per second.
    assert rejected.retry_after == pytest.approx(2.0)


async def test_token_bucket_retry_after_is_exact(store):
    # 24 per minute, as the bootstrap bucket: 0.4 tokens per second.
    rate = 24 / 60
    for _ in range(24):
        assert (await store.take_token("bootstrap", capacity=24, refill_per_second=rate, now=T0)).allowed

    rejected = await store.take_token("bootstrap", capacity=24, refill_per_second=rate, now=T0 + 1.0)
    assert rejected.allowed is False
    assert rejected.remaining == pytest.approx(0.4)
    assert rejected.retry_after == pytest.approx(1.5)

    too_early = await store.take_token(
        "bootstrap", capacity=24, refill_per_second=rate, now=T0 + 1.0 + rejected.retry_after - 0.01
    )
    assert too_early.allowed is False
    # At times near T0 one float step is about 5e-7 s.
    assert too_early.retry_after == pytest.approx(0.01, abs=1e-6)

    on_time = await store.take_token(
        "bootstrap", capacity=24, refill_per_second=rate, now=T0 + 1.0 + rejected.retry_after
    )
    assert on_time.allowed is True
    assert on_time.remaining == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("per_minute", "delay"), [(7, 0.1), (7, 0.2), (24, 1.0), (120, 0.3), (1000, 0.01)])
async def test_token_bucket_admits_at_retry_after(store, per_minute, delay):
    # For some of these cases (1000 per minute after 0.01 s) ``now +
    # retry_after`` rounds to a time just before the token is complete, so a
    # store that compared without TOKEN_TIME_TOLERANCE would reject.
    rate = per_minute / 60
    for _ in range(per_minute):
        await store.take_token("bucket", capacity=per_minute, refill_per_second=rate, now=T0)

    rejected = await store.take_token("bucket", capacity=per_minute, refill_per_second=rate, now=T0 + delay)
    retried = await store.take_token(
        "bucket", capacity=per_minute, refill_per_second=rate, now=T0 + delay + rejected.retry_after
    )

    assert rejected.allowed is False
    assert retried.allowed is True


async def test_token_bucket_refills_with_time(store):
    for _ in range(10):
        await store.take_token("bucket", capacity=10, refill_per_second=2.0, now=T0)

    after_two_seconds = await store.take_token("bucket", capacity=10, refill_per_second=2.0, now=T0 + 2.0)

    assert after_two_seconds.allowed is True
    assert after_two_seconds.remaining == pytest.approx(3.0)


async def test_token_bucket_caps_at_capacity(store):
    await store.take_token("bucket", capacity=10, refill_per_second=2.0, now=T0)

    much_later = await store.take_token("bucket", capacity=10, refill_per_second=2.0, now=T0 + 3600)

    assert much_later.remaining == pytest.approx(9.0)


async def test_token_bucket_cost_above_remaining(store):
    await store.take_token("bucket", capacity=10, refill_per_second=1.0, now=T0, cost=8)

    rejected = await store.take_token("bucket", capacity=10, refill_per_second=1.0, now=T0, cost=3)

    assert rejected.allowed is False
    assert rejected.remaining == pytest.approx(2.0)
    assert rejected.retry_after == pytest.approx(1.0)


async def test_token_bucket_clock_behind_adds_nothing(store):
    await store.take_token("bucket", capacity=2, refill_per_second=1.0, now=T0)
    await store.take_token("bucket", capacity=2, refill_per_second=1.0, now=T0)

    earlier = await store.take_token("bucket", capacity=2, refill_per_second=1.0, now=T0 - 30)

    assert earlier.allowed is False
    assert earlier.remaining == 0


async def test_token_buckets_are_independent(store):
    await store.take_token("bucket_a", capacity=1, refill_per_second=1.0, now=T0)

    assert (await store.take_token("bucket_a", capacity=1, refill_per_second=1.0, now=T0)).allowed is False
    assert (await store.take_token("bucket_b", capacity=1, refill_per_second=1.0, now=T0)).allowed is True


@pytest.mark.parametrize(
    ("capacity", "refill_per_second", "cost"),
    [(0, 1.0, 1.0), (10, 0.0, 1.0), (10, 1.0, 0.0), (10, 1.0, 11.0)],
)
async def test_token_bucket_invalid_arguments(store, capacity, refill_per_second, cost):
    with pytest.raises(ValueError):
        await store.take_token("bucket", capacity=capacity, refill_per_second=refill_per_second, now=T0, cost=cost)


async def test_token_bucket_concurrent_takes(store):
    decisions = await asyncio.gather(
        *(store.take_token("burst", capacity=120, refill_per_second=2.0, now=T0) for _ in range(200))
    )

    admitted = [decision for decision in decisions if decision.allowed]
    assert len(admitted) == 120
    assert sorted(decision.remaining for decision in admitted) == list(range(120))
    assert all(decision.retry_after == pytest.approx(0.5) for decision in decisions if not decision.allowed)


# -- rate limits: fixed window -------------------------------------------------------


async def test_fixed_window_limit_and_retry_after(store):
    window_start = math.floor(T0 / 60) * 60
    now = window_start + 15

    for expected_remaining in (2, 1, 0):
        decision = await store.hit_window("global", limit=3, window_seconds=60, now=now)
        assert decision.allowed is True
        assert decision.remaining == expected_remaining
        assert decision.retry_after == 0.0

    rejected = await store.hit_window("global", limit=3, window_seconds=60, now=now + 5)
    assert rejected.allowed is False
    assert rejected.remaining == 0
    assert rejected.retry_after == pytest.approx(40.0)

    still_full = await store.hit_window("global", limit=3, window_seconds=60, now=window_start + 59.5)
    assert still_full.allowed is False
    assert still_full.retry_after == pytest.approx(0.5)

    next_window = await store.hit_window("global", limit=3, window_seconds=60, now=window_start + 60)
    assert next_window.allowed is True
    assert next_window.remaining == 2


async def test_fixed_window_rejections_not_counted(store):
    window_start = math.floor(T0 / 60) * 60
    for _ in range(10):
        await store.hit_window("global", limit=2, window_seconds=60, now=window_start)

    later_window = await store.hit_window("global", limit=2, window_seconds=60, now=window_start + 61)

    assert later_window.allowed is True
    assert later_window.remaining == 1


async def test_fixed_windows_are_independent(store):
    await store.hit_window("key_a", limit=1, window_seconds=60, now=T0)

    assert (await store.hit_window("key_a", limit=1, window_seconds=60, now=T0)).allowed is False
    assert (await store.hit_window("key_b", limit=1, window_seconds=60, now=T0)).allowed is True


async def test_fixed_window_concurrent_hits(store):
    decisions = await asyncio.gather(
        *(store.hit_window("global", limit=50, window_seconds=60, now=T0) for _ in range(80))
    )

    assert sum(decision.allowed for decision in decisions) == 50


# -- MCP sessions --------------------------------------------------------------------


async def test_mcp_session_round_trip(store):
    session = make_session()
    await store.insert_mcp_session(session)

    assert await store.get_mcp_session("sess_1") == session
    assert await store.get_mcp_session("sess_missing") is None


async def test_mcp_session_reused_id_raises(store):
    await store.insert_mcp_session(make_session())

    with pytest.raises(DuplicateError):
        await store.insert_mcp_session(make_session(principal="someone else"))

    assert (await store.get_mcp_session("sess_1")).principal == "key:acct_1:ws_1"


async def test_activate_only_from_initializing(store):
    await store.insert_mcp_session(make_session())

    assert await store.activate_mcp_session("sess_1", T0 + 1) is True
    assert await store.activate_mcp_session("sess_1", T0 + 2) is False
    assert await store.activate_mcp_session("sess_missing", T0 + 2) is False

    stored = await store.get_mcp_session("sess_1")
    assert stored.state == "active"
    assert stored.last_seen_at == T0 + 1


async def test_activate_closed_session_fails(store):
    await store.insert_mcp_session(make_session())
    await store.close_mcp_session("sess_1", T0 + 1, "deleted")

    assert await store.activate_mcp_session("sess_1", T0 + 2) is False
    assert (await store.get_mcp_session("sess_1")).state == "closed"


async def test_touch_open_and_closed_session(store):
    await store.insert_mcp_session(make_session())

    assert await store.touch_mcp_session("sess_1", T0 + 5) is True
    assert (await store.get_mcp_session("sess_1")).last_seen_at == T0 + 5
    assert await store.touch_mcp_session("sess_1", T0 + 5) is True

    await store.close_mcp_session("sess_1", T0 + 6, "deleted")
    assert await store.touch_mcp_session("sess_1", T0 + 7) is False
    assert (await store.get_mcp_session("sess_1")).last_seen_at == T0 + 5
    assert await store.touch_mcp_session("sess_missing", T0 + 7) is False


async def test_close_mcp_session_once(store):
    await store.insert_mcp_session(make_session())
    await store.activate_mcp_session("sess_1", T0 + 1)

    assert await store.close_mcp_session("sess_1", T0 + 2, "client DELETE") is True
    assert await store.close_mcp_session("sess_1", T0 + 3, "again") is False
    assert await store.close_mcp_session("sess_missing", T0 + 3, "unknown") is False

    closed = await store.get_mcp_session("sess_1")
    assert closed.state == "closed"
    assert closed.closed_at == T0 + 2
    assert closed.close_reason == "client DELETE"


async def test_concurrent_close_has_one_winner(store):
    await store.insert_mcp_session(make_session())

    results = await asyncio.gather(*(store.close_mcp_session("sess_1", T0 + 1, f"closer {n}") for n in range(10)))

    assert results.count(True) == 1


async def test_close_deletes_event_log(store):
    await store.insert_mcp_session(make_session())
    await store.insert_mcp_session(make_session("sess_2"))
    first = await store.append_event("sess_1", "stream_a", "one", T0)
    await store.append_event("sess_1", "stream_a", "two", T0)
    kept = await store.append_event("sess_2", "stream_b", "other", T0)

    await store.close_mcp_session("sess_1", T0 + 1, "deleted")

    assert await store.events_after("sess_1", 0) == []
    assert await store.get_event("sess_1", first) is None
    assert [event.seq for event in await store.events_after("sess_2", 0)] == [kept]


async def test_event_after_close_not_kept(store):
    await store.insert_mcp_session(make_session())
    before = await store.append_event("sess_1", "stream_a", "before", T0)
    await store.close_mcp_session("sess_1", T0 + 1, "deleted")

    after = await store.append_event("sess_1", "stream_a", "late", T0 + 2)

    assert after > before
    assert await store.events_after("sess_1", 0) == []


async def test_count_open_mcp_sessions(store):
    await store.insert_mcp_session(make_session("sess_1", principal="alice"))
    await store.insert_mcp_session(make_session("sess_2", principal="alice"))
    await store.insert_mcp_session(make_session("sess_3", principal="bob"))
    await store.activate_mcp_session("sess_2", T0)
    await store.close_mcp_session("sess_1", T0, "deleted")

    assert await store.count_open_mcp_sessions() == 2
    assert await store.count_open_mcp_sessions(principal="alice") == 1
    assert await store.count_open_mcp_sessions(principal="bob") == 1
    assert await store.count_open_mcp_sessions(principal="carol") == 0


async def test_close_idle_mcp_sessions(store):
    await store.insert_mcp_session(make_session("sess_old", last_seen_at=T0 - 600))
    await store.insert_mcp_session(make_session("sess_older", last_seen_at=T0 - 900))
    await store.insert_mcp_session(make_session("sess_fresh", last_seen_at=T0 - 10))
    await store.insert_mcp_session(make_session("sess_edge", last_seen_at=T0 - 300))
    await store.insert_mcp_session(make_session("sess_closed", last_seen_at=T0 - 900))
    await store.activate_mcp_session("sess_old", T0 - 600)
    await store.close_mcp_session("sess_closed", T0 - 800, "deleted")
    await store.append_event("sess_old", "stream_a", "stale", T0 - 600)

    closed = await store.close_idle_mcp_sessions(idle_before=T0 - 300, now=T0)

    assert sorted(closed) == ["sess_old", "sess_older"]
    for session_id in ("sess_old", "sess_older"):
        session = await store.get_mcp_session(session_id)
        assert session.state == "closed"
        assert session.closed_at == T0
        assert session.close_reason
    assert (await store.get_mcp_session("sess_fresh")).state == "initializing"
    assert (await store.get_mcp_session("sess_edge")).state == "initializing"
    assert (await store.get_mcp_session("sess_closed")).closed_at == T0 - 800
    assert await store.events_after("sess_old", 0) == []
    assert await store.close_idle_mcp_sessions(idle_before=T0 - 300, now=T0 + 1) == []


# -- SSE event log ---------------------------------------------------------------------


async def test_append_event_seq_increases(store):
    await store.insert_mcp_session(make_session("sess_1"))
    await store.insert_mcp_session(make_session("sess_2"))

    seqs = {"sess_1": [], "sess_2": []}
    for n in range(5):
        for session_id in seqs:
            seqs[session_id].append(await store.append_event(session_id, "stream", f"{session_id} {n}", T0 + n))

    for session_seqs in seqs.values():
        assert all(earlier < later for earlier, later in zip(session_seqs, session_seqs[1:]))


async def test_concurrent_appends_get_distinct_seqs(store):
    await store.insert_mcp_session(make_session())

    seqs = await asyncio.gather(*(store.append_event("sess_1", "stream", f"event {n}", T0) for n in range(50)))

    assert len(set(seqs)) == 50
    events = await store.events_after("sess_1", 0)
    assert [event.seq for event in events] == sorted(seqs)


async def test_events_after_and_get_event(store):
    await store.insert_mcp_session(make_session())
    priming = await store.append_event("sess_1", "_GET_stream", None, T0)
    first = await store.append_event("sess_1", "request_7", '{"jsonrpc":"2.0","id":7,"result":{}}', T0 + 1)
    second = await store.append_event("sess_1", "request_7", "é ✓", T0 + 2)

    events = await store.events_after("sess_1", 0)
    assert [(event.seq, event.stream_id, event.data) for event in events] == [
        (priming, "_GET_stream", None),
        (first, "request_7", '{"jsonrpc":"2.0","id":7,"result":{}}'),
        (second, "request_7", "é ✓"),
    ]
    assert all(event.session_id == "sess_1" for event in events)
    assert [event.created_at for event in events] == [T0, T0 + 1, T0 + 2]

    assert [event.seq for event in await store.events_after("sess_1", priming)] == [first, second]
    assert [event.seq for event in await store.events_after("sess_1", 0, limit=2)] == [priming, first]
    assert await store.events_after("sess_1", second) == []
    assert await store.events_after("sess_1", 0, limit=0) == []
    assert await store.events_after("sess_other", 0) == []

    event = await store.get_event("sess_1", first)
    assert event.seq == first
    assert event.data == '{"jsonrpc":"2.0","id":7,"result":{}}'
    assert await store.get_event("sess_1", second + 1000) is None
    assert await store.get_event("sess_other", first) is None


async def test_trim_events_by_count(store):
    await store.insert_mcp_session(make_session())
    seqs = [await store.append_event("sess_1", "stream", f"event {n}", T0 + n) for n in range(5)]

    dropped = await store.trim_events("sess_1", max_count=2, max_bytes=10_000, min_created_at=0.0)

    assert dropped == 3
    assert [event.seq for event in await store.events_after("sess_1", 0)] == seqs[3:]


async def test_trim_events_by_bytes(store):
    await store.insert_mcp_session(make_session())
    # Four bytes each in UTF-8, whatever the character count.
    seqs = [await store.append_event("sess_1", "stream", data, T0) for data in ("aaaa", "éé", "✓a", "bbbb")]

    dropped = await store.trim_events("sess_1", max_count=100, max_bytes=9, min_created_at=0.0)

    assert dropped == 2
    assert [event.seq for event in await store.events_after("sess_1", 0)] == seqs[2:]


async def test_trim_events_by_age(store):
    await store.insert_mcp_session(make_session())
    seqs = [await store.append_event("sess_1", "stream", "x", T0 + n * 10) for n in range(4)]

    dropped = await store.trim_events("sess_1", max_count=100, max_bytes=10_000, min_created_at=T0 + 15)

    assert dropped == 2
    assert [event.seq for event in await store.events_after("sess_1", 0)] == seqs[2:]


async def test_trim_events_within_limits_drops_none(store):
    await store.insert_mcp_session(make_session())
    await store.append_event("sess_1", "stream", "x", T0)

    assert await store.trim_events("sess_1", max_count=1, max_bytes=1, min_created_at=T0) == 0
    assert await store.trim_events("sess_empty", max_count=1, max_bytes=1, min_created_at=T0) == 0
    assert len(await store.events_after("sess_1", 0)) == 1


async def test_trim_events_leaves_other_sessions(store):
    await store.insert_mcp_session(make_session("sess_1"))
    await store.insert_mcp_session(make_session("sess_2"))
    await store.append_event("sess_1", "stream", "x", T0)
    await store.append_event("sess_2", "stream", "y", T0)

    assert await store.trim_events("sess_1", max_count=0, max_bytes=0, min_created_at=T0) == 1

    assert await store.events_after("sess_1", 0) == []
    assert len(await store.events_after("sess_2", 0)) == 1


async def test_seq_grows_after_trimming_all(store):
    await store.insert_mcp_session(make_session())
    last = await store.append_event("sess_1", "stream", "x", T0)
    await store.trim_events("sess_1", max_count=0, max_bytes=0, min_created_at=T0)

    following = await store.append_event("sess_1", "stream", "y", T0 + 1)

    assert following > last


# -- webhooks and billing ------------------------------------------------------------------


async def test_take_tokens_stops_at_first_rejection(store):
    buckets = [
        BucketSpec("multi|agent", capacity=2, refill_per_second=1.0),
        BucketSpec("multi|ceiling", capacity=3, refill_per_second=1.0),
    ]
    first = await store.take_tokens(buckets, now=T0)
    assert [d.allowed for d in first] == [True, True]
    assert [d.remaining for d in first] == [1.0, 2.0]
    second = await store.take_tokens(buckets, now=T0)
    assert [d.allowed for d in second] == [True, True]
    third = await store.take_tokens(buckets, now=T0)
    assert [d.allowed for d in third] == [False], "the rejecting bucket ends the call"
    assert third[0].retry_after == pytest.approx(1.0)
    ceiling = await store.take_token("multi|ceiling", capacity=3, refill_per_second=1.0, now=T0)
    assert ceiling.allowed is True, "the ceiling kept its last token when the first bucket rejected"
    assert ceiling.remaining == 0.0


async def test_take_tokens_ceiling_rejects(store):
    buckets = [
        BucketSpec("ceil|agent-a", capacity=5, refill_per_second=1.0),
        BucketSpec("ceil|shared", capacity=1, refill_per_second=0.5),
    ]
    assert [d.allowed for d in await store.take_tokens(buckets, now=T0)] == [True, True]
    other = [BucketSpec("ceil|agent-b", capacity=5, refill_per_second=1.0), buckets[1]]
    decisions = await store.take_tokens(other, now=T0)
    assert [d.allowed for d in decisions] == [True, False]
    assert decisions[1].retry_after == pytest.approx(2.0)


async def test_webhook_receipt_once(store):
    assert await store.record_webhook_receipt("stripe", "evt_1", T0) is True
    assert await store.record_webhook_receipt("stripe", "evt_1", T0 + 1) is False
    assert await store.record_webhook_receipt("workos", "evt_1", T0) is True


async def test_has_webhook_receipt(store):
    assert await store.has_webhook_receipt("stripe", "evt_1") is False
    await store.record_webhook_receipt("stripe", "evt_1", T0)
    assert await store.has_webhook_receipt("stripe", "evt_1") is True
    assert await store.has_webhook_receipt("workos", "evt_1") is False


async def test_forget_webhook_receipt(store):
    await store.record_webhook_receipt("stripe", "evt_1", T0)

    await store.forget_webhook_receipt("stripe", "evt_1")
    await store.forget_webhook_receipt("stripe", "evt_missing")

    assert await store.record_webhook_receipt("stripe", "evt_1", T0 + 1) is True


async def test_concurrent_webhook_receipts(store):
    results = await asyncio.gather(*(store.record_webhook_receipt("stripe", "evt_1", T0) for _ in range(10)))

    assert results.count(True) == 1


async def test_billing_record_round_trip(store):
    record = make_billing(data={"plan": "team", "items": [{"price": "price_1", "quantity": 5}], "$meta": None})

    assert await store.apply_billing_record(record) is True

    assert await store.get_billing_record("subscription", "sub_1") == record
    assert await store.get_billing_record("subscription", "sub_missing") is None
    assert await store.get_billing_record("invoice", "sub_1") is None


async def test_billing_older_event_ignored(store):
    newer = make_billing(event_created=T0 + 10, status="past_due")
    await store.apply_billing_record(newer)

    assert await store.apply_billing_record(make_billing(event_created=T0, status="active")) is False

    assert await store.get_billing_record("subscription", "sub_1") == newer


async def test_billing_newer_event_applied(store):
    await store.apply_billing_record(make_billing(event_created=T0, status="active"))
    newer = make_billing(event_created=T0 + 10, status="canceled", organization_id="org_2")

    assert await store.apply_billing_record(newer) is True

    assert await store.get_billing_record("subscription", "sub_1") == newer


async def test_billing_same_event_time_applied(store):
    await store.apply_billing_record(make_billing(event_created=T0, status="active"))
    replay = make_billing(event_created=T0, status="trialing", event_id="evt_other")

    assert await store.apply_billing_record(replay) is True

    assert (await store.get_billing_record("subscription", "sub_1")).status == "trialing"


async def test_list_billing_records_order(store):
    await store.apply_billing_record(make_billing("sub_b"))
    await store.apply_billing_record(make_billing("sub_a"))
    await store.apply_billing_record(make_billing("cus_1", object_type="customer"))
    await store.apply_billing_record(make_billing("in_1", object_type="invoice"))
    await store.apply_billing_record(make_billing("sub_other", organization_id="org_2"))

    records = await store.list_billing_records("org_1")

    assert [(record.object_type, record.object_id) for record in records] == [
        ("customer", "cus_1"),
        ("invoice", "in_1"),
        ("subscription", "sub_a"),
        ("subscription", "sub_b"),
    ]
    assert await store.list_billing_records("org_missing") == []


# -- tasks ---------------------------------------------------------------------------------


async def test_task_round_trip(store):
    task = make_task(
        status="completed",
        started_at=T0 + 1,
        finished_at=T0 + 2,
        result={"rows": [1, 2.5, "three", None, True], "nested": {"$key": "dollar"}, "big": 2**70},
        error=None,
        output="line 1\nline 2\n",
        snapshot=b"\x00\x01\xffsnapshot",
    )
    await store.insert_task(task)

    assert await store.get_task("task_1") == task
    assert await store.get_task("task_missing") is None


@pytest.mark.parametrize("result", [None, 0, 3.5, "text", [1, "two"], {"a": {"b": [None]}}, False])
async def test_task_result_json_values(store, result):
    await store.insert_task(make_task(result=result))

    assert (await store.get_task("task_1")).result == result


async def test_task_reused_id_raises(store):
    await store.insert_task(make_task(code="first"))

    with pytest.raises(DuplicateError):
        await store.insert_task(make_task(code="second"))

    assert (await store.get_task("task_1")).code == "first"


async def test_update_task_fields(store):
    await store.insert_task(make_task())

    updated = await store.update_task(
        "task_1", status="waiting_approval", started_at=T0 + 1, snapshot=b"paused", result=[1, 2]
    )

    assert updated is True
    task = await store.get_task("task_1")
    assert task.status == "waiting_approval"
    assert task.started_at == T0 + 1
    assert task.snapshot == b"paused"
    assert task.result == [1, 2]
    assert task.code == "return 1 + 1"
    assert await store.update_task("task_missing", status="running") is False


async def test_update_task_expected_status(store):
    await store.insert_task(make_task(status="queued"))

    assert await store.update_task("task_1", expected_status="queued", status="running") is True
    assert await store.update_task("task_1", expected_status="queued", status="running") is False
    assert await store.update_task("task_1", expected_status="running", status="completed", snapshot=None) is True

    task = await store.get_task("task_1")
    assert task.status == "completed"
    assert task.snapshot is None


async def test_update_task_without_fields(store):
    await store.insert_task(make_task(status="queued"))

    assert await store.update_task("task_1") is True
    assert await store.update_task("task_1", expected_status="queued") is True
    assert await store.update_task("task_1", expected_status="running") is False
    assert await store.update_task("task_missing") is False


async def test_concurrent_task_claims_have_one_winner(store):
    await store.insert_task(make_task(status="queued"))

    results = await asyncio.gather(
        *(store.update_task("task_1", expected_status="queued", status="running", error=f"w{n}") for n in range(10))
    )

    assert results.count(True) == 1


async def test_update_task_unknown_field_raises(store):
    await store.insert_task(make_task())

    with pytest.raises(ValueError):
        await store.update_task("task_1", colour="blue")
    with pytest.raises(ValueError):
        await store.update_task("task_1", id="task_2")

    assert await store.get_task("task_1") == make_task()


async def test_list_tasks_newest_first(store):
    await store.insert_task(make_task("task_a", created_at=T0 + 1, status="completed"))
    await store.insert_task(make_task("task_b", created_at=T0 + 3, status="running"))
    await store.insert_task(make_task("task_c", created_at=T0 + 2, status="completed"))
    await store.insert_task(make_task("task_other", workspace_id="ws_2", created_at=T0 + 4))

    def ids(tasks):
        return [task.id for task in tasks]

    assert ids(await store.list_tasks("ws_1")) == ["task_b", "task_c", "task_a"]
    assert ids(await store.list_tasks("ws_1", status="completed")) == ["task_c", "task_a"]
    assert ids(await store.list_tasks("ws_1", limit=2)) == ["task_b", "task_c"]
    assert ids(await store.list_tasks("ws_1", limit=0)) == []
    assert ids(await store.list_tasks("ws_2")) == ["task_other"]
    assert ids(await store.list_tasks("ws_missing")) == []


# -- approvals and policies ----------------------------------------------------------------


async def test_approval_round_trip(store):
    approval = make_approval()
    await store.insert_approval(approval)

    assert await store.get_approval("appr_1") == approval
    assert await store.get_approval("appr_missing") is None

    with pytest.raises(DuplicateError):
        await store.insert_approval(make_approval(workspace_id="ws_2"))


async def test_list_approvals_filters_and_order(store):
    await store.insert_approval(make_approval("appr_b", created_at=T0 + 2))
    await store.insert_approval(make_approval("appr_a", created_at=T0 + 1))
    await store.insert_approval(make_approval("appr_c", created_at=T0 + 3, workspace_id="ws_2"))
    await store.insert_approval(make_approval("appr_d", created_at=T0, status="approved"))

    def ids(approvals):
        return [approval.id for approval in approvals]

    assert ids(await store.list_approvals()) == ["appr_d", "appr_a", "appr_b", "appr_c"]
    assert ids(await store.list_approvals(status="pending")) == ["appr_a", "appr_b", "appr_c"]
    assert ids(await store.list_approvals(workspace_id="ws_1")) == ["appr_d", "appr_a", "appr_b"]
    assert ids(await store.list_approvals(status="pending", workspace_id="ws_2")) == ["appr_c"]


async def test_decide_approval_once(store):
    await store.insert_approval(make_approval())

    first = await store.decide_approval(
        "appr_1", status="approved", decided_at=T0 + 5, decided_by="acct_admin", reason="looks fine"
    )
    second = await store.decide_approval(
        "appr_1", status="denied", decided_at=T0 + 6, decided_by="acct_other", reason=None
    )

    assert first is True
    assert second is False
    decided = await store.get_approval("appr_1")
    assert decided.status == "approved"
    assert decided.decided_at == T0 + 5
    assert decided.decided_by == "acct_admin"
    assert decided.reason == "looks fine"
    assert (
        await store.decide_approval("appr_missing", status="denied", decided_at=T0, decided_by="x", reason=None)
        is False
    )


async def test_concurrent_decisions_have_one_winner(store):
    await store.insert_approval(make_approval())

    results = await asyncio.gather(
        *(
            store.decide_approval(
                "appr_1",
                status="approved" if n % 2 else "denied",
                decided_at=T0 + n,
                decided_by=f"acct_{n}",
                reason=None,
            )
            for n in range(10)
        )
    )

    assert results.count(True) == 1


async def test_decide_approval_invalid_status(store):
    await store.insert_approval(make_approval())

    with pytest.raises(ValueError):
        await store.decide_approval("appr_1", status="pending", decided_at=T0, decided_by="x", reason=None)

    assert (await store.get_approval("appr_1")).status == "pending"


async def test_approval_policies(store):
    await store.put_approval_policy(ApprovalPolicy("ws_1", "github.*", "required", created_at=T0 + 2))
    await store.put_approval_policy(ApprovalPolicy("ws_1", "*", "auto", created_at=T0 + 1))
    await store.put_approval_policy(ApprovalPolicy("ws_2", "*", "deny", created_at=T0))

    policies = await store.list_approval_policies("ws_1")
    assert [(policy.pattern, policy.mode) for policy in policies] == [("*", "auto"), ("github.*", "required")]

    await store.put_approval_policy(ApprovalPolicy("ws_1", "github.*", "deny", created_at=T0 + 2))
    replaced = await store.list_approval_policies("ws_1")
    assert [(policy.pattern, policy.mode) for policy in replaced] == [("*", "auto"), ("github.*", "deny")]

    assert await store.delete_approval_policy("ws_1", "*") is True
    assert await store.delete_approval_policy("ws_1", "*") is False
    assert [policy.pattern for policy in await store.list_approval_policies("ws_1")] == ["github.*"]
    assert await store.list_approval_policies("ws_2") == [ApprovalPolicy("ws_2", "*", "deny", created_at=T0)]


# -- workspace key-value store --------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [{"a": [1, 2, {"b": None}]}, [], "text", 42, 2.5, True, {"$set": 1, "dotted.key": 2}]
)
async def test_kv_round_trip(store, value):
    await store.kv_set("ws_1", "key", value, T0)

    assert await store.kv_get("ws_1", "key") == value


async def test_kv_missing_overwrite_delete(store):
    assert await store.kv_get("ws_1", "key") is None

    await store.kv_set("ws_1", "key", {"version": 1}, T0)
    await store.kv_set("ws_1", "key", {"version": 2}, T0 + 1)
    assert await store.kv_get("ws_1", "key") == {"version": 2}

    assert await store.kv_delete("ws_1", "key") is True
    assert await store.kv_delete("ws_1", "key") is False
    assert await store.kv_get("ws_1", "key") is None


async def test_kv_workspace_isolation(store):
    await store.kv_set("ws_1", "shared", "one", T0)
    await store.kv_set("ws_2", "shared", "two", T0)

    assert await store.kv_get("ws_1", "shared") == "one"
    assert await store.kv_get("ws_2", "shared") == "two"
    assert await store.kv_list("ws_1") == ["shared"]

    await store.kv_delete("ws_1", "shared")
    assert await store.kv_get("ws_2", "shared") == "two"


async def test_kv_list_prefix_and_order(store):
    keys = ["user:2", "user:10", "user:1", "users", "team:1", "User:3", "user%", "user_x", "a.b", "aXb"]
    for key in keys:
        await store.kv_set("ws_1", key, True, T0)
    await store.kv_set("ws_2", "user:9", True, T0)

    assert await store.kv_list("ws_1") == sorted(keys)
    assert await store.kv_list("ws_1", prefix="user:") == ["user:1", "user:10", "user:2"]
    assert await store.kv_list("ws_1", prefix="user") == ["user%", "user:1", "user:10", "user:2", "user_x", "users"]
    assert await store.kv_list("ws_1", prefix="user%") == ["user%"]
    assert await store.kv_list("ws_1", prefix="user_") == ["user_x"]
    assert await store.kv_list("ws_1", prefix="a.") == ["a.b"]
    assert await store.kv_list("ws_1", prefix="user:", limit=2) == ["user:1", "user:10"]
    assert await store.kv_list("ws_1", prefix="nothing") == []
    assert await store.kv_list("ws_1", limit=0) == []
    assert await store.kv_list("ws_2", prefix="user") == ["user:9"]


async def test_kv_list_non_ascii_prefix(store):
    keys = ["é1", "é2", "ê1", "\U0010ffff", "\U0010ffffz", "e1"]
    for key in keys:
        await store.kv_set("ws_1", key, 1, T0)

    assert await store.kv_list("ws_1", prefix="é") == ["é1", "é2"]
    assert await store.kv_list("ws_1", prefix="\U0010ffff") == ["\U0010ffff", "\U0010ffffz"]


# -- SQLite only -----------------------------------------------------------------------------


async def test_sqlite_records_survive_reopen(io_loop, database_path):
    first = SQLiteStore(database_path)
    await first.open()
    await first.put_account(make_account())
    await first.insert_task(make_task(snapshot=b"\x00state", result={"ok": True}))
    await first.insert_mcp_session(make_session())
    seq = await first.append_event("sess_1", "stream", "kept", T0)
    await first.kv_set("ws_1", "key", [1, 2], T0)
    await first.take_token("bucket", capacity=2, refill_per_second=1.0, now=T0)
    await first.close()

    second = SQLiteStore(database_path)
    await second.open()
    try:
        assert await second.get_account("acct_1") == make_account()
        assert await second.get_task("task_1") == make_task(snapshot=b"\x00state", result={"ok": True})
        assert await second.get_mcp_session("sess_1") == make_session()
        assert [event.seq for event in await second.events_after("sess_1", 0)] == [seq]
        assert await second.kv_get("ws_1", "key") == [1, 2]
        bucket = await second.take_token("bucket", capacity=2, refill_per_second=1.0, now=T0)
        assert bucket.remaining == 0
        assert await second.append_event("sess_1", "stream", "next", T0) > seq
    finally:
        await second.close()


async def test_sqlite_two_connections_share_bucket(io_loop, database_path):
    first = SQLiteStore(database_path)
    second = SQLiteStore(database_path)
    await first.open()
    await second.open()
    try:
        decisions = await asyncio.gather(
            *(
                store.take_token("shared", capacity=120, refill_per_second=2.0, now=T0)
                for _ in range(100)
                for store in (first, second)
            )
        )
    finally:
        await first.close()
        await second.close()

    assert sum(decision.allowed for decision in decisions) == 120


def _take_tokens_in_process(path: str, count: int, start_at: float) -> int:
    """Take ``count`` tokens from the shared bucket in a fresh process; return how many were admitted."""

    async def take_all() -> int:
        store = SQLiteStore(path)
        await store.open()
        try:
            # Start both processes together so their transactions overlap.
            await asyncio.sleep(max(0.0, start_at - time.time()))
            admitted = 0
            for _ in range(count):
                decision = await store.take_token("shared", capacity=120, refill_per_second=2.0, now=T0)
                admitted += decision.allowed
            return admitted
        finally:
            await store.close()

    return asyncio.run(take_all())


def test_sqlite_two_processes_share_bucket(database_path):
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + 2.0
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        futures = [pool.submit(_take_tokens_in_process, database_path, 150, start_at) for _ in range(2)]
        admitted = [future.result(timeout=60) for future in futures]

    assert sum(admitted) == 120


async def test_sqlite_file_mode_and_directory(io_loop, tmp_path):
    path = tmp_path / "new" / "nested" / "executor.db"
    store = SQLiteStore(str(path))
    await store.open()
    try:
        await store.put_account(make_account())
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        wal_path = f"{path}-wal"
        assert os.path.exists(wal_path)
        assert stat.S_IMODE(os.stat(wal_path).st_mode) == 0o600
    finally:
        await store.close()


async def test_sqlite_schema_version_and_wal(io_loop, database_path):
    store = SQLiteStore(database_path)
    await store.open()
    await store.close()

    connection = sqlite3.connect(database_path)
    try:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        connection.close()

    reopened = SQLiteStore(database_path)
    await reopened.open()
    await reopened.close()


async def test_sqlite_newer_schema_rejected(io_loop, database_path):
    store = SQLiteStore(database_path)
    await store.open()
    await store.close()
    connection = sqlite3.connect(database_path)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()

    newer = SQLiteStore(database_path)
    with pytest.raises(StoreError, match="newer"):
        await newer.open()
    await newer.close()


async def test_sqlite_prunes_refilled_buckets(io_loop, database_path):
    store = SQLiteStore(database_path)
    await store.open()
    try:
        await store.take_token("stale", capacity=10, refill_per_second=1.0, now=T0)
        await store.hit_window("stale", limit=10, window_seconds=60, now=T0)
        # By T0 + 100 the stale bucket is full and its window has ended.
        await store.take_token("fresh", capacity=10, refill_per_second=1.0, now=T0 + 100)
        await store.hit_window("fresh", limit=10, window_seconds=60, now=T0 + 100)
    finally:
        await store.close()

    connection = sqlite3.connect(database_path)
    try:
        assert [row[0] for row in connection.execute("SELECT key FROM rate_buckets")] == ["fresh"]
        assert [row[0] for row in connection.execute("SELECT key FROM rate_windows")] == ["fresh"]
    finally:
        connection.close()


# -- MongoDB only (on the fake) -------------------------------------------------------------


async def test_mongo_database_from_url(io_loop):
    client = AsyncMongoMockClient()
    named = MongoStore("mongodb://db.example:27017/tenant_db?replicaSet=rs0", client=client)
    unnamed = MongoStore("mongodb://db.example:27017/", client=client)
    overridden = MongoStore("mongodb://db.example:27017/tenant_db", client=client, database="explicit")
    for store in (named, unnamed, overridden):
        await store.open()
        await store.put_account(make_account())
        await store.close()

    assert "accounts" in await client["tenant_db"].list_collection_names()
    assert "accounts" in await client["executor"].list_collection_names()
    assert "accounts" in await client["explicit"].list_collection_names()


async def test_mongo_ttl_and_unique_indexes(io_loop):
    client = AsyncMongoMockClient()
    store = MongoStore("mongodb://fake.invalid/executor", client=client)
    await store.open()
    await store.open()
    await store.close()
    database = client["executor"]

    for collection in ("rate_buckets", "rate_windows", "mcp_event_counters"):
        indexes = await database[collection].index_information()
        ttl = [index for index in indexes.values() if "expireAfterSeconds" in index]
        assert [index["key"] for index in ttl] == [[("expire_at", 1)]], collection

    for collection, keys in (
        ("mcp_events", [("session_id", 1), ("seq", 1)]),
        ("webhook_receipts", [("provider", 1), ("event_id", 1)]),
        ("kv", [("workspace_id", 1), ("key", 1)]),
        ("memberships", [("organization_id", 1), ("account_id", 1)]),
    ):
        indexes = await database[collection].index_information()
        assert any(index["key"] == keys and index.get("unique") for index in indexes.values()), collection


async def test_mongo_bucket_expires_after_refill(io_loop):
    client = AsyncMongoMockClient()
    store = MongoStore("mongodb://fake.invalid/executor", client=client)
    await store.open()
    try:
        await store.take_token("bucket", capacity=30, refill_per_second=0.5, now=T0)
        await store.hit_window("window", limit=5, window_seconds=60, now=T0)
    finally:
        await store.close()

    bucket = await client["executor"]["rate_buckets"].find_one({"_id": "bucket"})
    window = await client["executor"]["rate_windows"].find_one({"_id": "window"})
    full_at = T0 + (30 - bucket["tokens"]) / 0.5
    window_end = math.floor(T0 / 60) * 60 + 60

    assert _posix_seconds(bucket["expire_at"]) >= full_at
    assert _posix_seconds(window["expire_at"]) >= window_end


def _posix_seconds(value: datetime.datetime) -> float:
    if value.tzinfo is None:  # PyMongo and mongomock return naive UTC datetimes
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.timestamp()


async def test_sqlite_migrates_version_1_tasks(io_loop, database_path):
    from store.sqlite import _MIGRATIONS

    os.makedirs(os.path.dirname(database_path), exist_ok=True)
    connection = sqlite3.connect(database_path)
    try:
        for statement in _MIGRATIONS[1]:
            connection.execute(statement)
        connection.execute("PRAGMA user_version = 1")
        connection.execute(
            "INSERT INTO tasks (id, workspace_id, account_id, principal, code, status, created_at, timeout_ms,"
            " result, output) VALUES ('task_old', 'ws_1', 'anon_1', 'p', '1', 'completed', 1.0, 1000, 'null', '')"
        )
        connection.commit()
    finally:
        connection.close()

    store = SQLiteStore(database_path)
    await store.open()
    try:
        task = await store.get_task("task_old")
        assert task.status == "completed"
        assert task.claimed_at is None
        assert await store.update_task("task_old", claimed_at=5.0) is True
        assert (await store.get_task("task_old")).claimed_at == 5.0
    finally:
        await store.close()
