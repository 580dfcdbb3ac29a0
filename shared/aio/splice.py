"""A TCP connection joined to a tunnel stream by callbacks: the raw TCP path of both sides
(``exit_server/tcp.py``, the client's TCP upstreams).

:func:`shared.aio.pump.pump` moves bytes with two tasks, each woken through a future per chunk.
A :class:`Splice` is the socket's protocol and the stream's sink at once
(:meth:`shared.aio.connection.TunnelStream.attach`): a chunk read from the socket is offered to
the stream's send window inside ``data_received``, and a chunk from the tunnel is written to
the socket inside the stream's ``stream_data``. No task, future or queue per chunk (one
wake-up less per hop: docs/BENCHMARKS.md, round 18).

Flow control, both ways:

* socket -> tunnel: what the send window cannot take waits in ``_pending`` and the socket's
  reading pauses until the stream's ``stream_writable``;
* tunnel -> socket: credit goes back at once while the socket's write buffer is below its
  high-water mark, and is held (``_held``) from ``pause_writing`` until ``resume_writing``, so
  the peer sends at most one window beyond the mark.

Half-close travels both ways (EOF from the socket becomes END_STREAM, END_STREAM becomes a
write-EOF); the splice is done when both ends have travelled, or at the first failure: the
stream reset (its code and reason say which), the socket aborted. An optional idle timeout
ends a splice that moved no byte either way for that long, as the pump's does (a timer armed
once per period, a chunk only stores the time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ..errors import TunnelError
from ..frames import ResetCode
from .connection import TunnelStream

__all__ = ["Splice"]

log = logging.getLogger(__name__)


class Splice(asyncio.Protocol):
    """One TCP connection, then (after :meth:`join`) the stream it is spliced to.

    Bytes read before the join wait for it (reading pauses after the first chunk: the kernel
    holds the rest). Counters: :attr:`from_socket` and :attr:`to_socket`, in bytes.

    Args:
        on_connected: called with this splice when the connection is made (a listener's
            accept callback).
    """

    def __init__(self, on_connected: Callable[[Splice], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        #: bytes read from the socket / written to it
        self.from_socket = 0
        self.to_socket = 0
        self._on_connected = on_connected
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: TunnelStream | None = None
        self._done: asyncio.Future[None] | None = None
        self._pending: list[bytes | memoryview] = []  # read, not yet taken by the send window
        self._socket_eof = False  # the socket sent EOF (passed on once _pending is empty)
        self._sent_end = False  # END_STREAM went into the tunnel
        self._got_end = False  # the peer's END_STREAM became a write-EOF
        self._lost = False
        self._reading_paused = False
        self._writing_paused = False
        self._held = 0  # bytes written to the socket whose credit waits for resume_writing
        self._idle_timeout = 0.0
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._loop = asyncio.get_running_loop()
        callback, self._on_connected = self._on_connected, None
        if callback is not None:
            callback(self)

    def data_received(self, data: bytes) -> None:
        self.from_socket += len(data)
        if self._idle_timeout:
            self._last = self._now()
        stream = self._stream
        if stream is None or self._pending:
            self._pending.append(data)
            self._pause_reading()
            return
        try:
            taken = stream.send_now(data)
        except TunnelError as exc:
            self._fail(exc)
            return
        if taken < len(data):
            self._pending.append(memoryview(data)[taken:])
            self._pause_reading()

    def eof_received(self) -> bool:
        self._socket_eof = True
        if self._stream is not None and not self._pending:
            self._end_out()
        return True  # keep our sending side open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        stream = self._stream
        if stream is not None and not self._finished():
            # Whatever is left to travel cannot: the socket is gone.
            stream.reset(ResetCode.UPSTREAM_RESET, "connection reset")  # -> stream_failed

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        held, self._held = self._held, 0
        if held and self._stream is not None:
            self._stream.consume(held)

    # ------------------------------------------------------------------ the stream's sink

    def stream_data(self, data: bytes | memoryview, end: bool) -> None:
        stream = self._stream
        transport = self.transport
        if stream is None or transport is None:
            return
        if data:
            n = len(data)
            self.to_socket += n
            if self._idle_timeout:
                self._last = self._now()
            if self._lost or transport.is_closing():
                stream.reset(ResetCode.UPSTREAM_RESET, "connection reset")  # -> stream_failed
                return
            transport.write(data)
            if self._writing_paused:
                self._held += n
            else:
                stream.consume(n)
        if end and not self._got_end:
            self._got_end = True
            if not transport.is_closing() and transport.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    transport.write_eof()
            if self._sent_end:
                self._finish()

    def stream_writable(self) -> None:
        stream = self._stream
        if stream is None:
            return
        pending = self._pending
        while pending:
            chunk = pending[0]
            try:
                taken = stream.send_now(chunk)
            except TunnelError as exc:
                self._fail(exc)
                return
            if taken and self._idle_timeout:
                self._last = self._now()  # bytes moved: traffic, though read long ago
            if taken < len(chunk):
                pending[0] = memoryview(chunk)[taken:]
                return  # still blocked: called again when credit comes
            del pending[0]
        if self._socket_eof:
            self._end_out()
        elif self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def stream_failed(self, error: TunnelError) -> None:
        if self._finished():
            return
        log.debug("stream %d: splice ended: %s", self._stream.id if self._stream else 0, error)
        if self.transport is not None:
            self.transport.abort()
        self._finish()

    # ------------------------------------------------------------------ the owner's side

    def join(self, stream: TunnelStream, idle_timeout: float = 0) -> asyncio.Future[None]:
        """Splice the connection to ``stream`` (whose reply has been sent or received); the
        future is done when both directions have ended or the splice failed (then
        ``stream.error`` says why). ``idle_timeout`` seconds (0: none) without a byte either
        way reset the stream (CANCEL, "idle timeout").

        Cancelling the wait does not end the splice: the owner resets the stream, which does.
        """
        assert self._stream is None and self._loop is not None, "join() once, after connection_made"
        self._stream = stream
        self._done = done = self._loop.create_future()
        if self._lost:
            stream.reset(ResetCode.UPSTREAM_RESET, "connection reset")
            self._finish()
            return done
        stream.attach(self)  # what arrived before is delivered now
        if done.done():
            return done
        self.stream_writable()  # what the socket sent before, and its EOF
        if idle_timeout > 0 and not done.done():
            self._idle_timeout = idle_timeout
            self._last = self._now()
            self._timer = self._loop.call_at(self._last + idle_timeout, self._check_idle)
        return done

    @property
    def finished(self) -> bool:
        """True once the joined splice has ended (both ways, or failed)."""
        return self._finished()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # ------------------------------------------------------------------ internals

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._lost:
            self._reading_paused = True
            self.transport.pause_reading()

    def _end_out(self) -> None:
        stream = self._stream
        if self._sent_end or stream is None:
            return
        self._sent_end = True
        stream.end()
        if self._got_end:
            self._finish()

    def _fail(self, error: TunnelError) -> None:
        """send_now refused: the stream was reset (stream_failed has run) or the session is
        closed (the stream is reset here, as the pump does, which runs stream_failed)."""
        stream = self._stream
        if stream is not None and stream.error is None and stream.sink is self:
            stream.reset(ResetCode.UPSTREAM_RESET, "connection reset")
        self.stream_failed(error)  # (a no-op when the reset has run it)

    def _finished(self) -> bool:
        return self._done is not None and self._done.done()

    def _finish(self) -> None:
        done = self._done
        if done is None or done.done():
            return
        done.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()
        stream = self._stream
        if stream is not None and stream.sink is self:
            stream.sink = None  # no cycle left between the two

    def _check_idle(self) -> None:
        self._timer = None
        stream = self._stream
        if stream is None or self._finished():
            return
        idle = self._now() - self._last
        if idle < self._idle_timeout:
            assert self._loop is not None
            self._timer = self._loop.call_at(self._last + self._idle_timeout, self._check_idle)
            return
        log.info("stream %d: no byte either way for %.0fs: closed (idle timeout)", stream.id, idle)
        stream.reset(ResetCode.CANCEL, "idle timeout")  # -> stream_failed: the socket aborted
