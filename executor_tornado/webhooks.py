"""Stripe and WorkOS webhook events: signature checks and their effects on the store.

A handler passes the raw request body and the signature header to
:func:`verify_stripe_event` or :meth:`WorkOSVerifier.verify`, which raise
:class:`InvalidWebhook` (HTTP 400) before anything is stored. The verified
event then goes to :class:`WebhookProcessor`, which records a receipt per
event id, so a redelivery changes nothing, and applies the event:

* Stripe customer, checkout session, subscription and invoice events become
  :class:`~store.records.BillingRecord` rows attached to an organization;
* WorkOS ``user.*``, ``organization.*`` and ``organization_membership.*``
  events update accounts, organizations and memberships.

Providers deliver out of order, so every effect carries the event's time and
an older event never overwrites state written by a newer one.

Example::

    processor = WebhookProcessor(store, clock)
    event = verify_stripe_event(body, headers.get("Stripe-Signature"), secret)
    outcome = await processor.process_stripe(event)     # Outcome.APPLIED, ...

    verifier = WorkOSVerifier(client_id, api_key, webhook_secret)
    outcome = await processor.process_workos(verifier.verify(body, headers.get("WorkOS-Signature")))
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import stripe

from executor_tornado.clock import Clock
from store.base import Store
from store.records import Account, BillingRecord, Membership, Organization

__all__ = [
    "HANDLED_STRIPE_EVENTS",
    "HANDLED_WORKOS_EVENTS",
    "InvalidWebhook",
    "Outcome",
    "StripeEvent",
    "WORKOS_TOLERANCE_SECONDS",
    "WebhookProcessor",
    "WorkOSEvent",
    "WorkOSVerifier",
    "stripe_event_version",
    "verify_stripe_event",
]

log = logging.getLogger("executor_tornado.webhooks")

WORKOS_TOLERANCE_SECONDS = 180
"""Maximum age (and clock skew) of a ``WorkOS-Signature`` timestamp in seconds, as in the workos SDK's default."""

MAX_ID_CHARS = 255
LOCK_STRIPES = 64

HANDLED_STRIPE_EVENTS: dict[str, str] = {
    "customer.created": "customer",
    "customer.updated": "customer",
    "customer.deleted": "customer",
    "checkout.session.completed": "checkout_session",
    "checkout.session.async_payment_succeeded": "checkout_session",
    "checkout.session.async_payment_failed": "checkout_session",
    "checkout.session.expired": "checkout_session",
    "customer.subscription.created": "subscription",
    "customer.subscription.updated": "subscription",
    "customer.subscription.deleted": "subscription",
    "invoice.paid": "invoice",
    "invoice.payment_succeeded": "invoice",
    "invoice.payment_failed": "invoice",
}
"""Stripe event types that change billing records, mapped to the record's ``object_type``."""

HANDLED_WORKOS_EVENTS = frozenset(
    {
        "user.created",
        "user.updated",
        "user.deleted",
        "organization.created",
        "organization.updated",
        "organization.deleted",
        "organization_membership.created",
        "organization_membership.updated",
        "organization_membership.deleted",
    }
)

# Stripe's ``created`` has one-second resolution, and a subscription's
# ``created`` and first ``updated`` event often share that second. The stage
# of the event type, added as tenths of a second, orders such events the way
# Stripe emits them, so ``updated`` still wins over ``created`` when
# ``created`` arrives last. Events of the same stage in the same second stay
# in arrival order.
_STRIPE_STAGES = {
    "created": 0,
    "paid": 2,
    "payment_succeeded": 2,
    "async_payment_succeeded": 2,
    "deleted": 3,
}
_DEFAULT_STRIPE_STAGE = 1

