"""The base request handler: JSON errors, client address, rate limits.

Every route handler derives from :class:`BaseHandler`. Application state
(the :class:`~executor_tornado.app.Service`) reaches handlers through
``self.settings["service"]``, never through module globals.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import tornado.web

from executor_tornado.logs import new_request_id, request_id_var, valid_request_id
from executor_tornado.ratelimit import client_ip, retry_after_header

log = logging.getLogger("executor_tornado.http")


class BaseHandler(tornado.web.RequestHandler):
    """Adds JSON bodies, ``{"error": ...}`` errors and the rate-limit check."""

    request_id: str = "-"

    @property
    def service(self) -> Any:
        return self.settings["service"]

    async def _execute(self, transforms: Any, *args: bytes, **kwargs: bytes) -> None:
        """Run the request with its id in the logging context and counted as in progress.

        Tornado runs ``_execute`` (prepare, the verb method, finish) as one
        task per request, so the context variable set here reaches every line
        the request logs and no other request's lines. The service's graceful
        shutdown waits for the count to reach zero.
        """
        supplied = self.request.headers.get("X-Request-Id")
        self.request_id = supplied if valid_request_id(supplied) else new_request_id()
        self.set_header("X-Request-Id", self.request_id)
        request_id_var.set(self.request_id)
        self.service.request_started()
        try:
            await super()._execute(transforms, *args, **kwargs)
        finally:
            self.service.request_ended()

    def set_default_headers(self) -> None:
        self.set_header("Server", "executor-tornado")
        self.clear_header("Content-Type")
        if self.request_id != "-":
            self.set_header("X-Request-Id", self.request_id)

    def check_xsrf_cookie(self) -> None:
        """API routes take no cookies, so there is nothing for XSRF to protect."""

    @property
    def client_address(self) -> str:
        cached = getattr(self, "_client_address", None)
        if cached is None:
            cached = client_ip(self.request.remote_ip or "", self.request.headers, self.service.trusted_networks)
            self._client_address = cached
        return cached

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        """Finish with a JSON body (``body`` may be pre-serialized text)."""
        self.set_status(status)
        for name, value in (headers or {}).items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/json")
        self.finish(body if isinstance(body, (str, bytes)) else json.dumps(body, separators=(",", ":")))

    def send_error_json(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.send_json(status, {"error": message}, headers)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Render Tornado's own errors (404 of unknown routes, 405, 500) as JSON, without stack traces."""
        messages = {
            404: "Not found",
            405: "Method not allowed",
            500: "Internal server error",
        }
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": messages.get(status_code, self._reason)}))

    async def check_rate(self, route: str, per_minute: int) -> bool:
        """Take a token for this client on ``route``; send 429 and return ``False`` when over the limit."""
        decision = await self.service.limiter.check_route(
            route, self.client_address, self.request.headers.get("User-Agent", ""), per_minute=per_minute
        )
        if decision.allowed:
            return True
        self.service.metrics.rate_limited(route)
        self.send_error_json(429, "Rate limit exceeded", {"Retry-After": retry_after_header(decision)})
        return False

    def bearer_token(self) -> str | None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()


@tornado.web.stream_request_body
class BoundedBodyHandler(BaseHandler):
    """A handler whose request body is capped at ``max_body_bytes``: larger bodies get a JSON 413.

    The body is streamed, so Tornado's connection-level size check (an empty
    400 that closes the connection) never runs before this one. Verb methods read
    the body as :attr:`body`, not ``self.request.body``.
    """

    async def prepare(self) -> None:
        self._body_chunks: list[bytes] = []
        self._body_size = 0
        self._body_rejected = False
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > self.service.settings.max_body_bytes:
            self._reject_body()

    def data_received(self, chunk: bytes) -> None:
        if self._body_rejected:
            return
        self._body_size += len(chunk)
        if self._body_size > self.service.settings.max_body_bytes:
            self._body_chunks.clear()
            self._reject_body()
            return
        self._body_chunks.append(chunk)

    def _reject_body(self) -> None:
        self._body_rejected = True
        limit = self.service.settings.max_body_bytes
        self.send_error_json(413, f"Request body too large: the limit is {limit} bytes")

    @property
    def body(self) -> bytes:
        """The whole request body; complete once a verb method runs."""
        return b"".join(self._body_chunks)


class NotFoundHandler(BaseHandler):
    """The default handler: a JSON 404 for every unknown path and method."""

    def prepare(self) -> None:
        self.send_error_json(404, f"Not found: {self.request.path[:200]}")
