"""The tunnel client's own HTTP/1.1 upstream client (tunnel_client/http1.py): response framings,
keep-alive reuse, the stale-connection retry and upstream faults, against raw sockets on
127.0.0.1 that answer exactly the bytes each test scripts, and through the whole tunnel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from tunnel_client.http1 import DIRECT_BODY_MIN, UpstreamError, UpstreamPool, exchange

from .helpers import Certs, stack

pytestmark = pytest.mark.asyncio

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and (Content-Length or chunked) body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    body = b""
    if b"content-length:" in lower:
        n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(n)
    elif b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return head, body


@contextlib.asynccontextmanager
async def raw_upstream(script: Script) -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP server running ``script(reader, writer, connection_number)`` per connection;
    yields its port and a list that counts connections."""
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(len(seen) + 1)
        try:
            await script(reader, writer, len(seen))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        await server.wait_closed()


async def fetch(pool: UpstreamPool, port: int, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    conn, upload = await exchange(
        pool, ("http", "127.0.0.1", port), method, "/x", [("Host", "up")], "up", body, None, False
    )
    data = b""
    while chunks := await conn.read():
        data += b"".join(chunks)
    pool.release(conn)
    return conn.status, data


async def test_keep_alive_reuse_head_informational_and_chunked() -> None:
    """One connection carries: a 103 then 200, a HEAD with Content-Length (no body), a chunked
    answer and a POST with a body."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            head, body = await read_request(reader)
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            elif head.startswith(b"POST"):
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            elif b"chunked" in head:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            else:
                writer.write(
                    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
                )
            await writer.drain()

    pool = UpstreamPool(connect_timeout=2)
    async with raw_upstream(script) as (port, seen):
        assert await fetch(pool, port) == (200, b"hello")
        assert await asyncio.wait_for(fetch(pool, port, "HEAD"), 2) == (200, b"")
        assert await fetch(pool, port, "POST", b"payload") == (201, b"payload")
        conn, _ = await exchange(
            pool, ("http", "127.0.0.1", port), "GET", "/c", [("X", "chunked")], "up", None, None, False
        )
        got = b""
        while chunks := await conn.read():
            got += b"".join(chunks)
        assert (conn.status, got) == (200, b"abcde")
        pool.release(conn)
        assert seen == [1] and pool.opened == 1 and pool.idle_count == 1
    await pool.close()


async def test_body_until_close_and_connection_close() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()

    pool = UpstreamPool(connect_timeout=2)
    async with raw_upstream(script) as (port, seen):
        assert await fetch(pool, port) == (200, b"until the end")
        assert await fetch(pool, port) == (200, b"until the end")
        assert pool.idle_count == 0 and seen == [1, 2]  # never reused
    await pool.close()


async def test_stale_pooled_connection_is_retried_once() -> None:
    """The upstream says keep-alive but closes right after answering (the idle-timeout race):
    the next GET goes out again on a fresh connection instead of failing."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.transport.abort()

    pool = UpstreamPool(connect_timeout=2)
    async with raw_upstream(script) as (port, seen):
        for _ in range(5):
            assert await fetch(pool, port) == (200, b"ok")
        assert len(seen) == 5
    await pool.close()


async def test_reused_connection_dropped_on_request_replays_only_idempotent() -> None:
    """Each connection answers one request, then drops the next one unanswered (the upstream
    closing an idle connection as it is reused): a GET, a PUT and a POST with an
    Idempotency-Key go out again on a fresh connection; a plain POST is not run twice (502)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)
        writer.transport.abort()

    pool = UpstreamPool(connect_timeout=2)
    async with raw_upstream(script) as (port, seen):
        origin = ("http", "127.0.0.1", port)
        assert await fetch(pool, port) == (200, b"ok")
        for method, headers in (("GET", []), ("PUT", []), ("POST", [("Idempotency-Key", "k1")])):
            conn, _ = await exchange(
                pool, origin, method, "/x", headers, "up", b"b" if method != "GET" else None, None, False
            )
            assert conn.status == 200 and conn.reused is False  # answered on a fresh connection
            while await conn.read():
                pass
            pool.release(conn)
        before = len(seen)
        with pytest.raises(UpstreamError) as info:
            await exchange(pool, origin, "POST", "/x", [], "up", b"body", None, False)
        assert info.value.before_head and info.value.retriable and len(seen) == before  # not replayed
    await pool.close()


@pytest.mark.parametrize(
    "answer,before",
    [
        ([b""], True),  # closed without a byte
        ([b"NOT HTTP AT ALL\r\n\r\n"], True),  # malformed
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"], False),  # cut mid-body
        # cut 100 KiB into a 200 KiB body taken around the parser (DIRECT_BODY_MIN)
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 204800\r\n\r\n", b"y" * 102400], False),
    ],
)
async def test_upstream_faults(answer: list[bytes], before: bool) -> None:
    """Each fault is an error, before the head (502) or after it (the body aborted, never
    presented as complete); the connection is not pooled."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        for piece in answer:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.transport.abort()

    pool = UpstreamPool(connect_timeout=2)
    async with raw_upstream(script) as (port, _):
        with pytest.raises(UpstreamError) as info:
            await fetch(pool, port)
        assert info.value.before_head is before and not info.value.connect
        assert pool.idle_count == 0
    await pool.close()


@pytest.mark.parametrize("informational", [False, True])
@pytest.mark.parametrize("split", [0, 10, DIRECT_BODY_MIN + 5, 307_200])
async def test_large_sized_body_skips_the_parser_and_the_connection_is_reused(split: int, informational: bool) -> None:
    """A Content-Length body of 300 KiB written in uneven pieces, with ``split`` body bytes in
    the head's write (after a 103 Early Hints head, if ``informational``): taken around llhttp
    (tunnel_client/http1.py, DIRECT_BODY_MIN), byte-exact; the same connection then carries a
    small and a chunked answer (a fresh parser)."""
    body = bytes(range(256)) * 1200  # 307,200 bytes
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" if informational else b""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(hints + b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:split])
        await writer.drain()
        for start in range(split, len(body), 70_001):
            writer.write(body[start : start + 70_001])
            await writer.drain()
            await asyncio.sleep(0.001)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall")
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    pool = UpstreamPool(connect_timeout=2)
    async with raw_upstream(script) as (port, seen):
        assert await fetch(pool, port) == (200, body)
        assert await fetch(pool, port) == (200, b"small")
        assert await fetch(pool, port) == (200, b"abc")
        assert seen == [1] and pool.idle_count == 1
    await pool.close()


@pytest.mark.parametrize(
    "tail,reused",
    [
        (b"", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False),  # an answer nobody asked for
    ],
)
async def test_large_sized_body_end_and_extra_bytes(tail: bytes, reused: bool) -> None:
    """Bytes after a directly taken body end it there; the connection is then not reused."""
    body = b"z" * (DIRECT_BODY_MIN * 2)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(body + tail)
            await writer.drain()

    pool = UpstreamPool(connect_timeout=2)
    async with raw_upstream(script) as (port, seen):
        assert await fetch(pool, port) == (200, body)
        assert await fetch(pool, port) == (200, body)
        assert len(seen) == (1 if reused else 2)
    await pool.close()


async def test_refused_connection() -> None:
    sock = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = sock.sockets[0].getsockname()[1]
    sock.close()
    await sock.wait_closed()
    pool = UpstreamPool(connect_timeout=2)
    with pytest.raises(UpstreamError) as info:
        await fetch(pool, port)
    assert info.value.connect and not info.value.timeout
    await pool.close()


async def test_through_the_tunnel(certs: Certs) -> None:
    """Crafted answers through exit server and client: 103 skipped, HEAD keeps its length,
    an EOF-delimited body arrives whole, a cut body is aborted (never presented as complete),
    a streamed chunked upload reaches the upstream whole."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            head, body = await read_request(reader)
            path = head.split(b" ")[1]
            if path == b"/hints":
                writer.write(
                    b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
                )
            elif path == b"/head":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            elif path == b"/eof":
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"e" * 100_000)
                await writer.drain()
                return
            elif path == b"/cut":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"c" * 1000)
                await writer.drain()
                writer.transport.abort()
                return
            elif path == b"/upload":
                writer.write(b"HTTP/1.1 200 OK\r\nX-Got: %d\r\nContent-Length: 4\r\n\r\n%s" % (len(body), body[-4:]))
            await writer.drain()

    async with raw_upstream(script) as (port, _), stack(certs) as s:
        await s.add_client([f"default=http://127.0.0.1:{port}"])
        async with aiohttp.ClientSession() as http:
            async with http.get(s.base + "/hints") as r:
                assert r.status == 200 and await r.read() == b"hi"
            async with http.head(s.base + "/head") as r:
                assert r.status == 200 and r.headers["Content-Length"] == "1234"
            async with http.get(s.base + "/eof") as r:
                assert r.status == 200 and await r.read() == b"e" * 100_000

            with pytest.raises(aiohttp.ClientPayloadError):
                async with http.get(s.base + "/cut") as r:
                    assert r.status == 200
                    await r.read()

            async def gen() -> AsyncIterator[bytes]:
                for i in range(50):
                    yield bytes([65 + i % 26]) * 10_000
                    await asyncio.sleep(0)

            async with http.post(s.base + "/upload", data=gen()) as r:
                assert r.status == 200 and int(r.headers["X-Got"]) == 500_000
                assert await r.read() == bytes([65 + 49 % 26]) * 4


async def test_a_parked_request_holds_no_decoded_head(certs: Certs) -> None:
    """A long poll waits at the upstream for as long as it likes: once its request is sent, the
    client's stream no longer holds the decoded request head (about 2 KiB of strings each, 20 MiB
    at 10,000 long polls; bench/scale.py), and the answer still comes back whole."""
    parked = asyncio.Event()
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        head, _ = await read_request(reader)
        assert b"x-long: poll" in head.lower()
        parked.set()
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nparked")
        await writer.drain()

    async with raw_upstream(script) as (port, _), stack(certs) as s:
        running = await s.add_client([f"default=http://127.0.0.1:{port}"])
        async with aiohttp.ClientSession() as http:
            call = asyncio.ensure_future(http.get(s.base + "/poll", headers={"X-Long": "poll"}))
            try:
                await asyncio.wait_for(parked.wait(), 10)
                streams = [
                    stream
                    for link in running.client.links
                    if link.conn is not None
                    for stream in link.conn._streams.values()
                ]
                assert len(streams) == 1 and streams[0].head is None
                release.set()
                async with await asyncio.wait_for(call, 10) as r:
                    assert r.status == 200 and await r.read() == b"parked"
            finally:
                call.cancel()
