"""The handshake-era MCP session state machine, as data.

A session is ``initializing`` once the server has replied to ``initialize``
and issued the session id, ``active`` after the client's
``notifications/initialized``, and ``closed`` after a DELETE, idle expiry,
server shutdown or eviction. A closed session is never reopened. Requests
without a session id (state "none") are decided by the transport before a
session exists: ``initialize`` creates one, anything else is 400.

Example::

    state = next_state(SessionState.INITIALIZING, SessionEvent.INITIALIZED)
    assert state is SessionState.ACTIVE
    next_state(SessionState.CLOSED, SessionEvent.REQUEST)   # raises Rejected(404)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Rejected", "SessionEvent", "SessionState", "TRANSITIONS", "next_state"]


class SessionState(str, enum.Enum):
    INITIALIZING = "initializing"
    ACTIVE = "active"
    CLOSED = "closed"


class SessionEvent(str, enum.Enum):
    INITIALIZE = "POST initialize with a session id"
    INITIALIZED = "POST notifications/initialized"
    REQUEST = "POST request"
    NOTIFICATION = "POST notification or response only"
    GET_STREAM = "GET with Accept: text/event-stream"
    DELETE = "DELETE"
    IDLE_EXPIRY = "idle timeout"
    SHUTDOWN = "server shutdown or eviction"


@dataclass(frozen=True)
class Rejected(Exception):
    """The event is not allowed in the session's state, so the response has ``status``."""

    status: int
    message: str


_I, _A, _C = SessionState.INITIALIZING, SessionState.ACTIVE, SessionState.CLOSED
_NOT_FOUND = Rejected(404, "Session not found: it is unknown, expired or was terminated; initialize a new session")
_REINITIALIZE = Rejected(400, "Bad Request: initialize must be sent without an Mcp-Session-Id header")

TRANSITIONS: dict[tuple[SessionState, SessionEvent], SessionState | Rejected] = {
    (_I, SessionEvent.INITIALIZE): _REINITIALIZE,
    (_A, SessionEvent.INITIALIZE): _REINITIALIZE,
    (_C, SessionEvent.INITIALIZE): _REINITIALIZE,
    (_I, SessionEvent.INITIALIZED): _A,
    (_A, SessionEvent.INITIALIZED): _A,
    (_C, SessionEvent.INITIALIZED): _NOT_FOUND,
    (_I, SessionEvent.REQUEST): _I,
    (_A, SessionEvent.REQUEST): _A,
    (_C, SessionEvent.REQUEST): _NOT_FOUND,
    (_I, SessionEvent.NOTIFICATION): _I,
    (_A, SessionEvent.NOTIFICATION): _A,
    (_C, SessionEvent.NOTIFICATION): _NOT_FOUND,
    (_I, SessionEvent.GET_STREAM): _I,
    (_A, SessionEvent.GET_STREAM): _A,
    (_C, SessionEvent.GET_STREAM): _NOT_FOUND,
    (_I, SessionEvent.DELETE): _C,
    (_A, SessionEvent.DELETE): _C,
    (_C, SessionEvent.DELETE): _NOT_FOUND,
    (_I, SessionEvent.IDLE_EXPIRY): _C,
    (_A, SessionEvent.IDLE_EXPIRY): _C,
    (_C, SessionEvent.IDLE_EXPIRY): _C,
    (_I, SessionEvent.SHUTDOWN): _C,
    (_A, SessionEvent.SHUTDOWN): _C,
    (_C, SessionEvent.SHUTDOWN): _C,
}
"""Every (state, event) pair and its outcome: the next state or the rejection."""


def next_state(state: SessionState, event: SessionEvent) -> SessionState:
    """Return the state after ``event``; raise :class:`Rejected` when the event is not allowed."""
    outcome = TRANSITIONS[(state, event)]
    if isinstance(outcome, Rejected):
        raise outcome
    return outcome
