"""HTTP/2 upstreams: ``h2c://`` (prior knowledge, gRPC servers) and ``https://`` origins that
pick ``h2`` by ALPN. One connection per origin carries every stream (a second opens only when
the first is at its peer's concurrent-stream limit or going away), driven by the sans-I/O
``h2`` library from an :class:`asyncio.Protocol`.

Flow control is end to end: response DATA is acknowledged to the upstream only when the
tunnel took it (the next :meth:`H2Stream.read`), so a caller that stops reading stops the
upstream instead of filling this process. Request bodies wait for the upstream's window and for
the socket to drain.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import typing
from collections import deque
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from shared.aio.sockopts import set_nodelay
from shared.errors import UpstreamError
from shared.h2map import H2Error, split_pseudo

from .http1 import Origin

__all__ = ["H2Pool", "H2Stream", "H2UpstreamConnection", "StreamRefused", "UpstreamReset"]

log = logging.getLogger(__name__)

#: Per-stream receive window we grant an upstream (bytes it may send before the tunnel took
#: them), and the connection window across all streams.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
#: Largest header list we accept from an upstream (the tunnel carries 1,024 fields).
MAX_HEADER_LIST = 256 * 1024


class UpstreamReset(UpstreamError):
    """The upstream reset the stream (RST_STREAM) with an HTTP/2 error code."""

    def __init__(self, error_code: int, before_head: bool) -> None:
        super().__init__(f"upstream reset the stream (HTTP/2 error {error_code})", before_head=before_head)
        self.error_code = error_code


class StreamRefused(UpstreamError):
    """The upstream never processed the stream (GOAWAY below it, or REFUSED_STREAM)."""


class H2Stream:
    """One request on an upstream HTTP/2 connection."""

    __slots__ = (
        "_ack",
        "_conn",
        "_rwait",
        "_wwait",
        "chunks",
        "ended",
        "error",
        "head",
        "id",
        "sent_end",
        "trailers",
    )

    def __init__(self, conn: H2UpstreamConnection, stream_id: int) -> None:
        self.id = stream_id
        self._conn = conn
        self.head: asyncio.Future[tuple[int, list[tuple[str, str]]]] = conn.loop.create_future()
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.ended = False  # the response is complete
        self.sent_end = False  # the request is complete
        self.trailers: list[tuple[str, str]] | None = None
        self.error: UpstreamError | None = None
        self._ack = 0  # flow-controlled bytes handed out and not yet acknowledged
        self._rwait: asyncio.Future[None] | None = None
        self._wwait: asyncio.Future[None] | None = None

    # -- connection side
    def _wake_reader(self) -> None:
        waiter, self._rwait = self._rwait, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        waiter, self._wwait = self._wwait, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: the caller may be gone
        self._wake_reader()
        self._wake_writer()

    # -- application side
    async def response(self) -> tuple[int, list[tuple[str, str]]]:
        """The response status and fields (1xx skipped)."""
        return await self.head

    async def read(self) -> bytes:
        """The next body chunk, or b"" at the end (then :attr:`trailers` may be set). Each call
        first acknowledges the previous chunk: the upstream's window reopens only as the caller
        takes the data."""
        conn = self._conn
        if self._ack:
            conn.acknowledge(self.id, self._ack)
            self._ack = 0
        while True:
            if self.chunks:
                data, flow = self.chunks.popleft()
                self._ack = flow
                if not data:  # an empty flow-controlled frame (padding only)
                    conn.acknowledge(self.id, flow)
                    self._ack = 0
                    continue
                return data
            if self.error is not None:
                raise self.error
            if self.ended:
                return b""
            self._rwait = waiter = conn.loop.create_future()
            await waiter

    async def write(self, data: bytes | memoryview) -> None:
        """Send request body bytes within the upstream's flow-control window."""
        conn = self._conn
        view = memoryview(data)
        while view:
            if self.error is not None:
                raise self.error
            room = conn.send_room(self.id)
            if room <= 0:
                self._wwait = waiter = conn.loop.create_future()
                await waiter
                continue
            n = min(room, len(view))
            conn.send_data(self.id, view[:n])
            view = view[n:]
            await conn.writable()

    def finish(self, trailers: list[tuple[str, str]] | None = None) -> None:
        """End the request body, with trailer fields when given."""
        if self.error is None and not self.sent_end:
            self.sent_end = True
            self._conn.end_stream(self.id, trailers)

    def close(self) -> None:
        """The application is done with the stream: an exchange not complete both ways (the
        caller went away, the tunnel reset it, or the upstream answered before taking the whole
        request) is reset with CANCEL, and the stream leaves the connection."""
        self._conn.forget(self)


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection to an upstream (client side)."""

    def __init__(self, origin: Origin, on_idle: Any = None) -> None:
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        # The request fields are built lower-cased and filtered (upstream.h2_request_fields):
        # h2's outbound validation pass is skipped; what the upstream sends is still checked.
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.h2 = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.closed = False
        self.going_away = False
        self._paused: asyncio.Future[None] | None = None
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self._on_idle = on_idle
        self._flush_due = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        set_nodelay(transport.get_extra_info("socket"))
        h = self.h2
        h.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            },
        )
        h.initiate_connection()
        h.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("upstream %s://%s:%d: HTTP/2 protocol error: %s", *self.origin, exc)
            self._flush()
            self._lost(UpstreamError(f"HTTP/2 protocol error: {exc}"))
            return
        for event in events:
            self._event(event)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(UpstreamError(f"upstream connection lost: {exc or 'closed'}"))

    def pause_writing(self) -> None:
        if self._paused is None:
            self._paused = self.loop.create_future()

    def resume_writing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    # -- for streams and the pool
    @property
    def usable(self) -> bool:
        """Open, not going away, and below the peer's concurrent-stream limit."""
        return (
            not self.closed
            and not self.going_away
            and len(self.streams) < self.h2.remote_settings.max_concurrent_streams
        )

    def start(self, fields: list[tuple[bytes, bytes]], end_stream: bool) -> H2Stream:
        """Send a request's HEADERS; returns its stream."""
        stream_id = self.h2.get_next_available_stream_id()
        stream = H2Stream(self, stream_id)
        stream.sent_end = end_stream
        self.streams[stream_id] = stream
        self.h2.send_headers(stream_id, fields, end_stream=end_stream)
        self._flush()
        return stream

    def send_room(self, stream_id: int) -> int:
        try:
            return min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
        except h2.exceptions.StreamClosedError:
            return 0

    def send_data(self, stream_id: int, data: memoryview) -> None:
        self.h2.send_data(stream_id, bytes(data))
        self._flush()

    async def writable(self) -> None:
        if self._paused is not None:
            await asyncio.shield(self._paused)

    def end_stream(self, stream_id: int, trailers: list[tuple[str, str]] | None) -> None:
        try:
            if trailers:
                fields = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in trailers]
                self.h2.send_headers(stream_id, fields, end_stream=True)
            else:
                self.h2.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            return
        self._flush()

    def acknowledge(self, stream_id: int, n: int) -> None:
        """Give ``n`` bytes of credit back (h2 sends WINDOW_UPDATE once enough is due; the
        connection's share comes back even when the stream has closed)."""
        if not self.closed:
            self.h2.acknowledge_received_data(n, stream_id)
            self._flush()

    def forget(self, stream: H2Stream) -> None:
        """Drop ``stream``; reset it first unless both halves are complete."""
        present = self.streams.pop(stream.id, None) is not None
        if stream._ack:
            self.acknowledge(stream.id, stream._ack)
            stream._ack = 0
        if present and not (stream.ended and stream.sent_end) and stream.error is None and not self.closed:
            try:
                self.h2.reset_stream(stream.id, H2Error.CANCEL)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
            self._flush()
        for _, flow in stream.chunks:  # never read: the connection window comes back
            self.acknowledge(stream.id, flow)
        stream.chunks.clear()
        if present:
            stream._fail(UpstreamError("stream closed", before_head=not stream.head.done()))
            self._maybe_idle()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            try:
                self.h2.close_connection()
                self._write_now()
            except h2.exceptions.ProtocolError:
                pass
            self.transport.close()
        self.closed = True

    # -- internals
    def _flush(self) -> None:
        """Write what h2 queued, once per loop turn: the frames of every stream that moved in
        this turn go out in one write (one syscall, not one per frame)."""
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._write_now)

    def _write_now(self) -> None:
        self._flush_due = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _event(self, event: h2.events.Event) -> None:
        stream_id = getattr(event, "stream_id", 0)
        stream = self.streams.get(stream_id) if stream_id else None
        if isinstance(event, h2.events.DataReceived):
            if stream is None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
                return
            stream.chunks.append((event.data, event.flow_controlled_length))
            stream._wake_reader()
            if event.stream_ended is not None:
                self._ended(stream)
        elif isinstance(event, h2.events.ResponseReceived):
            if stream is not None and not stream.head.done():
                pseudo, regular = split_pseudo(event.headers)
                stream.head.set_result((int(pseudo.get(":status", "502")), regular))
                if event.stream_ended is not None:
                    self._ended(stream)
        elif isinstance(event, h2.events.TrailersReceived):
            if stream is not None:
                stream.trailers = split_pseudo(event.headers)[1]
                self._ended(stream)
        elif isinstance(event, h2.events.StreamEnded):
            if stream is not None:
                self._ended(stream)
        elif isinstance(event, h2.events.WindowUpdated):
            if stream_id == 0:
                for one in list(self.streams.values()):
                    one._wake_writer()
            elif stream is not None:
                stream._wake_writer()
        elif isinstance(event, h2.events.StreamReset):
            if stream is not None:
                self.streams.pop(stream_id, None)
                before = not stream.head.done()
                if event.error_code == H2Error.REFUSED_STREAM and before:
                    stream._fail(StreamRefused("upstream refused the stream", retriable=True))
                else:
                    stream._fail(UpstreamReset(event.error_code, before))
                self._maybe_idle()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.going_away = True
            last = event.last_stream_id if event.last_stream_id is not None else 0
            for sid, one in list(self.streams.items()):
                if sid > last:
                    self.streams.pop(sid)
                    one._fail(StreamRefused("upstream going away before this stream", retriable=True))
            self._maybe_idle()

    def _ended(self, stream: H2Stream) -> None:
        stream.ended = True
        stream._wake_reader()

    def _maybe_idle(self) -> None:
        if self.going_away and not self.streams:
            self.close()
        if self._on_idle is not None and not self.streams:
            self._on_idle(self)

    def _lost(self, error: UpstreamError) -> None:
        self.closed = True
        self.resume_writing()
        for one in list(self.streams.values()):
            one._fail(UpstreamError(error.reason, before_head=not one.head.done()))
        self.streams.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()
        if self._on_idle is not None:
            self._on_idle(self)


