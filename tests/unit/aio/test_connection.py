"""shared.aio.connection: the adapter's contract, two real connections over a socketpair.

Flush coalescing, blocking on the window and the wake-up, resets both ways, teardown (every
stream failed, every task awaited, the WebSocket dropped), drain, bad messages, a silent peer,
a full socket buffer.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side

from shared.aio.connection import TunnelConnection, TunnelStream, ws_limits
from shared.errors import SessionClosed, StreamReset, TooManyStreams
from shared.frames import GoAwayCode, ResetCode
from shared.heads import RequestHead, ResponseHead, StreamKind
from shared.messages import Routes, RouteSpec
from shared.mux import Role, Session, SessionState
from shared.sizes import MAX_MESSAGE

from .aio_pair import ServerSide, pair, until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


def head(path: str = "/") -> RequestHead:
    return RequestHead(StreamKind.HTTP, "POST", path, "a.example", "https", "192.0.2.1", ())


async def read_all(stream: TunnelStream) -> bytes:
    out = bytearray()
    while chunk := await stream.read():
        out += chunk
    return bytes(out)


async def test_echo_round_trip_and_release() -> None:
    async with pair() as p:
        stream = p.server.open_stream(head())
        await stream.write(b"hello", end=True)
        reply = await stream.response(timeout=5)
        assert reply.status == 200
        assert await read_all(stream) == b"hello"
        assert stream.at_eof and stream.error is None and stream.session_name == "s-test"
        p.server.release(stream)
        assert p.server.streams_in_flight == 0
        await until(lambda: p.client.streams_in_flight == 0)


async def test_frames_queued_in_one_iteration_share_a_message() -> None:
    async with pair() as p:
        await until(lambda: not p.server._flush_pending)
        before = len(p.sent)
        streams = [p.server.open_stream(head(f"/{i}"), end_stream=True) for i in range(20)]
        await until(lambda: len(p.sent) > before)
        await asyncio.sleep(0)  # the flush callback has run: nothing else queued
        assert len(p.sent) == before + 1  # twenty OPEN frames, one WebSocket message
        for stream in streams:
            assert (await stream.response(timeout=5)).status == 200
            p.server.release(stream)


async def test_a_large_write_is_split_into_messages_within_the_limit() -> None:
    async with pair() as p:
        stream = p.server.open_stream(head())
        data = bytes(range(256)) * 4096  # 1 MiB: more than one window and one message
        writer = asyncio.ensure_future(stream.write(data, end=True))
        assert (await stream.response(timeout=5)).status == 200
        assert await read_all(stream) == data
        await writer
        assert max(p.sent) <= MAX_MESSAGE + 64 * 1024


async def test_a_writer_blocks_on_the_window_and_wakes_when_credit_returns() -> None:
    held: list[TunnelStream] = []
    gate = asyncio.Event()

    async def slow(stream: TunnelStream) -> None:
        held.append(stream)
        stream.send_reply(ResponseHead(200))
        await gate.wait()  # reads nothing until the test says so
        await read_all(stream)
        stream.end()

    async with pair(slow, window=16 * 1024) as p:
        stream = p.server.open_stream(head())
        writer = asyncio.ensure_future(stream.write(b"x" * 64 * 1024, end=True))
        await until(lambda: stream in p.server._blocked)
        assert not writer.done() and p.server.session.send_window(stream.id) <= 0
        gate.set()  # the reader consumes: WINDOW frames come back
        async with asyncio.timeout(5):
            await writer
        assert stream not in p.server._blocked


async def test_a_connection_window_update_wakes_every_blocked_writer() -> None:
    gate = asyncio.Event()

    async def slow(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(200))
        await gate.wait()
        await read_all(stream)
        stream.end()

    async with pair(slow, window=1 << 20, client_kw={"connection_window": 1 << 20}) as p:  # 2 MiB > 1 MiB
        streams = [p.server.open_stream(head(f"/{i}")) for i in range(2)]
        writers = [asyncio.ensure_future(s.write(b"y" * (1 << 20), end=True)) for s in streams]
        await until(lambda: len(p.server._blocked) >= 1)
        gate.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*writers)


async def test_the_server_reset_cancels_the_client_handler() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def hang(stream: TunnelStream) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with pair(hang) as p:
        stream = p.server.open_stream(head(), end_stream=True)
        await started.wait()
        stream.reset(ResetCode.CANCEL, "caller went away")
        async with asyncio.timeout(5):
            await cancelled.wait()
        assert isinstance(stream.error, StreamReset) and stream.error.code == ResetCode.CANCEL
        with pytest.raises(StreamReset):
            await stream.read()
        with pytest.raises(StreamReset):
            await stream.write(b"late")
        stream.end()  # a no-op on a reset stream
        assert p.server.streams_in_flight == 0
        await until(lambda: p.client.streams_in_flight == 0)


async def test_a_client_reset_reaches_the_waiting_response() -> None:
    async def refuse(stream: TunnelStream) -> None:
        stream.reset(ResetCode.NO_UPSTREAM, "no upstream")

    async with pair(refuse) as p:
        stream = p.server.open_stream(head(), end_stream=True)
        with pytest.raises(StreamReset) as caught:
            await stream.response(timeout=5)
        assert caught.value.code == ResetCode.NO_UPSTREAM and caught.value.reason == "no upstream"
        assert caught.value is not stream.error  # a fresh copy: no traceback cycle through the stream
        with pytest.raises(StreamReset):
            await stream.response()  # asked again: the same error


async def test_a_failing_handler_resets_with_internal_error() -> None:
    async def broken(stream: TunnelStream) -> None:
        raise RuntimeError("bug")

    async with pair(broken) as p:
        stream = p.server.open_stream(head(), end_stream=True)
        with pytest.raises(StreamReset) as caught:
            await stream.response(timeout=5)
        assert caught.value.code == ResetCode.INTERNAL_ERROR


async def test_no_handler_refuses_streams() -> None:
    async with pair(None) as p:
        stream = p.server.open_stream(head(), end_stream=True)
        with pytest.raises(StreamReset) as caught:
            await stream.response(timeout=5)
        assert caught.value.code == ResetCode.REFUSED


async def test_response_timeout() -> None:
    async def silent(stream: TunnelStream) -> None:
        await asyncio.sleep(60)

    async with pair(silent) as p:
        stream = p.server.open_stream(head(), end_stream=True)
        with pytest.raises(TimeoutError):
            await stream.response(timeout=0.05)


async def test_take_complete_body() -> None:
    async def answer(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(200))
        await stream.write(b"whole body", end=True)

    async with pair(answer) as p:
        stream = p.server.open_stream(head(), end_stream=True)
        await stream.response(timeout=5)
        async with asyncio.timeout(5):
            while (body := stream.take_complete_body()) is None:  # None until END_STREAM is in
                await asyncio.sleep(0)
        assert body == b"whole body"
        assert stream.take_complete_body() == b""  # taken


async def test_reply_with_end_stream_ends_the_body() -> None:
    async def empty(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(204), end=True)

    async with pair(empty) as p:
        stream = p.server.open_stream(head(), end_stream=True)
        assert (await stream.response(timeout=5)).status == 204
        assert await stream.read() == b""


async def test_teardown_fails_every_stream_and_awaits_every_task() -> None:
    started = asyncio.Event()

    async def hang(stream: TunnelStream) -> None:
        started.set()
        await asyncio.sleep(60)

    async with pair(hang) as p:
        stream = p.server.open_stream(head())
        await started.wait()
        p.client.abort()  # the link breaks
        async with asyncio.timeout(5):
            await p.server_run
            await p.client_run
        assert p.server.closed and p.client.closed
        assert p.server.ws is None and p.client.ws is None  # nothing keeps the WebSocket alive
        assert isinstance(stream.error, SessionClosed)
        with pytest.raises(SessionClosed):
            await stream.response()
        with pytest.raises(SessionClosed):
            await stream.write(b"late")
        assert not p.client._tasks and not p.server._tasks
        await p.server.close()  # closing an ended connection is a no-op
        p.server.abort()
        assert p.server.streams_in_flight == 0
        with pytest.raises(SessionClosed):
            p.server.open_stream(head())
        assert "websocket closed" in p.server.close_reason or p.server.close_reason


async def test_drain_waits_for_the_last_stream() -> None:
    gate = asyncio.Event()

    async def held(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(200))
        await gate.wait()
        stream.end()

    async with pair(held) as p:
        stream = p.server.open_stream(head(), end_stream=True)
        await stream.response(timeout=5)
        p.client.goaway(GoAwayCode.NO_ERROR, "client shutting down")
        assert not await p.client.drain(0.05)  # the handler still holds its stream
        drained = asyncio.ensure_future(p.client.drain(5))
        await asyncio.sleep(0)
        assert not drained.done()
        gate.set()
        assert await drained
        await until(lambda: p.goaways)
        assert p.goaways[0] == (GoAwayCode.NO_ERROR, "client shutting down")
        async with asyncio.timeout(5):
            await p.client.wait_closed()  # drained and idle: the client closes the session
        assert p.client.close_reason in ("drained", "websocket closed: drained") or p.client.closed


async def test_drain_with_nothing_in_flight_returns_at_once() -> None:
    async with pair() as p:
        assert await p.client.drain(0.01)


async def test_stream_limit() -> None:
    async with pair(server_kw={"max_streams": 1}) as p:
        p.server.open_stream(head())
        with pytest.raises(TooManyStreams):
            p.server.open_stream(head())


async def test_control_messages_reach_the_callback() -> None:
    async with pair() as p:
        await until(lambda: p.controls)  # the Welcome
        p.client.send_control(Routes(routes=[RouteSpec(host="b.example")]))
        await asyncio.sleep(0)


async def test_a_text_message_closes_with_1003() -> None:
    async with pair() as p:
        ws = p.client.ws
        assert ws is not None
        ws.transport.write(Frame(Opcode.TEXT, b"hi").serialize(mask=True))
        async with asyncio.timeout(5):
            await p.server_run
        assert p.server.close_reason == "text message on the tunnel"


async def test_a_protocol_violation_closes_the_session() -> None:
    async with pair() as p:
        ws = p.client.ws
        assert ws is not None
        ws.send_message([b"\xff" * 16])  # not a frame the session knows
        async with asyncio.timeout(5):
            await p.server_run
        assert p.server.session.state is SessionState.CLOSED and p.server.session.error is not None


async def test_a_silent_peer_is_found_by_the_heartbeat() -> None:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    try:
        _, sws = await loop.create_connection(lambda: ServerSide(Protocol(Side.SERVER), None), sock=a)  # type: ignore[arg-type]
        session = Session(Role.SERVER, heartbeat_interval=0.05, heartbeat_timeout=0.2, now=loop.time())
        conn = TunnelConnection(sws, session, name="silent")
        async with asyncio.timeout(5):
            await conn.run()  # b never says a word
        assert conn.closed and "no data from peer" in conn.close_reason
    finally:
        a.close()
        b.close()


async def test_a_full_socket_buffer_defers_the_flush_until_it_drains() -> None:
    async with pair() as p:
        ws = p.server.ws
        assert ws is not None and p.client.ws is not None
        p.client.ws.transport.pause_reading()  # the client stops reading: the server's buffer fills
        stream = p.server.open_stream(head())
        writer = asyncio.ensure_future(stream.write(b"z" * (4 << 20), end=True))
        await until(lambda: p.server._drainer is not None, timeout=10)
        p.client.ws.transport.resume_reading()
        assert (await stream.response(timeout=10)).status == 200
        assert len(await read_all(stream)) == 4 << 20
        await writer


async def test_ws_limits_fit_a_message() -> None:
    limits = ws_limits(16 * 1024)
    assert limits["max_size"] >= MAX_MESSAGE and limits["compression"] is None and limits["ping_interval"] is None


async def test_close_flushes_then_closes_the_websocket() -> None:
    async with pair() as p:
        p.server.goaway(GoAwayCode.SHUTDOWN, "bye")
        await p.server.close(1001, "going away")
        async with asyncio.timeout(5):
            await p.client_run
        assert p.goaways == [] and p.client.closed