_STRIPE_SUMMARY_FIELDS: dict[str, tuple[str, ...]] = {
    "customer": ("email", "name", "metadata", "deleted"),
    "checkout_session": (
        "customer", "subscription", "mode", "status", "payment_status", "amount_total", "currency",
        "client_reference_id", "metadata",
    ),
    "subscription": (
        "customer", "status", "cancel_at_period_end", "cancel_at", "canceled_at", "current_period_end",
        "trial_end", "metadata",
    ),
    "invoice": (
        "customer", "subscription", "status", "amount_due", "amount_paid", "amount_remaining", "currency",
        "attempt_count", "next_payment_attempt", "billing_reason", "hosted_invoice_url",
    ),
}


class InvalidWebhook(Exception):
    """A delivery failed signature verification or is not a usable event.

    The message is a plain sentence that is safe to send back to the provider
    and to log: it never contains the secret or the body.
    """


class Outcome(str, enum.Enum):
    """Result of processing one delivery."""

    APPLIED = "applied"
    """The event's effect is stored."""
    STALE = "stale"
    """A newer event already set the state, so nothing changed."""
    IGNORED = "ignored"
    """The event type changes no record here, so only the receipt is stored."""
    DUPLICATE = "duplicate"
    """The event id was received before, so nothing changed."""


# -- Stripe --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StripeEvent:
    """A verified Stripe event with ``data.object`` as plain JSON values in ``object``."""

    id: str
    type: str
    created: int
    object: dict[str, Any]


def verify_stripe_event(payload: bytes, signature_header: str | None, secret: str) -> StripeEvent:
    """Verify ``Stripe-Signature`` over the raw body and return the event.

    The check is ``stripe.Webhook.construct_event`` with the library's default
    tolerance (300 seconds in stripe 16). Raise :class:`InvalidWebhook` for a
    missing or wrong signature, a stale timestamp, or a body that is not a
    Stripe event.
    """
    if not signature_header:
        raise InvalidWebhook("Missing Stripe-Signature header")
    try:
        event = stripe.Webhook.construct_event(payload, signature_header, secret)
    except stripe.SignatureVerificationError as exc:
        raise InvalidWebhook(
            f"Invalid Stripe-Signature header: {exc.user_message}."
            " Check that STRIPE_WEBHOOK_SECRET is this endpoint's signing secret"
        ) from None
    except (ValueError, AttributeError):
        # ValueError: not UTF-8, not JSON, or a thin (v2) event notification.
        # AttributeError: the stripe library reads ``.get`` on a JSON value
        # that is not an object.
        raise InvalidWebhook("Invalid webhook body: expected a JSON Stripe event object") from None

    values = event.to_dict(for_json=True)
    event_id = values.get("id")
    event_type = values.get("type")
    created = values.get("created")
    data = values.get("data")
    if not _is_id(event_id):
        raise InvalidWebhook("Invalid Stripe event: missing id")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidWebhook("Invalid Stripe event: missing type")
    if not isinstance(created, int) or isinstance(created, bool):
        raise InvalidWebhook("Invalid Stripe event: missing created timestamp")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise InvalidWebhook("Invalid Stripe event: missing data.object")
    stripe_object = data["object"]
    if event_type in HANDLED_STRIPE_EVENTS and not _is_id(stripe_object.get("id")):
        raise InvalidWebhook(f"Invalid Stripe event: {event_type} has no data.object.id")
    return StripeEvent(id=event_id, type=event_type, created=created, object=stripe_object)


def stripe_event_version(event: StripeEvent) -> float:
    """Return the ``event_created`` value that orders this event's effect.

    It is the event's ``created`` (whole seconds) plus the stage of the event
    type in tenths: ``created`` 0, most updates 1, payments 2, ``deleted`` 3.
    """
    action = event.type.rsplit(".", 1)[-1]
    return event.created + _STRIPE_STAGES.get(action, _DEFAULT_STRIPE_STAGE) / 10


# -- WorkOS --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkOSEvent:
    """A verified WorkOS event, with ``created_at`` in POSIX seconds."""

    id: str
    type: str
    created_at: float
    data: dict[str, Any]


