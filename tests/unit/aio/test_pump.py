"""shared.aio.pump: half-close both ways, the idle timeout, resets and broken endpoints, over
two real connections (tests/unit/aio/aio_pair.py) and a scripted endpoint."""

from __future__ import annotations

import asyncio
import socket

import pytest

from shared.aio.connection import TunnelStream
from shared.aio.pump import Endpoint, pump, stream_endpoint
from shared.errors import StreamReset
from shared.frames import ResetCode
from shared.heads import RequestHead, ResponseHead, StreamKind

from .aio_pair import pair, until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


class Scripted:
    """An endpoint whose received bytes come from a queue (None: EOF; an exception: raised)."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.sent: list[bytes] = []
        self.send_closed = asyncio.Event()
        self.aborted = False

    async def recv(self) -> bytes:
        item = await self.incoming.get()
        if isinstance(item, BaseException):
            raise item
        return item or b""

    async def send(self, data: bytes | memoryview) -> None:
        self.sent.append(bytes(data))

    def close_send(self) -> None:
        self.send_closed.set()

    def abort(self) -> None:
        self.aborted = True

    def endpoint(self) -> Endpoint:
        return Endpoint(self.recv, self.send, self.close_send, self.abort)


def tcp_head() -> RequestHead:
    return RequestHead(StreamKind.TCP, "CONNECT", "9000", "", "tcp", "192.0.2.1", ())


async def test_half_close_from_the_endpoint_then_the_peer() -> None:
    async with pair() as p:  # the client echoes and ends after our END_STREAM
        stream = p.server.open_stream(tcp_head())
        end = Scripted()
        for item in (b"abc", b"def", None):
            end.incoming.put_nowait(item)
        async with asyncio.timeout(5):
            received = await pump(stream, end.endpoint())
        assert b"".join(end.sent) == b"abcdef" and received == 6
        assert end.send_closed.is_set() and not end.aborted
        assert stream.error is None


async def test_half_close_from_the_peer_first_keeps_the_other_way_open() -> None:
    async def speak_first(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(200))
        await stream.write(b"banner", end=True)  # the peer is done sending, still reading
        got = bytearray()
        while chunk := await stream.read():
            got += chunk
        assert got == b"late reply"

    async with pair(speak_first) as p:
        stream = p.server.open_stream(tcp_head())
        end = Scripted()
        task = asyncio.ensure_future(pump(stream, end.endpoint()))
        async with asyncio.timeout(5):
            await end.send_closed.wait()  # END_STREAM from the peer became close_send
        assert end.sent == [b"banner"] and not task.done()
        end.incoming.put_nowait(b"late reply")
        end.incoming.put_nowait(None)
        async with asyncio.timeout(5):
            assert await task == 6
        assert stream.error is None


async def test_idle_timeout_resets_and_aborts() -> None:
    async def silent(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(200))
        await asyncio.sleep(60)

    async with pair(silent) as p:
        stream = p.server.open_stream(tcp_head())
        end = Scripted()
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(5):
            await pump(stream, end.endpoint(), idle_timeout=0.2)
        assert loop.time() - started >= 0.2  # never before the timeout
        assert end.aborted
        assert isinstance(stream.error, StreamReset) and stream.error.reason == "idle timeout"


async def test_traffic_rearms_the_idle_timer() -> None:
    async with pair() as p:
        stream = p.server.open_stream(tcp_head())
        end = Scripted()
        task = asyncio.ensure_future(pump(stream, end.endpoint(), idle_timeout=0.3))
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(5):  # a byte every 0.1 s: never 0.3 s idle
            end.incoming.put_nowait(b"%d" % i)
            await until(lambda i=i: len(end.sent) > i)
            await asyncio.sleep(0.1)
        end.incoming.put_nowait(None)
        async with asyncio.timeout(5):
            await task
        assert loop.time() - started >= 0.5 and stream.error is None and not end.aborted


async def test_a_peer_reset_aborts_the_endpoint() -> None:
    async def reset(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(200))
        await stream.read()
        stream.reset(ResetCode.UPSTREAM_RESET, "gone")

    async with pair(reset) as p:
        stream = p.server.open_stream(tcp_head())
        end = Scripted()
        end.incoming.put_nowait(b"hello")
        async with asyncio.timeout(5):
            await pump(stream, end.endpoint())
        assert end.aborted and isinstance(stream.error, StreamReset)


async def test_a_broken_endpoint_resets_the_stream() -> None:
    async with pair() as p:
        stream = p.server.open_stream(tcp_head())
        end = Scripted()
        end.incoming.put_nowait(ConnectionResetError("reset by peer"))
        async with asyncio.timeout(5):
            await pump(stream, end.endpoint())
        assert end.aborted
        assert isinstance(stream.error, StreamReset) and stream.error.code == ResetCode.UPSTREAM_RESET


async def test_cancelling_the_pump_cancels_both_halves() -> None:
    async with pair() as p:
        stream = p.server.open_stream(tcp_head())
        end = Scripted()
        task = asyncio.ensure_future(pump(stream, end.endpoint(), idle_timeout=30))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_stream_endpoint_over_asyncio_streams() -> None:
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    peer_reader, peer_writer = await asyncio.open_connection(sock=b)
    try:
        end = stream_endpoint(reader, writer, read_size=4)
        peer_writer.write(b"ping")
        assert await end.recv() == b"ping"
        await end.send(b"pong")
        assert await peer_reader.readexactly(4) == b"pong"
        end.close_send()  # write EOF: the peer reads EOF, and may still send
        assert await peer_reader.read() == b""
        peer_writer.write(b"more")
        assert await end.recv() == b"more"
        end.abort()
    finally:
        peer_writer.close()
        writer.close()
