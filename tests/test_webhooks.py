"""Stripe and WorkOS webhooks over real HTTP, with payloads signed the way each provider documents.

Stripe: ``Stripe-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``.
WorkOS: ``WorkOS-Signature: t=<unix milliseconds>, v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``.
The signatures are computed here with ``hmac``, not with either provider's library.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from authserver import LocalAuthServer
from conftest import MCP_HEADERS, anonymous_key, fetch, initialize_body, json_body, running
from executor_tornado.clock import ManualClock
from executor_tornado.webhooks import WORKOS_TOLERANCE_SECONDS
from store.records import Workspace

STRIPE_SECRET = "whsec_test_6f1d2c0b9a8e7d6c5b4a3f2e1d0c9b8a"
WORKOS_SECRET = "workos_webhook_secret_test_0123456789"
WEBHOOK_SETTINGS = {
    "stripe_webhook_secret": STRIPE_SECRET,
    "workos_client_id": "client_test",
    "workos_api_key": "sk_test_workos",
    "workos_webhook_secret": WORKOS_SECRET,
}
REPO_ROOT = Path(__file__).resolve().parent.parent
T0 = 1_796_000_000  # a Stripe-style event time in whole seconds


# -- signing and posting ---------------------------------------------------------------------


def hmac_hex(secret: str, message: str) -> str:
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def stripe_signature(payload: str, *, secret: str = STRIPE_SECRET, timestamp: int | None = None) -> str:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return f"t={timestamp},v1={hmac_hex(secret, f'{timestamp}.{payload}')}"


def workos_signature(payload: str, *, secret: str = WORKOS_SECRET, timestamp_ms: int | None = None) -> str:
    timestamp_ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return f"t={timestamp_ms}, v1={hmac_hex(secret, f'{timestamp_ms}.{payload}')}"


def stripe_event(event_id: str, event_type: str, stripe_object: dict[str, Any], *, created: int = T0) -> str:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "api_version": "2025-03-31.basil",
            "type": event_type,
            "created": created,
            "livemode": False,
            "data": {"object": stripe_object},
        }
    )


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def workos_event(event_id: str, event_type: str, data: dict[str, Any], *, created_at: float) -> str:
    return json.dumps({"id": event_id, "event": event_type, "data": data, "created_at": iso_time(created_at)})


def workos_user(user_id: str, *, first_name: str = "Ada", email: str = "ada@example.com") -> dict[str, Any]:
    return {
        "object": "user",
        "id": user_id,
        "email": email,
        "first_name": first_name,
        "last_name": "Lovelace",
        "email_verified": True,
        "external_id": None,
        "created_at": "2026-11-01T10:00:00.000Z",
        "updated_at": "2026-11-01T10:00:00.000Z",
    }


def workos_membership(user_id: str, organization_id: str, status: str = "active") -> dict[str, Any]:
    return {
        "object": "organization_membership",
        "id": f"om_{user_id}_{organization_id}",
        "user_id": user_id,
        "organization_id": organization_id,
        "status": status,
        "role": {"slug": "member"},
        "created_at": "2026-11-01T10:00:00.000Z",
        "updated_at": "2026-11-01T10:00:00.000Z",
    }


async def post_stripe(service, payload: str, signature: str | None = "sign") -> Any:
    headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "Stripe/1.0"}
    if signature == "sign":
        signature = stripe_signature(payload)
    if signature is not None:
        headers["Stripe-Signature"] = signature
    return await fetch(service, "/stripe/webhook", method="POST", body=payload, headers=headers)


async def post_workos(service, payload: str, signature: str | None = "sign") -> Any:
    headers = {"Content-Type": "application/json", "User-Agent": "WorkOS"}
    if signature == "sign":
        signature = workos_signature(payload)
    if signature is not None:
        headers["WorkOS-Signature"] = signature
    return await fetch(service, "/workos/webhook", method="POST", body=payload, headers=headers)


def assert_outcome(response, event_id: str, outcome: str) -> None:
    assert response.code == 200, response.body
    assert response.headers["Content-Type"] == "application/json"
    assert json_body(response) == {"received": True, "eventId": event_id, "outcome": outcome}


# -- Stripe ------------------------------------------------------------------------------------


async def test_stripe_events_applied_to_organization(data_dir: Path) -> None:
    async with running(data_dir, **WEBHOOK_SETTINGS) as service:
        store = service.store
        customer = {"id": "cus_1", "object": "customer", "email": "billing@acme.test", "name": "Acme",
                    "metadata": {"organization_id": "org_acme"}}
        assert_outcome(await post_stripe(service, stripe_event("evt_c1", "customer.created", customer)), "evt_c1", "applied")

        session = {"id": "cs_1", "object": "checkout.session", "customer": "cus_1", "subscription": "sub_1",
                   "mode": "subscription", "status": "complete", "payment_status": "paid",
                   "amount_total": 2000, "currency": "usd", "metadata": {"organizationId": "org_acme"}}
        response = await post_stripe(service, stripe_event("evt_cs1", "checkout.session.completed", session, created=T0 + 1))
        assert_outcome(response, "evt_cs1", "applied")

        # No metadata: the subscription and invoices find the organization through their customer.
        subscription = {"id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "active",
                        "cancel_at_period_end": False, "metadata": {},
                        "items": {"object": "list", "data": [{"id": "si_1", "price": {"id": "price_team"}}]}}
        response = await post_stripe(
            service, stripe_event("evt_s1", "customer.subscription.created", subscription, created=T0 + 2)
        )
        assert_outcome(response, "evt_s1", "applied")

        paid = {"id": "in_1", "object": "invoice", "customer": "cus_1", "status": "paid", "amount_due": 2000,
                "amount_paid": 2000, "currency": "usd",
                "parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_1"}}}
        assert_outcome(await post_stripe(service, stripe_event("evt_i1", "invoice.paid", paid, created=T0 + 3)), "evt_i1", "applied")

        failed = {"id": "in_2", "object": "invoice", "customer": "cus_1", "status": "open", "amount_due": 2000,
                  "amount_paid": 0, "attempt_count": 1, "currency": "usd"}
        response = await post_stripe(service, stripe_event("evt_i2", "invoice.payment_failed", failed, created=T0 + 4))
        assert_outcome(response, "evt_i2", "applied")

        canceled = {**subscription, "status": "canceled", "canceled_at": T0 + 5}
        response = await post_stripe(
            service, stripe_event("evt_s2", "customer.subscription.deleted", canceled, created=T0 + 5)
        )
        assert_outcome(response, "evt_s2", "applied")

        records = {(record.object_type, record.object_id): record for record in await store.list_billing_records("org_acme")}
        assert sorted(records) == [
            ("checkout_session", "cs_1"),
            ("customer", "cus_1"),
            ("invoice", "in_1"),
            ("invoice", "in_2"),
            ("subscription", "sub_1"),
        ]
        assert records[("customer", "cus_1")].status == "active"
        assert records[("customer", "cus_1")].data["email"] == "billing@acme.test"
        assert records[("checkout_session", "cs_1")].status == "complete"
        assert records[("checkout_session", "cs_1")].data["subscription"] == "sub_1"
        assert records[("subscription", "sub_1")].status == "canceled"
        assert records[("subscription", "sub_1")].event_id == "evt_s2"
        assert records[("subscription", "sub_1")].data["price_ids"] == ["price_team"]
        assert records[("invoice", "in_1")].status == "paid"
        assert records[("invoice", "in_1")].data["subscription"] == "sub_1"
        assert records[("invoice", "in_2")].status == "payment_failed"
        assert records[("invoice", "in_2")].data["attempt_count"] == 1


async def test_stripe_redelivery_changes_nothing(data_dir: Path) -> None:
    clock = ManualClock()
    async with running(data_dir, clock=clock, **WEBHOOK_SETTINGS) as service:
        subscription = {"id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "active",
                        "metadata": {"organization_id": "org_1"}}
        payload = stripe_event("evt_1", "customer.subscription.created", subscription)
        assert_outcome(await post_stripe(service, payload), "evt_1", "applied")
        first = await service.store.get_billing_record("subscription", "sub_1")
        assert first is not None

        # Stripe re-signs a redelivery with a new timestamp; a second apply would move updated_at.
        clock.advance(120)
        redelivery = await post_stripe(service, payload, stripe_signature(payload, timestamp=int(time.time()) + 1))
        assert_outcome(redelivery, "evt_1", "duplicate")
        assert await service.store.get_billing_record("subscription", "sub_1") == first
        assert await service.store.get_billing_record("customer", "cus_1") is not None


@pytest.mark.parametrize("newer_offset", [5, 0], ids=["later-second", "same-second"])
async def test_stripe_subscription_updated_before_created(data_dir: Path, newer_offset: int) -> None:
    async with running(data_dir, **WEBHOOK_SETTINGS) as service:
        base = {"id": "sub_9", "object": "subscription", "customer": "cus_9", "metadata": {"organization_id": "org_9"}}
        updated = stripe_event(
            "evt_updated", "customer.subscription.updated", {**base, "status": "active"}, created=T0 + newer_offset
        )
        created = stripe_event("evt_created", "customer.subscription.created", {**base, "status": "incomplete"}, created=T0)

        assert_outcome(await post_stripe(service, updated), "evt_updated", "applied")
        assert_outcome(await post_stripe(service, created), "evt_created", "stale")

        record = await service.store.get_billing_record("subscription", "sub_9")
        assert record is not None
        assert record.status == "active"
        assert record.event_id == "evt_updated"
        assert record.organization_id == "org_9"


async def test_stripe_subscription_attached_by_later_checkout(data_dir: Path) -> None:
    async with running(data_dir, **WEBHOOK_SETTINGS) as service:
        store = service.store
        subscription = {"id": "sub_2", "object": "subscription", "customer": "cus_2", "status": "active", "metadata": {}}
        response = await post_stripe(service, stripe_event("evt_s", "customer.subscription.created", subscription))
        assert_outcome(response, "evt_s", "applied")
        unattached = await store.get_billing_record("subscription", "sub_2")
        assert unattached is not None
        assert unattached.organization_id is None

        session = {"id": "cs_2", "object": "checkout.session", "customer": "cus_2", "subscription": "sub_2",
                   "status": "complete", "metadata": {"organization_id": "org_2"}}
        response = await post_stripe(service, stripe_event("evt_cs", "checkout.session.completed", session, created=T0 + 1))
        assert_outcome(response, "evt_cs", "applied")
        attached = await store.get_billing_record("subscription", "sub_2")
        assert attached is not None
        assert attached.organization_id == "org_2"
        assert attached.status == "active"
        assert attached.event_id == "evt_s"

        # The customer's own event carries no metadata and arrives last, yet older than the link.
        customer = {"id": "cus_2", "object": "customer", "email": "pay@two.test", "metadata": {}}
        response = await post_stripe(service, stripe_event("evt_cu", "customer.updated", customer, created=T0 - 60))
        assert_outcome(response, "evt_cu", "applied")
        customer_record = await store.get_billing_record("customer", "cus_2")
        assert customer_record is not None
        assert customer_record.organization_id == "org_2"
        assert customer_record.data["email"] == "pay@two.test"
        assert sorted(record.object_id for record in await store.list_billing_records("org_2")) == [
            "cs_2", "cus_2", "sub_2"
        ]


async def test_stripe_unknown_event_type_ignored(data_dir: Path) -> None:
    async with running(data_dir, **WEBHOOK_SETTINGS) as service:
        payload = stripe_event("evt_pi", "payment_intent.created", {"id": "pi_1", "object": "payment_intent"})
        assert_outcome(await post_stripe(service, payload), "evt_pi", "ignored")
        assert_outcome(await post_stripe(service, payload), "evt_pi", "duplicate")
        assert await service.store.get_billing_record("payment_intent", "pi_1") is None


def stripe_rejections() -> list[tuple[str, Any, str]]:
    """(case, function from payload to (body sent, signature header), expected error)."""
    mismatch = (
        "Invalid Stripe-Signature header: No signatures found matching the expected signature for payload."
        " Check that STRIPE_WEBHOOK_SECRET is this endpoint's signing secret"
    )
    stale_time = int(time.time()) - 3600
    return [
        ("bad-signature", lambda p: (p, stripe_signature(p, secret="whsec_wrong")), mismatch),
        (
            "stale-timestamp",
            lambda p: (p, stripe_signature(p, timestamp=stale_time)),
            f"Invalid Stripe-Signature header: Timestamp outside the tolerance zone ({stale_time})."
            " Check that STRIPE_WEBHOOK_SECRET is this endpoint's signing secret",
        ),
        ("body-changed", lambda p: (p.replace('"active"', '"canceled"'), stripe_signature(p)), mismatch),
        ("missing-header", lambda p: (p, None), "Missing Stripe-Signature header"),
        (
            "malformed-header",
            lambda p: (p, "v1=deadbeef"),
            "Invalid Stripe-Signature header: Unable to extract timestamp and signatures from header."
            " Check that STRIPE_WEBHOOK_SECRET is this endpoint's signing secret",
        ),
        ("signed-non-json", lambda p: ("not json", stripe_signature("not json")),
         "Invalid webhook body: expected a JSON Stripe event object"),
    ]


@pytest.mark.parametrize("case, tamper, error", stripe_rejections(), ids=[case[0] for case in stripe_rejections()])
async def test_stripe_rejected_delivery_changes_nothing(data_dir: Path, case: str, tamper, error: str) -> None:
    async with running(data_dir, **WEBHOOK_SETTINGS) as service:
        subscription = {"id": "sub_x", "object": "subscription", "customer": "cus_x", "status": "active",
                        "metadata": {"organization_id": "org_x"}}
        payload = stripe_event("evt_x", "customer.subscription.created", subscription)
        body, signature = tamper(payload)

        response = await post_stripe(service, body, signature)
        assert response.code == 400
        assert response.headers["Content-Type"] == "application/json"
        assert json_body(response) == {"error": error}
        assert await service.store.get_billing_record("subscription", "sub_x") is None
        assert await service.store.list_billing_records("org_x") == []

        # No receipt was recorded: the genuine delivery of the same event id is applied.
        assert_outcome(await post_stripe(service, payload), "evt_x", "applied")


async def test_stripe_failed_apply_is_retried(data_dir: Path) -> None:
    async with running(data_dir, **WEBHOOK_SETTINGS) as service:
        database = service.settings.resolved_store_url.removeprefix("sqlite:///")
        with sqlite3.connect(database) as connection:
            connection.execute(
                "CREATE TRIGGER fail_billing BEFORE INSERT ON billing_records"
                " BEGIN SELECT RAISE(ABORT, 'simulated disk failure'); END"
            )
        subscription = {"id": "sub_f", "object": "subscription", "customer": "cus_f", "status": "active",
                        "metadata": {"organization_id": "org_f"}}
        payload = stripe_event("evt_f", "customer.subscription.created", subscription)

        failed = await post_stripe(service, payload)
        assert failed.code == 500
        assert failed.headers["Content-Type"] == "application/json"
        assert json_body(failed) == {"error": "Processing Stripe event evt_f failed; it is applied when Stripe retries it"}
        assert await service.store.get_billing_record("subscription", "sub_f") is None

        with sqlite3.connect(database) as connection:
            connection.execute("DROP TRIGGER fail_billing")
        assert_outcome(await post_stripe(service, payload), "evt_f", "applied")
        record = await service.store.get_billing_record("subscription", "sub_f")
        assert record is not None
        assert record.organization_id == "org_f"


# -- WorkOS ------------------------------------------------------------------------------------


async def test_workos_user_events_ordered(data_dir: Path) -> None:
    async with running(data_dir, **WEBHOOK_SETTINGS) as service:
        now = time.time()
        created = workos_event("event_u1", "user.created", workos_user("user_1"), created_at=now - 60)
        updated = workos_event("event_u2", "user.updated", workos_user("user_1", first_name="Augusta"), created_at=now - 30)

        assert_outcome(await post_workos(service, updated), "event_u2", "applied")
        assert_outcome(await post_workos(service, created), "event_u1", "stale")
        assert_outcome(await post_workos(service, updated), "event_u2", "duplicate")

        account = await service.store.get_account("user_1")
        assert account is not None
        assert account.kind == "workos"
        assert account.name == "Augusta Lovelace"
        assert account.email == "ada@example.com"
        assert account.disabled is False
        assert account.updated_at == pytest.approx(now - 30, abs=0.001)

        deleted = workos_event("event_u3", "user.deleted", workos_user("user_1"), created_at=now - 10)
        assert_outcome(await post_workos(service, deleted), "event_u3", "applied")
        late_update = workos_event("event_u4", "user.updated", workos_user("user_1"), created_at=now - 20)
        assert_outcome(await post_workos(service, late_update), "event_u4", "stale")
        account = await service.store.get_account("user_1")
        assert account is not None
        assert account.disabled is True


async def test_workos_organization_events(data_dir: Path) -> None:
    async with running(data_dir, **WEBHOOK_SETTINGS) as service:
        now = time.time()
        organization = {"object": "organization", "id": "org_w", "name": "Acme", "domains": [],
                        "created_at": "2026-11-01T10:00:00.000Z", "updated_at": "2026-11-01T10:00:00.000Z"}
        events = [
            ("event_o1", "organization.created", organization, now - 60, "applied"),
            ("event_o2", "organization.updated", {**organization, "name": "Acme Inc"}, now - 50, "applied"),
            ("event_o3", "organization.deleted", {**organization, "name": "Acme Inc"}, now - 40, "applied"),
            ("event_o4", "organization.updated", {**organization, "name": "Late"}, now - 45, "stale"),
        ]
        for event_id, event_type, data, created_at, outcome in events:
            response = await post_workos(service, workos_event(event_id, event_type, data, created_at=created_at))
            assert_outcome(response, event_id, outcome)

        stored = await service.store.get_organization("org_w")
        assert stored is not None
        assert stored.name == "Acme Inc"
        assert stored.deleted is True


def workos_rejections() -> list[tuple[str, Any, str]]:
    hint = " Check that WORKOS_WEBHOOK_SECRET is this endpoint's secret"
    mismatch = "Invalid WorkOS-Signature header: Signature hash does not match the expected signature hash for payload." + hint
    stale_ms = int((time.time() - WORKOS_TOLERANCE_SECONDS - 60) * 1000)
    return [
        ("bad-signature", lambda p: (p, workos_signature(p, secret="wrong")), mismatch),
        (
            "stale-timestamp",
            lambda p: (p, workos_signature(p, timestamp_ms=stale_ms)),
            "Invalid WorkOS-Signature header: Timestamp outside the tolerance zone." + hint,
        ),
        ("body-changed", lambda p: (p.replace("Ada", "Eve"), workos_signature(p)), mismatch),
        ("missing-header", lambda p: (p, None), "Missing WorkOS-Signature header"),
        (
            "non-ascii-signature",
            lambda p: (p, f"t={int(time.time() * 1000)}, v1=\u00e9\u00e9"),
            "Invalid WorkOS-Signature header: expected t=<milliseconds>, v1=<hex HMAC-SHA256>"
            " signed with WORKOS_WEBHOOK_SECRET",
        ),
    ]


@pytest.mark.parametrize("case, tamper, error", workos_rejections(), ids=[case[0] for case in workos_rejections()])
async def test_workos_rejected_delivery_changes_nothing(data_dir: Path, case: str, tamper, error: str) -> None:
    async with running(data_dir, **WEBHOOK_SETTINGS) as service:
        payload = workos_event("event_x", "user.created", workos_user("user_x"), created_at=time.time())
        body, signature = tamper(payload)

        response = await post_workos(service, body, signature)
        assert response.code == 400
        assert response.headers["Content-Type"] == "application/json"
        assert json_body(response) == {"error": error}
        assert await service.store.get_account("user_x") is None

        assert_outcome(await post_workos(service, payload), "event_x", "applied")
        assert await service.store.get_account("user_x") is not None


# -- effects on the MCP endpoints ------------------------------------------------------------------


async def test_user_deleted_disables_api_key(data_dir: Path) -> None:
    async with running(data_dir, **WEBHOOK_SETTINGS) as service:
        bootstrap = await anonymous_key(service)
        url = f"/v1/mcp/anonymous?workspaceId={bootstrap['workspaceId']}"
        headers = {**MCP_HEADERS, "X-API-Key": bootstrap["apiKey"]}

        before = await fetch(service, url, method="POST", body=initialize_body(), headers=headers)
        assert before.code == 200, before.body

        deleted = workos_event("event_del", "user.deleted", workos_user(bootstrap["accountId"]), created_at=time.time())
        assert_outcome(await post_workos(service, deleted), "event_del", "applied")

        after = await fetch(service, url, method="POST", body=initialize_body(), headers=headers)
        assert after.code == 401
        assert json_body(after) == {"error": "API key's account is disabled or deleted"}
        account = await service.store.get_account(bootstrap["accountId"])
        assert account is not None
        assert account.kind == "anonymous"
        assert account.disabled is True


async def oauth_setup(service, user_id: str, organization_id: str) -> str:
    """Create an organization workspace and an active membership through webhooks; return the workspace id."""
    await service.store.put_workspace(
        Workspace(id="ws_team", name="Team", created_at=time.time(), organization_id=organization_id)
    )
    now = time.time()
    organization = {"object": "organization", "id": organization_id, "name": "Team", "domains": []}
    for event_id, event_type, data in [
        ("event_org", "organization.created", organization),
        ("event_user", "user.created", workos_user(user_id)),
        ("event_om", "organization_membership.created", workos_membership(user_id, organization_id)),
    ]:
        response = await post_workos(service, workos_event(event_id, event_type, data, created_at=now - 60))
        assert_outcome(response, event_id, "applied")
    return "ws_team"


async def test_membership_deleted_forbids_workspace(data_dir: Path) -> None:
    auth = LocalAuthServer()
    auth.start()
    try:
        async with running(data_dir, authorization_server=auth.issuer, **WEBHOOK_SETTINGS) as service:
            workspace_id = await oauth_setup(service, "user_m", "org_m")
            url = f"/v1/mcp?workspaceId={workspace_id}"
            headers = {**MCP_HEADERS, "Authorization": f"Bearer {auth.token('user_m')}"}

            before = await fetch(service, url, method="POST", body=initialize_body(), headers=headers)
            assert before.code == 200, before.body

            now = time.time()
            removed = workos_event(
                "event_om_del", "organization_membership.deleted", workos_membership("user_m", "org_m"), created_at=now
            )
            assert_outcome(await post_workos(service, removed), "event_om_del", "applied")
            after = await fetch(service, url, method="POST", body=initialize_body(), headers=headers)
            assert after.code == 403
            assert json_body(after) == {"error": "You are not a member of this workspace's organization"}

            # An update sent before the deletion but delivered after it does not restore access.
            late = workos_event(
                "event_om_late", "organization_membership.updated", workos_membership("user_m", "org_m"),
                created_at=now - 5,
            )
            assert_outcome(await post_workos(service, late), "event_om_late", "stale")
            still = await fetch(service, url, method="POST", body=initialize_body(), headers=headers)
            assert still.code == 403
            membership = await service.store.get_membership("org_m", "user_m")
            assert membership is not None
            assert membership.status == "inactive"
    finally:
        await auth.stop()


async def test_user_deleted_rejects_oauth_token(data_dir: Path) -> None:
    auth = LocalAuthServer()
    auth.start()
    try:
        async with running(data_dir, authorization_server=auth.issuer, **WEBHOOK_SETTINGS) as service:
            workspace_id = await oauth_setup(service, "user_d", "org_d")
            url = f"/v1/mcp?workspaceId={workspace_id}"
            headers = {**MCP_HEADERS, "Authorization": f"Bearer {auth.token('user_d')}"}

            before = await fetch(service, url, method="POST", body=initialize_body(), headers=headers)
            assert before.code == 200, before.body

            deleted = workos_event("event_ud", "user.deleted", workos_user("user_d"), created_at=time.time())
            assert_outcome(await post_workos(service, deleted), "event_ud", "applied")
            after = await fetch(service, url, method="POST", body=initialize_body(), headers=headers)
            assert after.code == 401
            assert json_body(after) == {"error": "Account is disabled"}
            assert 'error="invalid_token"' in after.headers["WWW-Authenticate"]
    finally:
        await auth.stop()


# -- configuration and limits ------------------------------------------------------------------------


async def test_webhooks_not_configured(data_dir: Path) -> None:
    workos_names = "WORKOS_CLIENT_ID, WORKOS_API_KEY and WORKOS_WEBHOOK_SECRET"
    payload = stripe_event("evt_n", "customer.created", {"id": "cus_n", "object": "customer"})
    partial_workos = {"workos_client_id": "client_test", "workos_webhook_secret": WORKOS_SECRET}
    cases = [
        ({}, 404, "Stripe webhooks are not configured: set STRIPE_WEBHOOK_SECRET",
         f"WorkOS webhooks are not configured: set {workos_names}"),
        (partial_workos, 404, "Stripe webhooks are not configured: set STRIPE_WEBHOOK_SECRET",
         f"WorkOS webhooks are not configured: set {workos_names}"),
        ({"deployment_mode": "cloud"}, 503,
         "Stripe webhooks must be configured for cloud deployments: set STRIPE_WEBHOOK_SECRET",
         f"WorkOS webhooks must be configured for cloud deployments: set {workos_names}"),
    ]
    for overrides, status, stripe_error, workos_error in cases:
        async with running(data_dir, **overrides) as service:
            stripe_response = await post_stripe(service, payload)
            assert stripe_response.code == status, overrides
            assert stripe_response.headers["Content-Type"] == "application/json"
            assert json_body(stripe_response) == {"error": stripe_error}

            workos_response = await post_workos(service, payload)
            assert workos_response.code == status, overrides
            assert json_body(workos_response) == {"error": workos_error}


async def test_webhook_route_rate_limited(data_dir: Path) -> None:
    # A stopped clock: no token refills while the 600 requests run.
    async with running(data_dir, clock=ManualClock(start=time.time()), **WEBHOOK_SETTINGS) as service:
        for index in range(600):
            response = await fetch(service, "/stripe/webhook", method="POST", body="{}")
            assert response.code == 400, index
        limited = await fetch(service, "/stripe/webhook", method="POST", body="{}")
        assert limited.code == 429
        assert json_body(limited) == {"error": "Rate limit exceeded"}
        assert int(limited.headers["Retry-After"]) >= 1


# -- command line ----------------------------------------------------------------------------------------


def run_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EXECUTOR_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "executor_tornado.cli", *args],
        cwd=data_dir, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


async def test_cli_shows_webhook_results(data_dir: Path) -> None:
    async with running(data_dir, **WEBHOOK_SETTINGS) as service:
        subscription = {"id": "sub_cli", "object": "subscription", "customer": "cus_cli", "status": "past_due",
                        "metadata": {"organization_id": "org_cli"}}
        response = await post_stripe(service, stripe_event("evt_cli", "customer.subscription.updated", subscription))
        assert_outcome(response, "evt_cli", "applied")
        organization = {"object": "organization", "id": "org_cli", "name": "CLI Org", "domains": []}
        response = await post_workos(service, workos_event("event_cli_o", "organization.created", organization,
                                                           created_at=time.time()))
        assert_outcome(response, "event_cli_o", "applied")
        response = await post_workos(service, workos_event("event_cli_u", "user.deleted", workos_user("user_cli"),
                                                           created_at=time.time()))
        assert_outcome(response, "event_cli_u", "applied")

    billing = run_cli(data_dir, "billing", "show", "org_cli")
    assert billing.returncode == 0, billing.stderr
    billing_output = json.loads(billing.stdout)
    assert billing_output["organization"]["name"] == "CLI Org"
    records = {(record["object_type"], record["object_id"]): record for record in billing_output["billingRecords"]}
    assert sorted(records) == [("customer", "cus_cli"), ("subscription", "sub_cli")]
    assert records[("subscription", "sub_cli")]["status"] == "past_due"
    assert records[("subscription", "sub_cli")]["event_id"] == "evt_cli"

    account = run_cli(data_dir, "account", "show", "user_cli")
    assert account.returncode == 0, account.stderr
    account_output = json.loads(account.stdout)
    assert account_output["account"]["id"] == "user_cli"
    assert account_output["account"]["disabled"] is True
    assert account_output["account"]["email"] == "ada@example.com"
    assert account_output["apiKeys"] == []

    missing = run_cli(data_dir, "billing", "show", "org_missing")
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr == "executor-tornado: No organization or billing records found for 'org_missing'\n"

    missing_account = run_cli(data_dir, "account", "show", "user_missing")
    assert missing_account.returncode == 1
    assert missing_account.stderr == "executor-tornado: Account 'user_missing' not found\n"
