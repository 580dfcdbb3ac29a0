"""shared.aio.splice: a socket joined to a tunnel stream by callbacks. Half-close both ways,
bytes before the join, flow control both ways, the idle timeout, resets, a broken socket and a
cancelled owner, over two real connections (tests/unit/aio/aio_pair.py) and a loopback TCP socket."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

import shared.aio.splice as splice_module
from shared.aio.connection import TunnelStream
from shared.aio.splice import Splice
from shared.errors import SessionClosed, StreamReset
from shared.frames import ResetCode
from shared.heads import RequestHead, ResponseHead, StreamKind

from .aio_pair import pair, until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


def tcp_head() -> RequestHead:
    return RequestHead(StreamKind.TCP, "CONNECT", "9000", "", "tcp", "192.0.2.1", ())


@dataclass
class Socket:
    """The splice's socket (its protocol) and the far end of the connection, as asyncio streams."""

    splice: Splice
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    raw: socket.socket


@asynccontextmanager
async def spliced_socket(buffers: int = 0) -> AsyncIterator[Socket]:
    """``buffers``: the kernel's send and receive buffer sizes on the two ends (0: the
    defaults, which on loopback may hold megabytes)."""
    loop = asyncio.get_running_loop()
    with socket.socket() as listener:  # TCP, not a socketpair: RST exists
        if buffers:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)  # inherited
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        a = socket.socket()
        if buffers:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
        a.connect(listener.getsockname())
        b, _ = listener.accept()
    _, splice = await loop.create_connection(Splice, sock=a)
    reader, writer = await asyncio.open_connection(sock=b)
    try:
        yield Socket(splice, reader, writer, b)
    finally:
        splice.abort()
        writer.close()


async def test_half_close_from_the_socket_then_the_peer() -> None:
    async with pair() as p, spliced_socket() as s:  # the client echoes and ends after our END_STREAM
        stream = p.server.open_stream(tcp_head())
        done = s.splice.join(stream)
        s.writer.write(b"abc")
        await until(lambda: s.splice.from_socket == 3)
        s.writer.write(b"def")
        s.writer.write_eof()
        async with asyncio.timeout(5):
            assert await s.reader.read() == b"abcdef"  # the echo, then EOF from END_STREAM
            await done
        assert stream.error is None and stream.sink is None
        assert (s.splice.from_socket, s.splice.to_socket) == (6, 6)


async def test_half_close_from_the_peer_first_keeps_the_other_way_open() -> None:
    got = bytearray()

    async def speak_first(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(200))
        await stream.write(b"banner", end=True)  # the peer is done sending, still reading
        while chunk := await stream.read():
            got.extend(chunk)

    async with pair(speak_first) as p, spliced_socket() as s:
        stream = p.server.open_stream(tcp_head())
        done = s.splice.join(stream)
        async with asyncio.timeout(5):
            assert await s.reader.read() == b"banner"  # and the write-EOF
        assert not done.done()
        s.writer.write(b"late reply")
        s.writer.write_eof()
        async with asyncio.timeout(5):
            await done
            await until(lambda: got == b"late reply")
        assert stream.error is None


async def test_bytes_and_eof_before_the_join_go_through_in_order() -> None:
    async def banner_then_echo(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(200))
        await stream.write(b"hello:")
        while chunk := await stream.read():
            await stream.write(chunk)
        stream.end()

    async with pair(banner_then_echo) as p, spliced_socket() as s:
        stream = p.server.open_stream(tcp_head())
        await stream.response(5)
        s.writer.write(b"early")
        s.writer.write_eof()
        await until(lambda: s.splice.from_socket == 5)
        await until(lambda: stream._chunks)  # the banner is queued on the stream before the join, too
        done = s.splice.join(stream)
        async with asyncio.timeout(5):
            assert await s.reader.read() == b"hello:early"
            await done
        assert stream.error is None


