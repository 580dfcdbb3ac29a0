"""shared.aio.chunks.ChunkStream: received chunks go on as they are (small ones joined), reading
pauses and resumes around the marks, writes wait for the transport, EOF is a half-close and a
broken connection is an error. The transport is a recording stand-in."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared.aio.chunks import ChunkStream

pytestmark = pytest.mark.asyncio


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.paused = False
        self.eof_written = False
        self.closing = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True


def made() -> tuple[ChunkStream, Transport]:
    seen: list[ChunkStream] = []
    conn = ChunkStream(seen.append)
    transport = Transport()
    conn.connection_made(transport)
    assert seen == [conn]  # the accept callback ran
    return conn, transport


async def test_large_chunks_go_on_as_they_are_and_small_ones_are_joined() -> None:
    conn, _ = made()
    big = b"x" * 100_000
    conn.data_received(big)
    for piece in (b"a", b"bc", b"def"):
        conn.data_received(piece)
    first = await conn.recv()
    assert first is big  # the very object received: no copy
    assert await conn.recv() == b"abcdef"  # queued small pieces in one


async def test_joining_stops_at_the_limit() -> None:
    conn, _ = made()
    pieces = [bytes([i]) * 30_000 for i in range(4)]
    for piece in pieces:
        conn.data_received(piece)
    assert await conn.recv() == pieces[0] + pieces[1]  # 60,000 bytes; a third would pass 64 KiB
    assert await conn.recv() == pieces[2] + pieces[3]


async def test_reading_pauses_above_high_and_resumes_below_low() -> None:
    conn, transport = made()
    for _ in range(5):
        conn.data_received(b"y" * 256 * 1024)  # 1.25 MiB queued
    assert transport.paused
    for _ in range(4):
        await conn.recv()
    assert transport.paused  # 256 KiB left: not below LOW yet
    assert await conn.recv() == b"y" * 256 * 1024
    assert not transport.paused  # nothing left: reading again


async def test_eof_is_a_half_close_and_a_waiting_recv_wakes() -> None:
    conn, transport = made()
    waiting = asyncio.ensure_future(conn.recv())
    await asyncio.sleep(0)
    conn.data_received(b"last")
    assert await waiting == b"last"
    later = asyncio.ensure_future(conn.recv())
    await asyncio.sleep(0)
    assert conn.eof_received() is True  # the transport stays open for our writes
    assert await later == b""
    await conn.send(b"still writing")
    assert transport.written == [b"still writing"]
    conn.close_send()
    assert transport.eof_written


async def test_a_broken_connection_raises_once_then_reads_eof() -> None:
    conn, _ = made()
    conn.data_received(b"before")
    conn.connection_lost(ConnectionResetError("reset by peer"))
    assert await conn.recv() == b"before"  # what arrived first is still delivered
    with pytest.raises(ConnectionResetError):
        await conn.recv()
    assert await conn.recv() == b""
    with pytest.raises(ConnectionResetError):
        await conn.send(b"x")


async def test_send_waits_while_the_transport_is_paused() -> None:
    conn, transport = made()
    conn.pause_writing()
    sending = asyncio.ensure_future(conn.send(b"data"))
    await asyncio.sleep(0.01)
    assert transport.written == [b"data"] and not sending.done()
    conn.resume_writing()
    await asyncio.wait_for(sending, 1)
    conn.pause_writing()
    stuck = asyncio.ensure_future(conn.send(b"more"))
    await asyncio.sleep(0.01)
    conn.connection_lost(None)  # the connection ends while a send waits
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(stuck, 1)


async def test_close_and_abort_are_idempotent() -> None:
    conn, transport = made()
    conn.abort()
    conn.close()
    conn.close_send()  # nothing to half-close on a closing transport
    assert transport.aborted and not transport.eof_written
