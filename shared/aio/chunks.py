"""Received bytes waiting for a reader, with flow control back to the transport.

:class:`ChunkQueue` is the one high/low-water chunk queue: the transport's reads are queued as
they are (no copy into a joined buffer); reading pauses above ``high`` bytes queued and resumes
below ``low``. :class:`ChunkStream` is a plain TCP connection built on it (a pump endpoint,
:mod:`shared.aio.pump`); the public listener queues request bodies and the bytes of an
upgraded connection in it (``exit_server/h1.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Protocol

from .pump import Endpoint

__all__ = ["HIGH_WATER", "LOW_WATER", "ChunkQueue", "ChunkStream", "Pausable"]

#: Reading pauses above this many bytes queued ...
HIGH_WATER = 1 << 20
#: ... and resumes below this many.
LOW_WATER = 256 * 1024


class Pausable(Protocol):
    """What a queue needs of its transport."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class ChunkQueue:
    """Chunks in arrival order, an end (maybe with an error), and one reader.

    Args:
        loop: the loop the reader waits on (kept: ``get_running_loop()`` per read is a
            ``getpid()`` on Python 3.11).
        high, low: the pause and resume marks, in bytes queued.
    """

    __slots__ = ("_chunks", "_eof", "_error", "_loop", "_paused", "_size", "_waiter", "high", "low", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop, high: int = HIGH_WATER, low: int = LOW_WATER) -> None:
        self.transport: Pausable | None = None
        self.high = high
        self.low = low
        self._loop = loop
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._error: Exception | None = None
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def size(self) -> int:
        """Bytes queued."""
        return self._size

    @property
    def paused(self) -> bool:
        """True while the transport's reading is paused by this queue."""
        return self._paused

    def put(self, data: bytes) -> None:
        """Queue one read (pausing the transport above the high mark)."""
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self.high and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def end(self, error: Exception | None = None) -> None:
        """No more data: the reader gets what is queued, then ``error`` (once), then ``b""``."""
        self._eof = True
        if error is not None and self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, join_below: int = 0) -> bytes:
        """The next chunk; small chunks queued behind a small first one are joined up to
        ``join_below`` bytes (one write's worth). ``b""`` at the end.

        Raises:
            Exception: the error the queue was ended with (once).
        """
        chunks = self._chunks
        while not chunks:
            if self._eof:
                error, self._error = self._error, None
                if error is not None:
                    raise error
                return b""
            self._waiter = waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        chunk = chunks.popleft()
        if chunks and len(chunk) < join_below:
            parts = [chunk]
            total = len(chunk)
            while chunks and total + len(chunks[0]) <= join_below:
                piece = chunks.popleft()
                parts.append(piece)
                total += len(piece)
            chunk = b"".join(parts)
        self._size -= len(chunk)
        if self._paused and self._size < self.low and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk


class ChunkStream(asyncio.Protocol):
    """A plain TCP connection as a pump endpoint, without asyncio streams' buffer.

    A StreamReader copies every received ``bytes`` into its bytearray and out again (two
    copies per byte: docs/ARCHITECTURE.md, "Performance tricks"). Here each received chunk
    goes on as it is, through a :class:`ChunkQueue`; small chunks that queued up are joined (up
    to ``JOIN_BELOW`` bytes), so one ``recv`` still returns what is there. ``send`` waits
    while the transport's write buffer is above its high-water mark. A peer's EOF is a
    half-close: ``recv`` returns ``b""`` and this side may still send.
    """

    JOIN_BELOW = 64 * 1024

    _queue: ChunkQueue
    _loop: asyncio.AbstractEventLoop

    def __init__(self, on_connected: Callable[[ChunkStream], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_connected = on_connected
        self._lost = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._loop = asyncio.get_running_loop()
        self._queue = ChunkQueue(self._loop)
        self._queue.transport = self.transport
        callback, self._on_connected = self._on_connected, None
        if callback is not None:
            callback(self)

    def data_received(self, data: bytes) -> None:
        self._queue.put(data)

    def eof_received(self) -> bool:
        self._queue.end()
        return True  # keep our sending side open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._queue.end(exc)
        self._wake_writer()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ the endpoint

    async def recv(self) -> bytes:
        """The next received bytes; ``b""`` at EOF.

        Raises:
            OSError: the connection broke (reset, not a clean EOF).
        """
        return await self._queue.get(self.JOIN_BELOW)

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
