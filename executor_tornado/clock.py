"""Injected time.

Everything that decides by time (rate buckets, token expiry, session idle
expiry) reads a :class:`Clock` from the application instead of calling
:func:`time.time`, so tests move time instead of sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    def time(self) -> float:
        """Return POSIX seconds."""


class SystemClock:
    """The wall clock."""

    def time(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to; for tests.

    ``offset`` mode follows the wall clock plus a shift, so timers of the
    event loop still fire while a test jumps ahead.
    """

    def __init__(self, start: float | None = None) -> None:
        self._shift = 0.0
        self._fixed = start

    def time(self) -> float:
        if self._fixed is not None:
            return self._fixed + self._shift
        return time.time() + self._shift

    def advance(self, seconds: float) -> None:
        self._shift += seconds
