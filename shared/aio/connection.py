"""One tunnel session over a websockets connection: the thin asyncio adapter around
:class:`shared.mux.Session` (websockets ``asyncio/connection.py`` is the model).

Two classes with a small contract between them:

* :class:`TunnelConnection` owns the session, the WebSocket and every task. What a stream may
  ask of it is :class:`StreamOwner`: the loop, the session, ``flush()``, ``consumed()`` (the
  application took bytes: maybe grant credit), ``wait_writable()`` (a future resolved when
  credit comes back) and ``release()`` (forget a finished stream).
* :class:`TunnelStream` is one stream's ``read``/``write``/``reset``. The connection feeds it
  through four methods and nothing else: :meth:`~TunnelStream.on_data`,
  :meth:`~TunnelStream.on_reply`, :meth:`~TunnelStream.on_writable` and
  :meth:`~TunnelStream.on_error`. A stream may instead be handed to a :class:`StreamSink`
  (:meth:`~TunnelStream.attach`), which gets the same news as callbacks and sends with
  :meth:`~TunnelStream.send_now`: no task, future or queue per chunk (a TCP stream's socket,
  :mod:`shared.aio.splice`).

Messages reach the session from the websockets protocol callback (:mod:`shared.aio.wsfast`: no
reader task); ``flush()`` schedules one callback per loop iteration, so frames queued in the
same iteration share a WebSocket message. The hot-path rules this module keeps (no
``get_running_loop()``, ``create_task()`` or ``Event.wait()`` per request; stored errors raised
as fresh copies) are explained in docs/ARCHITECTURE.md. Teardown cancels and awaits every task
it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from websockets.exceptions import ConnectionClosed

from ..errors import SessionClosed, StreamReset, TunnelError
from ..events import (
    ConnectionFailed,
    ControlReceived,
    DataReceived,
    GoAwayReceived,
    ReplyReceived,
    ResetReceived,
    StreamOpened,
    TrailersReceived,
    WindowUpdated,
)
from ..frames import GoAwayCode, ResetCode
from ..heads import Headers, RequestHead, ResponseHead
from ..messages import Error, Hello, Routes, Welcome
from ..mux import Session, SessionState
from ..sizes import MAX_MESSAGE
from .wsfast import TunnelWebSocket

__all__ = ["StreamOwner", "StreamSink", "TunnelConnection", "TunnelStream", "ws_limits"]

log = logging.getLogger(__name__)

#: websockets logs handshake headers (Authorization included) at DEBUG: its logger is kept at
#: WARNING whatever the process log level, so a token never reaches a log.
WS_LOG = logging.getLogger("backhaul.websockets")
WS_LOG.setLevel(logging.WARNING)


def ws_limits(max_frame: int) -> dict[str, Any]:
    """websockets keyword arguments tuned for the tunnel: no compression (payloads are often
    compressed already and deflate costs CPU), our own heartbeat instead of WebSocket pings,
    a message limit that fits one frame or one coalesced batch, a larger write buffer."""
    return {
        "compression": None,
        "ping_interval": None,
        "ping_timeout": None,
        "max_size": max(max_frame, MAX_MESSAGE) + 64,
        "max_queue": 64,
        "write_limit": 1 << 20,
        "close_timeout": 2,
        "logger": WS_LOG,
    }


class StreamOwner(Protocol):
    """What a :class:`TunnelStream` needs from the connection that carries it."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def name(self) -> str: ...

    @property
    def session(self) -> Session: ...

    def flush(self) -> None: ...

    def consumed(self, stream_id: int, n: int) -> None: ...

    def wait_writable(self, stream: TunnelStream) -> asyncio.Future[None]: ...

    def mark_blocked(self, stream: TunnelStream) -> None: ...

    def release(self, stream: TunnelStream) -> None: ...


class StreamSink(Protocol):
    """What takes a stream's incoming side when it is attached (:meth:`TunnelStream.attach`)."""

    def stream_data(self, data: bytes | memoryview, end: bool) -> None:
        """Bytes arrived (maybe empty), and maybe the peer's end of stream. The sink grants the
        credit back with :meth:`TunnelStream.consume` when it has taken them."""

    def stream_writable(self) -> None:
        """Send credit came back after :meth:`TunnelStream.send_now` took less than offered."""

    def stream_failed(self, error: TunnelError) -> None:
        """The stream was reset or its session ended; the sink is detached."""