class WorkOSVerifier:
    """Verifies ``WorkOS-Signature: t=<ms>, v1=<hex>`` headers offline with the workos SDK.

    The header's ``v1`` is the hex HMAC-SHA256, keyed with the webhook
    secret, of ``"<t>.<raw body>"``. ``WorkOSClient.webhooks.verify_header``
    (workos 10.x) computes it locally, compares in constant time and rejects
    a ``t`` more than :data:`WORKOS_TOLERANCE_SECONDS` away from now. It sends
    no request. The client owns an idle HTTP connection pool, so call
    :meth:`close` when done.
    """

    def __init__(self, client_id: str, api_key: str, secret: str, *, tolerance: int = WORKOS_TOLERANCE_SECONDS) -> None:
        # Imported here because importing workos is slow (0.8 s in one
        # measurement) and only deployments with WorkOS configured need it.
        from workos import WorkOSClient

        self._client = WorkOSClient(api_key=api_key, client_id=client_id)
        self._secret = secret
        self._tolerance = tolerance

    def verify(self, payload: bytes, signature_header: str | None) -> WorkOSEvent:
        """Verify the signature and return the event, or raise :class:`InvalidWebhook`."""
        if not signature_header:
            raise InvalidWebhook("Missing WorkOS-Signature header")
        try:
            self._client.webhooks.verify_header(
                event_body=payload,
                event_signature=signature_header,
                secret=self._secret,
                tolerance=self._tolerance,
            )
        except (ValueError, TypeError, OverflowError) as exc:
            # ValueError covers every mismatch the SDK reports and a body that
            # is not UTF-8. TypeError means a non-ASCII signature, and
            # OverflowError a timestamp too large for a float.
            raise InvalidWebhook(f"Invalid WorkOS-Signature header: {_workos_reason(exc)}") from None
        return _parse_workos_event(payload)

    def close(self) -> None:
        self._client.close()


def _workos_reason(exc: Exception) -> str:
    reason = exc.args[0] if isinstance(exc, ValueError) and exc.args and isinstance(exc.args[0], str) else ""
    if reason.startswith(("Timestamp outside", "Signature hash does not match", "Unable to extract")):
        return f"{reason}. Check that WORKOS_WEBHOOK_SECRET is this endpoint's secret"
    return "expected t=<milliseconds>, v1=<hex HMAC-SHA256> signed with WORKOS_WEBHOOK_SECRET"


def _parse_workos_event(payload: bytes) -> WorkOSEvent:
    try:
        values = json.loads(payload)
    except ValueError:
        raise InvalidWebhook("Invalid webhook body: expected a JSON WorkOS event object") from None
    if not isinstance(values, dict):
        raise InvalidWebhook("Invalid webhook body: expected a JSON WorkOS event object")

    event_id = values.get("id")
    event_type = values.get("event")
    data = values.get("data")
    if not _is_id(event_id):
        raise InvalidWebhook("Invalid WorkOS event: missing id")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidWebhook("Invalid WorkOS event: missing event type")
    if not isinstance(data, dict):
        raise InvalidWebhook("Invalid WorkOS event: missing data object")
    created_at = _parse_time(values.get("created_at"))
    if created_at is None:
        created_at = _parse_time(data.get("updated_at"))
    if created_at is None:
        raise InvalidWebhook("Invalid WorkOS event: created_at must be an ISO 8601 time")

    if event_type in HANDLED_WORKOS_EVENTS:
        if not _is_id(data.get("id")):
            raise InvalidWebhook(f"Invalid WorkOS event: {event_type} has no data.id")
        if event_type.startswith("organization_membership."):
            for name in ("user_id", "organization_id"):
                if not _is_id(data.get(name)):
                    raise InvalidWebhook(f"Invalid WorkOS event: {event_type} has no data.{name}")
    return WorkOSEvent(id=event_id, type=event_type, created_at=created_at, data=data)


# -- applying events ---------------------------------------------------------------------------


