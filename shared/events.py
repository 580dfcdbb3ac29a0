"""Events produced by :class:`shared.mux.Session` (hypercorn ``protocol/events.py`` style).

Every event carries ``stream_id``; connection-level events use stream 0.

Events are values: nothing assigns to their fields once made. The fields are not
marked ``Final``: mypyc, which compiles this module (README, "Compiled build"), refuses a
dataclass ``__init__`` that sets a ``Final`` field.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import TunnelError
from .heads import Headers, RequestHead, ResponseHead
from .messages import Error, Hello, Routes, Welcome

__all__ = [
    "ConnectionFailed",
    "ControlReceived",
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "ReplyReceived",
    "ResetReceived",
    "StreamOpened",
    "TrailersReceived",
    "WindowUpdated",
]


@dataclass(slots=True)
class ControlReceived:
    """A control message arrived (Hello on the server, Welcome on the client, Routes, Error)."""

    message: Hello | Welcome | Routes | Error
    stream_id: int = 0


@dataclass(slots=True)
class StreamOpened:
    """The exit server opened a stream (client side only)."""

    stream_id: int
    head: RequestHead
    end_stream: bool


@dataclass(slots=True)
class ReplyReceived:
    """The client answered a stream with a response head (exit-server side only)."""

    stream_id: int
    head: ResponseHead
    end_stream: bool


@dataclass(slots=True)
class DataReceived:
    """Body bytes for a stream; ``end_stream`` marks the peer's half-close. ``data`` is a
    read-only view into the received message when it is most of it (no copy), else bytes."""

    stream_id: int
    data: bytes | memoryview
    end_stream: bool


@dataclass(slots=True)
class ResetReceived:
    """A stream was reset: by the peer, or locally because the peer's GOAWAY excluded it
    (then ``code`` is REFUSED and the request is safe to retry)."""

    stream_id: int
    code: int
    reason: str


@dataclass(slots=True)
class WindowUpdated:
    """Send credit grew for a stream (or for the whole connection when stream_id is 0)."""

    stream_id: int


@dataclass(slots=True)
class GoAwayReceived:
    """The peer is draining: no new streams above ``last_stream_id``."""

    last_stream_id: int
    code: int
    reason: str
    stream_id: int = 0


@dataclass(slots=True)
class ConnectionFailed:
    """The session is dead (protocol error, heartbeat timeout, refused handshake)."""

    error: TunnelError
    stream_id: int = 0


@dataclass(slots=True)
class TrailersReceived:
    """The peer's trailer fields arrived; they end its half of the stream (version 2)."""

    stream_id: int
    headers: Headers


Event = (
    ControlReceived
    | TrailersReceived
    | StreamOpened
    | ReplyReceived
    | DataReceived
    | ResetReceived
    | WindowUpdated
    | GoAwayReceived
    | ConnectionFailed
)
