"""The public HTTP/1.1 listener's own connection handling (exit_server/h1.py), in raw bytes:
pipelined answers in order up to a malformed request, HTTP/1.0 framing, the keep-alive
timeout, the 505 status line, the answer to a body that breaks after its head, and a response
that stays readable when the caller is still sending a body the exit server refused."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from .helpers import Certs, stack, upstream
from .sec_helpers import echo_app, read_response

pytestmark = pytest.mark.asyncio

HOST = b"Host: app.example\r\n"


async def _read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.read()


async def test_pipelined_requests_are_answered_in_order_until_a_malformed_one(certs: Certs) -> None:
    async with upstream(echo_app()) as up, stack(certs) as s:
        await s.add_client([f"app.example={up.url}"])
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port)
        writer.write(
            b"GET /one HTTP/1.1\r\n" + HOST + b"\r\n"
            b"POST /two HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n\r\nabc"
            b"GET /three HTTP/1.1\r\n" + HOST + b"X-A : b\r\n\r\n"
            b"GET /four HTTP/1.1\r\n" + HOST + b"\r\n"
        )
        await writer.drain()
        first = await read_response(reader)
        second = await read_response(reader)
        third = await read_response(reader)
        assert (first.status, first.body) == (200, b"ok /one 0")
        assert (second.status, second.body) == (200, b"ok /two 3")
        assert third.status == 400 and third.closed
        assert third.header("Server") == "backhaul"
        writer.close()


async def test_http10_gets_a_close_delimited_body_and_its_version(certs: Certs) -> None:
    async def streamed(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked to the tunnel client: no length reaches the edge
        await resp.prepare(request)
        await resp.write(b"part one, ")
        await resp.write(b"part two")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/stream", streamed)
    async with upstream(app) as up, stack(certs) as s:
        await s.add_client([f"app.example={up.url}"])
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port)
        writer.write(b"GET /stream HTTP/1.0\r\n" + HOST + b"\r\n")
        await writer.drain()
        raw = await _read_all(reader)  # the close ends the body
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 ")
        assert b"transfer-encoding" not in head.lower()
        assert body == b"part one, part two"
        writer.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(certs: Certs) -> None:
    keepalive = 2.0  # longer than read_response's 1 s look for a close
    async with upstream(echo_app()) as up, stack(certs, keepalive_timeout=keepalive) as s:
        await s.add_client([f"app.example={up.url}"])
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port)
        sent = time.monotonic()
        writer.write(b"GET /a HTTP/1.1\r\n" + HOST + b"\r\n")
        await writer.drain()
        resp = await read_response(reader)
        assert resp.status == 200 and not resp.closed
        # closed by the server (EOF), not before the timeout, within it and a margin
        assert await _read_all(reader, keepalive + 5.0) == b""
        assert time.monotonic() - sent >= keepalive
        writer.close()


async def test_the_keep_alive_timeout_counts_from_the_last_answer(certs: Certs) -> None:
    """One timer serves a connection's requests (exit_server/h1.py): a request in the middle of
    the timeout moves the close to a full timeout after its answer."""
    keepalive = 2.0
    async with upstream(echo_app()) as up, stack(certs, keepalive_timeout=keepalive) as s:
        await s.add_client([f"app.example={up.url}"])
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port)
        writer.write(b"GET /a HTTP/1.1\r\n" + HOST + b"\r\n")
        resp = await read_response(reader)  # waits 1 s for a close that does not come
        assert resp.status == 200 and not resp.closed
        await asyncio.sleep(keepalive / 4)  # idle time on purpose: past half the timeout
        second = time.monotonic()
        writer.write(b"GET /b HTTP/1.1\r\n" + HOST + b"\r\n")
        resp = await read_response(reader)
        assert resp.status == 200 and not resp.closed
        assert await _read_all(reader, keepalive + 5.0) == b""
        assert time.monotonic() - second >= keepalive
        writer.close()


async def test_a_version_other_than_1x_is_answered_505_over_http11(certs: Certs) -> None:
    async with upstream(echo_app()) as up, stack(certs) as s:
        await s.add_client([f"app.example={up.url}"])
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port)
        writer.write(b"GET / HTTP/2.0\r\n" + HOST + b"\r\n")
        await writer.drain()
        raw = await _read_all(reader)
        assert raw.startswith(b"HTTP/1.1 505 ")
        writer.close()


async def test_a_body_that_breaks_after_its_head_is_answered_400(certs: Certs) -> None:
    """The head is fine and reaches the handler; the chunked body then breaks: the answer is a
    generic 400 (the stream is reset), and the connection closes."""
    async with upstream(echo_app()) as up, stack(certs) as s:
        await s.add_client([f"app.example={up.url}"])
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port)
        writer.write(b"POST /b HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            while not any(t.requests for t in s.server.registry.tunnels.values()):
                await asyncio.sleep(0.01)  # the stream is open: the handler has the request
        writer.write(b"zz\r\nhello\r\n")
        await writer.drain()
        resp = await read_response(reader)
        assert resp.status == 400 and resp.closed
        assert resp.body == b"bad request\n"
        writer.close()


async def test_a_refused_body_still_being_sent_does_not_reset_the_answer(certs: Certs) -> None:
    """413 before the stream opens, while the caller goes on sending its body: the exit server
    drops what follows for a while (a lingering close) so the caller reads the 413 instead of a
    connection reset."""
    async with upstream(echo_app()) as up, stack(certs, max_body=1000) as s:
        await s.add_client([f"app.example={up.url}"])
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port)
        size = 4 * 1024 * 1024
        writer.write(b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % size)
        piece = b"x" * 65536
        for _ in range(size // len(piece)):  # every write goes through: the server reads on
            writer.write(piece)
            await asyncio.wait_for(writer.drain(), 5)
        resp = await read_response(reader)
        assert resp.status == 413
        assert resp.body == b"request body too large\n"
        writer.close()
