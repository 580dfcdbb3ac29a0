"""Limits and hygiene of the public listener, spoken in raw bytes: size limits (414/431/413),
slow callers (408, dropped readers), stream limit (503), request smuggling (400 + close), and
error bodies that never echo what the caller sent."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from .helpers import Certs, stack, upstream
from .sec_helpers import RawResponse, echo_app, raw_exchange, read_response

pytestmark = pytest.mark.asyncio

MARK = b"S3CR3TMARK"
HOST = b"Host: app.example\r\n"


def _get(target: bytes = b"/", extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\n" + HOST + extra + b"\r\n"


def _assert_generic(head: bytes, body: bytes) -> None:
    assert MARK not in head + body and MARK.lower() not in head + body
    assert len(body) < 64


@pytest.mark.parametrize(
    ("name", "request_bytes", "status"),
    [
        ("request line over 8 KiB", _get(b"/" + MARK + b"a" * 8300), 414),
        ("one header over 8 KiB", _get(extra=b"X-Big: " + MARK + b"v" * 8300 + b"\r\n"), 431),
        (
            "headers over 16 KiB in total",
            _get(extra=b"".join(b"X-H%d: %s%s\r\n" % (i, MARK, b"v" * 6000) for i in range(3))),
            431,
        ),
        ("more than 100 headers", _get(extra=b"".join(b"X-H%d: %s\r\n" % (i, MARK) for i in range(101))), 431),
        (
            "Content-Length with Transfer-Encoding",
            b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "duplicate Content-Length",
            b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            400,
        ),
        (
            "conflicting Content-Length",
            b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            400,
        ),
        ("Content-Length list", b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 5, 5\r\n\r\nhello", 400),
        ("signed Content-Length", b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: +5\r\n\r\nhello", 400),
        ("non-numeric Content-Length", b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: " + MARK + b"\r\n\r\n", 400),
        (
            "malformed chunk size",
            b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + MARK + b"\r\nhello\r\n0\r\n\r\n",
            400,
        ),
        (
            "negative chunk size",
            b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
            400,
        ),
        ("chunked not last", b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked, identity\r\n\r\n", 400),
        (
            "unknown transfer coding",
            b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            b"POST / HTTP/1.0\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        ("space before colon", _get(extra=b"X-A" + MARK + b" : b\r\n"), 400),
        ("obsolete line folding", _get(extra=b"X-A: b\r\n " + MARK + b"\r\n"), 400),
        ("bare LF", b"GET /" + MARK + b" HTTP/1.1\nHost: app.example\n\n", 400),
        ("not HTTP", b"\x16\x03\x01\x00\x05" + MARK + b"\r\n\r\n", 400),
    ],
)
async def test_malformed_or_oversized_requests(certs: Certs, name: str, request_bytes: bytes, status: int) -> None:
    seen: list[web.Request] = []
    async with upstream(echo_app(seen)) as up, stack(certs) as s:
        await s.add_client([f"app.example={up.url}"])
        resp = await raw_exchange(s.server.public_port, request_bytes)
        assert resp.status == status, name
        assert resp.closed, f"{name}: the connection must be closed"
        _assert_generic(resp.head, resp.body)
        assert not seen, f"{name}: nothing may reach the upstream"
        assert all(t.requests == 0 for t in s.server.registry.tunnels.values())


async def test_limits_at_the_edge_still_pass(certs: Certs) -> None:
    """Just under each limit is served normally (the limits are not off by a lot)."""
    async with upstream(echo_app()) as up, stack(certs) as s:
        await s.add_client([f"app.example={up.url}"])
        ok = [
            _get(b"/" + b"a" * 8000),
            _get(extra=b"X-Big: " + b"v" * 8000 + b"\r\n"),
            _get(extra=b"".join(b"X-H%d: v\r\n" % i for i in range(98))),
            b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\n\r\n",
        ]
        for data in ok:
            resp = await raw_exchange(s.server.public_port, data)
            assert resp.status == 200, data[:60]


async def test_body_over_max_body_with_content_length_never_enters_the_tunnel(certs: Certs) -> None:
    seen: list[web.Request] = []
    async with upstream(echo_app(seen)) as up, stack(certs, max_body=1000) as s:
        await s.add_client([f"app.example={up.url}"])
        started = time.monotonic()
        resp = await raw_exchange(
            s.server.public_port, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1000000\r\n\r\n" + b"x" * 100
        )
        assert resp.status == 413 and time.monotonic() - started < 2
        assert not seen
        (tunnel,) = s.server.registry.tunnels.values()
        assert tunnel.requests == 0  # no stream was opened
        resp = await raw_exchange(
            s.server.public_port, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1000\r\n\r\n" + b"x" * 1000
        )
        assert resp.status == 200 and resp.body == b"ok / 1000"


async def test_chunked_body_over_max_body_is_reset_and_answered_413(certs: Certs) -> None:
    bodies: list[int] = []

    async def slurp(request: web.Request) -> web.Response:
        try:
            bodies.append(len(await request.read()))
        except Exception:
            bodies.append(-1)
        return web.Response(text="read")

    app = web.Application()
    app.router.add_post("/", slurp)
    async with upstream(app) as up, stack(certs, max_body=1000) as s:
        await s.add_client([f"app.example={up.url}"])
        head = b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
        chunks = [b"200\r\n" + b"x" * 512 + b"\r\n"] * 4
        resp = await raw_exchange(s.server.public_port, head, chunks=chunks, pause=0.05)
        assert resp.status == 413
        assert resp.body == b"request body too large\n"
        await asyncio.sleep(0.2)  # deliberate: a negative check (the upstream must not get the rest)
        assert all(n != 2048 for n in bodies)  # the upstream never got the whole body


async def test_slow_headers_are_closed(certs: Certs) -> None:
    async with stack(certs, header_timeout=0.5) as s:
        port = s.server.public_port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: app.example\r\n")
        started = time.monotonic()
        for i in range(4):  # a header every 0.1 s (slowloris): bytes keep coming, the deadline stays
            await asyncio.sleep(0.1)
            writer.write(b"X-%d: y\r\n" % i)
        resp = await read_response(reader, timeout=3)
        assert resp.status == 408 and resp.closed
        assert 0.45 < time.monotonic() - started < 0.85  # 0.5 s from the first byte, not from the last
        writer.transport.abort()
        # A connection that never sends anything is closed too, silently.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(3):
            assert await reader.read() == b""
        writer.transport.abort()


async def test_idle_request_body_is_answered_408(certs: Certs) -> None:
    async with upstream(echo_app()) as up, stack(certs, body_timeout=0.5) as s:
        await s.add_client([f"app.example={up.url}"])
        started = time.monotonic()
        resp = await raw_exchange(
            s.server.public_port, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 100\r\n\r\n" + b"x" * 10
        )
        assert resp.status == 408 and resp.closed
        assert time.monotonic() - started < 3


async def test_a_caller_that_reads_nothing_is_dropped(certs: Certs) -> None:
    cancelled = asyncio.Event()

    async def firehose(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            for _ in range(10_000):
                await resp.write(b"x" * 65536)
        except (asyncio.CancelledError, ConnectionError):
            cancelled.set()
            raise
        return resp

    app = web.Application()
    app.router.add_get("/", firehose)
    async with upstream(app) as up, stack(certs, send_timeout=1.0) as s:
        await s.add_client([f"app.example={up.url}"])
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port, limit=1024)
        writer.transport.pause_reading()  # never read
        writer.write(_get())
        await writer.drain()
        started = time.monotonic()
        async with asyncio.timeout(15):
            await cancelled.wait()  # the stream was reset and the upstream call cancelled
        assert time.monotonic() - started < 12
        async with asyncio.timeout(5):
            while s.server.public.in_flight:
                await asyncio.sleep(0.05)
        writer.transport.abort()


async def test_stream_limit_answers_503_with_retry_after(certs: Certs) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/", slow)
    async with upstream(app) as up, stack(certs, max_streams=2) as s:
        await s.add_client([f"app.example={up.url}"])
        port = s.server.public_port
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for _, writer in held:
            writer.write(_get())
            await writer.drain()
        async with asyncio.timeout(5):
            while sum(t.in_flight for t in s.server.registry.tunnels.values()) < 2:
                await asyncio.sleep(0.02)
        resp = await raw_exchange(port, _get())
        assert resp.status == 503 and resp.header("Retry-After") == "1"
        release.set()
        for reader, writer in held:
            assert (await read_response(reader)).status == 200
            writer.transport.abort()


async def test_slowloris_does_not_starve_normal_requests(certs: Certs) -> None:
    """300 slow-header connections (slowhttptest) are open; 200 sequential normal requests
    keep p99 under 1 s, and the slow connections are cut at the header deadline."""
    import shutil
    import statistics

    binary = shutil.which("slowhttptest")
    if binary is None:
        pytest.fail("slowhttptest is missing: `make test` installs it (scripts/ci-deps.sh)")
    async with upstream(echo_app()) as up, stack(certs, header_timeout=6) as s:
        await s.add_client([f"app.example={up.url}"])
        port = s.server.public_port
        public = s.server._listener  # the public listener's open connections
        assert public is not None
        attack = await asyncio.create_subprocess_exec(
            binary,
            "-H",
            "-c",
            "300",
            "-r",
            "300",
            "-i",
            "1",
            "-x",
            "10",
            "-l",
            "12",
            "-p",
            "3",
            "-u",
            f"http://127.0.0.1:{port}/",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async with asyncio.timeout(5):
                while len(public.connections) < 290:
                    await asyncio.sleep(0.05)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            latencies = []
            for i in range(200):
                started = time.perf_counter()
                writer.write(_get(b"/n%d" % i))
                resp = await _quick_response(reader)
                latencies.append(time.perf_counter() - started)
                assert resp.status == 200
            writer.transport.abort()
            assert len(public.connections) >= 250  # the attack was still on while we measured
            p99 = statistics.quantiles(latencies, n=100)[98]
            assert p99 < 1.0, f"p99 {p99:.3f}s"
            async with asyncio.timeout(6 + 3):  # the header deadline cuts the slow connections
                while len(public.connections) > 10:
                    await asyncio.sleep(0.1)
        finally:
            if attack.returncode is None:
                attack.kill()
            await attack.wait()


async def _quick_response(reader: asyncio.StreamReader) -> RawResponse:
    """Read one keep-alive response with a Content-Length, without waiting for a close."""
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        resp = RawResponse(int(head.split(b" ", 2)[1]), head, b"", False)
        resp.body = await reader.readexactly(int(resp.header("Content-Length") or 0))
    return resp
