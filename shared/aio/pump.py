"""Byte pumps between a tunnel stream and a socket-like endpoint (TCP streams and WebSocket
passthrough). Half-close travels both ways: EOF from the socket becomes END_STREAM, END_STREAM
from the peer becomes a write-EOF (TCP) or a close (WebSocket).

An optional idle timeout ends a pump that moved no byte in either direction for that long: the
stream is reset (CANCEL, "idle timeout") and the endpoint aborted. The check is a timer armed
once per timeout period, not per chunk (a chunk only stores the time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable

from ..errors import TunnelError
from ..frames import ResetCode
from .connection import TunnelStream

__all__ = ["ChunkStream", "Endpoint", "RawFeeder", "pump", "set_keepalive", "stream_endpoint"]

log = logging.getLogger(__name__)


class Endpoint:
    """What a pump needs from the non-tunnel side."""

    def __init__(
        self,
        recv: Callable[[], Awaitable[bytes]],
        send: Callable[[bytes | memoryview], Awaitable[None]],
        close_send: Callable[[], None],
        abort: Callable[[], None],
    ) -> None:
        self.recv = recv
        self.send = send
        self.close_send = close_send
        self.abort = abort


def stream_endpoint(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, read_size: int = 256 * 1024
) -> Endpoint:
    """Endpoint over asyncio streams; ``close_send`` half-closes (write EOF)."""

    async def recv() -> bytes:
        return await reader.read(read_size)

    async def send(data: bytes | memoryview) -> None:
        writer.write(data)
        await writer.drain()

    def close_send() -> None:
        if writer.can_write_eof() and not writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()

    def abort() -> None:
        writer.transport.abort()

    return Endpoint(recv, send, close_send, abort)


class ChunkStream(asyncio.Protocol):
    """A plain TCP connection as a pump endpoint, without asyncio streams' buffer.

    A StreamReader copies every received ``bytes`` into its bytearray and out again (two
    copies per byte; TCP mode's client spent 28 % more CPU per 1 MiB than HTTP mode's, whose
    reads go on as they are). Here each received chunk goes on as it is; small chunks that
    queued up are joined (up to ``JOIN_BELOW`` bytes), so one ``recv`` still returns what is
    there. Reading pauses above ``HIGH`` bytes queued and resumes below ``LOW``; ``send``
    waits while the transport's write buffer is above its high-water mark. A peer's EOF is a
    half-close: ``recv`` returns ``b""`` and this side may still send.
    """

    HIGH = 1 << 20
    LOW = 256 * 1024
    JOIN_BELOW = 64 * 1024

    _loop: asyncio.AbstractEventLoop

    def __init__(self, on_connected: Callable[[ChunkStream], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_connected = on_connected
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._lost = False
        self._error: Exception | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()  # kept: each call is a getpid() on Python 3.11
        callback, self._on_connected = self._on_connected, None
        if callback is not None:
            callback(self)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self.HIGH and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake(self._data_waiter)

    def eof_received(self) -> bool:
        self._eof = True
        self._wake(self._data_waiter)
        return True  # keep our sending side open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        self._error = exc
        self._wake(self._data_waiter)
        self._wake(self._drain_waiter)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake(self._drain_waiter)

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ the endpoint

    async def recv(self) -> bytes:
        """The next received bytes; ``b""`` at EOF.

        Raises:
            OSError: the connection broke (reset, not a clean EOF).
        """
        chunks = self._chunks
        while not chunks:
            if self._eof:
                error, self._error = self._error, None
                if error is not None:
                    raise error
                return b""
            self._data_waiter = waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._data_waiter = None
        chunk = chunks.popleft()
        if chunks and len(chunk) < self.JOIN_BELOW:  # small pieces queued up: one write's worth
            parts = [chunk]
            total = len(chunk)
            while chunks and total + len(chunks[0]) <= self.JOIN_BELOW:
                piece = chunks.popleft()
                parts.append(piece)
                total += len(piece)
            chunk = b"".join(parts)
        self._size -= len(chunk)
        if self._reading_paused and self._size < self.LOW and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return chunk

    async def send(self, data: bytes | memoryview) -> None:
        """Write ``data``, then wait while the transport holds too much unsent.

        Raises:
            ConnectionResetError: the connection is gone.
        """
        if self._lost or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection lost")
        self.transport.write(data)
        while self._writing_paused and not self._lost:
            self._drain_waiter = waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._drain_waiter = None
        if self._lost:
            raise ConnectionResetError("connection lost")

    def close_send(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def endpoint(self) -> Endpoint:
        return Endpoint(self.recv, self.send, self.close_send, self.abort)


def set_keepalive(sock: socket.socket | None, idle: int = 60, interval: int = 15, count: int = 4) -> None:
    """TCP keepalive on a long-lived relayed connection: a peer that vanished without a FIN
    (power loss, a NAT that forgot the flow) is found after about ``idle + interval * count``
    seconds of silence (2 minutes by default, against the kernel's 2 h 11 min), so its stream,
    its socket and the upstream connection behind it are not held for ever."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
            option = getattr(socket, name, None)  # Linux names; other systems keep their defaults
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def pump(stream: TunnelStream, endpoint: Endpoint, idle_timeout: float = 0) -> int:
    """Copy bytes both ways until both directions ended. Returns bytes sent to the endpoint.

    A reset stream or a broken socket aborts both directions at once; so does ``idle_timeout``
    seconds (0: no limit) without a byte in either direction.
    """
    received = 0
    loop = asyncio.get_running_loop()
    last = loop.time()

    async def outbound() -> None:  # endpoint -> tunnel
        nonlocal last
        try:
            while data := await endpoint.recv():
                last = loop.time()
                await stream.write(data)
            stream.end()
        except (ConnectionError, OSError):
            stream.reset(ResetCode.UPSTREAM_RESET, "connection reset")
            raise

    async def inbound() -> None:  # tunnel -> endpoint
        nonlocal received, last
        while chunk := await stream.read():
            last = loop.time()
            received += len(chunk)
            await endpoint.send(chunk)
        endpoint.close_send()

    tasks = [asyncio.create_task(outbound()), asyncio.create_task(inbound())]
    timer: asyncio.TimerHandle | None = None
    idled = False

    def check_idle() -> None:
        nonlocal timer, idled
        idle = loop.time() - last
        if idle < idle_timeout:
            timer = loop.call_at(last + idle_timeout, check_idle)  # noqa: F821 (deleted only after the timer)
            return
        timer = None
        idled = True
        log.info("stream %d: no byte either way for %.0fs: closed (idle timeout)", stream.id, idle)
        stream.reset(ResetCode.CANCEL, "idle timeout")
        endpoint.abort()
        for task in tasks:
            task.cancel()

    if idle_timeout > 0:
        timer = loop.call_at(last + idle_timeout, check_idle)
    try:
        for finished in asyncio.as_completed(tasks):
            await finished
    except (TunnelError, ConnectionError, OSError) as exc:
        log.debug("stream %d: pump ended: %s", stream.id, exc)
        endpoint.abort()
        if stream.error is None:
            stream.reset(ResetCode.UPSTREAM_RESET, "connection reset")
    except asyncio.CancelledError:
        # (no local may hold the current task here: this frame is in the exception's traceback,
        # and the task holds the exception, which would make a cycle for the GC)
        if not idled or _being_cancelled():
            raise  # this task itself is being cancelled
        # else: the idle check cancelled both halves: the pump is over
    finally:
        if timer is not None:
            timer.cancel()
        # check_idle refers to itself (it re-arms its timer): a function <-> cell cycle that
        # would keep the tasks, their cancelled exceptions and every frame of their tracebacks
        # alive until the cyclic GC runs (docs/RELIABILITY.md: about 80 objects per WebSocket
        # session). Deleting the name empties the cell and breaks the cycle.
        del check_idle
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return received


class RawFeeder:
    """An aiohttp payload parser that hands the raw bytes of an upgraded connection to a
    pump, pausing the transport above a high-water mark."""

    HIGH = 1 << 20
    LOW = 256 * 1024

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._paused = False
        self._wake = asyncio.Event()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._chunks.append(bytes(data))
        self._size += len(data)
        self._wake.set()
        if self._size > self.HIGH and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        return False, b""

    def feed_eof(self) -> None:
        self._eof = True
        self._wake.set()

    async def read(self) -> bytes:
        while not self._chunks:
            if self._eof:
                return b""
            self._wake.clear()
            await self._wake.wait()
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._paused and self._size < self.LOW:
            self._paused = False
            self._transport.resume_reading()
        return chunk
