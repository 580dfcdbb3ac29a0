"""shared.aio.chunks.ChunkQueue: received chunks go on as they are (small ones joined), reading
pauses and resumes around the marks, the end wakes a waiting reader and an error is raised
once. The transport is a recording stand-in."""

from __future__ import annotations

import asyncio

import pytest

from shared.aio.chunks import ChunkQueue

pytestmark = pytest.mark.asyncio

JOIN = 64 * 1024


class Transport:
    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def made() -> tuple[ChunkQueue, Transport]:
    queue = ChunkQueue(asyncio.get_running_loop())
    transport = Transport()
    queue.transport = transport
    return queue, transport


async def test_large_chunks_go_on_as_they_are_and_small_ones_are_joined() -> None:
    queue, _ = made()
    big = b"x" * 100_000
    queue.put(big)
    for piece in (b"a", b"bc", b"def"):
        queue.put(piece)
    first = await queue.get(JOIN)
    assert first is big  # the very object received: no copy
    assert await queue.get(JOIN) == b"abcdef"  # queued small pieces in one


async def test_joining_stops_at_the_limit() -> None:
    queue, _ = made()
    pieces = [bytes([i]) * 30_000 for i in range(4)]
    for piece in pieces:
        queue.put(piece)
    assert await queue.get(JOIN) == pieces[0] + pieces[1]  # 60,000 bytes; a third would pass 64 KiB
    assert await queue.get(JOIN) == pieces[2] + pieces[3]


async def test_reading_pauses_above_high_and_resumes_below_low() -> None:
    queue, transport = made()
    for _ in range(5):
        queue.put(b"y" * 256 * 1024)  # 1.25 MiB queued
    assert transport.paused and queue.paused
    for _ in range(4):
        await queue.get(JOIN)
    assert transport.paused  # 256 KiB left: not below LOW yet
    assert await queue.get(JOIN) == b"y" * 256 * 1024
    assert not transport.paused and queue.size == 0  # nothing left: reading again


async def test_the_end_wakes_a_waiting_reader() -> None:
    queue, _ = made()
    waiting = asyncio.ensure_future(queue.get(JOIN))
    await asyncio.sleep(0)
    queue.put(b"last")
    assert await waiting == b"last"
    later = asyncio.ensure_future(queue.get(JOIN))
    await asyncio.sleep(0)
    queue.end()
    assert await later == b""
    assert await queue.get(JOIN) == b""


async def test_an_error_is_raised_once_after_what_arrived_first() -> None:
    queue, _ = made()
    queue.put(b"before")
    queue.end(ConnectionResetError("reset by peer"))
    assert await queue.get(JOIN) == b"before"  # what arrived first is still delivered
    with pytest.raises(ConnectionResetError):
        await queue.get(JOIN)
    assert await queue.get(JOIN) == b""
