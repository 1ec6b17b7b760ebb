"""The systemd notification protocol (``sd_notify``) without libsystemd.

systemd starts a ``Type=notify`` service with ``NOTIFY_SOCKET`` set to the
path of a Unix datagram socket (a leading ``@`` names a socket in the
abstract namespace). The service sends newline-separated ``KEY=VALUE``
assignments to it: ``READY=1`` once it serves, ``STOPPING=1`` when it begins
to shut down, ``WATCHDOG=1`` at least once per ``WATCHDOG_USEC``
microseconds when the unit sets ``WatchdogSec=``. Without ``NOTIFY_SOCKET``
every call does nothing, so the same code runs under systemd and in a shell.

Example::

    notifier = Notifier.from_environment()
    notifier.notify("READY=1", "STATUS=listening on :8080")
    notifier.start_watchdog()        # pings at half of WATCHDOG_USEC
    ...
    notifier.notify("STOPPING=1")
    notifier.stop_watchdog()
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger("executor_tornado.notify")


class Notifier:
    """Sends state changes to the service manager's notification socket.

    Sending never raises: a notification that cannot be delivered is logged
    once per kind of error, because the service keeps serving either way.
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._watchdog: asyncio.Task[None] | None = None
        self._logged_errors: set[str] = set()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        The watchdog applies only when ``WATCHDOG_PID`` is unset or names this
        process, as sd_watchdog_enabled(3) specifies.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_usec: int | None = None
        raw_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        if raw_usec.isdigit() and int(raw_usec) > 0 and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            watchdog_usec = int(raw_usec)
        return cls(address, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_seconds(self) -> float | None:
        """Half the watchdog timeout, the ping interval sd_watchdog_enabled(3) recommends."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2_000_000

    def notify(self, *assignments: str) -> bool:
        """Send ``assignments`` as one datagram; return whether it was sent."""
        if self.address is None:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(target)
                sock.sendall(payload)
        except OSError as exc:
            kind = type(exc).__name__
            if kind not in self._logged_errors:
                self._logged_errors.add(kind)
                log.warning("Sending %s to NOTIFY_SOCKET %s failed: %s", assignments[0], self.address, exc)
            return False
        return True

    def start_watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` on the running event loop.

        The pings come from the event loop itself, so a blocked loop stops
        them and systemd restarts the service, which is the point of the
        watchdog.
        """
        interval = self.watchdog_interval_seconds
        if interval is None or self.address is None or self._watchdog is not None:
            return
        self._watchdog = asyncio.ensure_future(self._ping_forever(interval))
        log.info("Sending systemd watchdog pings every %.1f s", interval)

    async def stop_watchdog(self) -> None:
        if self._watchdog is None:
            return
        self._watchdog.cancel()
        try:
            await self._watchdog
        except asyncio.CancelledError:
            pass
        self._watchdog = None

    async def _ping_forever(self, interval: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)
