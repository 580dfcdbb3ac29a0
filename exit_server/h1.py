"""The public HTTP/1.1 listener: asyncio connections on the sans-I/O parser of
shared/h1server.py, with the request and response objects exit_server/public.py handles.

What a connection does (docs/ARCHITECTURE.md, "The public HTTP/1.1 listener"):

- requests are answered in order; pipelined heads wait their turn (reading pauses past
  :data:`PIPELINE_LIMIT` of them), each body is queued for its handler with flow control;
- the header deadline: a head must be complete within ``header_timeout`` of its first byte (or
  of the connection opening): 408 and close (a connection that sent nothing is just closed);
  an idle keep-alive connection closes after ``keepalive_timeout``;
- a parse error or a limit is answered with a generic body (never the caller's bytes) after the
  requests before it, and the connection closes;
- a response whose request body was not read to its end closes the connection;
- a handler is cancelled when its caller's connection is lost;
- the h2c preface (``--h2c``) and ALPN ``h2`` hand the connection to HTTP/2; PROXY v2 from a
  trusted proxy names the caller; past the descriptors left for callers, 503 at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import logging
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import unquote

from multidict import CIMultiDict, CIMultiDictProxy

from shared.aio.chunks import ChunkQueue
from shared.forwarding import TrustedProxies
from shared.h1server import Body, End, H1Parser, Head, ParseError, Upgraded
from shared.h2map import PREFACE
from shared.httputil import origin_form_of
from shared.proxyproto import parse_proxy_v2

if TYPE_CHECKING:
    from .h2public import H2Edge

__all__ = [
    "HttpVersion",
    "HttpVersion10",
    "HttpVersion11",
    "H1Connection",
    "H1Listener",
    "Request",
    "Response",
    "StreamResponse",
    "generic_response",
]

log = logging.getLogger("exit_server.httpguard")  # the name these lines had before this module


class HttpVersion(NamedTuple):
    major: int
    minor: int


HttpVersion10 = HttpVersion(1, 0)
HttpVersion11 = HttpVersion(1, 1)

#: Requests read ahead of the one being answered before reading pauses.
PIPELINE_LIMIT = 8
#: A request body's queue: reading pauses above HIGH bytes waiting, resumes below LOW.
BODY_HIGH = 256 * 1024
BODY_LOW = 64 * 1024

#: After a response whose request body was not read to its end: the caller's further bytes are
#: read and dropped for at most this long (and this many), so the close does not become a reset
#: that destroys the response in the caller's receive buffer (RFC 9112 section 9.6).
LINGER_SECONDS = 5.0
LINGER_BYTES = 16 << 20

#: ``Server`` on the exit server's own responses: no software or version to fingerprint.
SERVER = "backhaul"

_REASONS = {s.value: s.phrase for s in HTTPStatus}

#: The bodies of the answers the exit server writes itself: fixed, never the caller's bytes.
ERROR_TEXT = {
    400: "bad request",
    408: "request timeout",
    414: "uri too long",
    431: "request header fields too large",
    500: "internal server error",
    501: "not implemented",
    504: "gateway timeout",
    505: "http version not supported",
}
_EMPTY_STATUS = frozenset({204, 304})

_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 16\r\nConnection: close\r\nServer: backhaul\r\n\r\nrequest timeout\n"
)

_BUSY_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 12\r\nRetry-After: 1\r\nConnection: close\r\nServer: backhaul\r\n\r\nserver busy\n"
)

_date_second = 0
_date_value = ""


def _date() -> str:
    """The ``Date`` field, formatted once a second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_value = email.utils.formatdate(now, usegmt=True)
    return _date_value


def decode_path(target: str) -> str:
    """The percent-decoded path of a request target (origin-form or absolute-form), without
    its query: what routes and ACME answers are matched on."""
    if not target.startswith("/") and "://" not in target:
        return target  # "*" (OPTIONS) or an authority (CONNECT): no path
    path = origin_form_of(target).partition("?")[0].partition("#")[0]
    return unquote(path) if "%" in path else path


