"""A bad upstream costs the client bounded memory and the caller a prompt, honest answer
(issue 24 items 1-3): an endless or oversized response head is 502 at once, a head the tunnel
cannot carry is 502 at once (not a 504 after --upstream-timeout), and a close-delimited body
cut by a reset is an aborted response, never a complete one."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from .helpers import Certs, stack

pytestmark = pytest.mark.asyncio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    """An asyncio server that answers each request with whatever ``handler`` writes."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.written = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawUpstream:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            try:
                await self.handler(reader, writer)
            except (ConnectionError, OSError):
                pass
            finally:
                writer.transport.abort()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _get(base: str, timeout: float = 20) -> tuple[int, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            await resp.read()
            return resp.status, loop.time() - started


@pytest.fixture
def endless_header() -> tuple[RawUpstream, list[int]]:
    up: RawUpstream

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        chunk = b"a" * 65536
        for _ in range(4096):  # at most 256 MiB; the client must stop it long before
            writer.write(chunk)
            await writer.drain()
            up.written += len(chunk)

    up = RawUpstream(handler)
    return up, []


async def test_endless_response_head_is_502_at_once(
    certs: Certs, endless_header: tuple[RawUpstream, list[int]]
) -> None:
    up, _ = endless_header
    async with up, stack(certs, upstream_timeout=30) as s:
        await s.add_client([f"default={up.url}"])
        status, took = await _get(s.base)
        assert status == 502
        assert took < 10  # not the upstream timeout (30 s)
        # The client stopped reading at the limit: what the upstream managed to write is the
        # limit plus the socket buffers on both sides, not the 256 MiB it tried.
        assert up.written < 16 * 1024 * 1024, up.written


@pytest.mark.parametrize(
    ("head", "limits"),
    [
        (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-F%d: v\r\n" % i for i in range(2000)) + b"\r\n", {}),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 100_000 + b"\r\nContent-Length: 0\r\n\r\n", {}),
        # Past the client's own bounds (raised here), the tunnel's limits: a field over 64 KiB ...
        (
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n",
            {"max_response_head": 1024 * 1024},
        ),
        # ... and a status the tunnel does not carry.
        (b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n", {}),
    ],
    ids=["2000-fields", "100k-head", "field-over-64k", "status-099"],
)
async def test_bad_response_heads_are_502_at_once(
    certs: Certs, head: bytes, limits: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(60)  # hold the connection: the answer must not wait for its end

    async with RawUpstream(handler) as up, stack(certs, upstream_timeout=30) as s:
        await s.add_client([f"default={up.url}"], **limits)
        status, took = await _get(s.base)
        assert status == 502 and took < 10, (status, took)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("tunnel_client")]
    assert any("502" in m or "too large" in m or "malformed" in m for m in messages), messages


async def test_reset_on_close_delimited_body_aborts_the_response(certs: Certs) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"partial body " * 1000)
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # close with linger 0: an RST, not a FIN

    async with RawUpstream(handler) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with http.get(s.base + "/", timeout=aiohttp.ClientTimeout(total=20)) as resp:
                    assert resp.status == 200
                    await resp.read()


async def test_clean_close_delimited_body_is_complete(certs: Certs) -> None:
    body = b"whole body " * 1000

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()  # FIN: the end of a close-delimited body

    async with RawUpstream(handler) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        async with aiohttp.ClientSession() as http:
            async with http.get(s.base + "/", timeout=aiohttp.ClientTimeout(total=20)) as resp:
                assert resp.status == 200 and await resp.read() == body
