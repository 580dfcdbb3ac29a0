"""Reconnects, dead links, replacement, and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from exit_server import ExitServer
from shared.aio.connection import TunnelConnection
from tunnel_client import TunnelClient

from ..waiting import wait_until
from .helpers import TOKEN, BlackholeProxy, Certs, _token_auth, client_config, server_config, stack, upstream

pytestmark = pytest.mark.asyncio


def _client_streams(client: TunnelClient) -> int:
    return sum(link.conn.streams_in_flight for link in client.links if link.conn is not None)


def slow_app(delay: float = 1.0) -> web.Application:
    async def h(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("d", delay)))
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/{tail:.*}", h)
    return app


async def test_client_back_within_5s_after_exit_server_restart(certs: Certs) -> None:
    async with upstream(slow_app(0)) as up:
        server = ExitServer(server_config(certs), auth=_token_auth())
        await server.start()
        port = server.control_port
        # Default backoff (1 s base, full jitter), as a user would run it.
        client = TunnelClient(
            client_config(certs, server, [f"default={up.url}"], backoff_base=1.0, backoff_cap=30.0), token=TOKEN
        )
        task = asyncio.create_task(client.run())
        try:
            await client.wait_connected(10)
            await server.close()
            server = ExitServer(server_config(certs, control_addr=f"127.0.0.1:{port}"), auth=_token_auth())
            await server.start()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await client.wait_connected(5)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{server.public_port}/") as r:
                    assert r.status == 200
            assert loop.time() - t0 < 5
            assert client.links[0].reconnects >= 1
        finally:
            await client.shutdown(1)
            await task
            await server.close()


async def test_heartbeat_detects_blackholed_link_and_reconnects(certs: Certs) -> None:
    async with upstream(slow_app(0)) as up, stack(certs) as s:
        proxy = BlackholeProxy(s.server.control_port)
        await proxy.start()
        try:
            running = await s.add_client([f"default={up.url}"], server=[f"wss://localhost:{proxy.port}"])
            client = running.client
            loop = asyncio.get_running_loop()
            proxy.blackhole = True
            t0 = loop.time()
            await wait_until(lambda: not (client.connected or s.server.registry.tunnels), 20, 0.05, "both sides notice")
            detected = loop.time() - t0
            assert not client.connected and not s.server.registry.tunnels
            assert detected < 15, f"dead link noticed after {detected:.1f}s"
            async with aiohttp.ClientSession() as http:  # new requests get 503 at once
                async with http.get(s.base + "/") as r:
                    assert r.status == 503
            proxy.heal()
            await client.wait_connected(10)
            async with aiohttp.ClientSession() as http:
                async with http.get(s.base + "/") as r:
                    assert r.status == 200
        finally:
            await proxy.close()


async def test_a_client_with_a_short_timeout_stays_behind_a_slow_pinging_server(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """The server pings once a second; the client was started with a 0.3 s silence limit. It
    takes the server's interval from the Welcome and raises its limit to three intervals, so
    the session lives on (it used to be declared dead between two PINGs, and reconnected
    forever), and says so in its log. (test_mux checks that the client then sends no PING of
    its own while the server's reach it.)"""
    caplog.set_level(logging.INFO)
    async with upstream(slow_app(0)) as up, stack(certs, heartbeat_interval=1.0, heartbeat_timeout=3.0) as s:
        running = await s.add_client([f"default={up.url}"], heartbeat_timeout=0.3)
        link = running.client.links[0]
        conn = link.conn
        assert conn is not None
        (tunnel,) = s.server.registry.tunnels.values()
        server_session = tunnel.conn.session
        first_ping = server_session._last_ping

        def three_server_pings_later() -> bool:
            return conn.closed or server_session._last_ping >= first_ping + 3.0

        await wait_until(three_server_pings_later, 10, 0.05, "three heartbeat intervals")
        assert not conn.closed and link.reconnects == 0, conn.close_reason
        assert conn.session.heartbeat_interval == 1.0 and conn.session.heartbeat_timeout == 3.0
        assert server_session.rtt is not None  # the server's PINGs were answered
        assert any("heartbeat deadline 3s, not --heartbeat-timeout 0.3s" in r.getMessage() for r in caplog.records)


async def test_tunnel_dropped_mid_request_gives_502(certs: Certs) -> None:
    async with upstream(slow_app(30)) as up, stack(certs) as s:
        running = await s.add_client([f"default={up.url}"], backoff_base=5.0, backoff_cap=5.0)
        async with aiohttp.ClientSession() as http:

            async def call() -> int:
                async with http.get(s.base + "/") as r:
                    return r.status

            pending = asyncio.create_task(call())
            await wait_until(lambda: _client_streams(running.client) >= 1, 5, what="the request at the client")
            conn = running.client.links[0].conn
            assert conn is not None
            conn.abort()  # the link dies under the request
            status = await asyncio.wait_for(pending, 5)
            assert status == 502
        tunnel_count = len(s.server.registry.tunnels)
        assert tunnel_count == 0


async def test_reconnecting_instance_replaces_its_old_session(certs: Certs) -> None:
    async with upstream(slow_app(0)) as up, stack(certs) as s:
        first = await s.add_client([f"default={up.url}"], instance_id="replica-1")
        old_ids = set(s.server.registry.tunnels)
        second = await s.add_client([f"default={up.url}"], instance_id="replica-1")
        assert second.client.connected
        new_ids = set(s.server.registry.tunnels) - old_ids
        assert len(new_ids) == 1
        assert not old_ids & set(s.server.registry.tunnels)  # the old session is gone at once
        await first.stop()


async def test_client_shutdown_drains_in_flight_and_refuses_new(certs: Certs) -> None:
    async with upstream(slow_app(1.0)) as up, stack(certs) as s:
        running = await s.add_client([f"default={up.url}"])
        async with aiohttp.ClientSession() as http:

            async def call(path: str) -> tuple[int, str]:
                async with http.get(s.base + path) as r:
                    return r.status, await r.text()

            in_flight = asyncio.create_task(call("/?d=1.0"))
            await wait_until(lambda: _client_streams(running.client) >= 1, 5, what="the request at the client")
            stopping = asyncio.create_task(running.client.shutdown(drain_timeout=5))
            await wait_until(lambda: s.server.registry.pick_route("x.test", "/")[1] is None, 5, what="withdrawn")
            status, _ = await call("/?d=0")
            assert status == 503  # not routed to the draining client
            assert await in_flight == (200, "done")
            await asyncio.wait_for(stopping, 5)
            await asyncio.wait_for(running.task, 5)


@contextlib.asynccontextmanager
async def server_to_shut_down(certs: Certs, delay: float) -> AsyncIterator[ExitServer]:
    """An exit server (the test shuts it down) with one connected client of a ``slow_app``."""
    async with upstream(slow_app(delay)) as up:
        server = ExitServer(server_config(certs), auth=_token_auth())
        await server.start()
        client = TunnelClient(client_config(certs, server, [f"default={up.url}"]), token=TOKEN)
        task = asyncio.create_task(client.run())
        try:
            await client.wait_connected(10)
            yield server
        finally:
            await client.shutdown(1)
            await task


async def test_exit_server_shutdown_drains(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with server_to_shut_down(certs, 1.0) as server:
        async with aiohttp.ClientSession() as http:

            async def call() -> tuple[int, str]:
                async with http.get(f"http://127.0.0.1:{server.public_port}/?d=1") as r:
                    return r.status, await r.text()

            in_flight = asyncio.create_task(call())
            await wait_until(lambda: server.public.in_flight >= 1, 5, what="the request in flight")
            await server.shutdown(drain_timeout=5)
            assert await in_flight == (200, "done")
            with pytest.raises(aiohttp.ClientConnectionError):
                await call()
        assert any("peer going away" in r.getMessage() for r in caplog.records)


async def test_exit_server_closes_idle_keep_alive_connections_before_its_tunnels(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller's idle keep-alive connection is closed while the tunnels are still up, so a
    request it sends meanwhile is answered, never 503 "no tunnel" (behind a TCP balancer the
    connection stays with this server). At the moment the tunnel client is told to go away, the
    public side is already closed."""
    async with server_to_shut_down(certs, 0.0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.public_port)
        writer.write(b"GET /?d=0 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"close" not in head.lower()  # kept alive
        assert await reader.readexactly(4) == b"done"
        (tunnel,) = server.registry.tunnels.values()
        public_open_at_goaway: list[bool] = []
        goaway = TunnelConnection.goaway

        def recording_goaway(conn: TunnelConnection, code: int = 0, reason: str = "") -> None:
            if conn is tunnel.conn:
                public_open_at_goaway.append(server._listener is not None)
            goaway(conn, code, reason)

        monkeypatch.setattr(TunnelConnection, "goaway", recording_goaway)  # its instances have slots
        await server.shutdown(drain_timeout=5)
        assert public_open_at_goaway == [False]
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no stray answer
        writer.close()


def _control_accepts(server: ExitServer) -> bool:
    """Whether the control listener still accepts a TCP connection (a blocking connect: the
    kernel accepts into the backlog of a listening socket while the loop is busy)."""
    try:
        with socket.create_connection(("127.0.0.1", server.control_port), timeout=5):
            return True
    except ConnectionRefusedError:
        return False


@pytest.mark.parametrize("graceful", [True, False], ids=["shutdown", "close"])
async def test_tunnels_are_told_to_go_only_after_the_control_listener_closed(
    certs: Certs, monkeypatch: pytest.MonkeyPatch, graceful: bool
) -> None:
    """A tunnel client told to go away (go-away at shutdown, WebSocket close at close())
    reconnects at once; the control listener is closed by then, so that connection cannot reach
    this server. Before, it could be accepted and still be in its TLS handshake when close()
    returned, a connection nobody closed (a CI run saw its transport collected unclosed)."""
    async with server_to_shut_down(certs, 0.0) as server:
        listening: list[bool] = []
        goaway, close = TunnelConnection.goaway, TunnelConnection.close

        def recording_goaway(conn: TunnelConnection, code: int = 0, reason: str = "") -> None:
            listening.append(_control_accepts(server))
            goaway(conn, code, reason)

        async def recording_close(conn: TunnelConnection, code: int = 1000, reason: str = "") -> None:
            listening.append(_control_accepts(server))
            await close(conn, code, reason)

        monkeypatch.setattr(TunnelConnection, "goaway", recording_goaway)  # its instances have slots
        monkeypatch.setattr(TunnelConnection, "close", recording_close)
        if graceful:
            await server.shutdown(drain_timeout=5)
        else:
            await server.close()
        assert listening and not any(listening)


async def test_exit_server_shutdown_stays_within_the_drain_timeout(certs: Certs) -> None:
    """A request longer than the drain timeout is cut at the timeout (502 or a broken
    response), and shutting down takes the drain timeout, not twice it."""
    async with server_to_shut_down(certs, 10.0) as server, aiohttp.ClientSession() as http:

        async def call() -> int:
            async with http.get(f"http://127.0.0.1:{server.public_port}/?d=10") as r:
                await r.read()
                return r.status

        slow = asyncio.create_task(call())
        await wait_until(lambda: server.public.in_flight >= 1, 5, what="the request in flight")
        started = asyncio.get_running_loop().time()
        await server.shutdown(drain_timeout=1)
        took = asyncio.get_running_loop().time() - started
        assert 0.9 < took < 3.0
        try:
            status = await asyncio.wait_for(slow, 5)
        except aiohttp.ClientError:
            status = 0  # cut mid-exchange
        assert status in (0, 502)
