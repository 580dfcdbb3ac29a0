"""shared.aio.wsfast: the tunnel's own parse of whole binary frames, fed any split of the byte
stream, and the hand-over to websockets at the first frame it does not take (close, text,
oversized). The transport is a recording stand-in: what is tested is the parse, not I/O."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.connection import Connection
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import Protocol, Side

from shared.aio.wsclient import TunnelClientConnection
from shared.aio.wsfast import TunnelServerConnection

pytestmark = pytest.mark.asyncio

MESSAGES = [
    b"a" * 10,
    bytes(range(256)) * 2,
    b"\x00" * 70_000,
    b"z",
    b"q" * 125,
    b"r" * 126,
    b"s" * 65_535,
    b"G" * 300_000,
]  # larger than uvloop reads at once


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def writelines(self, pieces: Any) -> None:
        self.write(b"".join(bytes(p) for p in pieces))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol


def server_side(max_size: int = 1 << 20) -> tuple[TunnelServerConnection, list[bytes], list[str]]:
    protocol = Protocol(Side.SERVER, max_size=max_size)  # open: past the opening handshake
    conn = TunnelServerConnection(protocol, server=None)  # type: ignore[arg-type]
    Connection.connection_made(conn, Transport())  # past the opening handshake (no server handler)
    conn.request = object()  # type: ignore[assignment]  # (the handshake's request, as after one)
    got: list[bytes] = []
    bad: list[str] = []
    conn.attach(got.append, bad.append)
    return conn, got, bad


def client_side() -> tuple[TunnelClientConnection, list[bytes], list[str]]:
    protocol = Protocol(Side.CLIENT)
    conn = TunnelClientConnection(protocol)  # type: ignore[arg-type]
    Connection.connection_made(conn, Transport())
    got: list[bytes] = []
    bad: list[str] = []
    conn.attach(got.append, bad.append)
    return conn, got, bad


def frames(messages: list[bytes], mask: bool) -> bytes:
    return b"".join(Frame(Opcode.BINARY, m).serialize(mask=mask) for m in messages)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 100, 4096, 1 << 30])
@pytest.mark.parametrize("side", ["server", "client"])
async def test_any_split_gives_the_same_messages(side: str, step: int) -> None:
    conn, got, bad = server_side() if side == "server" else client_side()
    data = frames(MESSAGES, mask=side == "server")  # the client masks what it sends
    for i in range(0, len(data), step):
        conn.data_received(data[i : i + step])
    assert got == MESSAGES and not bad
    assert conn._fast and conn._start == conn._end  # parsed here, nothing left over


async def test_close_frame_hands_over_to_websockets() -> None:
    conn, got, _ = server_side()
    close = Frame(Opcode.CLOSE, Close(1000, "bye").serialize()).serialize(mask=True)
    data = frames(MESSAGES[:2], mask=True) + close
    conn.data_received(data[:-3])
    conn.data_received(data[-3:])
    assert got == MESSAGES[:2]
    assert not conn._fast
    assert conn.protocol.close_rcvd is not None and conn.protocol.close_rcvd.code == 1000


async def test_oversized_frame_is_refused_by_websockets() -> None:
    conn, got, _ = server_side(max_size=1000)
    data = frames([b"ok", b"x" * 2000], mask=True)
    conn.data_received(data[:20])  # the big frame's header announces more than max_size
    conn.data_received(data[20:])
    assert got == [b"ok"] and not conn._fast
    assert conn.protocol.close_sent is not None and conn.protocol.close_sent.code == 1009


async def test_unmasked_frame_from_a_client_is_a_protocol_error() -> None:
    conn, got, _ = server_side()
    conn.data_received(frames([b"ok"], mask=True) + frames([b"naked"], mask=False))
    assert got == [b"ok"] and not conn._fast
    assert conn.protocol.close_sent is not None and conn.protocol.close_sent.code == 1002


async def test_text_message_goes_to_on_bad() -> None:
    conn, got, bad = server_side()
    conn.data_received(Frame(Opcode.TEXT, b"hello").serialize(mask=True))
    assert got == [] and bad == ["text message on the tunnel"]


async def test_messages_before_attach_are_replayed_in_order() -> None:
    protocol = Protocol(Side.SERVER)
    conn = TunnelServerConnection(protocol, server=None)  # type: ignore[arg-type]
    Connection.connection_made(conn, Transport())
    third = frames([b"thr"], mask=True)
    conn.data_received(frames([b"one", b"two"], mask=True) + third[:3])
    got: list[bytes] = []
    conn.attach(got.append, lambda why: None)
    assert got == [b"one", b"two"]
    assert not conn._fast  # websockets holds a partial frame: it keeps parsing this connection
    conn.data_received(third[3:])
    assert got == [b"one", b"two", b"thr"]


async def test_outgoing_frames_parse_back() -> None:
    client, client_got, _ = client_side()
    server, got, _ = server_side()
    for message in MESSAGES:
        client.send_message([message])
    # a message in pieces of every alignment masks as one
    pieces = [b"a", b"bc", b"def", b"ghij" * 2000, b"k"]
    client.send_message(pieces)  # type: ignore[arg-type]
    client.send_message([b"x", b"yz"])  # type: ignore[arg-type]
    wire = b"".join(client.transport.written)  # type: ignore[attr-defined]
    server.data_received(wire)
    assert got == [*MESSAGES, b"".join(pieces), b"xyz"]
    # the server side's frames are unmasked
    server.send_message([b"head", memoryview(b"-tail")])
    client.data_received(b"".join(server.transport.written))  # type: ignore[attr-defined]
    assert client_got == [b"head-tail"]


def feed_like_a_transport(conn: Any, data: bytes, sizes: list[int]) -> None:
    """What a transport does with a BufferedProtocol: ask for a buffer, fill part of it, report."""
    pos, i = 0, 0
    while pos < len(data):
        buf = conn.get_buffer(-1 if i % 3 == 0 else len(data) - pos + 256)
        n = min(len(buf), sizes[i % len(sizes)], len(data) - pos)
        assert n > 0
        buf[:n] = data[pos : pos + n]
        conn.buffer_updated(n)
        pos += n
        i += 1


@pytest.mark.parametrize("sizes", [[1], [5, 70_000, 3], [16_384], [300_001, 17], [1 << 30]])
@pytest.mark.parametrize("side", ["server", "client"])
async def test_buffered_reads_of_any_size_give_the_same_messages(side: str, sizes: list[int]) -> None:
    conn, got, bad = server_side() if side == "server" else client_side()
    reader = conn.transport.get_protocol()  # what the transport calls from attach on
    assert isinstance(reader, asyncio.BufferedProtocol) and not isinstance(reader, asyncio.Protocol)  # (uvloop)
    data = frames(MESSAGES * 3, mask=side == "server")
    feed_like_a_transport(reader, data, sizes)
    assert got == MESSAGES * 3 and not bad
    assert conn._fast and conn._start == conn._end


async def test_own_buffer_is_released_after_a_period_with_no_frame_spanning_reads() -> None:
    conn, got, _ = server_side()
    data = frames([b"x" * 200_000, b"y" * 200_000], mask=True)
    conn.data_received(data[:1000])  # a partial frame: kept in the connection's own buffer
    assert conn._view is not None
    conn.release_idle_buffer()
    assert conn._view is not None  # it holds a partial frame
    conn.data_received(data[1000:250_000])  # x complete, y partial
    conn.data_received(data[250_000:])
    assert got == [b"x" * 200_000, b"y" * 200_000]
    conn.release_idle_buffer()
    assert conn._view is not None  # a frame spanned reads within the last period
    conn.data_received(frames([b"heartbeat"], mask=True))  # whole small frames keep nothing alive
    conn.release_idle_buffer()
    assert conn._view is None  # empty, and no frame spanned reads for a whole period: given back
    conn.data_received(frames([b"z"], mask=True))
    assert got[-2:] == [b"heartbeat", b"z"] and conn._view is None  # whole frames need no buffer of their own


async def test_a_message_that_detaches_hands_the_rest_to_websockets_once() -> None:
    conn, _, _ = server_side()
    got: list[bytes] = []

    def sink(message: bytes) -> None:
        got.append(message)
        if message == b"stop":
            conn.detach()

    conn.attach(sink, lambda why: None)
    close = Frame(Opcode.CLOSE, Close(1000, "bye").serialize()).serialize(mask=True)
    data = frames([b"x" * 100_000], mask=True) + frames([b"stop", b"after"], mask=True) + close
    conn.data_received(data[:50_000])  # the first frame spans reads: the own buffer
    conn.data_received(data[50_000:])
    assert got == [b"x" * 100_000, b"stop"]
    assert not conn._fast and conn._view is None
    # websockets got "after" (kept for nobody: detached) and the close frame, each once
    assert conn._early == [b"after"]
    assert conn.protocol.close_rcvd is not None and conn.protocol.close_rcvd.code == 1000


async def test_close_after_a_partial_frame_in_the_own_buffer() -> None:
    conn, got, _ = server_side()
    close = Frame(Opcode.CLOSE, Close(1001, "away").serialize()).serialize(mask=True)
    data = frames([b"q" * 150_000], mask=True) + close
    feed_like_a_transport(conn, data, [40_000])
    assert got == [b"q" * 150_000] and not conn._fast and conn._view is None
    assert conn.protocol.close_rcvd is not None and conn.protocol.close_rcvd.code == 1001


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.sampled_from([0, 1, 125, 126, 65_535, 65_536, 200_000, 262_200]), min_size=1, max_size=8),
    reads=st.lists(st.integers(min_value=1, max_value=300_000), min_size=1, max_size=6),
    side=st.sampled_from(["server", "client"]),
    release=st.booleans(),
)
async def test_any_messages_and_reads_give_the_same_messages(
    sizes: list[int], reads: list[int], side: str, release: bool
) -> None:
    """Messages of the sizes around each header form and the largest frame, read in any sizes
    (the transport's path), with the idle-buffer release called between reads or not."""
    messages = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    conn, got, bad = server_side() if side == "server" else client_side()
    reader = conn.transport.get_protocol()
    data = frames(messages, mask=side == "server")
    pos, i = 0, 0
    while pos < len(data):
        buf = reader.get_buffer(len(data) - pos + 256)
        n = min(len(buf), reads[i % len(reads)], len(data) - pos)
        buf[:n] = data[pos : pos + n]
        reader.buffer_updated(n)
        if release:
            conn.release_idle_buffer()
        pos += n
        i += 1
    assert got == messages and not bad
    assert conn._fast and conn._start == conn._end
