"""The upstream leg of HTTP streams: a lean HTTP/1.1 client with a keep-alive pool, on
httptools (llhttp) from an :class:`asyncio.Protocol`; health checks and ECS metadata keep
aiohttp. Why not aiohttp's ``ClientSession`` here, and the figures: docs/ARCHITECTURE.md.

Semantics (docs/PROTOCOL.md section 12; failures are :class:`shared.errors.UpstreamError`,
mapped to reset codes by ``tunnel_client/upstream.py`` ``reset_for``):

* connection refused / unreachable -> ``connect=True``; connect timeout -> ``timeout=True``;
* the upstream closes or breaks before the response head -> ``before_head``; after it -> the
  body is aborted (``before_head=False``), never presented as complete;
* a request whose connection came from the pool and failed before any response byte arrived
  is sent once more on a fresh connection (the upstream closed an idle keep-alive connection as
  we reused it) when that cannot run it twice: an idempotent method (RFC 9110 section 9.2.2) or
  an ``Idempotency-Key`` header, and a body that was not streamed;
* informational 1xx answers are skipped; HEAD, 204 and 304 answers have no body; a body with
  neither length nor chunking ends when the upstream closes.

Back-pressure: body bytes are buffered up to ``HIGH_WATER``, then the upstream socket is paused
until the tunnel has taken them; request bodies wait for ``resume_writing``. A Content-Length
body of at least ``DIRECT_BODY_MIN`` bytes past the head skips llhttp: the received ``bytes``
go on as they are, and the parser is replaced for the next exchange.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import httptools

from shared.errors import TunnelError, UpstreamError

__all__ = [
    "DIRECT_BODY_MIN",
    "HIGH_WATER",
    "MAX_RESPONSE_FIELDS",
    "MAX_RESPONSE_HEAD",
    "Origin",
    "UpstreamConnection",
    "UpstreamPool",
    "build_head",
    "exchange",
    "is_replayable",
    "parse_response_head",
    "request_bytes",
    "send_request",
]

log = logging.getLogger(__name__)

#: Pause reading from the upstream above this many buffered response-body bytes.
HIGH_WATER = 128 * 1024

#: A Content-Length body with at least this much left after the head's read skips llhttp.
DIRECT_BODY_MIN = 64 * 1024

#: Default bound on a response head's bytes (status line and fields, 1xx heads included) and on
#: its field count: a bad upstream cannot make the client buffer without end (nginx answers
#: 502 past its 4-16 KiB proxy buffers, HAProxy past tune.bufsize and 101 fields). Both stay
#: within what the tunnel carries (shared/heads.py: 1,024 fields of at most 64 KiB each).
MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_FIELDS = 256

#: (scheme, host, port)
Origin = tuple[str, str, int]

_NO_BODY_STATUS = frozenset({204, 304})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def build_head(
    method: str, target: str, headers: list[tuple[str, str]], host: str, body_length: int | None, chunked: bool
) -> bytes:
    """The request head bytes. ``headers`` are already free of hop-by-hop fields; Host is added
    when absent, and the body's framing (Content-Length or chunked) is ours to set."""
    parts = [f"{method} {target} HTTP/1.1\r\n"]
    have_host = have_length = False
    for name, value in headers:
        lower = name.lower()
        if lower == "host":
            have_host = True
        elif lower == "content-length":
            if body_length is not None or chunked:
                continue  # ours decides (the body we really send)
            have_length = True
        parts.append(f"{name}: {value}\r\n")
    if not have_host:
        parts.append(f"Host: {host}\r\n")
    if chunked:
        parts.append("Transfer-Encoding: chunked\r\n")
    elif body_length is not None:
        parts.append(f"Content-Length: {body_length}\r\n")
    elif not have_length and method in _BODY_METHODS:
        parts.append("Content-Length: 0\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


class _HeadTooLarge(Exception):
    """Raised from an llhttp callback to stop parsing a head past the limits."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to an upstream; one exchange at a time."""

    # Slots, not a __dict__: every request in flight holds one (0.9 KiB less each).
    __slots__ = (
        "_body_left",
        "_body_waiter",
        "_buffered",
        "_chunks",
        "_complete",
        "_direct",
        "_drain_waiter",
        "_eof_body",
        "_error",
        "_head",
        "_head_bytes",
        "_headers",
        "_informational",
        "_is_head",
        "_keep_alive",
        "_loop",
        "_parser",
        "_paused",
        "_received",
        "_status",
        "_write_paused",
        "closed",
        "idle_since",
        "origin",
        "pool",
        "reused",
        "transport",
    )

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        # the loop, kept: asyncio.get_running_loop() costs a getpid() syscall on Python 3.11
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._parser: Any = None
        self._is_head = False
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._head: asyncio.Future[None] | None = None
        self._chunks: list[bytes | memoryview] = []  # not a deque: 760 bytes each, one per request in flight
        self._buffered = 0
        self._body_left = -1  # Content-Length bytes still to come (-1: not framed by length)
        self._direct = 0  # body bytes still to take around the parser (see the module docstring)
        self._complete = False
        self._eof_body = False
        self._keep_alive = False
        self._informational = False
        self._received = False
        self._head_bytes = 0  # bytes received while the response head was still incomplete
        self._error: UpstreamError | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ the exchange

    def begin(self, is_head: bool) -> asyncio.Future[None]:
        """Reset the per-exchange state; returns the future set when the response head is in."""
        if self._parser is None or self._is_head:  # after a HEAD, llhttp still expects its body
            self._parser = httptools.HttpResponseParser(self)
        self._is_head = is_head
        self._status = 0
        self._headers = []
        self._chunks.clear()
        self._buffered = 0
        self._body_left = -1
        self._direct = 0
        self._complete = self._eof_body = self._keep_alive = self._informational = False
        self._received = False
        self._head_bytes = 0
        self._error = None
        self._head = head = self._loop.create_future()
        return head

    @property
    def status(self) -> int:
        return self._status

    def headers(self) -> list[tuple[str, str]]:
        """The response headers, decoded as ISO-8859-1 (HTTP/1.1 octets)."""
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self._headers]

    @property
    def drained(self) -> bool:
        """The whole response has arrived and every body byte was taken."""
        return self._complete and not self._chunks

    @property
    def reusable(self) -> bool:
        return self._complete and self._keep_alive and not self.closed and self._error is None

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is None:
            raise self._error or UpstreamError("upstream closed the connection", before_head=self._head_pending())
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the upstream is not taking our request body."""
        if self.closed:
            raise self._error or UpstreamError("upstream closed the connection", before_head=self._head_pending())
        if self._write_paused:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    async def read(self) -> list[bytes | memoryview]:
        """The body chunks buffered so far, waiting for some; [] when the body is complete.
        (A list, not a join: each chunk is copied once, into the tunnel message.)

        Raises:
            UpstreamError: the upstream broke the body.
        """
        while True:
            data = self._chunks
            if data:
                self._chunks = []
                self._buffered = 0
                if self._paused and not self.closed:
                    self._paused = False
                    assert self.transport is not None
                    self.transport.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._complete:
                return []
            self._body_waiter = self._loop.create_future()
            await self._body_waiter

    def abort(self) -> None:
        """Drop the connection (an exchange that did not finish cleanly)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _head_pending(self) -> bool:
        return self._head is not None and not self._head.done()

    def _wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None:
            self._body_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None and not self._complete:
            self._error = error
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)  # the waiter finds self._error
        self._wake_body()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._complete or self._head is None:  # bytes nobody asked for: unusable
            self._keep_alive = False
            self.abort()
            return
        self._received = True
        left = self._direct
        if left:
            self._take_direct(data, left)
            return
        try:
            if not self._status and len(data) > DIRECT_BODY_MIN:
                # The head and much of a large body in one read: llhttp parses the head alone, so
                # that the body bytes in this read can skip it too (not only later reads).
                cut = data.find(b"\r\n\r\n") + 4
                if 4 <= cut < len(data):
                    parser.feed_data(data[:cut])
                    if (
                        self._status
                        and self._body_left >= DIRECT_BODY_MIN
                        and self._error is None
                        and not self._complete
                    ):
                        self._direct = self._body_left
                        self._take_direct(memoryview(data)[cut:], self._direct)
                        return
                    data = data[cut:]
            parser.feed_data(data)
            if self._body_left >= DIRECT_BODY_MIN and self._error is None and not self._complete:
                self._direct = self._body_left  # the rest of the body skips llhttp
            if not self._status:  # the head is still incomplete: bound what it may take
                self._head_bytes += len(data)
                if self._head_bytes > self.pool.max_head:
                    self._fail(UpstreamError(f"response head over {self.pool.max_head} bytes", head_too_large=True))
                    self.abort()
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("unexpected protocol upgrade", before_head=self._head_pending()))
            self.abort()
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed response: {exc}", before_head=self._head_pending()))
            self.abort()

    def _take_direct(self, data: bytes | memoryview, left: int) -> None:
        n = len(data)
        if n < left:
            self._direct = left - n
            self._take(data)
            return
        self._direct = 0
        self._take(data if n == left else data[:left])
        self._parser = None  # it still expects the body: a fresh one for the next exchange
        if n > left:
            self._keep_alive = False  # bytes after the response nobody asked for: not reused
        self._complete = True
        self._wake_body()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self.pool._forget(self)
        self._settle(exc)
        self._parser = None  # it holds our bound methods: no cycle left for the GC to find

    def _settle(self, exc: Exception | None = None) -> None:
        if self._head is None or self._complete:
            return
        if not self._head_pending() and self._eof_body and self._error is None:
            if exc is None:
                self._complete = True  # a body delimited by the connection's end (RFC 9112 section 6.3)
                self._wake_body()
                return
            # Only a clean end (FIN) ends such a body: a reset or an error cut it short, and the
            # caller must see an aborted response, never a complete one.
            self._fail(UpstreamError(f"upstream connection broke mid-body ({exc})", before_head=False))
            return
        before = self._head_pending()
        self._fail(
            UpstreamError(
                "upstream closed the connection " + ("before the response head" if before else "mid-body"),
                before_head=before,
                retriable=before and self.reused and not self._received,
            )
        )

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        if len(headers) > self.pool.max_fields:
            self._fail(UpstreamError(f"response head over {self.pool.max_fields} fields", head_too_large=True))
            raise _HeadTooLarge  # stops llhttp here; data_received aborts the connection

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        size = sum(len(name) + len(value) + 4 for name, value in self._headers)
        if size > self.pool.max_head:  # a whole head in one read: the per-read count missed it
            self._fail(UpstreamError(f"response head over {self.pool.max_head} bytes", head_too_large=True))
            raise _HeadTooLarge
        if 100 <= status < 200:  # 100 Continue, 103 Early Hints: not the answer
            self._informational = True
            self._headers = []
            return
        self._status = status
        self._keep_alive = parser.should_keep_alive()
        if not self._is_head and status not in _NO_BODY_STATUS:
            framed = False
            length = -1
            for name, value in self._headers:
                lower = name.lower()
                if lower == b"transfer-encoding":
                    framed = True
                    length = -1
                    break
                if lower == b"content-length":
                    framed = True
                    length = int(value) if value.isdigit() else -1  # llhttp checked it
            self._eof_body = not framed
            self._body_left = length
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)
        if self._is_head:  # llhttp would wait for Content-Length bytes that never come
            self._complete = True
            self._wake_body()

    def on_body(self, body: bytes) -> None:
        if self._is_head:
            self._keep_alive = False
            return
        if self._body_left > 0:
            self._body_left -= len(body)
        self._take(body)

    def _take(self, body: bytes | memoryview) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._complete = True
        self._wake_body()


