"""A small SSE reader over httpx2 streaming responses, for transport tests."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import httpx2


@dataclass
class SseEvent:
    id: str | None = None
    data: str = ""
    retry: int | None = None
    event: str | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def message(self) -> Any:
        return json.loads(self.data) if self.data else None


class SseReader:
    """Reads events from an open ``text/event-stream`` response."""

    def __init__(self, response: httpx2.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next_event(self, timeout: float = 10.0, *, skip_comments: bool = True) -> SseEvent | None:
        """Return the next event, or ``None`` at end of stream."""
        return await asyncio.wait_for(self._read(skip_comments), timeout)

    async def _read(self, skip_comments: bool) -> SseEvent | None:
        event = SseEvent()
        seen = False
        async for line in self._lines:
            if line == "":
                if seen:
                    if skip_comments and event.id is None and not event.data and event.retry is None:
                        event = SseEvent()
                        seen = False
                        continue
                    return event
                continue
            seen = True
            if line.startswith(":"):
                event.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                event.id = value
            elif name == "data":
                event.data = f"{event.data}\n{value}" if event.data else value
            elif name == "retry":
                event.retry = int(value)
            elif name == "event":
                event.event = value
        return event if seen else None

    async def events_until_response(self, request_id: Any, timeout: float = 10.0) -> list[SseEvent]:
        """Read events until the JSON-RPC response with ``request_id`` arrives."""
        events = []
        while True:
            event = await self.next_event(timeout)
            assert event is not None, "stream ended before the response"
            events.append(event)
            message = event.message
            if isinstance(message, dict) and message.get("id") == request_id and ("result" in message or "error" in message):
                return events