class WebhookProcessor:
    """Records receipts and applies verified events to the store.

    Every method is safe to call concurrently. Deliveries that touch the same
    object in this process are serialized by a lock. Stripe effects are
    atomic in the store itself (``apply_billing_record``).
    """

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._locks = [asyncio.Lock() for _ in range(LOCK_STRIPES)]

    async def process_stripe(self, event: StripeEvent) -> Outcome:
        """Apply a Stripe event once. A store error is raised again after the receipt is removed."""
        return await self._process("stripe", event.id, lambda: self._apply_stripe(event))

    async def process_workos(self, event: WorkOSEvent) -> Outcome:
        """Apply a WorkOS event once. A store error is raised again after the receipt is removed."""
        return await self._process("workos", event.id, lambda: self._apply_workos(event))

    async def _process(self, provider: str, event_id: str, apply: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """Apply an event once; the receipt is written only after the effect.

        A process killed between the effect and the receipt leaves no
        receipt, so the provider's retry applies the event again. Every
        effect is idempotent and ignores older state, so that is harmless,
        whereas a receipt written first would turn that retry into a
        duplicate and lose the event.
        """
        if await self._store.has_webhook_receipt(provider, event_id):
            return Outcome.DUPLICATE
        outcome = await apply()
        if not await self._store.record_webhook_receipt(provider, event_id, self._clock.time()):
            # A concurrent delivery of the same event applied it too; both effects are the same.
            return Outcome.DUPLICATE
        return outcome

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks[zlib.crc32(key.encode("utf-8")) % LOCK_STRIPES]

    # -- Stripe -------------------------------------------------------------------------------

    async def _apply_stripe(self, event: StripeEvent) -> Outcome:
        object_type = HANDLED_STRIPE_EVENTS.get(event.type)
        if object_type is None:
            return Outcome.IGNORED
        stripe_object = event.object
        object_id = stripe_object["id"]
        customer_id = object_id if object_type == "customer" else _stripe_id(stripe_object.get("customer"))

        async with self._lock(f"stripe:{object_type}:{object_id}"):
            organization_id = await self._stripe_organization(object_type, stripe_object, customer_id)
            record = BillingRecord(
                object_type=object_type,
                object_id=object_id,
                organization_id=organization_id,
                status=_stripe_status(event, object_type),
                data=_stripe_summary(event, object_type),
                event_id=event.id,
                event_created=stripe_event_version(event),
                updated_at=self._clock.time(),
            )
            stored = await self._store.apply_billing_record(record)

        if organization_id is None:
            log.warning(
                "Stripe event %s (%s) names no organization: %s %s is stored without one",
                event.id, event.type, object_type, object_id,
            )
        elif object_type != "customer":
            if customer_id is not None:
                await self._attach_to_organization("customer", customer_id, organization_id, event)
            subscription_id = _stripe_id(stripe_object.get("subscription"))
            if object_type == "checkout_session" and subscription_id is not None:
                await self._attach_to_organization("subscription", subscription_id, organization_id, event)
        return Outcome.APPLIED if stored else Outcome.STALE

    async def _stripe_organization(
        self, object_type: str, stripe_object: dict[str, Any], customer_id: str | None
    ) -> str | None:
        """Return the organization of a Stripe object.

        In order: the object's ``metadata.organization_id`` (or
        ``organizationId``), the organization its stored record already has,
        that of its customer's record, and for an invoice that of its
        subscription's record.
        """
        organization_id = _metadata_organization(stripe_object)
        if organization_id is not None:
            return organization_id

        candidates = [(object_type, stripe_object["id"])]
        if customer_id is not None:
            candidates.append(("customer", customer_id))
        subscription_id = _invoice_subscription(stripe_object) if object_type == "invoice" else None
        if subscription_id is not None:
            candidates.append(("subscription", subscription_id))
        for candidate_type, candidate_id in candidates:
            stored = await self._store.get_billing_record(candidate_type, candidate_id)
            if stored is not None and stored.organization_id is not None:
                return stored.organization_id
        return None

    async def _attach_to_organization(
        self, object_type: str, object_id: str, organization_id: str, event: StripeEvent
    ) -> None:
        """Attach a related Stripe object's record to ``organization_id`` if it has no organization yet.

        An unknown customer gets a placeholder record with ``event_created``
        0, so the customer's own events, whatever their age, replace its data
        and keep the organization. An unknown subscription gets nothing: its
        own events find the organization through its customer.
        """
        async with self._lock(f"stripe:{object_type}:{object_id}"):
            stored = await self._store.get_billing_record(object_type, object_id)
            if stored is None:
                if object_type != "customer":
                    return
                stored = BillingRecord(
                    object_type=object_type,
                    object_id=object_id,
                    organization_id=None,
                    status=None,
                    data={"linked_by_event": event.id},
                    event_id=event.id,
                    event_created=0.0,
                    updated_at=self._clock.time(),
                )
            if stored.organization_id == organization_id:
                return
            if stored.organization_id is not None:
                log.warning(
                    "Stripe event %s names organization %s, but %s %s belongs to %s; it stays there",
                    event.id, organization_id, object_type, object_id, stored.organization_id,
                )
                return
            stored.organization_id = organization_id
            stored.updated_at = self._clock.time()
            # The same event_created replaces the stored record. A newer one
            # stored meanwhile is kept, and its next event finds the
            # organization through the customer.
            await self._store.apply_billing_record(stored)

    # -- WorkOS -------------------------------------------------------------------------------

    async def _apply_workos(self, event: WorkOSEvent) -> Outcome:
        if event.type not in HANDLED_WORKOS_EVENTS:
            return Outcome.IGNORED
        if event.type.startswith("user."):
            return await self._apply_user(event)
        if event.type.startswith("organization_membership."):
            return await self._apply_membership(event)
        return await self._apply_organization(event)

    # NOTE: the version check and the write below are two store calls. The
    # lock orders them within one process, but two processes that receive
    # events of the same object at the same moment can still let the older
    # one win.

    async def _apply_user(self, event: WorkOSEvent) -> Outcome:
        """Apply ``user.*`` to the account whose id is the WorkOS user id (the OAuth ``sub``).

        ``user.deleted`` disables the account. ``created`` and ``updated``
        never re-enable one, so an operator's ``disabled`` stays in force.
        """
        data = event.data
        user_id = data["id"]
        async with self._lock(f"workos:user:{user_id}"):
            account = await self._store.get_account(user_id)
            if _is_older(event, account.updated_at if account else None):
                return Outcome.STALE
            if account is None:
                account = Account(
                    id=user_id, kind="workos", created_at=_parse_time(data.get("created_at")) or event.created_at
                )
            account.email = _optional_text(data.get("email"))
            account.name = _full_name(data)
            account.external_id = _optional_text(data.get("external_id"))
            if event.type == "user.deleted":
                account.disabled = True
            account.updated_at = event.created_at
            await self._store.put_account(account)
        return Outcome.APPLIED

    async def _apply_organization(self, event: WorkOSEvent) -> Outcome:
        """Apply ``organization.*``. ``organization.deleted`` marks the organization deleted for good."""
        data = event.data
        organization_id = data["id"]
        async with self._lock(f"workos:organization:{organization_id}"):
            organization = await self._store.get_organization(organization_id)
            if _is_older(event, organization.updated_at if organization else None):
                return Outcome.STALE
            if organization is None:
                organization = Organization(
                    id=organization_id,
                    name=organization_id,
                    created_at=_parse_time(data.get("created_at")) or event.created_at,
                )
            organization.name = _optional_text(data.get("name")) or organization.name
            organization.external_id = _optional_text(data.get("external_id"))
            if event.type == "organization.deleted":
                organization.deleted = True
            organization.updated_at = event.created_at
            await self._store.put_organization(organization)
        return Outcome.APPLIED

    async def _apply_membership(self, event: WorkOSEvent) -> Outcome:
        """Apply ``organization_membership.*`` to the (organization, account) membership.

        ``deleted`` keeps the record with status ``inactive`` rather than
        removing it, so its time still rejects an older ``created`` or
        ``updated`` that arrives late. Only ``active`` grants access; a
        missing status counts as ``inactive``.
        """
        data = event.data
        organization_id, account_id = data["organization_id"], data["user_id"]
        async with self._lock(f"workos:membership:{organization_id}:{account_id}"):
            membership = await self._store.get_membership(organization_id, account_id)
            if _is_older(event, membership.updated_at if membership else None):
                return Outcome.STALE
            status = _optional_text(data.get("status")) or "inactive"
            if event.type == "organization_membership.deleted":
                status = "inactive"
            role = data.get("role")
            await self._store.put_membership(
                Membership(
                    organization_id=organization_id,
                    account_id=account_id,
                    status=status,
                    role=_optional_text(role.get("slug")) if isinstance(role, dict) else _optional_text(role),
                    external_id=data["id"],
                    updated_at=event.created_at,
                )
            )
        return Outcome.APPLIED


# -- helpers -----------------------------------------------------------------------------------


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


def _is_older(event: WorkOSEvent, stored_version: float | None) -> bool:
    """Return whether a newer event wrote the stored record. An event with the same time is applied again."""
    return stored_version is not None and event.created_at < stored_version


def _parse_time(value: Any) -> float | None:
    """Return POSIX seconds of an ISO 8601 time such as ``2026-12-04T20:11:38.155Z``, or ``None``."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return moment.timestamp()


def _optional_text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _full_name(data: dict[str, Any]) -> str | None:
    parts = [_optional_text(data.get("first_name")), _optional_text(data.get("last_name"))]
    name = " ".join(part for part in parts if part)
    return name or None


def _stripe_id(value: Any) -> str | None:
    """Return the id of a Stripe reference, which is an id string or an expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if _is_id(value) else None


def _metadata_organization(stripe_object: dict[str, Any]) -> str | None:
    metadata = stripe_object.get("metadata")
    if not isinstance(metadata, dict):
        return None
    for name in ("organization_id", "organizationId"):
        value = metadata.get(name)
        if _is_id(value):
            return value
    return None


def _invoice_subscription(invoice: dict[str, Any]) -> str | None:
    """Return an invoice's subscription id.

    API versions before 2025-03-31 put it in ``subscription``, later ones in
    ``parent.subscription_details.subscription``.
    """
    subscription_id = _stripe_id(invoice.get("subscription"))
    if subscription_id is not None:
        return subscription_id
    parent = invoice.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, dict) else None
    return _stripe_id(details.get("subscription")) if isinstance(details, dict) else None