class _HeadOnly:
    """httptools callbacks that keep a response head's status and fields."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_response_head(raw: bytes) -> tuple[int, list[tuple[str, str]]]:
    """Status and fields of one complete HTTP/1.x response head (the upgrade answer of a
    WebSocket stream), parsed by llhttp like every other response.

    Raises:
        ValueError: ``raw`` is not one complete, well-formed response head.
    """
    callbacks = _HeadOnly()
    parser = httptools.HttpResponseParser(callbacks)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass  # a 101 with Upgrade: the head is complete, the rest is the new protocol
    except httptools.HttpParserError as exc:
        raise ValueError(f"malformed response head: {exc}") from None
    if not callbacks.complete:
        raise ValueError("incomplete response head")
    return parser.get_status_code(), callbacks.headers


class UpstreamPool:
    """Keep-alive connections per origin, most recently used first; idle ones closed after
    ``idle_timeout`` seconds.

    Args:
        connect_timeout: seconds to open a connection (then :class:`UpstreamError`, 504).
        idle_timeout: seconds an unused connection is kept.
        max_head: bytes a response head may take (then :class:`UpstreamError`, 502).
        max_fields: fields a response head may have (likewise).
    """

    def __init__(
        self,
        connect_timeout: float = 10.0,
        idle_timeout: float = 30.0,
        max_head: int = MAX_RESPONSE_HEAD,
        max_fields: int = MAX_RESPONSE_FIELDS,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_head = max_head
        self.max_fields = max_fields
        self._idle: dict[Origin, list[UpstreamConnection]] = {}
        self._busy: set[UpstreamConnection] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._tls: ssl.SSLContext | None = None
        self.opened = 0

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="upstream-pool-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        for conns in list(self._idle.values()):
            for conn in conns:
                conn.abort()
        for conn in list(self._busy):
            conn.abort()
        self._idle.clear()
        self._busy.clear()

    @property
    def idle_count(self) -> int:
        return sum(len(c) for c in self._idle.values())

    async def acquire(self, origin: Origin, fresh: bool = False) -> UpstreamConnection:
        """A connection to ``origin``: an idle pooled one unless ``fresh``.

        Raises:
            UpstreamError: the connection could not be opened.
        """
        if not fresh:
            idle = self._idle.get(origin)
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    conn.reused = True
                    self._busy.add(conn)
                    return conn
        conn = await self._open(origin)
        self._busy.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Give back a connection after its exchange: kept when it can carry another one."""
        self._busy.discard(conn)
        if conn.reusable:
            conn._head = None  # idle: the parser is kept for the next exchange
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            conn.abort()

    def discard(self, conn: UpstreamConnection) -> None:
        """Drop a connection whose exchange failed or was cancelled."""
        self._busy.discard(conn)
        conn.abort()
        # A raised error's traceback holds the frames that hold this connection: drop our
        # reference to it so that no cycle waits for the GC (docs/RELIABILITY.md, "Findings").
        conn._error = None
        conn._head = None

    def _forget(self, conn: UpstreamConnection) -> None:
        self._busy.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    async def _open(self, origin: Origin) -> UpstreamConnection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: UpstreamConnection(self, origin),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                )
        except TimeoutError:
            raise UpstreamError(
                f"connect timeout after {self.connect_timeout:g}s", connect=True, timeout=True
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"connect failed: {exc.strerror or exc}", connect=True) from None
        self.opened += 1
        return proto

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.idle_timeout / 4))
            cutoff = time.monotonic() - self.idle_timeout
            for conns in self._idle.values():
                stale = [c for c in conns if c.idle_since < cutoff]
                for conn in stale:
                    conns.remove(conn)
                    conn.abort()