class BodyReader:
    """A request body as its handler reads it: :meth:`readany` returns what arrived, ``b""``
    at the end; the caller's connection lost mid-body raises ConnectionResetError."""

    __slots__ = ("_queue",)

    def __init__(self, queue: ChunkQueue | None) -> None:
        self._queue = queue

    async def readany(self) -> bytes:
        if self._queue is None:
            return b""
        return await self._queue.get()

    def iter_any(self) -> AsyncIterator[bytes]:
        """The chunks until the end (an iterator object, not an async generator: nothing to
        close when the reader stops early, and mypyc can compile it)."""
        return _Chunks(self)


class _Chunks:
    __slots__ = ("_reader",)

    def __init__(self, reader: BodyReader) -> None:
        self._reader = reader

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._reader.readany()
        if not chunk:
            raise StopAsyncIteration
        return chunk


_NO_BODY = BodyReader(None)


class Request:
    """One public request: its head, its body and the connection it came on."""

    __slots__ = (
        "_headers",
        "_path",
        "bad",
        "body_exists",
        "complete",
        "content",
        "content_length",
        "keep_alive",
        "method",
        "protocol",
        "raw_headers",
        "raw_path",
        "remote",
        "started",
        "upgrade",
        "version",
    )

    def __init__(self, head: Head, protocol: H1Connection, content: BodyReader) -> None:
        self.method = head.method
        self.raw_path = head.target
        self.version = HttpVersion11 if head.version == (1, 1) else HttpVersion(*head.version)
        self.raw_headers = head.raw_headers
        self.keep_alive = head.keep_alive
        self.upgrade = head.upgrade
        self.protocol = protocol
        self.remote = protocol.remote
        self.content = content
        self.content_length = head.content_length
        self.body_exists = content is not _NO_BODY
        self.complete = not self.body_exists  # the whole body was received
        self.started = False  # the response head was sent
        self.bad = 0  # the status of a parse error in the body (its answer unless one started)
        self._headers: CIMultiDictProxy[str] | None = None
        self._path: str | None = None

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:
            # add() per field: building from a generator of pairs took 2.4 times as long
            fields: CIMultiDict[str] = CIMultiDict()
            for name, value in self.raw_headers:
                fields.add(name.decode("latin-1"), value.decode("latin-1"))
            self._headers = CIMultiDictProxy(fields)
        return self._headers

    @property
    def path(self) -> str:
        if self._path is None:
            self._path = decode_path(self.raw_path)
        return self._path

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.protocol.transport

    @property
    def writer(self) -> H1Connection:
        """Where raw bytes for the caller go (``await writer.write(data)``)."""
        return self.protocol


HeadersInit = Mapping[str, str] | Iterable[tuple[str, str]] | None