class TunnelStream:
    """The asyncio face of one stream."""

    __slots__ = (
        "_chunks",
        "_eof",
        "_error",
        "_loop",
        "_owner",
        "_reply",
        "_rwait",
        "_wwait",
        "handler",
        "head",
        "id",
        "sink",
        "trailers",
    )

    def __init__(
        self, owner: StreamOwner, stream_id: int, head: RequestHead | None = None, end_stream: bool = False
    ) -> None:
        self.id = stream_id
        self.head = head
        #: client side: the task serving this stream, cancelled when the server resets it
        self.handler: asyncio.Task[None] | None = None
        self._owner = owner
        # A list, not a deque: an empty deque is 760 bytes and every request in flight has a
        # stream; the queue holds at most a window's worth of frames, so pop(0) stays cheap.
        self._chunks: list[bytes | memoryview] = []
        self._eof = end_stream
        self._error: TunnelError | None = None
        self._loop = owner.loop
        self._rwait: asyncio.Future[None] | None = None  # read() waiting for data
        self._wwait: asyncio.Future[None] | None = None  # write() waiting for credit
        self._reply: asyncio.Future[ResponseHead] | None = None
        #: the peer's trailer fields (protocol version 2), set when they end its half
        self.trailers: Headers | None = None
        #: the callbacks that take the incoming side instead of read() (attach())
        self.sink: StreamSink | None = None

    # -- the connection side: the only calls the connection makes
    def on_data(self, data: bytes | memoryview, end: bool) -> None:
        """Bytes (and maybe the end of stream) arrived."""
        sink = self.sink
        if sink is not None:
            if end:
                self._eof = True
            sink.stream_data(data, end)
            return
        if data:
            self._chunks.append(data)
        if end:
            self._eof = True
        waiter = self._rwait
        if waiter is not None:
            self._rwait = None
            if not waiter.done():
                waiter.set_result(None)

    def on_trailers(self, headers: Headers) -> None:
        """The peer's trailers arrived: they end its half of the stream."""
        self.trailers = headers
        self.on_data(b"", True)

    def on_writable(self) -> None:
        """Credit came back: a blocked write() goes on."""
        sink = self.sink
        if sink is not None:
            sink.stream_writable()
            return
        waiter = self._wwait
        if waiter is not None:
            self._wwait = None
            if not waiter.done():
                waiter.set_result(None)

    def on_error(self, error: TunnelError) -> None:
        """The stream ended abnormally: every waiter raises ``error`` (the first one kept)."""
        if self._error is None:
            self._error = error
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.stream_failed(self._error)
        self.on_data(b"", False)
        self.on_writable()
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(error)
            self._reply.exception()  # mark retrieved: nobody may be waiting any more

    def on_reply(self, head: ResponseHead, end: bool) -> None:
        """The peer's REPLY arrived (exit-server side)."""
        if self._reply is None:
            self._reply = self._loop.create_future()
        if not self._reply.done():
            self._reply.set_result(head)
        if end:
            self.on_data(b"", True)

    # -- the application side
    @property
    def error(self) -> TunnelError | None:
        """The reset or session error that ended this stream, if any."""
        return self._error

    @property
    def session_name(self) -> str:
        """The id of the session carrying this stream (for log lines and audit records)."""
        return self._owner.name

    @property
    def at_eof(self) -> bool:
        """True when the peer half-closed and every chunk was read."""
        return self._eof and not self._chunks

    async def response(self, timeout: float | None = None) -> ResponseHead:
        """Exit-server side: wait for the client's REPLY.

        Args:
            timeout: seconds to wait (a timer handle, not ``asyncio.timeout``: this is the hot path).

        Raises:
            StreamReset: the client reset the stream before replying.
            SessionClosed: the tunnel dropped.
            TimeoutError: no REPLY within ``timeout``.
        """
        if self._reply is None:
            self._reply = self._loop.create_future()
            if self._error is not None:
                raise _fresh(self._error)
        reply = self._reply
        try:
            if reply.done() or timeout is None:
                return await reply
            handle = self._loop.call_later(timeout, _expire, reply)
            try:
                return await reply
            finally:
                handle.cancel()
        except (TunnelError, TimeoutError) as exc:  # kept by the future: see _fresh
            raise _fresh(exc) from None

    def take_complete_body(self) -> bytes | None:
        """When the whole body has already arrived, take it at once (so a small response goes
        out in one write); None when more is to come or the stream failed."""
        if not self._eof or self._error is not None:
            return None
        body = b"".join(self._chunks)
        self._chunks.clear()
        if body:
            self._owner.consumed(self.id, len(body))
        return body

    async def read(self) -> bytes | memoryview:
        """Return the next chunk (bytes, or a read-only view for a large one), or b"" at the
        peer's end of stream.

        Raises:
            StreamReset / SessionClosed: the stream ended abnormally.
        """
        while True:
            if self._chunks:
                chunk = self._chunks.pop(0)
                self._owner.consumed(self.id, len(chunk))
                return chunk
            if self._error is not None:
                raise _fresh(self._error)
            if self._eof:
                return b""
            self._rwait = waiter = self._loop.create_future()
            await waiter

    async def write(self, data: bytes | memoryview, end: bool = False) -> None:
        """Send ``data`` (then END_STREAM if ``end``), waiting for credit as needed.

        Raises:
            StreamReset / SessionClosed: the stream ended abnormally.
        """
        owner = self._owner
        session = owner.session
        total = len(data)
        offset = 0
        view = memoryview(data) if total else None
        while True:
            if self._error is not None:
                raise _fresh(self._error)
            if session.state is SessionState.CLOSED:
                raise SessionClosed("tunnel closed")
            remaining = total - offset
            if remaining == 0:
                if end:
                    session.send_data(self.id, b"", True)
                    owner.flush()
                return
            window = session.send_window(self.id)
            if window <= 0:
                self._wwait = waiter = owner.wait_writable(self)
                await waiter
                continue
            n = min(window, remaining)
            last = n == remaining
            assert view is not None
            chunk = data if (offset == 0 and last) else view[offset : offset + n]  # copied once, into the message
            session.send_data(self.id, chunk, end and last)
            offset += n
            owner.flush()
            if last:
                return

    def attach(self, sink: StreamSink) -> None:
        """Hand the incoming side to ``sink``: from now on data, the end, credit and errors
        reach its callbacks (what arrived before is delivered at once), and :meth:`read` is
        not used. The sink sends with :meth:`send_now` and grants credit with :meth:`consume`;
        it is detached when the stream fails (``stream_failed``) or by setting
        :attr:`sink` to None."""
        self.sink = sink
        chunks, self._chunks = self._chunks, []
        for chunk in chunks:
            if self.sink is not sink:
                return
            sink.stream_data(chunk, False)
        if self.sink is not sink:
            return
        if self._error is not None:
            self.sink = None
            sink.stream_failed(self._error)
        elif self._eof:
            sink.stream_data(b"", True)

    def consume(self, n: int) -> None:
        """The sink took ``n`` received bytes: credit may go back to the peer."""
        self._owner.consumed(self.id, n)

    def send_now(self, data: bytes | memoryview) -> int:
        """Send as much of ``data`` as the send window allows, without waiting, and return the
        bytes taken. Fewer than ``len(data)``: the window is spent, and the sink's
        ``stream_writable`` is called when credit comes back.

        Raises:
            StreamReset / SessionClosed: the stream ended abnormally.
        """
        if self._error is not None:
            raise _fresh(self._error)
        owner = self._owner
        session = owner.session
        if session.state is SessionState.CLOSED:
            raise SessionClosed("tunnel closed")
        total = len(data)
        window = session.send_window(self.id)
        if window < total:
            owner.mark_blocked(self)
            if window <= 0:
                return 0
            data = memoryview(data)[:window]  # copied once, into the message
            total = window
        session.send_data(self.id, data, False)
        owner.flush()
        return total

    @property
    def carries_trailers(self) -> bool:
        """True when this stream's session negotiated TRAILERS (protocol version 2)."""
        return self._owner.session.carries_trailers

    def send_trailers(self, headers: Headers) -> None:
        """Send trailer fields, which half-close our side (after every write()).

        Raises:
            StreamReset / SessionClosed: the stream ended abnormally.
            LocalProtocolError: a version 1 session (check :attr:`carries_trailers` first).
        """
        if self._error is not None:
            raise _fresh(self._error)
        self._owner.session.send_trailers(self.id, headers)
        self._owner.flush()

    def end(self) -> None:
        """Half-close our side (no more DATA)."""
        session = self._owner.session
        if self._error is None and session.send_window(self.id) >= 0:
            with contextlib.suppress(TunnelError):
                session.send_data(self.id, b"", True)
                self._owner.flush()

    def reset(self, code: int = ResetCode.CANCEL, reason: str = "") -> None:
        """Abort the stream in both directions (no-op on the wire once it is closed)."""
        owner = self._owner
        if owner.session.state is not SessionState.CLOSED:
            owner.session.reset_stream(self.id, code, reason)
            owner.flush()
        self.on_error(StreamReset(code, reason or "reset locally"))
        owner.release(self)

    def send_reply(self, head: ResponseHead, end: bool = False) -> None:
        """Client side: send the response head."""
        if self._error is not None:
            raise _fresh(self._error)
        self._owner.session.send_reply(self.id, head, end)
        self._owner.flush()


