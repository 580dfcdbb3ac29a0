"""shared.aio.wsfast: the tunnel's own parse of whole binary frames, fed any split of the byte
stream, and the hand-over to websockets at the first frame it does not take (close, text,
oversized). The transport is a recording stand-in: what is tested is the parse, not I/O."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.asyncio.connection import Connection
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import Protocol, Side

from shared.aio.wsfast import TunnelClientConnection, TunnelServerConnection

pytestmark = pytest.mark.asyncio

MESSAGES = [b"a" * 10, bytes(range(256)) * 2, b"\x00" * 70_000, b"z", b"q" * 125, b"r" * 126, b"s" * 65_535,
            b"G" * 300_000]  # larger than uvloop reads at once


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
    assert conn._fast and conn._parts is None  # parsed here, nothing left over


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
