"""Events produced by :class:`shared.mux.Session` (hypercorn ``protocol/events.py`` style).

Every event carries ``stream_id``; connection-level events use stream 0.

Events are values: their fields are ``Final``. Each class writes its own ``__init__``
(``init=False``): mypyc, which compiles this module (README, "Compiled build"), compiles that
one, where a dataclass-made ``__init__`` stays interpreted (five times slower to build) and
cannot set a native ``Final`` field.
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


@dataclass(slots=True, init=False)
class ControlReceived:
    """A control message arrived (Hello on the server, Welcome on the client, Routes, Error)."""

    message: Final[Hello | Welcome | Routes | Error]
    stream_id: Final[int]

    def __init__(self, message: Hello | Welcome | Routes | Error, stream_id: int = 0) -> None:
        self.message = message
        self.stream_id = stream_id


@dataclass(slots=True, init=False)
class StreamOpened:
    """The exit server opened a stream (client side only)."""

    stream_id: Final[int]
    head: Final[RequestHead]
    end_stream: Final[bool]

    def __init__(self, stream_id: int, head: RequestHead, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.head = head
        self.end_stream = end_stream


@dataclass(slots=True, init=False)
class ReplyReceived:
    """The client answered a stream with a response head (exit-server side only)."""

    stream_id: Final[int]
    head: Final[ResponseHead]
    end_stream: Final[bool]

    def __init__(self, stream_id: int, head: ResponseHead, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.head = head
        self.end_stream = end_stream


@dataclass(slots=True, init=False)
class DataReceived:
    """Body bytes for a stream; ``end_stream`` marks the peer's half-close. ``data`` is a
    read-only view into the received message when it is most of it (no copy), else bytes."""

    stream_id: Final[int]
    data: Final[bytes | memoryview]
    end_stream: Final[bool]

    def __init__(self, stream_id: int, data: bytes | memoryview, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.data = data
        self.end_stream = end_stream


@dataclass(slots=True, init=False)
class ResetReceived:
    """A stream was reset: by the peer, or locally because the peer's GOAWAY excluded it
    (then ``code`` is REFUSED and the request is safe to retry)."""

    stream_id: Final[int]
    code: Final[int]
    reason: Final[str]

    def __init__(self, stream_id: int, code: int, reason: str) -> None:
        self.stream_id = stream_id
        self.code = code
        self.reason = reason


@dataclass(slots=True, init=False)
class WindowUpdated:
    """Send credit grew for a stream (or for the whole connection when stream_id is 0)."""

    stream_id: Final[int]

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


@dataclass(slots=True, init=False)
class GoAwayReceived:
    """The peer is draining: no new streams above ``last_stream_id``."""

    last_stream_id: Final[int]
    code: Final[int]
    reason: Final[str]
    stream_id: Final[int]

    def __init__(self, last_stream_id: int, code: int, reason: str, stream_id: int = 0) -> None:
        self.last_stream_id = last_stream_id
        self.code = code
        self.reason = reason
        self.stream_id = stream_id


@dataclass(slots=True, init=False)
class ConnectionFailed:
    """The session is dead (protocol error, heartbeat timeout, refused handshake)."""

    error: Final[TunnelError]
    stream_id: Final[int]

    def __init__(self, error: TunnelError, stream_id: int = 0) -> None:
        self.error = error
        self.stream_id = stream_id


@dataclass(slots=True, init=False)
class TrailersReceived:
    """The peer's trailer fields arrived; they end its half of the stream (version 2)."""

    stream_id: Final[int]
    headers: Final[Headers]

    def __init__(self, stream_id: int, headers: Headers) -> None:
        self.stream_id = stream_id
        self.headers = headers


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
