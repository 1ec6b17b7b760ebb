"""The four MCP Streamable HTTP endpoints.

The handler does the HTTP part of every MCP request, in the order the
service promises: rate limit (429), ``workspaceId`` and authentication
(400, 401, 403, 503), then hands the request to
:class:`~executor_tornado.mcp.transport.McpTransport` for session lookup and
the transport rules. Bodies are streamed, so an oversized one gets 413
without being buffered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import tornado.web
from tornado.iostream import StreamClosedError

from executor_tornado.identity import AuthFailure, authenticate_api_key, authorize_oauth
from executor_tornado.mcp.transport import McpCaller, McpHttpRequest
from executor_tornado.oauth import TokenRejected
from handlers.base import BaseHandler
from handlers.discovery import RESOURCE_METADATA_PATH


@tornado.web.stream_request_body
class McpHandler(BaseHandler):
    """``POST``/``GET``/``DELETE`` on an MCP path; ``auth`` is ``"oauth"`` or ``"api_key"``."""

    def initialize(self, auth: str) -> None:
        self.auth = auth
        self.caller: McpCaller | None = None
        self._chunks: list[bytes] = []
        self._body_bytes = 0
        self._rejected = False
        self._closed = asyncio.Event()

    # -- request phase: checks in the promised order ------------------------------

    async def prepare(self) -> None:
        if self.request.method not in ("POST", "GET", "DELETE"):
            self.set_header("Allow", "GET, POST, DELETE")
            self._reject(405, "Method not allowed: use POST, GET or DELETE")
            return
        if not await self.check_rate(self.request.path, self.service.settings.mcp_rate_per_minute):
            self._rejected = True
            return
        if self.auth == "oauth":
            caller = await self._authenticate_oauth()
        else:
            caller = await self._authenticate_api_key()
        if caller is None:
            return
        self.caller = caller

        declared = self.request.headers.get("Content-Length")
        limit = self.service.settings.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self._reject(413, f"Request body too large: the limit is {limit} bytes")

    def data_received(self, chunk: bytes) -> None:
        if self._rejected:
            return
        self._body_bytes += len(chunk)
        if self._body_bytes > self.service.settings.max_body_bytes:
            self._chunks.clear()
            self._reject(413, f"Request body too large: the limit is {self.service.settings.max_body_bytes} bytes")
            return
        self._chunks.append(chunk)

    def _reject(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._rejected = True
        self.send_json(status, {"error": message}, headers)

    def _workspace_id(self) -> str | None:
        workspace_id = self.get_query_argument("workspaceId", None)
        if not workspace_id or len(workspace_id) > 200:
            self._reject(400, "Missing workspaceId query parameter: call this endpoint as ...?workspaceId=<id>")
            return None
        return workspace_id

    async def _authenticate_api_key(self) -> McpCaller | None:
        workspace_id = self._workspace_id()
        if workspace_id is None:
            return None
        api_keys = self.service.keys.api_keys
        if api_keys is None:
            self._reject(503, "API key signing is not configured: set MCP_API_KEY_SECRET")
            return None
        key = self.request.headers.get("X-API-Key") or self.bearer_token()
        if not key:
            self._reject(401, "Missing API key: send it in X-API-Key or Authorization: Bearer")
            return None
        try:
            return await authenticate_api_key(self.service.store, api_keys, key.strip(), workspace_id)
        except AuthFailure as failure:
            if failure.status == 401:
                self.service.log_auth_failure(self.request.path, failure.message)
            self._reject(failure.status, failure.message)
            return None

    async def _authenticate_oauth(self) -> McpCaller | None:
        settings = self.service.settings
        verifier = self.service.oauth_verifier
        if verifier is None:
            message = (
                "MCP OAuth must be configured for cloud deployments"
                if settings.oauth_required
                else "MCP OAuth is not configured"
            )
            self._reject(503, message)
            return None
        token = self.bearer_token()
        if token is None:
            self._reject(401, "Missing bearer token", {"WWW-Authenticate": self._challenge(error=False)})
            return None
        try:
            principal = await verifier.verify(token)
        except TokenRejected as exc:
            self.service.log_auth_failure(self.request.path, str(exc))
            self._reject(
                401, "Invalid or expired bearer token", {"WWW-Authenticate": self._challenge(error=True)}
            )
            return None
        workspace_id = self._workspace_id()
        if workspace_id is None:
            return None
        try:
            return await authorize_oauth(self.service.store, principal, workspace_id)
        except AuthFailure as failure:
            headers = {"WWW-Authenticate": self._challenge(error=True)} if failure.status == 401 else None
            self._reject(failure.status, failure.message, headers)
            return None

    def _challenge(self, *, error: bool) -> str:
        """Build the RFC 9728 challenge naming the path-inserted metadata URL of the called resource."""
        query = f"?{self.request.query}" if self.request.query else ""
        url = f"{self.service.settings.base_url}{RESOURCE_METADATA_PATH}{self.request.path}{query}"
        challenge = f'Bearer resource_metadata="{url}"'
        if error:
            challenge += ', error="invalid_token"'
        return challenge

    # -- verbs ------------------------------------------------------------------------

    async def post(self) -> None:
        await self._dispatch()

    async def get(self) -> None:
        await self._dispatch()

    async def delete(self) -> None:
        await self._dispatch()

    async def _dispatch(self) -> None:
        if self._rejected or self._finished:
            return
        assert self.caller is not None
        request = McpHttpRequest(
            method=self.request.method or "",
            headers=self.request.headers,
            raw_headers=list(self.request.headers.get_all()),
            body=b"".join(self._chunks),
            caller=self.caller,
            peer_trusted=self.service.is_trusted_peer(self.request.remote_ip or ""),
        )
        await self.service.transport.handle(request, self)

    # -- Responder protocol -------------------------------------------------------------

    def send_empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.set_status(status)
        for name, value in (headers or {}).items():
            self.set_header(name, value)
        self.finish()

    def start_stream(self, headers: dict[str, str]) -> None:
        self.set_status(200)
        for name, value in headers.items():
            self.set_header(name, value)
        self.flush()

    async def write_frame(self, data: bytes) -> None:
        if self._closed.is_set():
            raise ConnectionError("client disconnected")
        self.write(data)
        flushed = self.flush()
        if not flushed.done():
            # Tornado 6 drops (never resolves) a pending flush when the
            # connection closes, so wait for the close as well.
            closed = asyncio.ensure_future(self._closed.wait())
            await asyncio.wait({flushed, closed}, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            if not flushed.done():
                raise ConnectionError("client disconnected")
        try:
            flushed.result()
        except StreamClosedError:
            raise ConnectionError("client disconnected") from None

    def finish_stream(self) -> None:
        if not self._finished and not self._closed.is_set():
            self.finish()

    def abort(self) -> None:
        self._closed.set()
        if self.request.connection is not None:
            self.request.connection.close()

    @property
    def closed(self) -> asyncio.Event:
        return self._closed

    def on_connection_close(self) -> None:
        # Tornado's own handler fails the pending body future, so a request
        # cut off mid-upload (body timeout, client gone) ends its coroutine.
        super().on_connection_close()
        self._closed.set()


def mcp_routes() -> list[tuple[str, Any, dict[str, str]]]:
    return [
        (r"/v1/mcp", McpHandler, {"auth": "oauth"}),
        (r"/mcp", McpHandler, {"auth": "oauth"}),
        (r"/v1/mcp/anonymous", McpHandler, {"auth": "api_key"}),
        (r"/mcp/anonymous", McpHandler, {"auth": "api_key"}),
    ]


default_handlers = mcp_routes()
