"""WebSocket passthrough: the upstream's own WebSocket reaches the caller byte for byte."""

from __future__ import annotations

import asyncio
import collections
import gc
import types

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ..waiting import wait_until
from .helpers import Certs, stack, upstream

pytestmark = pytest.mark.asyncio


def ws_app(seen: dict[str, object] | None = None) -> web.Application:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
        await ws.prepare(request)
        if seen is not None:
            seen["transport"] = request.transport
            seen["xff"] = request.headers.get("X-Forwarded-For")
            seen["host"] = request.host
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    if msg.data.startswith("close:"):
                        _, code, reason = msg.data.split(":", 2)
                        await ws.close(code=int(code), message=reason.encode())
                        break
                    await ws.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        finally:  # also when the handler is cancelled because the connection dropped
            if seen is not None:
                seen["close_code"] = ws.close_code
        return ws

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="plain")

    app = web.Application()
    app.router.add_get("/ws", echo)
    app.router.add_get("/plain", plain)
    return app


def ws_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


async def test_text_binary_fragmented_ping_and_large_messages(certs: Certs) -> None:
    seen: dict[str, object] = {}
    async with upstream(ws_app(seen)) as up, stack(certs) as s:
        await s.add_client([f"chat.example.com={up.url}"])
        port = s.server.public_port
        async with connect(
            f"ws://chat.example.com:{port}/ws", host="127.0.0.1", port=port, max_size=None, compression=None
        ) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x00\x01binary")
            assert await ws.recv() == b"\x00\x01binary"
            await ws.send(["frag", "mented", "!"])  # one message in three frames
            assert await ws.recv() == "fragmented!"
            pong = await ws.ping(b"are-you-there")
            await asyncio.wait_for(pong, 5)
            big = bytes(range(256)) * (16 * 4096)  # 16 MiB
            await ws.send(big)
            assert await asyncio.wait_for(ws.recv(), 60) == big
        await wait_until(lambda: "xff" in seen and "host" in seen, 5, what="the upstream saw the upgrade")
    assert seen["xff"] == "127.0.0.1" and seen["host"] == f"chat.example.com:{port}"


async def test_close_codes_and_reasons_both_ways(certs: Certs) -> None:
    seen: dict[str, object] = {}
    async with upstream(ws_app(seen)) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        async with connect(ws_url(s.server.public_port)) as ws:
            await ws.send("close:4001:upstream says bye")
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "upstream says bye")
        async with connect(ws_url(s.server.public_port)) as ws:
            await ws.send("x")
            await ws.recv()
            await ws.close(4002, "caller says bye")
        for _ in range(50):
            if seen.get("close_code") == 4002:
                break
            await asyncio.sleep(0.05)
        assert seen["close_code"] == 4002


async def test_hundred_websockets_next_to_http(certs: Certs) -> None:
    async with upstream(ws_app()) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])

        async def session(i: int) -> None:
            async with connect(ws_url(s.server.public_port)) as ws:
                for j in range(5):
                    await ws.send(f"{i}-{j}")
                    assert await ws.recv() == f"{i}-{j}"

        async def http_calls() -> None:
            async with aiohttp.ClientSession() as http:
                for _ in range(50):
                    async with http.get(f"http://127.0.0.1:{s.server.public_port}/plain") as r:
                        assert await r.text() == "plain"

        await asyncio.wait_for(asyncio.gather(*(session(i) for i in range(100)), http_calls()), 60)


async def test_upstream_dying_closes_the_caller(certs: Certs) -> None:
    seen: dict[str, object] = {}
    async with upstream(ws_app(seen)) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        async with connect(ws_url(s.server.public_port), close_timeout=1) as ws:
            await ws.send("a")
            assert await ws.recv() == "a"
            seen["transport"].abort()  # type: ignore[attr-defined]  # the upstream dies
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)


async def test_caller_dying_closes_the_upstream(certs: Certs) -> None:
    seen: dict[str, object] = {}
    async with upstream(ws_app(seen)) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # the upstream's own accept key
        writer.transport.abort()
        for _ in range(100):
            if "close_code" in seen:
                break
            await asyncio.sleep(0.05)
        assert "close_code" in seen
        tunnel = next(iter(s.server.registry.tunnels.values()))
        for _ in range(50):
            if tunnel.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        assert tunnel.in_flight == 0


async def test_declined_upgrade_is_relayed(certs: Certs) -> None:
    async with upstream(ws_app()) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(f"http://127.0.0.1:{s.server.public_port}/plain")
            assert info.value.status == 200  # the upstream answered without upgrading


async def test_idle_websocket_is_closed_after_the_stream_idle_timeout(certs: Certs) -> None:
    """--stream-idle-timeout: a session that keeps talking outlives it; once both sides fall
    silent for that long, the caller's connection is closed and the stream is gone."""
    seen: dict[str, object] = {}
    async with upstream(ws_app(seen)) as up, stack(certs, stream_idle_timeout=0.6) as s:
        await s.add_client([f"default={up.url}"])
        async with connect(ws_url(s.server.public_port), close_timeout=1, ping_interval=None) as ws:
            loop = asyncio.get_running_loop()
            for i in range(8):  # 1.2 s of traffic every 0.15 s: never idle for 0.6 s
                await asyncio.sleep(0.15 if i else 0)
                await ws.send(f"m{i}")
                assert await ws.recv() == f"m{i}"
            last_byte = loop.time()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert 0.5 < loop.time() - last_byte < 5
        tunnel = next(iter(s.server.registry.tunnels.values()))
        for _ in range(50):
            if tunnel.in_flight == 0 and "close_code" in seen:
                break
            await asyncio.sleep(0.05)
        assert tunnel.in_flight == 0 and "close_code" in seen  # the upstream side was closed too


async def test_websocket_sessions_leave_no_reference_cycles(certs: Certs) -> None:
    """Ended WebSocket sessions are freed by reference counting, on both sides: no cycle waits
    for the GC (a pump whose idle check referred to itself, or a frame holding the current task
    in the traceback of its CancelledError, kept ~80 objects per session until the next full
    collection; the soak's RSS grew 19 %)."""
    async with upstream(ws_app()) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        port = s.server.public_port

        async def session() -> None:
            async with connect(ws_url(port), close_timeout=1) as ws:
                for i in range(3):
                    await ws.send(f"m{i}")
                    assert await ws.recv() == f"m{i}"

        for _ in range(5):  # warm-up: first-use caches, pools
            await session()
        await asyncio.sleep(0.2)  # deliberate: let closing tasks of the warm-up finish before the GC baseline
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(40):
                await session()
            await asyncio.sleep(0.3)  # both sides finish their streams
            gc.collect()
            frames = sorted(
                {
                    f"{o.f_code.co_name} ({o.f_code.co_filename.rsplit('/', 1)[-1]})"
                    for o in gc.garbage
                    if isinstance(o, types.FrameType)
                }
            )
            # (asyncio's own selector transports sit in cycles of their own; not counted)
            ours = [
                o
                for o in gc.garbage
                if isinstance(o, types.FrameType | types.TracebackType | BaseException)
                or type(o).__module__.partition(".")[0] in ("shared", "exit_server", "tunnel_client")
            ]
            kinds = collections.Counter(type(o).__qualname__ for o in ours).most_common(8)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.collect()
        assert not ours, f"{len(ours)} objects in cycles after 40 sessions: {kinds}; frames: {frames[:12]}"
