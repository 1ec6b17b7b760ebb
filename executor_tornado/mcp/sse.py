"""Server-sent event streams with a bounded outgoing buffer.

An :class:`SseStream` sits between the producers of events (the session's
message router) and one HTTP response. Producers call :meth:`SseStream.send`,
which never blocks: the frame is queued and a single writer coroutine writes
and flushes frames to the socket in order. When a client stops reading, its
socket stops draining, frames pile up in the queue, and once the queued bytes
pass the stream's budget the connection is dropped. The session's events stay
in the store, so the client can resume with ``Last-Event-ID``.

Example::

    stream = SseStream(responder, buffer_bytes=1 << 20, keepalive_seconds=15)
    stream.send(event_frame(seq, json_text))
    await stream.run()          # returns when closed or the client is gone
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Protocol

__all__ = ["Responder", "SseStream", "comment_frame", "event_frame", "priming_frame", "retry_frame"]

log = logging.getLogger("executor_tornado.mcp")


class Responder(Protocol):
    """The HTTP side of one exchange, implemented by the request handler."""

    def send_json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        """Finish the response with a JSON body."""

    def send_empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        """Finish the response with no body."""

    def start_stream(self, headers: dict[str, str]) -> None:
        """Send 200 and ``headers``; the body follows through :meth:`write_frame`."""

    async def write_frame(self, data: bytes) -> None:
        """Write and flush ``data``; raise ``ConnectionError`` when the client is gone."""

    def finish_stream(self) -> None:
        """End a started stream cleanly."""

    def abort(self) -> None:
        """Drop the connection without finishing the response."""

    @property
    def closed(self) -> asyncio.Event:
        """Set when the client disconnects."""


def event_frame(event_id: str, data: str) -> bytes:
    return f"id: {event_id}\nevent: message\ndata: {data}\n\n".encode()


def priming_frame(event_id: str, retry_ms: int) -> bytes:
    """Build the first event of a stream for protocol 2025-11-25 and later: an id, empty data and ``retry``."""
    return f"id: {event_id}\nretry: {retry_ms}\ndata: \n\n".encode()


def retry_frame(retry_ms: int) -> bytes:
    return f"retry: {retry_ms}\n\n".encode()


def comment_frame(text: str = "keep-alive") -> bytes:
    return f": {text}\n\n".encode()


SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}


class SseStream:
    """One open SSE response with a bounded queue and keep-alive comments."""

    def __init__(self, responder: Responder, *, buffer_bytes: int, keepalive_seconds: float) -> None:
        self._responder = responder
        self._buffer_bytes = buffer_bytes
        self._keepalive_seconds = keepalive_seconds
        self._frames: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._closing = False
        self.overflowed = False
        self.done = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return not self._closing and not self.done.is_set()

    def send(self, frame: bytes) -> bool:
        """Queue ``frame``; return ``False`` when the stream is closed or was just dropped for overflow."""
        if not self.is_open:
            return False
        if self._queued_bytes and self._queued_bytes + len(frame) > self._buffer_bytes:
            self.overflowed = True
            log.warning("SSE client stopped reading; dropping the stream after %d queued bytes", self._queued_bytes)
            self._drop()
            return False
        self._frames.append(frame)
        self._queued_bytes += len(frame)
        self._wakeup.set()
        return True

    async def send_paced(self, frame: bytes) -> bool:
        """Queue ``frame`` once the queue has room, for bulk writers such as a replay.

        Unlike :meth:`send` this waits for the client to read instead of
        dropping the stream, but a client that reads nothing for two
        keep-alive intervals is dropped all the same. Return ``False`` when
        the stream is closed.
        """
        while self.is_open and self._queued_bytes and self._queued_bytes + len(frame) > self._buffer_bytes:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), timeout=2 * self._keepalive_seconds)
            except asyncio.TimeoutError:
                log.warning("SSE client stopped reading during a replay; dropping the stream")
                self._drop()
                return False
        return self.send(frame)

    def close(self, final: bytes | None = None) -> None:
        """Write ``final`` (if any) after the queued frames, then end the response."""
        if not self.is_open:
            return
        if final:
            self._frames.append(final)
            self._queued_bytes += len(final)
        self._closing = True
        self._wakeup.set()

    def _drop(self) -> None:
        self._closing = True
        self._frames.clear()
        self._queued_bytes = 0
        self._responder.abort()
        self.done.set()
        self._wakeup.set()
        self._drained.set()

    async def run(self) -> None:
        """Write frames until the stream is closed or the client disconnects."""
        disconnected = asyncio.ensure_future(self._responder.closed.wait())
        try:
            while not self.done.is_set():
                if self._frames:
                    frame = self._frames.popleft()
                    try:
                        await self._responder.write_frame(frame)
                    except ConnectionError:
                        break
                    self._queued_bytes -= len(frame)
                    self._drained.set()
                    continue
                if self._closing:
                    self._responder.finish_stream()
                    break
                self._wakeup.clear()
                waiter = asyncio.ensure_future(self._wakeup.wait())
                finished, _ = await asyncio.wait(
                    {waiter, disconnected}, timeout=self._keepalive_seconds, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                if disconnected in finished:
                    break
                if not finished:
                    self._frames.append(comment_frame())
                    self._queued_bytes += len(self._frames[-1])
        finally:
            disconnected.cancel()
            self._frames.clear()
            self._queued_bytes = 0
            self._closing = True
            self.done.set()
            self._drained.set()
