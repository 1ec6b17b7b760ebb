"""Webhooks under replayed, reordered and forged deliveries, as a property.

Each example delivers the events of one fresh Stripe subscription and one
fresh WorkOS user in a random order, with random redeliveries and forged
copies mixed in. Forged copies must be 400 and change nothing, a redelivery
must be acknowledged as a duplicate, and the stored state must be that of
the newest genuine event, whatever the order.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from live_server import LiveServer
from test_webhooks import (
    T0,
    WEBHOOK_SETTINGS,
    stripe_event,
    stripe_signature,
    workos_event,
    workos_signature,
    workos_user,
)

SOAK = os.environ.get("EXECUTOR_SOAK") == "1"
STATUSES = ["incomplete", "active", "past_due", "canceled", "unpaid"]
NAMES = ["Ada", "Augusta", "Grace", "Edsger", "Barbara"]
_serial = itertools.count()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("webhooks"), rate_limit_enabled=False, **WEBHOOK_SETTINGS)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def forge(payload: str, signature: str, tampering: str) -> tuple[str, str]:
    """Return a (payload, signature) pair that a verifier must reject."""
    if tampering == "changed body":
        return payload.replace("}", ', "x": 1}', 1), signature
    if tampering == "tampered signature":
        last = "1" if signature.endswith("0") else "0"
        return payload, signature[:-1] + last
    if tampering == "no signature":
        return payload, ""
    return payload, "t=1, v1=" + "0" * 64


def deliveries(count: int) -> st.SearchStrategy[list[tuple[int, str]]]:
    """A delivery plan: each event index at least once, in any order, some repeated, some forged."""
    genuine = st.permutations(range(count))
    extras = st.lists(
        st.tuples(st.integers(0, count - 1), st.sampled_from(["replay", "changed body", "tampered signature", "no signature", "stale signature"])),
        max_size=count * 2,
    )
    return st.tuples(genuine, extras, st.randoms(use_true_random=False)).map(
        lambda plan: _mix(plan[0], plan[1], plan[2])
    )


def _mix(order: list[int], extras: list[tuple[int, str]], rng: Any) -> list[tuple[int, str]]:
    steps = [(index, "genuine") for index in order] + list(extras)
    rng.shuffle(steps)
    return steps


def _post(live: LiveServer, route: str, header: str, payload: str, signature: str) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if signature:
        headers[header] = signature
    response = live.request("POST", route, body=payload.encode(), headers=headers)
    return response.status, json.loads(response.body)


def _run_plan(live: LiveServer, plan: list[tuple[int, str]], events: list[tuple[str, str]], sign: Any, route: str, header: str, read: Any) -> set[int]:
    """Deliver ``plan``, check each response and that forged deliveries change nothing, and return the genuine indexes delivered."""
    delivered: set[int] = set()
    for index, kind in plan:
        event_id, payload = events[index]
        signature = sign(payload)
        if kind in ("genuine", "replay"):
            status, body = _post(live, route, header, payload, signature)
            assert status == 200, body
            if index in delivered:
                assert body["outcome"] == "duplicate", (event_id, body)
            else:
                assert body["outcome"] in ("applied", "stale"), (event_id, body)
            delivered.add(index)
            continue
        before = read()
        forged_payload, forged_signature = forge(payload, signature, kind)
        status, body = _post(live, route, header, forged_payload, forged_signature)
        assert status == 400, (kind, body)
        assert isinstance(body.get("error"), str) and body["error"], body
        assert read() == before, f"a forged delivery ({kind}) changed stored state"
    return delivered


@settings(
    max_examples=200 if SOAK else 25,
    deadline=None,
    derandomize=not SOAK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_stripe_deliveries_in_any_order(live: LiveServer, data: st.DataObject) -> None:
    serial = next(_serial)
    subscription_id = f"sub_prop_{serial}"
    count = data.draw(st.integers(1, 5), label="events")
    statuses = data.draw(st.lists(st.sampled_from(STATUSES), min_size=count, max_size=count), label="statuses")
    events = []
    for index, status in enumerate(statuses):
        stripe_object = {"id": subscription_id, "object": "subscription", "customer": f"cus_prop_{serial}",
                         "status": status, "metadata": {"organization_id": f"org_prop_{serial}"}}
        event_type = "customer.subscription.created" if index == 0 else "customer.subscription.updated"
        event_id = f"evt_prop_{serial}_{index}"
        events.append((event_id, stripe_event(event_id, event_type, stripe_object, created=T0 + index * 10)))
    plan = data.draw(deliveries(count), label="plan")
    store = live.service.store  # type: ignore[union-attr]

    def read() -> Any:
        return live.call(store.get_billing_record("subscription", subscription_id))

    delivered = _run_plan(live, plan, events, stripe_signature, "/stripe/webhook", "Stripe-Signature", read)

    newest = max(delivered)
    record = read()
    assert record is not None
    assert record.event_id == events[newest][0], "the newest event wins whatever the order"
    assert record.status == statuses[newest]


@settings(
    max_examples=200 if SOAK else 25,
    deadline=None,
    derandomize=not SOAK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_workos_deliveries_in_any_order(live: LiveServer, data: st.DataObject) -> None:
    serial = next(_serial)
    user_id = f"user_prop_{serial}"
    count = data.draw(st.integers(1, 5), label="events")
    names = data.draw(st.lists(st.sampled_from(NAMES), min_size=count, max_size=count), label="names")
    now = time.time()
    events = []
    for index, name in enumerate(names):
        event_type = "user.created" if index == 0 else "user.updated"
        event_id = f"event_prop_{serial}_{index}"
        user = workos_user(user_id, first_name=name)
        events.append((event_id, workos_event(event_id, event_type, user, created_at=now - 100 + index)))
    plan = data.draw(deliveries(count), label="plan")
    store = live.service.store  # type: ignore[union-attr]

    def read() -> Any:
        return live.call(store.get_account(user_id))

    delivered = _run_plan(live, plan, events, workos_signature, "/workos/webhook", "WorkOS-Signature", read)

    newest = max(delivered)
    account = read()
    assert account is not None
    assert account.name == f"{names[newest]} Lovelace", "the newest event wins whatever the order"
