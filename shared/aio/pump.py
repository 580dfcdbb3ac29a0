"""Byte pumps between a tunnel stream and a socket-like endpoint (TCP streams and WebSocket
passthrough). Half-close travels both ways: EOF from the socket becomes END_STREAM, END_STREAM
from the peer becomes a write-EOF (TCP) or a close (WebSocket)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from ..errors import TunnelError
from ..frames import ResetCode
from .connection import TunnelStream

__all__ = ["Endpoint", "RawFeeder", "pump", "stream_endpoint"]

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


async def pump(stream: TunnelStream, endpoint: Endpoint) -> int:
    """Copy bytes both ways until both directions ended. Returns bytes sent to the endpoint.

    A reset stream or a broken socket aborts both directions at once.
    """
    received = 0

    async def outbound() -> None:  # endpoint -> tunnel
        try:
            while data := await endpoint.recv():
                await stream.write(data)
            stream.end()
        except (ConnectionError, OSError):
            stream.reset(ResetCode.UPSTREAM_RESET, "connection reset")
            raise

    async def inbound() -> None:  # tunnel -> endpoint
        nonlocal received
        while chunk := await stream.read():
            received += len(chunk)
            await endpoint.send(chunk)
        endpoint.close_send()

    tasks = [asyncio.create_task(outbound()), asyncio.create_task(inbound())]
    try:
        for finished in asyncio.as_completed(tasks):
            await finished
    except (TunnelError, ConnectionError, OSError) as exc:
        log.debug("stream %d: pump ended: %s", stream.id, exc)
        endpoint.abort()
        if stream.error is None:
            stream.reset(ResetCode.UPSTREAM_RESET, "connection reset")
    finally:
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
