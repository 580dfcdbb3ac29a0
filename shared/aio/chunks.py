"""Received bytes waiting for a reader, with flow control back to the transport.

:class:`ChunkQueue` is the one high/low-water chunk queue: the transport's reads are queued as
they are (no copy into a joined buffer); reading pauses above ``high`` bytes queued and resumes
below ``low``. The public listener queues request bodies and the bytes of an upgraded
connection in it (``exit_server/h1.py``). (A raw TCP connection needs no queue: it is spliced
to its stream, :mod:`shared.aio.splice`.)
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

__all__ = ["HIGH_WATER", "LOW_WATER", "ChunkQueue", "Pausable"]

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
