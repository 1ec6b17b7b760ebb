"""The in-process half of a handshake-era MCP session.

A :class:`LiveSession` runs the ``mcp`` SDK's server kernel for one session
over two anyio memory streams and routes what the kernel writes:

* a response or error goes to the POST that carried the request id;
* a message with ``related_request_id`` goes to that POST's SSE stream;
* everything else goes to the standalone GET stream.

Every message sent on an SSE stream is first appended to the session's event
log in the store, and its store sequence number is the SSE event id, so a
client can resume any stream with ``Last-Event-ID``. The session record (state,
principal, timestamps) lives in the store. This object keeps only what
cannot be stored: the kernel task and the open HTTP streams.

Example::

    live = LiveSession(record, runtime)
    live.start(restored=False)
    pending = await live.submit_request(message, context, protocol_version)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.server.connection import Connection
from mcp.server.lowlevel.server import Server
from mcp.server.runner import serve_connection
from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher
from mcp.shared.message import ServerMessageMetadata, SessionMessage
from mcp_types import (
    InitializeRequestParams,
    JSONRPCError,
    JSONRPCMessage,
    JSONRPCRequest,
    JSONRPCResponse,
    RequestId,
)
from mcp_types.version import is_version_at_least

from executor_tornado.clock import Clock
from executor_tornado.mcp.sse import SseStream, event_frame, priming_frame, retry_frame
from store.base import Store
from store.records import McpSessionRecord

__all__ = ["GET_STREAM_ID", "LiveSession", "PendingRequest", "SessionRuntime"]

log = logging.getLogger("executor_tornado.mcp")

GET_STREAM_ID = "g"
PRIMING_MIN_VERSION = "2025-11-25"
TRIM_EVERY_EVENTS = 64
REQUEST_CANCELLED = -32800


@dataclass
class SessionRuntime:
    """The parts every live session shares: the kernel, the store and the limits."""

    server: Server[Any]
    lifespan_state: Any
    store: Store
    clock: Clock
    sse_retry_ms: int
    sse_buffer_bytes: int
    sse_keepalive_seconds: float
    event_log_max_events: int
    event_log_max_bytes: int
    event_log_max_age_seconds: float


def message_json(message: JSONRPCMessage) -> str:
    body = message.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(message, JSONRPCError) and message.id is None:
        body["id"] = None
    return json.dumps(body, separators=(",", ":"))


def wants_priming(protocol_version: str) -> bool:
    return is_version_at_least(protocol_version, PRIMING_MIN_VERSION)


@dataclass(eq=False)
class PendingRequest:
    """A client request in flight and the HTTP response that waits for it.

    ``mode`` starts undecided (``None``) and becomes ``"json"`` when the
    response arrives before anything else, or ``"sse"`` when the kernel sends
    a related message first or the POST waited past the JSON window.
    """

    request_id: RequestId
    stream_id: str
    protocol_version: str
    mode: str | None = None
    decided: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    response_json: str | None = None
    backlog: list[bytes] = field(default_factory=list)
    stream: SseStream | None = None
    attached: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class LiveSession:
    """The kernel task, message router and open streams of one session."""

    def __init__(self, record: McpSessionRecord, runtime: SessionRuntime) -> None:
        self.id = record.id
        self.principal = record.principal
        self.workspace_id = record.workspace_id
        self.protocol_version = record.protocol_version
        self._record = record
        self._runtime = runtime
        self.pending: dict[str, PendingRequest] = {}
        self.get_stream: SseStream | None = None
        self.last_activity = runtime.clock.time()
        self.last_store_touch = self.last_activity
        self.closed = False
        self._appended = 0
        self._get_lock = asyncio.Lock()
        self._inbound_send: MemoryObjectSendStream[SessionMessage | Exception] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------

    def start(self, *, restored: bool) -> None:
        """Start the kernel and the router.

        A *restored* session (its record came from the store, written by another
        process or before a restart) gets a connection that is already
        initialized with the stored client parameters.
        """
        inbound_send, inbound_recv = anyio.create_memory_object_stream[SessionMessage | Exception](64)
        outbound_send, outbound_recv = anyio.create_memory_object_stream[SessionMessage](64)
        self._inbound_send = inbound_send
        self._tasks.append(asyncio.ensure_future(self._serve(inbound_recv, outbound_send, restored=restored)))
        self._tasks.append(asyncio.ensure_future(self._route(outbound_recv)))

    async def _serve(
        self,
        inbound: MemoryObjectReceiveStream[SessionMessage | Exception],
        outbound: MemoryObjectSendStream[SessionMessage],
        *,
        restored: bool,
    ) -> None:
        dispatcher: JSONRPCDispatcher[Any] = JSONRPCDispatcher(
            inbound, outbound, inline_methods=frozenset({"initialize"})
        )
        connection = Connection.for_loop(dispatcher, session_id=self.id, protocol_version_hint=self.protocol_version)
        if restored:
            params = {
                "protocolVersion": self.protocol_version,
                "capabilities": self._record.client_capabilities,
                "clientInfo": self._record.client_info or {"name": "unknown", "version": "0"},
            }
            connection.client_params = InitializeRequestParams.model_validate(params, by_name=False)
            connection.initialized.set()
        try:
            await serve_connection(
                self._runtime.server, dispatcher, connection=connection, lifespan_state=self._runtime.lifespan_state
            )
        except Exception:
            log.exception("MCP session %s kernel failed", self.id[:12])
        finally:
            await outbound.aclose()

    async def close(self, *, retry_hint: bool = False) -> None:
        """Stop the kernel and end every open stream (with a ``retry:`` hint on shutdown)."""
        if self.closed:
            return
        self.closed = True
        if self._inbound_send is not None:
            self._inbound_send.close()
        final = retry_frame(self._runtime.sse_retry_ms) if retry_hint else None
        for pending in list(self.pending.values()):
            if pending.stream is not None:
                pending.stream.close(final)
            if pending.mode is None:
                pending.mode = "closed"
                pending.decided.set()
            pending.finished.set()
        if self.get_stream is not None:
            self.get_stream.close(final)
        done, running = await asyncio.wait(self._tasks, timeout=2.0)
        for task in running:
            task.cancel()
        self.pending.clear()

    @property
    def idle(self) -> bool:
        """True when no request is in flight and no stream is open."""
        if self.pending:
            return False
        return self.get_stream is None or not self.get_stream.is_open

    # -- inbound -------------------------------------------------------------------

    async def submit(self, message: JSONRPCMessage, context: Any, protocol_version: str) -> PendingRequest | None:
        """Hand a client message to the kernel.

        For a request, return its :class:`PendingRequest`, registered before
        the kernel receives the message, so no reply can be missed.
        """
        assert self._inbound_send is not None
        self.last_activity = self._runtime.clock.time()
        pending = None
        if isinstance(message, JSONRPCRequest):
            key = _id_key(message.id)
            pending = PendingRequest(request_id=message.id, stream_id=_stream_token(key), protocol_version=protocol_version)
            self.pending[key] = pending
            metadata = ServerMessageMetadata(
                request_context=context,
                can_send_request=True,
                on_request_unanswered=lambda: self._unanswered(message.id),
                close_sse_stream=lambda: self._close_post_stream(pending),
                close_standalone_sse_stream=self._close_get_stream,
            )
        else:
            metadata = ServerMessageMetadata(request_context=context)
        try:
            await self._inbound_send.send(SessionMessage(message, metadata=metadata))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            if pending is not None:
                self.pending.pop(_id_key(message.id), None)
            raise
        return pending

    async def _unanswered(self, request_id: RequestId) -> None:
        error = JSONRPCError(
            jsonrpc="2.0", id=request_id, error={"code": REQUEST_CANCELLED, "message": "Request cancelled"}
        )
        await self._deliver_final(_id_key(request_id), message_json(error))

    async def _close_post_stream(self, pending: PendingRequest) -> None:
        if pending.stream is not None:
            pending.stream.close(retry_frame(self._runtime.sse_retry_ms))
            pending.stream = None

    async def _close_get_stream(self) -> None:
        if self.get_stream is not None:
            self.get_stream.close(retry_frame(self._runtime.sse_retry_ms))

    # -- outbound ------------------------------------------------------------------

    async def _route(self, outbound: MemoryObjectReceiveStream[SessionMessage]) -> None:
        async with outbound:
            async for item in outbound:
                try:
                    await self._route_one(item)
                except Exception:
                    log.exception("MCP session %s could not route a message", self.id[:12])

    async def _route_one(self, item: SessionMessage) -> None:
        message = item.message
        data = message_json(message)
        if isinstance(message, (JSONRPCResponse, JSONRPCError)) and message.id is not None:
            await self._deliver_final(_id_key(message.id), data)
            return
        related = item.metadata.related_request_id if isinstance(item.metadata, ServerMessageMetadata) else None
        if related is not None:
            pending = self.pending.get(_id_key(related))
            if pending is not None:
                await self._deliver_related(pending, data)
            return
        await self._deliver_standalone(data)

    async def _deliver_final(self, key: str, data: str) -> None:
        pending = self.pending.get(key)
        if pending is None:
            return
        async with pending.lock:
            if pending.mode is None:
                pending.mode = "json"
                pending.response_json = data
                pending.decided.set()
            elif pending.mode == "sse":
                frame = await self._append(pending.stream_id, data)
                self._send(pending, frame)
                if pending.stream is not None:
                    pending.stream.close()
            pending.finished.set()
        self.pending.pop(key, None)
        self.last_activity = self._runtime.clock.time()

    async def _deliver_related(self, pending: PendingRequest, data: str) -> None:
        async with pending.lock:
            if pending.mode is None:
                await self._commit_sse_locked(pending)
            if pending.mode != "sse":
                return
            frame = await self._append(pending.stream_id, data)
            self._send(pending, frame)

    async def commit_sse(self, pending: PendingRequest) -> None:
        """Switch an undecided request to an SSE response (the JSON window passed)."""
        async with pending.lock:
            if pending.mode is None:
                await self._commit_sse_locked(pending)

    async def _commit_sse_locked(self, pending: PendingRequest) -> None:
        pending.mode = "sse"
        if wants_priming(pending.protocol_version):
            seq = await self._runtime.store.append_event(self.id, pending.stream_id, None, self._runtime.clock.time())
            pending.backlog.append(priming_frame(event_id(seq, pending.stream_id), self._runtime.sse_retry_ms))
        pending.decided.set()

    def _send(self, pending: PendingRequest, frame: bytes) -> None:
        if pending.stream is not None:
            if not pending.stream.send(frame):
                pending.stream = None
        elif not pending.attached:
            pending.backlog.append(frame)

    async def _deliver_standalone(self, data: str) -> None:
        async with self._get_lock:
            frame = await self._append(GET_STREAM_ID, data)
            if self.get_stream is not None and self.get_stream.is_open:
                self.get_stream.send(frame)

    async def _append(self, stream_id: str, data: str | None) -> bytes:
        runtime = self._runtime
        now = runtime.clock.time()
        seq = await runtime.store.append_event(self.id, stream_id, data, now)
        self._appended += 1
        if self._appended % TRIM_EVERY_EVENTS == 0:
            await runtime.store.trim_events(
                self.id,
                max_count=runtime.event_log_max_events,
                max_bytes=runtime.event_log_max_bytes,
                min_created_at=now - runtime.event_log_max_age_seconds,
            )
        if data is None:
            return priming_frame(event_id(seq, stream_id), runtime.sse_retry_ms)
        return event_frame(event_id(seq, stream_id), data)

    # -- streams ---------------------------------------------------------------------

    def attach_post_stream(self, pending: PendingRequest, stream: SseStream) -> None:
        """Give a committed request its SSE stream and flush what was queued before."""
        for frame in pending.backlog:
            stream.send(frame)
        pending.backlog.clear()
        pending.attached = True
        if pending.finished.is_set():
            stream.close()
        else:
            pending.stream = stream

    async def open_get_stream(self, stream: SseStream) -> bool:
        """Attach a new standalone stream, starting with a priming event where the version wants one.

        Return ``False`` when the session already has an open GET stream.
        """
        async with self._get_lock:
            if self.get_stream is not None and self.get_stream.is_open:
                return False
            self.get_stream = stream
            if wants_priming(self.protocol_version):
                stream.send(await self._append(GET_STREAM_ID, None))
            return True

    async def resume(self, last_event_id: str, stream: SseStream) -> bool:
        """Replay the events after ``last_event_id`` on the stream it names, then continue live.

        An event id is ``<seq>/<stream token>``, so a stream can be resumed even
        when the event itself has left the replay window; the client then gets
        the events still in the window. Replay and attachment happen under the
        stream's lock, so an event routed meanwhile is either replayed or sent
        live, never lost. The stream's writer must already be running, because
        the replay waits for the client to read. Return ``False`` for an id
        that is not well formed. Lookups are scoped to this session, so another
        session's id never replays that session's events.
        """
        parsed = parse_event_id(last_event_id)
        if parsed is None:
            return False
        last_seq, stream_id = parsed

        if stream_id == GET_STREAM_ID:
            async with self._get_lock:
                await self._replay(stream_id, last_seq, stream)
                # A reconnecting client takes over from its previous GET stream,
                # which may not have been noticed as dead yet.
                if self.get_stream is not None and self.get_stream is not stream:
                    self.get_stream.close()
                self.get_stream = stream
            return True

        pending = next((p for p in self.pending.values() if p.stream_id == stream_id), None)
        if pending is None:
            await self._replay(stream_id, last_seq, stream)
            stream.close()
            return True
        async with pending.lock:
            await self._replay(stream_id, last_seq, stream)
            if pending.finished.is_set():
                stream.close()
            else:
                pending.stream = stream
                pending.attached = True
        return True

    async def _replay(self, stream_id: str, after_seq: int, stream: SseStream) -> None:
        store = self._runtime.store
        page = 500
        while True:
            events = await store.events_after(self.id, after_seq, limit=page)
            for event in events:
                if event.stream_id != stream_id:
                    continue
                if event.data is None:
                    frame = priming_frame(event_id(event.seq, stream_id), self._runtime.sse_retry_ms)
                else:
                    frame = event_frame(event_id(event.seq, stream_id), event.data)
                if not await stream.send_paced(frame):
                    return
            if len(events) < page:
                return
            after_seq = events[-1].seq


def event_id(seq: int, stream_id: str) -> str:
    """Return the SSE event id: the store sequence number and the stream it belongs to."""
    return f"{seq}/{stream_id}"


def parse_event_id(value: str) -> tuple[int, str] | None:
    seq, _, stream_id = value.strip().partition("/")
    if not seq.isdigit() or len(seq) > 18 or not stream_id or len(stream_id) > 64:
        return None
    return int(seq), stream_id


def _stream_token(key: str) -> str:
    """Return a short token for a request's stream, safe inside an SSE ``id:`` line whatever the request id holds."""
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _id_key(request_id: RequestId) -> str:
    return f"{type(request_id).__name__}:{request_id}"