class StreamResponse:
    """A response sent as it is written: :meth:`prepare` sends the head, :meth:`write` the body
    (chunked unless a Content-Length is set; close-delimited for HTTP/1.0), :meth:`write_eof`
    ends it."""

    def __init__(self, *, status: int = 200, headers: HeadersInit = None) -> None:
        self.status = status
        # Given as a list of pairs, the fields stay one until someone asks for ``headers``:
        # the proxied answer's head is written from the list (response_head), with no
        # case-insensitive dict built and queried per response.
        self._fields: list[tuple[str, str]] | None = None
        self._headers: CIMultiDict[str] | None = None
        if isinstance(headers, list):
            self._fields = list(headers)
        else:
            self._headers = CIMultiDict(headers or ())
        self.prepared = False
        self.keep_alive = True
        self._conn: H1Connection | None = None
        self._chunked = False
        self._no_body = False
        self._eof = False

    @property
    def headers(self) -> CIMultiDict[str]:
        """The header fields (a case-insensitive multidict, made from the list on first use)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = CIMultiDict(self._fields or ())
            self._fields = None
        return headers

    def set_default(self, name: str, value: str) -> None:
        """Add ``name: value`` unless a field of that name is there (either form, no dict made)."""
        fields = self._fields
        if fields is None:
            self.headers.setdefault(name, value)
            return
        lower = name.lower()
        for pair in fields:
            if pair[0].lower() == lower:
                return
        fields.append((name, value))

    def force_close(self) -> None:
        """Close the connection after this response."""
        self.keep_alive = False

    async def prepare(self, request: Request) -> None:
        if self.prepared:
            return
        conn = request.protocol
        self._conn = conn
        head = conn.response_head(request, self, None)
        self.prepared = True
        await conn.write(head)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        conn = self._conn
        assert conn is not None, "prepare() first"
        if self._no_body or not data:
            return
        if self._chunked:
            await conn.write(b"".join((b"%x\r\n" % len(data), data, b"\r\n")))
        else:
            await conn.write(data)

    async def write_eof(self) -> None:
        if self._eof:
            return
        self._eof = True
        conn = self._conn
        assert conn is not None, "prepare() first"
        if self._chunked:
            await conn.write(b"0\r\n\r\n")


class Response(StreamResponse):
    """A whole response (head and body in one write)."""

    def __init__(
        self, *, status: int = 200, body: bytes | None = None, text: str | None = None, headers: HeadersInit = None
    ) -> None:
        super().__init__(status=status, headers=headers)
        if text is not None:
            body = text.encode()
            self.headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        self.body = body if body is not None else b""


def generic_response(status: int) -> Response:
    """A closing response with a fixed body that never echoes the caller's bytes."""
    resp = Response(status=status, text=ERROR_TEXT.get(status, "error") + "\n", headers={"Server": SERVER})
    resp.force_close()
    return resp


