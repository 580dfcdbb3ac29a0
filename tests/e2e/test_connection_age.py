"""Paths that cut long-lived connections or do not pass WebSocket upgrades: --max-connection-age
renews a session before a known cut-off without losing a request; a path that cuts every
session at the same age is recognised and named in one line; an upgrade answered with
anything but 101 or 401 says that something in between does not pass WebSockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from ..waiting import wait_until
from .helpers import Certs, stack, upstream

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]


def slow_app() -> web.Application:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)  # the upstream's own pace: streams are in flight at every rollover
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    return app


async def test_max_connection_age_renews_sessions_without_losing_a_request(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with upstream(slow_app()) as up, stack(certs) as s:
        client = await s.add_client([f"default={up.url}"], max_connection_age=1.5)
        link = client.client.links[0]
        sessions = {link.session_id}
        statuses: list[int] = []

        async def caller() -> None:
            async with aiohttp.ClientSession() as http:
                for _ in range(25):  # bounded: 25 requests of 0.2 s each per caller
                    async with http.get(s.base + "/") as resp:
                        statuses.append(resp.status)
                    sessions.add(link.session_id)

        await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(8))), 60)
        assert statuses == [200] * 200, sorted(set(statuses))
        assert len(sessions) >= 2, "no rollover within the run"
        assert "reached --max-connection-age" in caplog.text
        # the retired sessions were closed: only the current one is left on the server
        await wait_until(lambda: len(s.server.control.connections) == 1, timeout=10, what="old sessions closed")


@contextlib.asynccontextmanager
async def age_cutter(target_port: int, cut_after: float) -> AsyncIterator[int]:
    """A TCP relay to ``target_port`` that closes every connection ``cut_after`` seconds after
    it opened: a firewall with a connection-age limit."""
    tasks: set[asyncio.Task[None]] = set()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers = [writer]
        pipes: list[asyncio.Future[None]] = []
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
            writers.append(up_writer)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()

            pipes = [asyncio.ensure_future(pipe(reader, up_writer)), asyncio.ensure_future(pipe(up_reader, writer))]
            await asyncio.wait(pipes, timeout=cut_after)
        finally:  # cut, also when the relay itself is cancelled at the end of the test
            for p in pipes:
                p.cancel()
            for w in writers:
                w.transport.abort()
                w.close()

    def spawn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(relay(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(spawn, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
        while tasks:  # a relay started while closing is cut too
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_sessions_cut_at_a_fixed_age_are_recognised(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    async with upstream(slow_app()) as up, stack(certs) as s:
        async with age_cutter(s.server.control_port, 1.5) as port:
            client = await s.add_client([f"default={up.url}"], server=[f"wss://localhost:{port}"], backoff_base=0.05)
            line = await wait_until(
                lambda: next((r.getMessage() for r in caplog.records if "were each cut after" in r.getMessage()), None),
                timeout=30,
                what="the age limit recognised",
            )
            assert "a firewall or NAT" in line and "--max-connection-age 1 " in line, line
            await client.stop()  # before the relay goes: no connection races its teardown
            s.clients.remove(client)


async def test_an_upgrade_answered_200_names_what_is_in_between(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    async def anything(request: web.Request) -> web.Response:
        return web.Response(text="<html>corporate portal</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs.cert, certs.key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with stack(certs) as s:
            await s.add_client(["default=http://127.0.0.1:9"], server=[f"wss://localhost:{port}"], wait=False)
            line = await wait_until(
                lambda: next((r.getMessage() for r in caplog.records if "instead of 101" in r.getMessage()), None),
                timeout=20,
                what="the blocked upgrade logged",
            )
            assert "answered HTTP 200" in line and "does not pass WebSocket upgrades" in line, line
    finally:
        await runner.cleanup()