async def test_socket_to_tunnel_waits_for_credit_and_pauses_reading() -> None:
    total = 1 << 20
    got = bytearray()

    async def slow_reader(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(200))
        while chunk := await stream.read():
            got.extend(chunk)
            await asyncio.sleep(0.001)
        stream.end()

    async with pair(slow_reader, window=16 * 1024) as p, spliced_socket() as s:
        stream = p.server.open_stream(tcp_head())
        done = s.splice.join(stream)
        payload = bytes(range(256)) * (total // 256)
        s.writer.write(payload)
        s.writer.write_eof()
        async with asyncio.timeout(20):
            await done
        assert bytes(got) == payload and stream.error is None


async def test_a_socket_nobody_reads_yet_loses_nothing() -> None:
    total = 4 << 20

    async def flood(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(200))
        await stream.write(b"x" * total, end=True)

    async with pair(flood, window=64 * 1024) as p, spliced_socket(buffers=32 * 1024) as s:
        stream = p.server.open_stream(tcp_head())
        done = s.splice.join(stream)
        transport = s.splice.transport
        assert transport is not None
        high = transport.get_write_buffer_limits()[1]
        await until(lambda: transport.get_write_buffer_size() > high)  # writing paused: credit held
        s.writer.write_eof()
        async with asyncio.timeout(20):
            data = await s.reader.read()  # now read it all
            await done
        assert len(data) == total and stream.error is None


async def test_idle_timeout_resets_and_aborts() -> None:
    async def silent(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(200))
        await asyncio.sleep(60)

    async with pair(silent) as p, spliced_socket() as s:
        stream = p.server.open_stream(tcp_head())
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(5):
            await s.splice.join(stream, idle_timeout=0.2)
            assert await s.reader.read() == b""  # aborted
        assert loop.time() - started >= 0.2  # never before the timeout
        assert isinstance(stream.error, StreamReset) and stream.error.reason == "idle timeout"


async def test_traffic_rearms_the_idle_timer() -> None:
    async with pair() as p, spliced_socket() as s:
        stream = p.server.open_stream(tcp_head())
        done = s.splice.join(stream, idle_timeout=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(5):  # a byte every 0.1 s: never 0.3 s idle
            s.writer.write(b"%d" % i)
            assert await s.reader.readexactly(1) == b"%d" % i
            await asyncio.sleep(0.1)
        s.writer.write_eof()
        async with asyncio.timeout(5):
            await done
        assert loop.time() - started >= 0.5 and stream.error is None


async def test_bytes_sent_as_credit_returns_count_as_traffic() -> None:
    """Bytes read before a long wait for credit still move when it comes back: that is
    traffic, and the idle timer must not fire while it lasts."""
    got = bytearray()

    async def slow_reader(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(200))
        while chunk := await stream.read():
            got.extend(chunk)
            await asyncio.sleep(0.05)  # pacing: credit returns a little at a time
        stream.end()

    total = 160 * 1024
    async with pair(slow_reader, window=16 * 1024) as p, spliced_socket() as s:
        stream = p.server.open_stream(tcp_head())
        done = s.splice.join(stream, idle_timeout=0.3)
        s.writer.write(b"y" * total)
        s.writer.write_eof()  # everything read at once, then no new read: only credit moves it
        async with asyncio.timeout(20):
            await done
            assert await s.reader.read() == b""
        assert stream.error is None and len(got) == total


async def test_a_peer_reset_aborts_the_socket() -> None:
    async def reset(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(200))
        await stream.read()
        stream.reset(ResetCode.UPSTREAM_RESET, "gone")

    async with pair(reset) as p, spliced_socket() as s:
        stream = p.server.open_stream(tcp_head())
        done = s.splice.join(stream)
        s.writer.write(b"hello")
        async with asyncio.timeout(5):
            await done
            assert await s.reader.read() == b""  # aborted (closed without a write-EOF first)
        assert s.splice.transport is not None and s.splice.transport.is_closing()
        assert isinstance(stream.error, StreamReset) and stream.sink is None


async def test_a_broken_socket_resets_the_stream() -> None:
    async with pair() as p, spliced_socket() as s:
        stream = p.server.open_stream(tcp_head())
        done = s.splice.join(stream)
        s.raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.writer.transport.abort()  # RST to the splice's socket
        async with asyncio.timeout(5):
            await done
        assert isinstance(stream.error, StreamReset) and stream.error.code == ResetCode.UPSTREAM_RESET


async def test_the_session_ending_aborts_the_socket() -> None:
    async def hold(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(200))
        await asyncio.sleep(60)

    async with pair(hold) as p, spliced_socket() as s:
        stream = p.server.open_stream(tcp_head())
        done = s.splice.join(stream)
        p.server.abort()
        async with asyncio.timeout(5):
            await done
            assert await s.reader.read() == b""
        assert isinstance(stream.error, SessionClosed)


async def test_an_owner_that_resets_ends_the_splice() -> None:
    async with pair() as p, spliced_socket() as s:
        stream = p.server.open_stream(tcp_head())
        done = s.splice.join(stream, idle_timeout=30)
        stream.reset(ResetCode.CANCEL, "server closing")  # what a cancelled owner does
        async with asyncio.timeout(5):
            await done
        assert s.splice.finished and stream.sink is None
        assert s.splice.transport is not None and s.splice.transport.is_closing()


# -- without sockets: a recording transport and a stand-in stream, for the bookkeeping. The
# compiled build's Splice takes only a real TunnelStream, so these run in the pure build; the
# socket tests above run in both.

pure_only = pytest.mark.skipif(
    not str(splice_module.__file__).endswith(".py"), reason="a stand-in stream: pure build only"
)


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.reading = True
        self.eof_written = False
        self.closing = False

    def write(self, data: bytes | memoryview) -> None:
        self.written.append(bytes(data))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


class Stream:
    """What a splice uses of a TunnelStream: a send window it is told, credit it records."""

    id = 1

    def __init__(self, window: int) -> None:
        self.window = window
        self.sent: list[bytes] = []
        self.credit: list[int] = []
        self.ended = False
        self.error: Exception | None = None
        self.refuse: Exception | None = None
        self.sink: Splice | None = None

    def attach(self, sink: Splice) -> None:
        self.sink = sink

    def send_now(self, data: bytes | memoryview) -> int:
        if self.refuse is not None:
            raise self.refuse
        n = min(self.window, len(data))
        self.window -= n
        self.sent.append(bytes(data[:n]))
        return n

    def consume(self, n: int) -> None:
        self.credit.append(n)

    def end(self) -> None:
        self.ended = True

    def reset(self, code: int, reason: str) -> None:
        self.error = StreamReset(code, reason)
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.stream_failed(self.error)


def joined(window: int = 1 << 20) -> tuple[Splice, Transport, Stream, asyncio.Future[None]]:
    splice = Splice()
    transport = Transport()
    splice.connection_made(transport)  # type: ignore[arg-type]
    stream = Stream(window)
    done = splice.join(stream)  # type: ignore[arg-type]
    return splice, transport, stream, done


@pure_only
async def test_credit_is_held_while_the_socket_buffer_is_full() -> None:
    splice, transport, stream, _ = joined()
    splice.stream_data(b"a" * 10, False)
    assert stream.credit == [10]  # taken by the socket: credit back at once
    splice.pause_writing()
    splice.stream_data(b"b" * 20, False)
    splice.stream_data(b"c" * 5, False)
    assert stream.credit == [10] and transport.written[1:] == [b"b" * 20, b"c" * 5]
    splice.resume_writing()
    assert stream.credit == [10, 25]  # held credit goes back when the buffer drains
    splice.resume_writing()
    assert stream.credit == [10, 25]


@pure_only
async def test_what_the_window_cannot_take_waits_and_reading_pauses() -> None:
    splice, transport, stream, done = joined(window=4)
    splice.data_received(b"abcdef")
    assert stream.sent == [b"abcd"] and not transport.reading
    splice.data_received(b"gh")  # (a read already under way when reading paused)
    splice.eof_received()
    assert stream.sent == [b"abcd"] and not stream.ended  # the EOF waits behind the bytes
    stream.window = 3
    splice.stream_writable()
    assert stream.sent == [b"abcd", b"ef", b"g"] and not stream.ended
    stream.window = 10
    splice.stream_writable()
    assert stream.sent[-1] == b"h" and stream.ended and not done.done()
    splice.stream_data(b"", True)
    assert transport.eof_written and done.done()


@pure_only
async def test_reading_resumes_when_the_pending_bytes_are_sent() -> None:
    splice, transport, stream, _ = joined(window=2)
    splice.data_received(b"abc")
    assert not transport.reading
    stream.window = 5
    splice.stream_writable()
    assert transport.reading and stream.sent == [b"ab", b"c"]


@pure_only
async def test_a_closed_session_refusing_bytes_resets_and_aborts() -> None:
    splice, transport, stream, done = joined()
    stream.refuse = SessionClosed("tunnel closed")
    splice.data_received(b"abc")
    assert done.done() and transport.closing
    assert isinstance(stream.error, StreamReset) and stream.error.code == ResetCode.UPSTREAM_RESET


@pure_only
async def test_a_refusal_while_sending_pending_bytes_ends_the_splice() -> None:
    splice, transport, stream, done = joined(window=1)
    splice.data_received(b"abc")
    stream.refuse = SessionClosed("tunnel closed")
    splice.stream_writable()
    assert done.done() and transport.closing and stream.error is not None


@pure_only
async def test_tunnel_bytes_for_a_lost_socket_reset_the_stream() -> None:
    splice, transport, stream, done = joined()
    transport.closing = True  # closing, not yet lost: nothing more can be written
    splice.stream_data(b"late", False)
    assert done.done() and transport.written == []
    assert isinstance(stream.error, StreamReset) and stream.error.code == ResetCode.UPSTREAM_RESET


@pure_only
async def test_a_socket_lost_before_the_join_resets_the_stream_there() -> None:
    splice = Splice()
    splice.connection_made(Transport())  # type: ignore[arg-type]
    splice.connection_lost(ConnectionResetError("reset by peer"))
    stream = Stream(1 << 20)
    done = splice.join(stream)  # type: ignore[arg-type]
    assert done.done() and stream.sink is None
    assert isinstance(stream.error, StreamReset) and stream.error.code == ResetCode.UPSTREAM_RESET


@pure_only
async def test_the_accept_callback_and_close() -> None:
    seen: list[Splice] = []
    splice = Splice(seen.append)
    transport = Transport()
    splice.connection_made(transport)  # type: ignore[arg-type]
    assert seen == [splice] and not splice.finished
    splice.close()
    splice.close()
    assert transport.closing
