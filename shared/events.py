"""Events produced by :class:`shared.mux.Session` (hypercorn ``protocol/events.py`` style).

Every event carries ``stream_id``; connection-level events use stream 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

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

    message: Final[Hello | Welcome | Routes | Error]
    stream_id: Final[int] = 0


@dataclass(slots=True)
class StreamOpened:
    """The exit server opened a stream (client side only)."""

    stream_id: Final[int]
    head: Final[RequestHead]
    end_stream: Final[bool]


@dataclass(slots=True)
class ReplyReceived:
    """The client answered a stream with a response head (exit-server side only)."""

    stream_id: Final[int]
    head: Final[ResponseHead]
    end_stream: Final[bool]


@dataclass(slots=True)
class DataReceived:
    """Body bytes for a stream; ``end_stream`` marks the peer's half-close. ``data`` is a
    read-only view into the received message when it is most of it (no copy), else bytes."""

    stream_id: Final[int]
    data: Final[bytes | memoryview]
    end_stream: Final[bool]


@dataclass(slots=True)
class ResetReceived:
    """A stream was reset: by the peer, or locally because the peer's GOAWAY excluded it
    (then ``code`` is REFUSED and the request is safe to retry)."""

    stream_id: Final[int]
    code: Final[int]
    reason: Final[str]


@dataclass(slots=True)
class WindowUpdated:
    """Send credit grew for a stream (or for the whole connection when stream_id is 0)."""

    stream_id: Final[int]


@dataclass(slots=True)
class GoAwayReceived:
    """The peer is draining: no new streams above ``last_stream_id``."""

    last_stream_id: Final[int]
    code: Final[int]
    reason: Final[str]
    stream_id: Final[int] = 0


@dataclass(slots=True)
class ConnectionFailed:
    """The session is dead (protocol error, heartbeat timeout, refused handshake)."""

    error: Final[TunnelError]
    stream_id: Final[int] = 0


@dataclass(slots=True)
class TrailersReceived:
    """The peer's trailer fields arrived; they end its half of the stream (version 2)."""

    stream_id: Final[int]
    headers: Final[Headers]


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