class H1Listener:
    """A public listener's connections: the protocol factory (``loop.create_server(listener,
    ...)``), their count for the descriptor reserve, and graceful shutdown."""

    def __init__(
        self,
        handler: Callable[[Request], Awaitable[StreamResponse]],
        *,
        header_timeout: float = 10.0,
        keepalive_timeout: float = 75.0,
        trusted: TrustedProxies | None = None,
        max_connections: int = 1 << 30,
        on_refused: Callable[[], None] | None = None,
        h2: H2Edge | None = None,
        scheme: str = "http",
        h2c_peers_only: bool = False,
    ) -> None:
        """``h2c_peers_only``: h2c is accepted on this listener only for the fleet's relays
        (--peer-url without --h2c): each stream must carry a valid relay signature."""
        self.handler = handler
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.trusted = trusted
        self.max_connections = max_connections
        self._on_refused = on_refused
        self.h2 = h2
        self.scheme = scheme
        self.h2c_peers_only = h2c_peers_only
        self.connections: set[H1Connection] = set()
        self.closing = False
        self._all_closed: asyncio.Event | None = None  # set once none is left, during shutdown
        self._refusal_log = 0.0

    def __call__(self) -> H1Connection:
        return H1Connection(self)

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def refused(self) -> None:
        """A connection over ``max_connections`` was answered 503: count it, log now and then."""
        if self._on_refused is not None:
            self._on_refused()
        now = time.monotonic()
        if now - self._refusal_log >= 10.0:
            self._refusal_log = now
            log.error(
                "public: %d connections open, the limit left by the open-file limit: new callers get 503",
                self.max_connections,
            )

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections now, the others after the response in progress; after
        ``timeout`` seconds, whatever is left is cut."""
        self.closing = True
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.close_when_idle()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), timeout)
        for conn in list(self.connections):
            conn.abort()

    def closed(self, conn: H1Connection) -> None:
        """``conn`` is gone."""
        self.connections.discard(conn)
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()


class H1Connection(asyncio.Protocol):
    """One public HTTP/1.1 connection."""

    def __init__(self, listener: H1Listener) -> None:
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._parser = H1Parser()
        self.transport: asyncio.Transport | None = None
        self.remote = ""
        #: The caller's address from a trusted proxy's PROXY v2 header (None: the socket peer).
        self.proxied_peer: str | None = None
        self._pipeline: collections.deque[Request | ParseError] = collections.deque()
        self._reading: Request | None = None  # the request whose body is arriving
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._head_started = False  # the head timer runs for a head whose bytes arrived
        self._keepalive = False  # the timer is the keep-alive one
        self._idle_at = 0.0  # loop time the last response ended (the keep-alive timeout's start)
        self._raw: ChunkQueue | None = None  # after an upgrade: every later byte
        self._sniff: bytes | None = None  # the first bytes, while they may be the h2c preface
        self._proxy_bytes: bytes | None = None  # collecting a possible PROXY v2 header
        self._pauses = 0
        self._pipeline_full = False  # reading paused: PIPELINE_LIMIT requests wait their turn
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._closing = False  # close once the response in progress is sent
        self._linger: int | None = None  # bytes still dropped before closing (None: not lingering)
        self._lost = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self._listener
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if listener.h2 is not None:
            sslobj = transport.get_extra_info("ssl_object")
            if sslobj is not None and sslobj.selected_alpn_protocol() == "h2":
                protocol = listener.h2.protocol(listener.scheme, None)
                self.transport.set_protocol(protocol)
                protocol.connection_made(transport)
                return
            if sslobj is None:
                self._sniff = b""
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if peer else ""
        listener.connections.add(self)
        if listener.open_connections > listener.max_connections:
            # Past the descriptors left for callers: answer at once and free the descriptor,
            # so the admin port and tunnel reconnects keep theirs (shared/runtime/fdlimit.py).
            listener.refused()
            self.transport.write(_BUSY_503)
            self._closing = True
            self.transport.close()
            return
        if listener.closing:
            self.transport.close()
            return
        if listener.trusted and self.remote and listener.trusted.contains(self.remote):
            self._proxy_bytes = b""  # a trusted proxy may start with a PROXY v2 header
        self._arm(listener.header_timeout, started=False)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._listener.closed(self)
        self._disarm()
        error = ConnectionResetError("the caller's connection was lost")
        if self._reading is not None:
            self._reading.content._queue.end(error)  # type: ignore[union-attr]
            self._reading = None
        if self._raw is not None:
            self._raw.end()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)  # the writer wakes and finds the connection gone
        if self._task is not None:
            self._task.cancel()  # the caller went away: the handler stops (and resets its stream)
        self.transport = None
        self._pipeline.clear()  # no reference cycles left: a request refers to its connection
        self._raw = None
        self._parser.close()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def pause_reading(self) -> None:
        self._pauses += 1
        if self._pauses == 1 and self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._pauses -= 1
        if self._pauses == 0 and self.transport is not None and not self._lost:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            self._linger -= len(data)
            if self._linger < 0:
                self.abort()
            return
        if self._raw is not None:
            self._raw.put(data)
            return
        if self._proxy_bytes is not None:
            data = self._proxy_header(data)
            if not data:
                return
        if self._sniff is not None:
            data = self._sniff + data
            if len(data) < len(PREFACE) and PREFACE.startswith(data):
                self._sniff = data  # maybe the h2c preface: wait for more
                return
            self._sniff = None
            if data.startswith(PREFACE) and self._listener.h2 is not None:
                self._switch_to_h2(data)
                return
        events = self._parser.feed(data)
        for event in events:
            if isinstance(event, Body):
                reading = self._reading
                if reading is not None:
                    reading.content._queue.put(event.data)  # type: ignore[union-attr]
            elif isinstance(event, Head):
                self._head(event)
            elif isinstance(event, End):
                reading = self._reading
                if reading is not None:
                    reading.complete = True
                    reading.content._queue.end()  # type: ignore[union-attr]
                    self._reading = None
            elif isinstance(event, Upgraded):
                self._raw = ChunkQueue(self._loop)
                self._raw.transport = self
                if event.data:
                    self._raw.put(event.data)
            else:
                reading = self._reading
                if reading is not None:  # malformed body: its request is answered with the error
                    reading.bad = event.status
                    reading.content._queue.end(ConnectionResetError("malformed request body"))  # type: ignore[union-attr]
                    self._reading = None
                    log.debug(
                        "public: %d for a malformed body from %s (%s)", event.status, self.remote or "-", event.reason
                    )
                else:
                    self._pipeline.append(event)
                    self._serve()
        if self._task is None and self._parser.mid_head:  # the first bytes of a new head
            if self._timer is None or self._keepalive:
                self._arm(self._listener.header_timeout, started=True)
            else:
                self._head_started = True  # the deadline still counts from the connection's start

    def eof_received(self) -> bool | None:
        """The caller half-closed: the connection closes (a handler in progress is cancelled,
        as for a lost connection: the caller cannot be waiting for the answer of a request it
        did not finish, and a caller that did finish and half-closed is rare enough to treat
        like nginx does, as an abort)."""
        return None

    # requests

    def _head(self, head: Head) -> None:
        if not self._keepalive:  # the keep-alive timer runs on: no timer made per request
            self._disarm()
        content = _NO_BODY
        if head.chunked or head.content_length:
            queue = ChunkQueue(self._loop, BODY_HIGH, BODY_LOW)
            queue.transport = self
            content = BodyReader(queue)
        request = Request(head, self, content)
        if request.body_exists:
            self._reading = request
        self._pipeline.append(request)
        if len(self._pipeline) > PIPELINE_LIMIT and not self._pipeline_full:
            self._pipeline_full = True
            self.pause_reading()
        self._serve()

    def _serve(self) -> None:
        if self._task is None and not self._lost:
            self._task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        pipeline = self._pipeline
        handler = self._listener.handler
        try:
            while pipeline and not self._lost:
                item = pipeline[0]
                if isinstance(item, ParseError):
                    self._answer_error(item)
                    return
                if item.bad:  # the body was malformed before the request reached its handler
                    self._answer_error(ParseError(item.bad, "malformed request body"))
                    return
                try:
                    resp = await handler(item)
                except (asyncio.CancelledError, ConnectionError):
                    raise
                except Exception:
                    log.error(
                        "public: internal error while handling a request from %s", item.remote or "-", exc_info=True
                    )
                    if self.transport is None or item.started:
                        self.abort()
                        return
                    resp = generic_response(500)
                if self._lost:
                    return
                if item.bad and not item.started:
                    resp = generic_response(item.bad)
                if not resp.prepared:
                    self._send_whole(item, resp)
                elif not resp._eof:
                    await resp.write_eof()
                pipeline.popleft()
                if self._pipeline_full and len(pipeline) <= PIPELINE_LIMIT:
                    self._pipeline_full = False
                    self.resume_reading()
                if self._raw is not None and self.transport is not None and self.transport.is_closing():
                    return  # upgraded: the handler's pump owned the connection
                if not item.complete and self._raw is None:
                    self._linger_close()
                    return
                if not resp.keep_alive or self._raw is not None or self._closing:
                    self._close()
                    return
        except (asyncio.CancelledError, ConnectionError):
            return
        finally:
            self._task = None
            if not self._lost:
                self._idle()

    def _idle(self) -> None:
        """Nothing to answer: wait for the next head within the keep-alive timeout (or the
        header deadline, when its first bytes are here)."""
        if self._lost or self.transport is None or self._task is not None or self._pipeline or self._linger is not None:
            return
        if self._closing or self._listener.closing or self._parser.done:
            self._close()
            return
        if self._parser.mid_head:
            self._arm(self._listener.header_timeout, started=True)
        else:
            self._idle_at = self._loop.time()
            if self._timer is None or not self._keepalive:
                self._arm(self._listener.keepalive_timeout, started=False, keepalive=True)

    def close_when_idle(self) -> None:
        """Shutdown: close now if nothing is in progress, else after the current response."""
        self._closing = True
        if self._task is None and not self._pipeline:
            self._close()

    def _close(self) -> None:
        self._disarm()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _linger_close(self) -> None:
        """Close after a response whose request body was not read: stop sending, drop what the
        caller still sends until it stops, LINGER_BYTES or LINGER_SECONDS, then close."""
        self._disarm()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._reading is not None:
            self._reading = None
        self._pipeline.clear()
        self._linger = LINGER_BYTES
        if self._pauses:
            self._pauses = 1
            self.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self._loop.call_later(LINGER_SECONDS, self._close)

    def abort(self) -> None:
        self._disarm()
        if self.transport is not None:
            self.transport.abort()

    # the deadlines

    def _arm(self, delay: float, started: bool, keepalive: bool = False) -> None:
        self._disarm()
        self._head_started = started
        self._keepalive = keepalive
        self._timer = self._loop.call_later(delay, self._expired, keepalive)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._head_started = self._keepalive = False

    def _expired(self, keepalive: bool) -> None:
        self._timer = None
        if self.transport is None or self._task is not None or self._pipeline:
            self._keepalive = False  # busy: _idle arms the timer again after the response
            return
        if keepalive and not self._parser.mid_head:
            left = self._idle_at + self._listener.keepalive_timeout - self._loop.time()
            if left > 0.001:  # requests came and went since it was armed: idle for less
                self._timer = self._loop.call_later(left, self._expired, True)
                return
        if not keepalive or self._parser.mid_head:
            log.debug(
                "public: request head not complete within %.0fs from %s: closed",
                self._listener.header_timeout,
                self.remote or "-",
            )
            if self._head_started or self._parser.mid_head:
                self.transport.write(_TIMEOUT_408)
        self._close()

    # writing

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``, waiting while the caller's socket buffer is full.

        Raises:
            ConnectionResetError: the connection is closed or lost.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("cannot write to a closing connection")
        transport.write(data)
        if self._write_paused:
            if self._drain is None:
                self._drain = self._loop.create_future()
            await asyncio.shield(self._drain)
            if self._lost:
                raise ConnectionResetError("the caller's connection was lost")

    def response_head(self, request: Request, resp: StreamResponse, body: bytes | None) -> bytes:
        """The head of ``resp`` for ``request``, deciding its framing and the connection's
        reuse; ``body``: the whole body (a :class:`Response`), else None (streamed)."""
        request.started = True
        status = resp.status
        version = request.version if request.version in (HttpVersion10, HttpVersion11) else HttpVersion11
        no_body = request.method == "HEAD" or status in _EMPTY_STATUS or status < 200
        keep = resp.keep_alive and request.keep_alive and not self._closing and not request.upgrade
        upgrade = status == 101  # the connection belongs to the upgrade now: framing left alone
        drop_te = no_body and not upgrade
        drop_cl = drop_te and status in _EMPTY_STATUS
        sized = body is not None and not no_body and not upgrade  # Content-Length: len(body)
        # One pass over the fields, as a multidict's popall / setitem / ``in`` would leave them:
        # a set Content-Length replaces the first one in place and drops the others.
        fields = resp._fields if resp._headers is None else list(resp._headers.items())
        assert fields is not None
        out: list[tuple[str, str]] = []
        length: str | None = None  # the first Content-Length value sent
        has_te = has_type = has_date = has_server = has_connection = False
        for pair in fields:
            lower = pair[0].lower()
            if lower == "content-length":
                if drop_cl or (sized and length is not None):
                    continue
                if sized:
                    assert body is not None
                    pair = ("Content-Length", str(len(body)))
                if length is None:
                    length = pair[1]
            elif lower == "transfer-encoding":
                if drop_te:
                    continue
                has_te = True
            elif lower == "content-type":
                has_type = True
            elif lower == "date":
                has_date = True
            elif lower == "server":
                has_server = True
            elif lower == "connection":
                has_connection = True
            out.append(pair)
        if upgrade:
            keep = True
        elif no_body:
            pass
        elif sized:
            if length is None:
                assert body is not None
                length = str(len(body))
                out.append(("Content-Length", length))
        elif length is None:
            if version >= HttpVersion11:
                if has_te:  # as a multidict's setitem: the first one replaced, the others dropped
                    at = next(i for i, pair in enumerate(out) if pair[0].lower() == "transfer-encoding")
                    out[at] = ("Transfer-Encoding", "chunked")
                    out[at + 1 :] = [pair for pair in out[at + 1 :] if pair[0].lower() != "transfer-encoding"]
                else:
                    out.append(("Transfer-Encoding", "chunked"))
                resp._chunked = True
            else:
                keep = False  # HTTP/1.0: the body ends with the connection
        sized_empty = body == b"" or (body is None and length == "0")
        if not no_body and not sized_empty and not has_type and not upgrade:
            out.append(("Content-Type", "application/octet-stream"))
        if not has_date:
            out.append(("Date", _date()))
        if not has_server:
            out.append(("Server", SERVER))
        if not has_connection and not upgrade:
            if not keep:
                out.append(("Connection", "close"))
            elif version == HttpVersion10:
                out.append(("Connection", "keep-alive"))
        resp._fields, resp._headers = out, None  # ``headers`` shows what was sent
        resp.keep_alive = keep
        resp._no_body = no_body
        lines = [f"HTTP/{version[0]}.{version[1]} {status} {_REASONS.get(status, 'Unknown')}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in out]
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _send_whole(self, request: Request, resp: StreamResponse) -> None:
        body = resp.body if isinstance(resp, Response) else b""
        head = self.response_head(request, resp, body)
        resp.prepared = resp._eof = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(head if resp._no_body or not body else head + body)

    def _answer_error(self, error: ParseError) -> None:
        """A request the parser refused: a generic answer, then close."""
        log.debug("public: %d for a malformed request from %s (%s)", error.status, self.remote or "-", error.reason)
        if self.transport is not None and not self.transport.is_closing():
            text = ERROR_TEXT.get(error.status, "error") + "\n"
            self.transport.write(
                f"HTTP/1.1 {error.status} {_REASONS.get(error.status, 'Error')}\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(text)}\r\n"
                f"Date: {_date()}\r\nServer: {SERVER}\r\nConnection: close\r\n\r\n{text}".encode("latin-1")
            )
        self._close()

    # upgrades and hand-offs

    def take_raw(self) -> ChunkQueue:
        """After a 101 for an upgrade: every later byte from the caller, queued."""
        if self._raw is None:  # an upgrade the parser did not see as one: the bytes after it
            self._raw = ChunkQueue(self._loop)
            self._raw.transport = self
        return self._raw

    def _switch_to_h2(self, data: bytes) -> None:
        """The caller sent the HTTP/2 preface (h2c with prior knowledge): hand the connection to
        the HTTP/2 protocol."""
        listener = self._listener
        assert listener.h2 is not None and self.transport is not None
        self._disarm()
        listener.connections.discard(self)
        protocol = listener.h2.protocol(listener.scheme, self.proxied_peer)
        protocol.peers_only = listener.h2c_peers_only
        transport = self.transport
        self.transport = None
        self._lost = True
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)

    def _proxy_header(self, data: bytes) -> bytes:
        """Take a PROXY v2 header off the first bytes from a trusted peer; what follows (or
        everything, when the peer sent plain HTTP) is returned for the HTTP parser."""
        assert self._proxy_bytes is not None
        data = self._proxy_bytes + data
        try:
            parsed = parse_proxy_v2(data)
        except ValueError:
            self._proxy_bytes = None  # plain HTTP from the proxy (or garbage: the parser says 400)
            return data
        if parsed is None:
            self._proxy_bytes = data
            return b""
        consumed, source = parsed
        self._proxy_bytes = None
        self.proxied_peer = source
        return data[consumed:]