async def exchange(
    pool: UpstreamPool,
    origin: Origin,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    host: str,
    body: bytes | None,
    body_stream: AsyncIterator[bytes | memoryview] | None,
    framed: bool,
) -> tuple[UpstreamConnection, asyncio.Task[None] | None]:
    """Send one request and wait for its response head.

    Args:
        body: the whole request body when it is already known (sent with the head).
        body_stream: the request body to stream instead (``framed``: the head's own
            Content-Length frames it; otherwise it goes chunked).

    Returns:
        The connection (status and headers ready; read the body with ``read()``, then give it
        back with ``pool.release``) and the upload task still running, if any.

    Raises:
        UpstreamError: no response head (the connection is already discarded).
    """
    data = request_bytes(method, target, headers, host, body, body_stream is not None, framed)
    replayable = body_stream is None and is_replayable(method, headers)
    return await send_request(pool, origin, data, method == "HEAD", replayable, body_stream, framed)


def request_bytes(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    host: str,
    body: bytes | None,
    streamed: bool,
    framed: bool,
) -> bytes:
    """The request as sent: its head, then ``body`` when the whole body is known (a streamed
    body, ``streamed``, follows later: framed by the head's Content-Length or chunked)."""
    if streamed:
        return build_head(method, target, headers, host, None, not framed)
    data = build_head(method, target, headers, host, None if body is None else len(body), False)
    return data + body if body else data


