"""The raw bytes of an upgraded public connection (a relayed WebSocket), for a pump."""

from __future__ import annotations

import asyncio

from shared.aio.chunks import ChunkQueue

__all__ = ["RawFeeder"]


class RawFeeder:
    """An aiohttp payload parser (``RequestHandler.set_parser``: the contract is pinned by
    tests/unit/test_library_contracts.py) that queues every byte after the upgrade for a pump,
    pausing the transport above the queue's high-water mark."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._queue = ChunkQueue(loop)
        self._queue.transport = transport

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._queue.put(bytes(data))
        return False, b""

    def feed_eof(self) -> None:
        self._queue.end()

    async def read(self) -> bytes:
        return await self._queue.get()
