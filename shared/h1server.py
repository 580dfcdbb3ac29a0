"""The server side of HTTP/1.1, sans I/O: bytes in, request events out, on httptools (llhttp).

llhttp does the framing and refuses what smuggling needs (Content-Length with
Transfer-Encoding, duplicate or signed lengths, ``chunked`` not last, bare LF, obsolete line
folding, whitespace before a colon, control characters in values, malformed chunk sizes).
This module adds the size limits llhttp leaves to its user, each with its status:

- a request target longer than :data:`REQUEST_LINE_LIMIT` bytes: 414;
- one header whose name plus value exceeds :data:`FIELD_LIMIT`, more than
  :data:`MAX_HEADERS` headers, or a head still incomplete after :data:`HEAD_BYTES_LIMIT`
  bytes: 431;
- anything llhttp refuses: 400.

After an error the connection is unusable: :meth:`H1Parser.feed` returns nothing more. After
an upgrade (a request with ``Connection: upgrade`` and ``Upgrade``, or CONNECT) the bytes that
follow are the upgraded protocol's, returned as :class:`Upgraded`; the caller decides whether
the upgrade happens (and otherwise closes after its answer).

The events are values: their fields are ``Final``. Each class writes its own ``__init__``
(``init=False``): mypyc, which compiles this module (README, "Compiled build"), compiles that
one, where a dataclass-made ``__init__`` stays interpreted (five times slower to build) and
cannot set a native ``Final`` field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import httptools

__all__ = [
    "FIELD_LIMIT",
    "HEADERS_LIMIT",
    "HEAD_BYTES_LIMIT",
    "MAX_HEADERS",
    "REQUEST_LINE_LIMIT",
    "Body",
    "End",
    "Event",
    "H1Parser",
    "Head",
    "ParseError",
    "Upgraded",
]

#: Longest request target: 414 beyond (the request line's other parts are a few bytes).
REQUEST_LINE_LIMIT = 8192
#: Longest header, name plus value: 431 beyond.
FIELD_LIMIT = 8190
#: Most headers in one request: 431 beyond.
MAX_HEADERS = 100
#: Largest total of the header lines (name, value, ": " and CRLF each): 431 beyond. Checked by
#: the listener on the parsed head (exit_server/httpguard.py ``head_problem``), as it always was.
HEADERS_LIMIT = 16 * 1024
#: Bytes a head may take before it is complete: past the limits above with room for the request
#: line and the line ends. It bounds what one caller's unfinished head holds in memory.
HEAD_BYTES_LIMIT = REQUEST_LINE_LIMIT + HEADERS_LIMIT + MAX_HEADERS * 4 + 64


@dataclass(slots=True, init=False)
class Head:
    """A request head, complete."""

    method: Final[str]
    target: Final[str]  # as sent: origin-form, absolute-form, authority-form or "*"
    version: Final[tuple[int, int]]
    raw_headers: Final[tuple[tuple[bytes, bytes], ...]]  # in order, as sent
    keep_alive: Final[bool]  # what llhttp reads from the version and Connection
    chunked: Final[bool]  # the body is chunked (Transfer-Encoding ends with chunked)
    content_length: Final[int | None]  # the Content-Length, when the body is so delimited
    upgrade: Final[bool]  # an upgrade (or CONNECT): the bytes after this request are not HTTP/1.1

    def __init__(
        self,
        method: str,
        target: str,
        version: tuple[int, int],
        raw_headers: tuple[tuple[bytes, bytes], ...],
        keep_alive: bool,
        chunked: bool,
        content_length: int | None,
        upgrade: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.raw_headers = raw_headers
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.content_length = content_length
        self.upgrade = upgrade


@dataclass(slots=True, init=False)
class Body:
    """Bytes of the current request's body (chunked framing removed)."""

    data: Final[bytes]

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True, init=False)
class End:
    """The current request is complete."""

    def __init__(self) -> None:
        pass


@dataclass(slots=True, init=False)
class Upgraded:
    """The request before was an upgrade: ``data`` and everything after is raw."""

    data: Final[bytes]

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True, init=False)
class ParseError:
    """The bytes cannot be a request: answer ``status`` (generic body) and close."""

    status: Final[int]
    reason: Final[str]  # llhttp's or ours, never the caller's bytes

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason


Event = Head | Body | End | Upgraded | ParseError

_END: Final = End()


class _Limit(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class H1Parser:
    """One connection's requests. :meth:`feed` takes what the socket read and returns the
    events it completes, in order (pipelined requests follow one another)."""

    __slots__ = (
        "_chunked",
        "_clen",
        "_events",
        "_field_count",
        "_head_bytes",
        "_headers",
        "_in_head",
        "mid_head",
        "_parser",
        "_progress",
        "_url",
        "done",
    )

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._field_count = 0
        self._head_bytes = 0  # bytes fed since the current head began (or the last request ended)
        self._in_head = True  # no head in progress has completed yet
        self._chunked = False
        self._clen: int | None = None
        self._progress = False  # a head or a request completed during the current feed
        #: a head has begun and is not complete
        self.mid_head = False
        #: set after an upgrade or a parse error: feed() returns nothing more
        self.done = False

    def feed(self, data: bytes) -> list[Event]:
        """The events ``data`` completes."""
        if self.done:
            return []
        events = self._events = []
        self._progress = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as up:
            self.done = True
            offset = up.args[0] if up.args and isinstance(up.args[0], int) else len(data)
            events.append(Upgraded(data[offset:]))
            return events
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            limit = cause if isinstance(cause, _Limit) else _Limit(400, "callback failed")
            return self._fail(limit.status, limit.reason)
        except httptools.HttpParserError as exc:
            return self._fail(400, str(exc) or type(exc).__name__)
        if self._in_head and not self._progress:  # else part of data was not head: undercount
            self._head_bytes += len(data)
            if self._head_bytes > HEAD_BYTES_LIMIT:
                if len(self._url) > REQUEST_LINE_LIMIT:  # pragma: no cover - on_url refuses first
                    return self._fail(414, "request target too long")
                return self._fail(431, "request head too large")
        return events

    def close(self) -> None:
        """The connection is gone: drop the parser (it refers back to this object)."""
        self.done = True
        self._parser = None  # type: ignore[assignment]
        self._events = []

    def _fail(self, status: int, reason: str) -> list[Event]:
        self.done = True
        self._events.append(ParseError(status, reason))
        return self._events

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.mid_head = True
        self._in_head = True
        self._url = b""
        self._headers = []
        self._field_count = 0
        self._chunked = False
        self._clen = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > REQUEST_LINE_LIMIT:
            raise _Limit(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > FIELD_LIMIT:
            raise _Limit(431, "header field too long")
        self._field_count += 1
        if self._field_count > MAX_HEADERS:
            raise _Limit(431, "too many headers")
        self._headers.append((name, value))
        if len(name) == 14 and name.lower() == b"content-length":
            self._clen = int(value)  # llhttp checked: digits only, one header
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            self._chunked = value.rstrip().lower().endswith(b"chunked")

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._in_head = False
        self.mid_head = False
        self._progress = True
        self._head_bytes = 0
        version = parser.get_http_version()
        major, _, minor = version.partition(".")
        self._events.append(
            Head(
                parser.get_method().decode("ascii"),
                self._url.decode("latin-1"),
                (int(major or 0), int(minor or 0)),
                tuple(self._headers),
                parser.should_keep_alive(),
                self._chunked,
                None if self._chunked else self._clen,
                parser.should_upgrade(),
            )
        )

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        self._events.append(_END)
        self._in_head = True
        self._progress = True
        self._head_bytes = 0