_E = TypeVar("_E", bound=BaseException)


def _fresh(error: _E) -> _E:
    """A copy of a stored error to raise. Raising the stored object itself gives it a traceback
    that holds the raising frames (the stream, the caller's request and buffers) while the
    stream holds the error: a reference cycle that keeps all that alive until the cyclic GC
    runs (docs/RELIABILITY.md, "Findings"). The original's traceback is dropped too."""
    error.__traceback__ = None
    fresh = type(error).__new__(type(error))
    fresh.__dict__.update(error.__dict__)
    fresh.args = error.args
    return fresh


def _expire(reply: asyncio.Future[ResponseHead]) -> None:
    if not reply.done():
        reply.set_exception(TimeoutError())


StreamHandler = Callable[[TunnelStream], Awaitable[None]]
#: How the reading side ended: None (the session closed itself), or a close code and reason
#: for the WebSocket.
_Ending = tuple[int, str] | None


class TunnelConnection:
    """Runs a :class:`Session` over an open websockets connection.

    Args:
        ws: the open WebSocket (client or server side).
        session: the sans-I/O session; its handshake may already be queued.
        name: an id for log lines (session id).
        on_stream: client side, called in a new task for each stream the server opens.
        on_control: called for each control message (Hello, Welcome, Routes, Error).
        on_goaway: called when the peer starts draining.
    """

    # Slots, and dicts for sets (64 bytes empty where a set is 216), futures made when first
    # awaited: every idle tunnel holds one of these (docs/BENCHMARKS.md, round 12).
    __slots__ = (
        "_blocked",
        "_closed_waiter",
        "_done",
        "_drainer",
        "_flush_pending",
        "_idle",
        "_is_closed",
        "_on_control",
        "_on_goaway",
        "_on_stream",
        "_streams",
        "_tasks",
        "_tick_handle",
        "_tick_step",
        "close_reason",
        "loop",
        "name",
        "session",
        "ws",
    )

    def __init__(
        self,
        ws: TunnelWebSocket,
        session: Session,
        *,
        name: str = "-",
        on_stream: StreamHandler | None = None,
        on_control: Callable[[Hello | Welcome | Routes | Error], None] | None = None,
        on_goaway: Callable[[int, str], None] | None = None,
    ) -> None:
        #: the WebSocket; None once run() has ended (an ended session must not keep it, and
        #: its TLS buffers, alive: docs/RELIABILITY.md, "Findings")
        self.ws: TunnelWebSocket | None = ws
        self.session = session
        self.name = name
        self._on_stream = on_stream
        self._on_control = on_control
        self._on_goaway = on_goaway
        self._streams: dict[int, TunnelStream] = {}
        self._blocked: dict[TunnelStream, None] = {}  # streams waiting for send credit
        self._flush_pending = False
        self._drainer: asyncio.Task[None] | None = None  # waits while the socket buffer is full
        self._tasks: dict[asyncio.Task[None], None] = {}
        self._is_closed = False
        self._closed_waiter: asyncio.Future[None] | None = None  # wait_closed() waits on it
        self._idle: asyncio.Future[None] | None = None  # drain() waits on it for the streams to end
        self.loop = asyncio.get_running_loop()
        self._done: asyncio.Future[_Ending] = self.loop.create_future()  # the reading side ended
        self.close_reason = ""
        self._tick_step = 1.0
        self._tick_handle: asyncio.TimerHandle | None = None  # the next _tick (while run() runs)

    # ------------------------------------------------------------------ API

    @property
    def closed(self) -> bool:
        return self._is_closed

    @property
    def streams_in_flight(self) -> int:
        return len(self._streams)

    def flush(self) -> None:
        """Write what the session has queued, once per loop iteration (frames queued in the same
        iteration go out together)."""
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def consumed(self, stream_id: int, n: int) -> None:
        """The application took ``n`` bytes of a stream: credit may go back to the peer."""
        if self.session.consume(stream_id, n):
            self.flush()

    def wait_writable(self, stream: TunnelStream) -> asyncio.Future[None]:
        """A future resolved (by :meth:`TunnelStream.on_writable`) when ``stream`` may get send
        credit again, or when it fails."""
        self._blocked[stream] = None
        return self.loop.create_future()

    def mark_blocked(self, stream: TunnelStream) -> None:
        """Call :meth:`TunnelStream.on_writable` when ``stream`` may get send credit again."""
        self._blocked[stream] = None

    def release(self, stream: TunnelStream) -> None:
        """Forget a stream the application has finished with."""
        self._streams.pop(stream.id, None)
        self._blocked.pop(stream, None)
        if not self._streams:
            self._wake_idle()
        self._check_idle()

    def open_stream(self, head: RequestHead, end_stream: bool = False) -> TunnelStream:
        """Exit-server side: open a stream.

        Raises:
            SessionClosed, TooManyStreams: the session cannot take a new stream.
            LocalProtocolError: the head does not fit in one frame.
        """
        stream_id = self.session.open_stream(head, end_stream)
        stream = TunnelStream(self, stream_id, head)
        self._streams[stream_id] = stream
        self.flush()
        return stream

    def send_control(self, message: Routes | Error) -> None:
        self.session.send_control(message)
        self.flush()

    def goaway(self, code: int = GoAwayCode.NO_ERROR, reason: str = "") -> None:
        """Start draining this session."""
        self.session.send_goaway(code, reason)
        self.flush()
        self._check_idle()

    async def wait_closed(self) -> None:
        if self._is_closed:
            return
        if self._closed_waiter is None:
            self._closed_waiter = self.loop.create_future()
        await asyncio.shield(self._closed_waiter)  # several callers may wait on it

    async def drain(self, timeout: float) -> bool:
        """Wait until no stream is in flight (or ``timeout``); True when drained."""
        if not self._streams or self.closed:
            return True
        if self._idle is None or self._idle.done():
            self._idle = self.loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._idle)  # several callers may wait on it
        except TimeoutError:
            return False
        return True

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the WebSocket after flushing what is queued."""
        self.close_reason = self.close_reason or reason
        await self._flush_now()
        ws = self.ws
        if ws is None:
            return
        try:
            async with asyncio.timeout(2):
                await ws.close(code, reason[:120])
        except (TimeoutError, ConnectionClosed, OSError):
            self.abort()

    def abort(self) -> None:
        """Drop the transport at once (dead peer)."""
        if self.ws is not None:
            self.ws.transport.abort()

    async def run(self) -> None:
        """Run until the session ends; then fail every stream and await every task."""
        ws = self.ws
        assert ws is not None, "run() once"
        self._tick_step = min(1.0, self.session.heartbeat_interval / 2)
        self._tick_handle = self.loop.call_later(self._tick_step, self._tick)
        self.flush()
        try:
            await self._reader(ws)
        finally:
            ws.detach()
            await self._flush_now()
            if self._tick_handle is not None:
                self._tick_handle.cancel()
                self._tick_handle = None
            if self._drainer is not None:
                self._drainer.cancel()
            self._teardown()
            tasks = list(self._tasks)
            if self._drainer is not None:
                tasks.append(self._drainer)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # The callbacks are closures over this connection, and streams failed with a stored
            # error are in cycles through its traceback: drop them with the WebSocket.
            self._on_stream = self._on_control = self._on_goaway = None
            self._is_closed = True
            waiter, self._closed_waiter = self._closed_waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            self._wake_idle()
            self.ws = None

    # ------------------------------------------------------------------ internals

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    def _wake_idle(self) -> None:
        """No stream in flight any more (or the session ended): drain() returns."""
        idle, self._idle = self._idle, None
        if idle is not None and not idle.done():
            idle.set_result(None)

    def _teardown(self) -> None:
        error = self.session.error
        if not isinstance(error, TunnelError) or isinstance(error, StreamReset):
            error = SessionClosed(self.close_reason or "tunnel closed")
        if self.session.state is not SessionState.CLOSED:
            self.session.close(error)
        for stream in list(self._streams.values()):
            stream.on_error(error if isinstance(error, SessionClosed) else SessionClosed(str(error)))
        self._streams.clear()
        self._blocked.clear()

    async def _reader(self, ws: TunnelWebSocket) -> None:
        """Attach to the websocket (messages arrive in :meth:`_on_message`) and wait until the
        session ends or the websocket closes."""
        ws.attach(self._on_message, self._on_bad_message)
        # Woken by whichever comes first: callbacks on the two futures, not a task around
        # ws.wait_closed() and asyncio.wait (about 1.3 KiB per idle tunnel).
        lost = ws.connection_lost_waiter
        woken = self.loop.create_future()

        def wake(_: asyncio.Future[Any]) -> None:
            if not woken.done():
                woken.set_result(None)

        lost.add_done_callback(wake)
        self._done.add_done_callback(wake)
        try:
            await woken
        finally:
            lost.remove_done_callback(wake)
            self._done.remove_done_callback(wake)
        if self._done.done():
            ending = None if self._done.cancelled() else self._done.result()
            if ending is not None:
                await self.close(*ending)
            return
        rcvd = ws.protocol.close_rcvd
        why = rcvd.reason if rcvd else "no close frame"
        self.close_reason = self.close_reason or f"websocket closed: {why}"

    def _end(self, code: int | None = None, reason: str = "") -> None:
        """The reading side is over: run() closes the websocket (with ``code``) and tears down."""
        if not self._done.done():
            self._done.set_result((code, reason) if code is not None else None)

    def _on_message(self, message: bytes) -> None:
        """One binary WebSocket message, from the websockets protocol callback."""
        session = self.session
        if self._done.done():
            return
        try:
            session.receive(message, self.loop.time())
            self._handle_events()
        except Exception:  # a bug here must not unwind into websockets' data_received
            log.exception("session %s: failed handling a message", self.name)
            self.close_reason = "internal error"
            self._end(1011, "internal error")
            return
        if session.state is SessionState.CLOSED:
            self._end(1002 if session.error else 1000, str(session.error or "closed"))
        elif session.has_output:
            self.flush()

    def _on_bad_message(self, what: str) -> None:
        self.close_reason = what
        self._end(1003, "binary frames only")

    def _handle_events(self) -> None:
        streams = self._streams
        for event in self.session.events():
            # isinstance narrows the type; the order is by frequency on the hot path
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_data(event.data, event.end_stream)
            elif isinstance(event, WindowUpdated):
                self._wake_writers(event.stream_id)
            elif isinstance(event, ReplyReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_reply(event.head, event.end_stream)
            elif isinstance(event, StreamOpened):
                self._start_stream(event)
            elif isinstance(event, TrailersReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_trailers(event.headers)
            elif isinstance(event, ResetReceived):
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    stream.on_error(StreamReset(event.code, event.reason))
                    self._blocked.pop(stream, None)
                    if stream.handler is not None:  # the server gave up: cancel the upstream call
                        stream.handler.cancel()
                    if not streams:
                        self._wake_idle()
            elif isinstance(event, ControlReceived):
                if self._on_control is not None:
                    self._on_control(event.message)
            elif isinstance(event, GoAwayReceived):
                log.info("session %s: peer going away (code %s): %s", self.name, event.code, event.reason)
                if self._on_goaway is not None:
                    self._on_goaway(event.code, event.reason)
            elif isinstance(event, ConnectionFailed):
                self.close_reason = str(event.error)
                log.warning("session %s failed: %s", self.name, event.error)
        self._check_idle()

    def _check_idle(self) -> None:
        if self.session.is_idle and not self._streams:
            task = self.loop.create_task(self.close(1000, "drained"))
            self._tasks[task] = None
            task.add_done_callback(self._forget_task)

    def _wake_writers(self, stream_id: int) -> None:
        if stream_id == 0:
            blocked = self._blocked
            self._blocked = {}
            for stream in blocked:
                stream.on_writable()
            return
        one = self._streams.get(stream_id)
        if one is not None and one in self._blocked:
            del self._blocked[one]
            one.on_writable()

    def _start_stream(self, event: StreamOpened) -> None:
        stream = TunnelStream(self, event.stream_id, event.head, event.end_stream)
        self._streams[event.stream_id] = stream
        if self._on_stream is None:
            stream.reset(ResetCode.REFUSED, "no stream handler")
            return
        task = self.loop.create_task(self._run_stream(stream))
        stream.handler = task
        self._tasks[task] = None
        task.add_done_callback(self._forget_task)

    async def _run_stream(self, stream: TunnelStream) -> None:
        assert self._on_stream is not None
        try:
            await self._on_stream(stream)
        except TunnelError:
            pass
        except Exception:
            log.exception("session %s stream %d: handler failed", self.name, stream.id)
            stream.reset(ResetCode.INTERNAL_ERROR, "internal error")
        finally:
            self.release(stream)
            stream.handler = None  # a cancelled task keeps its CancelledError, whose traceback holds this frame

    def _flush(self) -> None:
        self._flush_pending = False
        if self._drainer is not None:
            return  # the socket buffer is full: the drainer flushes when it empties
        ws = self.ws
        if ws is None or not ws.can_send:
            return
        if ws.paused:
            self._drainer = self.loop.create_task(self._drain(ws))
            return
        try:
            for message in self.session.messages_to_send(MAX_MESSAGE):
                ws.send_message(message)
        except (OSError, RuntimeError) as exc:  # uvloop raises RuntimeError on a closed transport
            self.close_reason = self.close_reason or f"send failed: {exc}"
            self.abort()

    async def _drain(self, ws: TunnelWebSocket) -> None:
        try:
            await ws.drain()
        except (ConnectionClosed, OSError):
            return
        finally:
            self._drainer = None
        self._flush()

    async def _flush_now(self) -> None:
        """Write what is queued before closing (waiting for the socket buffer if need be)."""
        ws = self.ws
        if ws is None:
            return
        if ws.paused:
            try:
                async with asyncio.timeout(2):
                    await ws.drain()
            except (TimeoutError, ConnectionClosed, OSError):
                return
        if self._drainer is not None:
            self._drainer.cancel()
            self._drainer = None
        self._flush()

    def _tick(self) -> None:
        """Heartbeats, the silent-peer check and the idle buffer's release, every
        ``_tick_step`` seconds while run() runs: a timer callback, not a task per tunnel (a
        task, its coroutine and a sleep's future and timer were about 1 KiB of every idle
        tunnel, and a task wake-up per tunnel per second)."""
        self._tick_handle = None
        session = self.session
        if session.state is SessionState.CLOSED:
            return
        if self.ws is not None:
            self.ws.release_idle_buffer()
        session.tick(self.loop.time())
        self._handle_events()
        if session.has_output:
            self.flush()
        if session.closed:  # tick() closes a session whose peer went silent
            log.warning("session %s: %s", self.name, session.error)
            self.close_reason = str(session.error)
            task = self.loop.create_task(self._end_silent())
            self._tasks[task] = None
            task.add_done_callback(self._forget_task)
            return
        self._tick_handle = self.loop.call_later(self._tick_step, self._tick)

    async def _end_silent(self) -> None:
        """Send what is queued (the GOAWAY of a silent peer's session), then drop the transport."""
        await self._flush_now()
        self.abort()
