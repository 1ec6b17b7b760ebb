"""A real service on a loopback port, run in a background thread, for synchronous tests.

Hypothesis drives its examples from plain functions, so property tests talk
to the service with a blocking HTTP client while the service runs on its own
asyncio loop in a thread. :meth:`LiveServer.call` runs a coroutine on that
loop (for example a store query) and returns its result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from conftest import make_settings
from executor_tornado.app import Service
from executor_tornado.clock import Clock

T = TypeVar("T")


@dataclass
class RawResponse:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


class LiveServer:
    """Start with :meth:`start`, stop with :meth:`stop`; every call has a timeout."""

    def __init__(self, data_dir: Path, *, clock: Clock | None = None, **settings: Any) -> None:
        self._data_dir = data_dir
        self._clock = clock
        self._settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="live-server", daemon=True)
        self.service: Service | None = None
        self.extras: dict[str, Any] = {}

    def start(
        self,
        setup: Callable[["LiveServer"], Awaitable[None]] | None = None,
        before: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> "LiveServer":
        """Start the loop, run ``before`` (it returns more settings), start the service, then run ``setup``."""
        self._thread.start()
        if before is not None:
            self._settings.update(self.call(before()))

        async def start_service() -> Service:
            service = Service(make_settings(self._data_dir, **self._settings), clock=self._clock)
            await service.start()
            return service

        self.service = self.call(start_service())
        if setup is not None:
            self.call(setup(self))
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.call(self.service.stop(), timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def call(self, coroutine: Awaitable[T], timeout: float = 30.0) -> T:
        """Run ``coroutine`` on the service's loop and return its result."""
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)  # type: ignore[arg-type]
        return future.result(timeout)

    @property
    def port(self) -> int:
        assert self.service is not None and self.service.port is not None
        return self.service.port

    def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> RawResponse:
        """Send one request on a fresh connection and read the response.

        An SSE response (``text/event-stream``) never ends, so only its head
        is read and the connection is closed.

        ``target`` is the path and query, sent as given, so tests control
        every byte of it.
        """
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            skip_host = any(name.lower() == "host" for name in headers or {})
            connection.putrequest(method, target, skip_host=skip_host, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                connection.putheader(name, value)
            if body is not None or method in ("POST", "PUT", "PATCH"):
                connection.putheader("Content-Length", str(len(body or b"")))
            connection.endheaders(body or None)
            response = connection.getresponse()
            streaming = response.headers.get("Content-Type", "").startswith("text/event-stream")
            try:
                data = b"" if streaming else response.read()
            except ConnectionResetError:
                # Tornado's parser rejects malformed framing with a bare 400 and
                # closes the socket with the request body unread, which resets it.
                if "Content-Length" in response.headers or "Transfer-Encoding" in response.headers:
                    raise
                data = b""
            return RawResponse(response.status, response.headers, data)
        finally:
            connection.close()
