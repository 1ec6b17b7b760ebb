"""The MCP Streamable HTTP transport: session rules, both protocol eras.

:class:`McpTransport` receives a request whose caller the MCP handler has
already authenticated. It applies the transport rules:
session lookup, DNS-rebinding checks, content negotiation, the session state
machine of :mod:`executor_tornado.mcp.state`, and the choice between a JSON
and an SSE response. Requests whose ``MCP-Protocol-Version`` names the
stateless 2026-07-28 revision take :meth:`McpTransport._handle_modern`: one
self-contained POST, no session.

Example::

    transport = McpTransport(runtime, settings, registry)
    await transport.start()
    await transport.handle(McpHttpRequest(...), responder)
    await transport.shutdown()
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from mcp.server.connection import Connection
from mcp.server.runner import modern_error_data, serve_one
from mcp.shared.dispatcher import CallOptions
from mcp.shared.exceptions import NoBackChannelError
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    InboundLadderRejection,
    classify_inbound_request,
    find_duplicated_routing_header,
    unsupported_protocol_version_rejection,
    validate_mcp_param_headers,
)
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params
from mcp.shared.message import ServerMessageMetadata
from mcp.shared.transport_context import TransportContext
from mcp_types import (
    HEADER_MISMATCH,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    PARSE_ERROR,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    ProgressToken,
    RequestId,
    jsonrpc_message_adapter,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION
from pydantic import ValidationError

from executor_tornado.mcp.session import LiveSession, PendingRequest, SessionRuntime, message_json, parse_event_id
from executor_tornado.mcp.sse import SSE_HEADERS, Responder, SseStream, event_frame, retry_frame
from executor_tornado.mcp.state import Rejected, SessionEvent, SessionState, next_state
from store.base import DuplicateError
from store.records import McpSessionRecord

__all__ = ["McpCaller", "McpHttpRequest", "McpTransport"]

log = logging.getLogger("executor_tornado.mcp")

SESSION_ID_HEADER = "Mcp-Session-Id"
PROTOCOL_VERSION_HEADER = "MCP-Protocol-Version"
SESSION_NOT_FOUND = -32001
SESSION_CAP_RETRY_AFTER_SECONDS = 30
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")


@dataclass(frozen=True)
class McpCaller:
    """The authenticated identity behind an MCP request; tool handlers get it as ``ctx.request``.

    ``principal`` is what sessions are bound to: issuer and subject for
    OAuth, account and workspace for API keys, never the credential bytes.
    """

    principal: str
    account_id: str
    workspace_id: str
    auth_kind: str
    session_id: str | None = None
    protocol_version: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class McpHttpRequest:
    """The parts of one HTTP request that the transport reads."""

    method: str
    headers: Mapping[str, str]
    raw_headers: list[tuple[str, str]]
    body: bytes
    caller: McpCaller
    peer_trusted: bool = False


def _error_body(code: int, message: str, request_id: RequestId | None = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _accepts(headers: Mapping[str, str]) -> tuple[bool, bool]:
    types = [part.split(";")[0].strip().lower() for part in headers.get("Accept", "").split(",")]
    wildcard = "*/*" in types
    has_json = wildcard or "application/json" in types or "application/*" in types
    has_sse = wildcard or "text/event-stream" in types or "text/*" in types
    return has_json, has_sse


def _is_json_content(headers: Mapping[str, str]) -> bool:
    return headers.get("Content-Type", "").split(";")[0].strip().lower() == "application/json"


class McpTransport:
    """Streamable HTTP for every MCP endpoint; owns the live sessions of this process."""

    def __init__(self, runtime: SessionRuntime, settings: Any, registry: Any = None) -> None:
        self._runtime = runtime
        self._settings = settings
        self._registry = registry
        self.live: dict[str, LiveSession] = {}
        self._creation_lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._stopping = False
        self._allowed_hosts = self._build_allowed_hosts()
        self._allowed_origins = self._build_allowed_origins()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._reaper = asyncio.ensure_future(self._reap_forever())

    async def shutdown(self) -> None:
        """End every stream with a retry hint and stop the kernels.

        Session records stay open in the store, so clients reconnect (to this
        service after a restart, or to another process) and keep their session.
        """
        self._stopping = True
        if self._reaper is not None:
            self._reaper.cancel()
        sessions = list(self.live.values())
        self.live.clear()
        await asyncio.gather(*(live.close(retry_hint=True) for live in sessions), return_exceptions=True)

    def end_get_streams(self) -> None:
        """Refuse new sessions and end every GET stream with a retry hint.

        The first step of a graceful shutdown: clients reconnect their GET
        streams elsewhere while POST requests in flight run to completion.
        """
        self._stopping = True
        final = retry_frame(self._runtime.sse_retry_ms)
        for live in self.live.values():
            if live.get_stream is not None:
                live.get_stream.close(final)

    @property
    def in_flight_count(self) -> int:
        """Number of requests that no kernel of this process has responded to yet."""
        return sum(len(live.pending) for live in self.live.values())

    @property
    def open_stream_count(self) -> int:
        count = 0
        for live in self.live.values():
            if live.get_stream is not None and live.get_stream.is_open:
                count += 1
            count += sum(1 for p in live.pending.values() if p.stream is not None and p.stream.is_open)
        return count

    # -- DNS rebinding ------------------------------------------------------------

    def _build_allowed_hosts(self) -> set[str]:
        hosts = {self._settings.public_host}
        hosts.update(h.lower() for h in self._settings.allowed_hosts)
        listen = self._settings.host
        if listen in ("127.0.0.1", "::1", "localhost") or listen.startswith("127."):
            port = self._settings.port
            for name in LOOPBACK_NAMES:
                bracketed = f"[{name}]" if name == "::1" else name
                hosts.add(bracketed)
                hosts.add(f"{bracketed}:{port}")
        return hosts

    def _build_allowed_origins(self) -> set[str]:
        if self._settings.allowed_origins:
            return {origin.rstrip("/").lower() for origin in self._settings.allowed_origins}
        origins = {self._settings.base_url.lower()}
        for host in self._allowed_hosts:
            if any(host.startswith(name) for name in LOOPBACK_NAMES):
                origins.add(f"http://{host}")
                origins.add(f"https://{host}")
        return origins

    def refresh_allowed_hosts(self, port: int) -> None:
        """Recompute loopback names once the real port is known (``port=0`` in tests)."""
        self._settings = self._settings.model_copy(update={"port": port})
        self._allowed_hosts = self._build_allowed_hosts()
        self._allowed_origins = self._build_allowed_origins()

    def _check_host_and_origin(self, request: McpHttpRequest) -> tuple[int, str] | None:
        host = request.headers.get("Host", "").strip().lower()
        if request.peer_trusted and request.headers.get("X-Forwarded-Host"):
            host = request.headers["X-Forwarded-Host"].split(",")[0].strip().lower()
        if host not in self._allowed_hosts:
            return 421, f"Misdirected Request: host {host[:100]!r} is not served here"
        origin = request.headers.get("Origin")
        if origin is not None and origin.rstrip("/").lower() not in self._allowed_origins:
            return 403, f"Forbidden: origin {origin[:100]!r} is not allowed"
        return None

    # -- entry -----------------------------------------------------------------

    async def handle(self, request: McpHttpRequest, responder: Responder) -> None:
        """Respond to one MCP request whose caller passed rate limits and authentication."""
        session_id = request.headers.get(SESSION_ID_HEADER)
        live = None
        state = SessionState.CLOSED
        if session_id is not None:
            found = await self._find_session(session_id, request.caller)
            if found is not None:
                live, state = found
            if live is None:
                responder.send_json(404, _error_body(SESSION_NOT_FOUND, "Session not found: it is unknown, expired or was terminated; initialize a new session"))
                return

        rejection = self._check_host_and_origin(request)
        if rejection is not None:
            responder.send_json(rejection[0], _error_body(INVALID_REQUEST, rejection[1]))
            return

        version = request.headers.get(PROTOCOL_VERSION_HEADER)
        if version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
            if live is None:
                await self._handle_modern(request, responder)
                return
            responder.send_json(
                400,
                _error_body(
                    INVALID_REQUEST,
                    f"Bad Request: unsupported MCP-Protocol-Version {version[:40]!r}; "
                    f"supported: {', '.join(HANDSHAKE_PROTOCOL_VERSIONS)}",
                ),
            )
            return

        if request.method == "POST":
            await self._handle_post(request, responder, live, state)
        elif request.method == "GET":
            await self._handle_get(request, responder, live, state)
        elif request.method == "DELETE":
            await self._handle_delete(responder, live, state)
        else:
            responder.send_empty(405, {"Allow": "GET, POST, DELETE"})

    async def _find_session(self, session_id: str, caller: McpCaller) -> tuple[LiveSession, SessionState] | None:
        """Return the caller's open session and its stored state, restoring it if this process lacks it.

        The state read here serves the whole request: the only other move of
        an open session (initializing to active) is idempotent.
        """
        if len(session_id) > 200:
            return None
        record = await self._runtime.store.get_mcp_session(session_id)
        if record is None or record.state == SessionState.CLOSED.value:
            live = self.live.pop(session_id, None)
            if live is not None:
                await live.close()
            return None
        if record.principal != caller.principal or record.workspace_id != caller.workspace_id:
            log.warning("MCP session %s presented by another principal; responding 404", session_id[:12])
            return None
        live = self.live.get(session_id)
        if live is None:
            if self._stopping:
                return None
            live = LiveSession(record, self._runtime)
            live.start(restored=True)
            self.live[session_id] = live
            log.info("Restored MCP session %s from the store", session_id[:12])
        return live, SessionState(record.state)

    # -- POST ----------------------------------------------------------------------

    def _check_post_basics(self, request: McpHttpRequest, responder: Responder) -> Any | None:
        has_json, has_sse = _accepts(request.headers)
        if not (has_json and has_sse):
            responder.send_json(
                406,
                _error_body(INVALID_REQUEST, "Not Acceptable: Accept must list both application/json and text/event-stream"),
            )
            return None
        if not _is_json_content(request.headers):
            responder.send_json(
                415, _error_body(INVALID_REQUEST, "Unsupported Media Type: Content-Type must be application/json")
            )
            return None
        try:
            decoded = json.loads(request.body)
        except (ValueError, RecursionError):
            responder.send_json(400, _error_body(PARSE_ERROR, "Parse error: the body is not valid JSON"))
            return None
        return decoded if decoded is not None else {}

    async def _handle_post(
        self, request: McpHttpRequest, responder: Responder, live: LiveSession | None, state: SessionState
    ) -> None:
        decoded = self._check_post_basics(request, responder)
        if decoded is None:
            return
        try:
            if isinstance(decoded, list):
                raise ValueError("batch")
            message = jsonrpc_message_adapter.validate_python(decoded, by_name=False)
        except (ValidationError, ValueError):
            responder.send_json(
                400, _error_body(INVALID_REQUEST, "Invalid Request: the body must be one JSON-RPC 2.0 message object")
            )
            return

        is_initialize = isinstance(message, JSONRPCRequest) and message.method == "initialize"
        if live is None:
            if not is_initialize:
                responder.send_json(
                    400,
                    _error_body(INVALID_REQUEST, "Bad Request: Mcp-Session-Id header is required; send initialize first"),
                )
                return
            await self._open_session(message, request, responder)
            return

        try:
            if is_initialize:
                next_state(state, SessionEvent.INITIALIZE)
            elif isinstance(message, JSONRPCNotification) and message.method == "notifications/initialized":
                next_state(state, SessionEvent.INITIALIZED)
                if state is SessionState.INITIALIZING:
                    await self._runtime.store.activate_mcp_session(live.id, self._runtime.clock.time())
            elif isinstance(message, JSONRPCRequest):
                next_state(state, SessionEvent.REQUEST)
            else:
                next_state(state, SessionEvent.NOTIFICATION)
        except Rejected as rejected:
            code = INVALID_REQUEST if rejected.status == 400 else SESSION_NOT_FOUND
            responder.send_json(rejected.status, _error_body(code, rejected.message))
            return

        # The negotiated version decides the stream format (priming events):
        # clients send older version headers on some requests, and the
        # header was already checked to be a supported handshake version.
        version = live.protocol_version
        caller = _with_session(request.caller, live.id, version)
        await self._touch(live)
        try:
            pending = await live.submit(message, caller, version)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            responder.send_json(404, _error_body(SESSION_NOT_FOUND, "Session not found: it was terminated"))
            return
        if pending is None:
            responder.send_empty(202)
            return
        await self._respond(live, pending, responder, {SESSION_ID_HEADER: live.id})

    async def _touch(self, live: LiveSession) -> None:
        now = self._runtime.clock.time()
        if now - live.last_store_touch > self._settings.session_idle_seconds / 4:
            live.last_store_touch = now
            await self._runtime.store.touch_mcp_session(live.id, now)

    async def _open_session(self, message: JSONRPCRequest, request: McpHttpRequest, responder: Responder) -> None:
        caller = request.caller
        async with self._creation_lock:
            if self._stopping or len(self.live) >= self._settings.max_sessions:
                log.warning("Rejecting a new MCP session: %d sessions are open in this process", len(self.live))
                responder.send_json(
                    503,
                    _error_body(INTERNAL_ERROR, "Service Unavailable: too many open sessions; retry later"),
                    {"Retry-After": str(SESSION_CAP_RETRY_AFTER_SECONDS)},
                )
                return
            open_for_principal = await self._runtime.store.count_open_mcp_sessions(principal=caller.principal)
            if open_for_principal >= self._settings.max_sessions_per_principal:
                log.warning("Rejecting a new MCP session: principal has %d open sessions", open_for_principal)
                responder.send_json(
                    503,
                    _error_body(
                        INTERNAL_ERROR,
                        "Service Unavailable: this identity has too many open sessions; "
                        "DELETE unused sessions or retry later",
                    ),
                    {"Retry-After": str(SESSION_CAP_RETRY_AFTER_SECONDS)},
                )
                return

            params = message.params or {}
            requested = params.get("protocolVersion")
            negotiated = requested if requested in HANDSHAKE_PROTOCOL_VERSIONS else LATEST_HANDSHAKE_VERSION
            now = self._runtime.clock.time()
            record = McpSessionRecord(
                id=secrets.token_urlsafe(32),
                principal=caller.principal,
                workspace_id=caller.workspace_id,
                protocol_version=negotiated,
                state=SessionState.INITIALIZING.value,
                created_at=now,
                last_seen_at=now,
                client_capabilities=params.get("capabilities") if isinstance(params.get("capabilities"), dict) else {},
                client_info=params.get("clientInfo") if isinstance(params.get("clientInfo"), dict) else {},
            )
            try:
                await self._runtime.store.insert_mcp_session(record)
            except DuplicateError:
                responder.send_json(500, _error_body(INTERNAL_ERROR, "Session id collision; retry"))
                return
            live = LiveSession(record, self._runtime)
            live.start(restored=False)
            self.live[record.id] = live

        pending = await live.submit(message, _with_session(caller, record.id, negotiated), negotiated)
        assert pending is not None
        await self._respond(live, pending, responder, {SESSION_ID_HEADER: record.id})
        if pending.response_json is not None and "error" in json.loads(pending.response_json):
            # The handshake failed, so no session was established.
            await self._close(live, "initialize failed")

    async def _respond(
        self, live: LiveSession, pending: PendingRequest, responder: Responder, headers: dict[str, str]
    ) -> None:
        window = self._settings.json_response_timeout_seconds
        try:
            await asyncio.wait_for(pending.decided.wait(), timeout=window)
        except asyncio.TimeoutError:
            await live.commit_sse(pending)

        if pending.mode == "json":
            responder.send_json(200, pending.response_json, headers)
            return
        if pending.mode != "sse":
            responder.send_json(404, _error_body(SESSION_NOT_FOUND, "Session not found: it was terminated"))
            return
        responder.start_stream({**SSE_HEADERS, **headers})
        stream = SseStream(
            responder,
            buffer_bytes=self._runtime.sse_buffer_bytes,
            keepalive_seconds=self._runtime.sse_keepalive_seconds,
        )
        live.attach_post_stream(pending, stream)
        await stream.run()
        live.last_activity = self._runtime.clock.time()

    # -- GET --------------------------------------------------------------------------

    async def _handle_get(
        self, request: McpHttpRequest, responder: Responder, live: LiveSession | None, state: SessionState
    ) -> None:
        _, has_sse = _accepts(request.headers)
        if not has_sse:
            responder.send_json(406, _error_body(INVALID_REQUEST, "Not Acceptable: Accept must list text/event-stream"))
            return
        if live is None:
            responder.send_json(
                400, _error_body(INVALID_REQUEST, "Bad Request: Mcp-Session-Id header is required for GET")
            )
            return
        try:
            next_state(state, SessionEvent.GET_STREAM)
        except Rejected as rejected:
            responder.send_json(rejected.status, _error_body(SESSION_NOT_FOUND, rejected.message))
            return

        stream = SseStream(
            responder,
            buffer_bytes=self._runtime.sse_buffer_bytes,
            keepalive_seconds=self._runtime.sse_keepalive_seconds,
        )
        parsed = parse_event_id(request.headers.get("Last-Event-ID") or "")
        if parsed is None and not await live.open_get_stream(stream):
            responder.send_json(409, _error_body(INVALID_REQUEST, "Conflict: this session already has an open GET stream"))
            return

        responder.start_stream({**SSE_HEADERS, SESSION_ID_HEADER: live.id})
        writer = asyncio.ensure_future(stream.run())
        try:
            if parsed is not None:
                await live.resume(request.headers["Last-Event-ID"], stream)
            await self._touch(live)
            await writer
        finally:
            if not writer.done():
                stream.close()
                await writer
            if live.get_stream is stream:
                live.get_stream = None
            live.last_activity = self._runtime.clock.time()

    # -- DELETE ------------------------------------------------------------------------

    async def _handle_delete(self, responder: Responder, live: LiveSession | None, state: SessionState) -> None:
        if live is None:
            responder.send_json(
                400, _error_body(INVALID_REQUEST, "Bad Request: Mcp-Session-Id header is required for DELETE")
            )
            return
        try:
            next_state(state, SessionEvent.DELETE)
        except Rejected as rejected:
            responder.send_json(rejected.status, _error_body(SESSION_NOT_FOUND, rejected.message))
            return
        closed = await self._close(live, "deleted by client")
        if not closed:
            responder.send_json(404, _error_body(SESSION_NOT_FOUND, "Session not found: it was already terminated"))
            return
        responder.send_empty(204)

    async def _close(self, live: LiveSession, reason: str) -> bool:
        closed = await self._runtime.store.close_mcp_session(live.id, self._runtime.clock.time(), reason)
        self.live.pop(live.id, None)
        await live.close()
        return closed

    # -- idle expiry ------------------------------------------------------------------

    async def _reap_forever(self) -> None:
        interval = min(30.0, max(0.05, self._settings.session_idle_seconds / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reap_idle()
            except Exception:
                log.exception("Idle session sweep failed")

    async def reap_idle(self) -> int:
        """Close sessions idle past the timeout; keep the store fresh for busy ones. Return how many closed."""
        now = self._runtime.clock.time()
        idle_seconds = self._settings.session_idle_seconds
        closed = 0
        for live in list(self.live.values()):
            if live.idle and now - live.last_activity >= idle_seconds:
                next_state(SessionState.ACTIVE, SessionEvent.IDLE_EXPIRY)
                await self._close(live, "idle timeout")
                closed += 1
            elif not live.idle and now - live.last_store_touch > idle_seconds / 4:
                live.last_store_touch = now
                await self._runtime.store.touch_mcp_session(live.id, now)
        for session_id in await self._runtime.store.close_idle_mcp_sessions(now - idle_seconds, now):
            live = self.live.pop(session_id, None)
            if live is not None:
                await live.close()
            closed += 1
        return closed

    # -- 2026-07-28 -----------------------------------------------------------------------

    async def _handle_modern(self, request: McpHttpRequest, responder: Responder) -> None:
        if request.method != "POST":
            responder.send_json(
                405,
                _error_body(INVALID_REQUEST, "Method Not Allowed: protocol version 2026-07-28 takes POST only"),
                {"Allow": "POST"},
            )
            return
        decoded = self._check_post_basics(request, responder)
        if decoded is None:
            return
        version = request.headers.get(PROTOCOL_VERSION_HEADER, "")

        if isinstance(decoded, dict) and "id" not in decoded:
            try:
                JSONRPCNotification.model_validate(decoded)
            except ValidationError:
                responder.send_json(400, _error_body(INVALID_REQUEST, "Body must be one JSON-RPC request or notification object"))
                return
            unsupported = unsupported_protocol_version_rejection(version)
            if unsupported is not None:
                responder.send_json(400, _error_body(unsupported.code, unsupported.message))
                return
            responder.send_empty(202)
            return
        try:
            message = JSONRPCRequest.model_validate(decoded)
        except ValidationError:
            responder.send_json(400, _error_body(INVALID_REQUEST, "Body must be one JSON-RPC request or notification object"))
            return

        duplicated = find_duplicated_routing_header(request.raw_headers)
        if duplicated is not None:
            self._send_rejection(
                responder, InboundLadderRejection(code=HEADER_MISMATCH, message=f"{duplicated} header appears more than once"), message.id
            )
            return
        lowered = {key.lower(): value for key, value in request.headers.items()}
        verdict = classify_inbound_request(decoded, headers=lowered)
        if isinstance(verdict, InboundLadderRejection):
            self._send_rejection(responder, verdict, message.id)
            return
        param_rejection = self._mcp_param_rejection(message, lowered)
        if param_rejection is not None:
            self._send_rejection(responder, param_rejection, message.id)
            return

        caller = _with_session(request.caller, None, verdict.protocol_version)
        connection = Connection.from_envelope(verdict.protocol_version, verdict.client_info, verdict.client_capabilities)
        events: asyncio.Queue[str | None] = asyncio.Queue()
        dctx = SingleExchangeContext(
            transport=TransportContext(kind="streamable-http", can_send_request=False, headers=lowered),
            request_id=message.id,
            message_metadata=ServerMessageMetadata(request_context=caller, can_send_request=False),
            progress_token=progress_token_from_params(message.params),
            sink=events,
        )
        runtime = self._runtime

        async def run() -> str:
            try:
                result = await serve_one(
                    runtime.server, dctx, message.method, message.params,
                    connection=connection, lifespan_state=runtime.lifespan_state,
                )
                reply: JSONRPCResponse | JSONRPCError = JSONRPCResponse(jsonrpc="2.0", id=message.id, result=result)
            except Exception as exc:
                reply = JSONRPCError(jsonrpc="2.0", id=message.id, error=modern_error_data(exc))
            return message_json(reply)

        task = asyncio.ensure_future(run())
        first_event = asyncio.ensure_future(events.get())
        done, _ = await asyncio.wait(
            {task, first_event}, timeout=runtime.sse_keepalive_seconds, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done and first_event not in done:
            first_event.cancel()
            reply_json = task.result()
            reply = json.loads(reply_json)
            status = 200
            if "error" in reply:
                status = ERROR_CODE_HTTP_STATUS.get(reply["error"].get("code"), 200)
            responder.send_json(status, reply_json)
            return

        responder.start_stream(dict(SSE_HEADERS))
        stream = SseStream(responder, buffer_bytes=runtime.sse_buffer_bytes, keepalive_seconds=runtime.sse_keepalive_seconds)
        pump = asyncio.ensure_future(self._pump_modern(events, first_event, stream, task, message.id))
        try:
            await stream.run()
        finally:
            if not task.done():
                dctx.cancel_requested.set()
                task.cancel()
            pump.cancel()

    async def _pump_modern(
        self, events: asyncio.Queue[str | None], first_event: asyncio.Future[str | None],
        stream: SseStream, task: asyncio.Future[str], request_id: RequestId,
    ) -> None:
        counter = 0
        pending_get: asyncio.Future[str | None] = first_event
        while True:
            done, _ = await asyncio.wait({pending_get, task}, return_when=asyncio.FIRST_COMPLETED)
            if pending_get in done:
                counter += 1
                data = pending_get.result()
                if data is not None:
                    stream.send(event_frame(f"{counter}", data))
                pending_get = asyncio.ensure_future(events.get())
                continue
            pending_get.cancel()
            while not events.empty():
                data = events.get_nowait()
                if data is not None:
                    counter += 1
                    stream.send(event_frame(f"{counter}", data))
            counter += 1
            stream.close(event_frame(f"{counter}", task.result()))
            return

    def _mcp_param_rejection(self, message: JSONRPCRequest, lowered: dict[str, str]) -> InboundLadderRejection | None:
        if message.method != "tools/call" or self._registry is None:
            return None
        params = message.params or {}
        name = params.get("name")
        arguments = params.get("arguments") or {}
        if not isinstance(name, str) or not isinstance(arguments, Mapping):
            return None
        if not arguments and not any(key.startswith("mcp-param-") for key in lowered):
            return None
        schema = self._registry.input_schema(name)
        if schema is None:
            return None
        return validate_mcp_param_headers(schema, arguments, lowered)

    @staticmethod
    def _send_rejection(responder: Responder, rejection: InboundLadderRejection, request_id: RequestId) -> None:
        body = {"jsonrpc": "2.0", "id": request_id, "error": {"code": rejection.code, "message": rejection.message}}
        if rejection.data is not None:
            body["error"]["data"] = rejection.data
        responder.send_json(ERROR_CODE_HTTP_STATUS.get(rejection.code, 400), body)


@dataclass
class SingleExchangeContext:
    """The dispatch context of one 2026-07-28 request: no back channel, notifications go to ``sink``."""

    transport: TransportContext
    request_id: RequestId
    message_metadata: Any
    progress_token: ProgressToken | None
    sink: asyncio.Queue[str | None]
    cancel_requested: anyio.Event = field(default_factory=anyio.Event)

    @property
    def can_send_request(self) -> bool:
        return False

    async def send_raw_request(self, method: str, params: Mapping[str, Any] | None, opts: CallOptions | None = None) -> dict[str, Any]:
        raise NoBackChannelError(method)

    async def notify(self, method: str, params: Mapping[str, Any] | None, opts: CallOptions | None = None) -> None:
        notification = JSONRPCNotification(jsonrpc="2.0", method=method, params=dict(params) if params is not None else None)
        self.sink.put_nowait(message_json(notification))

    async def progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        if self.progress_token is None:
            return
        params: dict[str, Any] = {"progressToken": self.progress_token, "progress": progress}
        if total is not None:
            params["total"] = total
        if message is not None:
            params["message"] = message
        await self.notify("notifications/progress", params)


def _with_session(caller: McpCaller, session_id: str | None, protocol_version: str) -> McpCaller:
    return dataclasses.replace(caller, session_id=session_id, protocol_version=protocol_version)