def _stripe_status(event: StripeEvent, object_type: str) -> str | None:
    """Return the record status, which is the object's own except in two cases.

    A deleted customer is ``deleted`` (customers have no status), and an
    invoice of ``invoice.payment_failed`` is ``payment_failed``, because the
    invoice itself stays ``open`` while Stripe retries.
    """
    stripe_object = event.object
    if object_type == "customer":
        return "deleted" if event.type == "customer.deleted" or stripe_object.get("deleted") else "active"
    if event.type == "invoice.payment_failed":
        return "payment_failed"
    return _optional_text(stripe_object.get("status"))


def _stripe_summary(event: StripeEvent, object_type: str) -> dict[str, Any]:
    """Return the fields of the Stripe object an operator needs, plus the event type."""
    stripe_object = event.object
    summary: dict[str, Any] = {"event_type": event.type}
    for name in _STRIPE_SUMMARY_FIELDS[object_type]:
        if name in stripe_object:
            value = stripe_object[name]
            summary[name] = _stripe_id(value) if name in ("customer", "subscription") else value
    if object_type == "invoice" and summary.get("subscription") is None:
        summary["subscription"] = _invoice_subscription(stripe_object)
    if object_type == "subscription":
        items = stripe_object.get("items")
        item_list = items.get("data") if isinstance(items, dict) else None
        if isinstance(item_list, list):
            summary["price_ids"] = [
                _stripe_id(item.get("price")) for item in item_list if isinstance(item, dict)
            ]
    return summary
