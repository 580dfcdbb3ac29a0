"""Streaming, multiplexing and flow control through the tunnel."""

from __future__ import annotations

import asyncio
import io

import aiohttp
import pytest
from aiohttp import web

from ..waiting import wait_until
from .helpers import Certs, stack, upstream

pytestmark = pytest.mark.asyncio


async def test_sse_first_event_arrives_while_upstream_still_sending(certs: Certs) -> None:
    release = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await asyncio.wait_for(release.wait(), 10)  # hold the response open
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/events", sse)
    async with upstream(app) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        async with aiohttp.ClientSession() as http, http.get(s.base + "/events") as r:
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert first == b"data: first\n\n"
            assert not release.is_set()  # the upstream had not finished
            release.set()
            assert await r.content.read() == b"data: second\n\n"


async def test_thousand_concurrent_requests_over_one_tunnel(certs: Certs) -> None:
    async def h(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return web.Response(text=request.query["i"])

    app = web.Application()
    app.router.add_get("/", h)
    async with upstream(app) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        connector = aiohttp.TCPConnector(limit=1000)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one(i: int) -> str:
                async with http.get(s.base + f"/?i={i}") as r:
                    assert r.status == 200
                    return await r.text()

            results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(1000))), 60)
        assert results == [str(i) for i in range(1000)]
        assert len(s.server.registry.tunnels) == 1


async def test_stalled_reader_does_not_slow_other_streams(certs: Certs) -> None:
    big = b"x" * (64 << 20)

    async def large(request: web.Request) -> web.Response:
        return web.Response(body=big)

    async def small(request: web.Request) -> web.Response:
        return web.Response(body=b"y" * 1024 * 1024)

    app = web.Application()
    app.router.add_get("/large", large)
    app.router.add_get("/small", small)
    async with upstream(app) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        # A raw caller that asks for 64 MiB and never reads.
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port)
        writer.write(b"GET /large HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await wait_until(lambda: s.server.public.in_flight == 1, 5, what="the stalled download in flight")
        async with aiohttp.ClientSession() as http:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for _ in range(20):  # 20 MiB through the same tunnel while the stalled stream holds its window
                async with http.get(s.base + "/small") as r:
                    assert len(await r.read()) == 1024 * 1024
            assert loop.time() - t0 < 10
        tunnel = next(iter(s.server.registry.tunnels.values()))
        assert tunnel.in_flight == 1  # the stalled stream is still open, not finished
        writer.close()


async def test_caller_disconnect_resets_stream_and_cancels_upstream(certs: Certs) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/", slow)
    async with upstream(app) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(started.wait(), 5)
        writer.close()
        await asyncio.wait_for(cancelled.wait(), 5)
        tunnel = next(iter(s.server.registry.tunnels.values()))
        for _ in range(50):
            if tunnel.in_flight == 0 and s.clients[0].client.links[0].conn.streams_in_flight == 0:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.05)
        assert tunnel.in_flight == 0
        assert s.server.public.in_flight == 0


async def test_upstream_reset_mid_body_is_an_aborted_body(certs: Certs) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"a" * 1000)
        await asyncio.sleep(0.1)
        assert request.transport is not None
        request.transport.abort()
        return resp

    app = web.Application()
    app.router.add_get("/", broken)
    async with upstream(app) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        async with aiohttp.ClientSession() as http:
            async with http.get(s.base + "/") as r:
                assert r.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()


async def test_chunked_response_cut_mid_body_is_detectable(certs: Certs) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"b" * 5000)
        await asyncio.sleep(0.1)
        assert request.transport is not None
        request.transport.abort()
        return resp

    app = web.Application()
    app.router.add_get("/", broken)
    async with upstream(app) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        async with aiohttp.ClientSession() as http:
            async with http.get(s.base + "/") as r:
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()


async def test_tunnel_reads_land_in_its_own_buffer_which_an_idle_tunnel_gives_back(certs: Certs) -> None:
    """Both ends read the tunnel through the buffered stand-in (shared/aio/wsfast.py). Frames that
    span reads (a 3 MiB download towards the exit server, a 3 MiB upload towards the client)
    give each end a buffer of its own, which goes once the tunnel has been idle for a ticker
    period or two; every byte arrives."""
    blob = bytes(range(251)) * 12_600  # 3,150,600 bytes, no period that lines up with frames

    async def down(request: web.Request) -> web.Response:
        return web.Response(body=blob)

    async def up(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    app = web.Application(client_max_size=8 << 20)
    app.router.add_get("/down", down)
    app.router.add_post("/up", up)
    async with upstream(app) as origin, stack(certs, heartbeat_interval=1.0, heartbeat_timeout=5.0) as s:
        running = await s.add_client([f"default={origin.url}"])
        (tunnel,) = s.server.registry.tunnels.values()
        server_ws = tunnel.conn.ws
        client_conn = running.client.links[0].conn
        assert client_conn is not None
        client_ws = client_conn.ws
        for ws in (server_ws, client_ws):
            reader = ws.transport.get_protocol()
            assert isinstance(reader, asyncio.BufferedProtocol) and not isinstance(reader, asyncio.Protocol)
        async with aiohttp.ClientSession() as http:
            async with http.get(s.base + "/down") as r:
                assert r.status == 200 and await r.read() == blob
            assert server_ws._view is not None  # (two quiet ticks, 0.5 s apart, drop it)
            async with http.post(s.base + "/up", data=io.BytesIO(blob)) as r:
                assert r.status == 200 and await r.text() == str(len(blob))
            assert client_ws._view is not None
        for _ in range(40):
            if server_ws._view is None and client_ws._view is None:
                break
            await asyncio.sleep(0.1)
        assert server_ws._view is None and client_ws._view is None
        async with aiohttp.ClientSession() as http, http.get(s.base + "/down") as r:
            assert r.status == 200 and await r.read() == blob  # and a buffer again when needed