class H2Pool:
    """HTTP/2 connections per origin, and which ``https://`` origins speak h2 (learnt by ALPN
    on the first connection and kept for the process's life)."""

    def __init__(self, connect_timeout: float, tls: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self._tls = tls
        self._conns: dict[Origin, list[H2UpstreamConnection]] = {}
        self._locks: dict[Origin, asyncio.Lock] = {}
        #: https origins known to answer ALPN h2 (True) or only HTTP/1.1 (False)
        self.alpn: dict[Origin, bool] = {}
        self.opened = 0

    def tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    async def speaks_h2(self, origin: Origin) -> bool:
        """For an ``https`` origin: connect once (ALPN h2, http/1.1) and remember the answer.

        Raises:
            UpstreamError: the origin cannot be reached.
        """
        known = self.alpn.get(origin)
        if known is not None:
            return known
        try:
            await self.connection(origin)
        except _NotH2:
            return False
        return self.alpn.get(origin, False)

    async def connection(self, origin: Origin) -> H2UpstreamConnection:
        """A usable connection to ``origin``: an open one with room, else a new one.

        Raises:
            UpstreamError: connect failed or timed out (``connect=True``).
        """
        for conn in self._conns.get(origin, ()):
            if conn.usable:
                return conn
        lock = self._locks.setdefault(origin, asyncio.Lock())
        async with lock:  # one dial at a time per origin: a burst shares the new connection
            for conn in self._conns.get(origin, ()):
                if conn.usable:
                    return conn
            return await self._open(origin)

    async def _open(self, origin: Origin) -> H2UpstreamConnection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            tls = _alpn_context(self.tls_context())
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: H2UpstreamConnection(origin, self._dropped),
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
        if tls is not None:
            sslobj = transport.get_extra_info("ssl_object")
            speaks = sslobj is not None and sslobj.selected_alpn_protocol() == "h2"
            if self.alpn.get(origin) is None:
                log.info("upstream %s://%s:%d: ALPN %s", scheme, host, port, "h2" if speaks else "http/1.1")
            self.alpn[origin] = speaks
            if not speaks:
                transport.close()
                raise _NotH2()
        self.opened += 1
        self._conns.setdefault(origin, []).append(conn)
        return conn

    def _dropped(self, conn: H2UpstreamConnection) -> None:
        if conn.closed:
            conns = self._conns.get(conn.origin)
            if conns is not None and conn in conns:
                conns.remove(conn)

    @property
    def open_connections(self) -> int:
        return sum(len(c) for c in self._conns.values())

    async def close(self) -> None:
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.close()
        self._conns.clear()


class _NotH2(UpstreamError):
    """An https origin answered ALPN http/1.1: serve it over HTTP/1.1."""

    def __init__(self) -> None:
        super().__init__("origin speaks HTTP/1.1", connect=True)


def _alpn_context(base: ssl.SSLContext) -> ssl.SSLContext:
    """``base`` with ALPN h2 and http/1.1 offered (set once: contexts are shared)."""
    base.set_alpn_protocols(["h2", "http/1.1"])
    return base
