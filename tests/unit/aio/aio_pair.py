"""Two tunnel connections over a socketpair: the real websockets connection classes and the
real sessions, past the opening handshake (websockets' Protocol starts OPEN), no TLS, no
listener. What the adapter tests in test_connection.py and test_pump.py run on."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.connection import Connection
from websockets.protocol import Protocol, Side

from shared.aio.connection import StreamHandler, TunnelConnection, TunnelStream
from shared.aio.wsclient import TunnelClientConnection
from shared.aio.wsfast import TunnelServerConnection
from shared.heads import ResponseHead
from shared.messages import Error, Hello, Routes, Welcome
from shared.mux import Role, Session


class ServerSide(TunnelServerConnection):
    """A server connection without a websockets Server behind it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Connection.connection_made(self, transport)


@dataclass
class Pair:
    server: TunnelConnection
    client: TunnelConnection
    server_run: asyncio.Task[None]
    client_run: asyncio.Task[None]
    sent: list[int] = field(default_factory=list)  # sizes of the server's WebSocket messages
    controls: list[Any] = field(default_factory=list)  # control messages the client received
    goaways: list[tuple[int, str]] = field(default_factory=list)  # what the server's on_goaway saw


async def until(check: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait for ``check()`` to hold, polling every loop iteration, with a deadline."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0)


async def echo(stream: TunnelStream) -> None:
    """Client handler: reply 200 and send back every byte."""
    stream.send_reply(ResponseHead(200))
    while chunk := await stream.read():
        await stream.write(chunk)
    stream.end()


@asynccontextmanager
async def pair(
    on_stream: StreamHandler | None = echo,
    *,
    window: int = 256 * 1024,
    heartbeat: tuple[float, float] = (5.0, 15.0),
    server_kw: dict[str, Any] | None = None,
    client_kw: dict[str, Any] | None = None,
) -> AsyncIterator[Pair]:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    _, sws = await loop.create_connection(lambda: ServerSide(Protocol(Side.SERVER), None), sock=a)  # type: ignore[arg-type]
    _, cws = await loop.create_connection(lambda: TunnelClientConnection(Protocol(Side.CLIENT)), sock=b)  # type: ignore[arg-type]
    sws.request = object()  # type: ignore[assignment]  # (as after a handshake)
    now = loop.time()
    ssession = Session(
        Role.SERVER,
        initial_window=window,
        heartbeat_interval=heartbeat[0],
        heartbeat_timeout=heartbeat[1],
        now=now,
        **(server_kw or {}),
    )
    csession = Session(
        Role.CLIENT, initial_window=window, heartbeat_interval=heartbeat[0], now=now, **(client_kw or {})
    )
    csession.send_hello(Hello(versions=[1], instance_id="i-test", initial_window=window))
    result: dict[str, Any] = {"controls": [], "goaways": []}

    def server_control(message: Hello | Welcome | Routes | Error) -> None:
        if isinstance(message, Hello):
            ssession.accept(
                Welcome(
                    version=1,
                    session_id="s-test",
                    client_id="c",
                    initial_window=window,
                    heartbeat_interval=heartbeat[0],
                )
            )
            server.flush()

    server = TunnelConnection(
        sws, ssession, name="s-test", on_control=server_control, on_goaway=lambda c, r: result["goaways"].append((c, r))
    )
    client = TunnelConnection(cws, csession, name="c-test", on_stream=on_stream, on_control=result["controls"].append)
    sent: list[int] = []
    original = sws.send_message

    def counting(pieces: list[bytes | memoryview]) -> None:
        sent.append(sum(len(p) for p in pieces))
        original(pieces)

    sws.send_message = counting  # type: ignore[method-assign]
    server_run = loop.create_task(server.run())
    client_run = loop.create_task(client.run())
    p = Pair(server, client, server_run, client_run, sent, result["controls"], result["goaways"])
    try:
        await until(lambda: ssession.accepting_streams and csession.accepting_streams)
        yield p
    finally:
        for conn in (server, client):
            conn.abort()
        async with asyncio.timeout(10):
            await asyncio.gather(server_run, client_run, return_exceptions=True)
        a.close()
        b.close()
