"""Webhook routes: ``POST /stripe/webhook`` and ``POST /workos/webhook``.

Each delivery goes through the same steps: rate limit (429), configuration
(404 self-hosted, 503 required mode), signature and body (400), then the
event is applied once (200, or 500 so the provider retries).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from executor_tornado.webhooks import InvalidWebhook, Outcome, WebhookProcessor, WorkOSVerifier, verify_stripe_event
from handlers.base import BoundedBodyHandler

log = logging.getLogger("executor_tornado.webhooks")

STRIPE_PATH = "/stripe/webhook"
WORKOS_PATH = "/workos/webhook"

WEBHOOK_RATE_PER_MINUTE = 600
"""Requests per minute per client on each webhook route: five times the default MCP budget, because providers deliver in bursts."""


def webhook_processor(service) -> WebhookProcessor:
    """Return the service's processor, created on first use (its locks must be shared by all requests)."""
    processor = service.extensions.get("webhook_processor")
    if processor is None:
        processor = WebhookProcessor(service.store, service.clock)
        service.extensions["webhook_processor"] = processor
    return processor


def workos_verifier(service) -> WorkOSVerifier | None:
    """Return the service's WorkOS verifier, or ``None`` unless all three WorkOS settings are set."""
    settings = service.settings
    if not (settings.workos_client_id and settings.workos_api_key and settings.workos_webhook_secret):
        return None
    verifier = service.extensions.get("workos_verifier")
    if verifier is None:
        verifier = WorkOSVerifier(settings.workos_client_id, settings.workos_api_key, settings.workos_webhook_secret)
        service.extensions["workos_verifier"] = verifier

        async def close_verifier() -> None:
            service.extensions.pop("workos_verifier", None)
            verifier.close()

        service.extensions.setdefault("closers", []).append(close_verifier)
    return verifier


class WebhookHandler(BoundedBodyHandler):
    """Shared steps of the webhook routes. Subclasses verify the delivery and pick the processor method."""

    provider = ""

    async def _deliver(self, event_id: str, event_type: str, process: Callable[[], Awaitable[Outcome]]) -> None:
        try:
            outcome = await process()
        except Exception:
            log.exception(
                "Processing %s event %s (%s) failed; its receipt was removed so a retry applies it",
                self.provider, event_id, event_type,
            )
            self.send_error_json(
                500, f"Processing {self.provider} event {event_id} failed; it is applied when {self.provider} retries it"
            )
            return
        log.info("%s event %s (%s): %s", self.provider, event_id, event_type, outcome.value)
        self.send_json(200, {"received": True, "eventId": event_id, "outcome": outcome.value})

    def _reject(self, route: str, failure: InvalidWebhook) -> None:
        self.service.log_auth_failure(route, str(failure))
        self.send_error_json(400, str(failure))


class StripeWebhookHandler(WebhookHandler):
    """``POST /stripe/webhook``: Stripe events, verified with ``STRIPE_WEBHOOK_SECRET``."""

    provider = "Stripe"

    async def post(self) -> None:
        if not await self.check_rate(STRIPE_PATH, WEBHOOK_RATE_PER_MINUTE):
            return
        settings = self.service.settings
        if not settings.stripe_webhook_secret:
            if settings.oauth_required:
                self.send_error_json(503, "Stripe webhooks must be configured for cloud deployments: set STRIPE_WEBHOOK_SECRET")
            else:
                self.send_error_json(404, "Stripe webhooks are not configured: set STRIPE_WEBHOOK_SECRET")
            return

        try:
            event = verify_stripe_event(
                self.body, self.request.headers.get("Stripe-Signature"), settings.stripe_webhook_secret
            )
        except InvalidWebhook as failure:
            self._reject(STRIPE_PATH, failure)
            return

        processor = webhook_processor(self.service)
        await self._deliver(event.id, event.type, lambda: processor.process_stripe(event))


class WorkOSWebhookHandler(WebhookHandler):
    """``POST /workos/webhook``: WorkOS events, verified with ``WORKOS_WEBHOOK_SECRET``.

    The route exists only when ``WORKOS_CLIENT_ID``, ``WORKOS_API_KEY`` and
    ``WORKOS_WEBHOOK_SECRET`` are all set. Otherwise it returns 404, or 503 in
    required mode.
    """

    provider = "WorkOS"

    async def post(self) -> None:
        if not await self.check_rate(WORKOS_PATH, WEBHOOK_RATE_PER_MINUTE):
            return
        verifier = workos_verifier(self.service)
        if verifier is None:
            names = "WORKOS_CLIENT_ID, WORKOS_API_KEY and WORKOS_WEBHOOK_SECRET"
            if self.service.settings.oauth_required:
                self.send_error_json(503, f"WorkOS webhooks must be configured for cloud deployments: set {names}")
            else:
                self.send_error_json(404, f"WorkOS webhooks are not configured: set {names}")
            return

        try:
            event = verifier.verify(self.body, self.request.headers.get("WorkOS-Signature"))
        except InvalidWebhook as failure:
            self._reject(WORKOS_PATH, failure)
            return

        processor = webhook_processor(self.service)
        await self._deliver(event.id, event.type, lambda: processor.process_workos(event))


default_handlers = [
    (STRIPE_PATH, StripeWebhookHandler),
    (WORKOS_PATH, WorkOSWebhookHandler),
]