async def send_request(
    pool: UpstreamPool,
    origin: Origin,
    data: bytes,
    is_head: bool,
    replayable: bool,
    body_stream: AsyncIterator[bytes | memoryview] | None,
    framed: bool,
) -> tuple[UpstreamConnection, asyncio.Task[None] | None]:
    """:func:`exchange` for a request already made into bytes (:func:`request_bytes`): the
    caller need not keep the head's fields while the answer is awaited (a long poll holds
    this frame for as long as the upstream takes). ``replayable``: sending it again on a
    fresh connection is harmless, when a pooled one turns out closed under us."""
    for attempt in (1, 2):
        conn = await pool.acquire(origin, fresh=attempt == 2)
        head = conn.begin(is_head)
        upload: asyncio.Task[None] | None = None
        retry = replayable and conn.reused  # only a pooled connection can fail that way (retriable)
        try:
            conn.write(data)
            if not retry:
                data = b""  # never sent again: not kept for as long as the answer takes
            if body_stream is not None:
                upload = conn._loop.create_task(_upload(conn, body_stream, chunked=not framed))
            await head
            if conn._error is not None:
                raise conn._error
            return conn, upload
        except UpstreamError as exc:
            pool.discard(conn)
            if upload is not None:
                upload.cancel()
            if attempt == 1 and exc.retriable and retry:
                log.debug("upstream %s: pooled connection closed under us; sending again", origin)
                continue
            raise
        except BaseException:
            pool.discard(conn)
            if upload is not None:
                upload.cancel()
            raise
    raise AssertionError("unreachable")


def is_replayable(method: str, headers: list[tuple[str, str]]) -> bool:
    """Sending it twice is harmless: an idempotent method or an Idempotency-Key."""
    return method in _IDEMPOTENT or any(name.lower() == "idempotency-key" for name, _ in headers)


async def _upload(conn: UpstreamConnection, body: AsyncIterator[bytes | memoryview], chunked: bool) -> None:
    """Stream a request body to the upstream (chunked when it has no Content-Length)."""
    try:
        async for chunk in body:
            if not chunk:
                continue
            await conn.drain()
            conn.write(b"".join((b"%x\r\n" % len(chunk), chunk, b"\r\n")) if chunked else chunk)
        if chunked:
            conn.write(b"0\r\n\r\n")
    except UpstreamError:
        pass  # the response side reports it
    except TunnelError:
        conn.abort()  # the caller's body broke: the upstream must not take a partial request as whole
