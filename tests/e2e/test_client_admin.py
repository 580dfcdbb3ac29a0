"""The client's admin listener (tunnel_client/admin.py, plain asyncio) over real sockets:
answers, HEAD without a body, and a head too large or too slow dropped without an answer."""

from __future__ import annotations

import asyncio

import pytest

from .helpers import Certs, stack

pytestmark = pytest.mark.asyncio


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 15)
    writer.close()
    return answer


async def test_the_client_admin_listener(certs: Certs) -> None:
    async with stack(certs) as s:
        running = await s.add_client(["default=http://127.0.0.1:9"])
        port = running.client.admin_port
        ok = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b"\r\n\r\nok\n")
        head = await exchange(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")  # no body
        assert b"Content-Length: 0" not in head
        assert (await exchange(port, b"DELETE /healthz HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert await exchange(port, b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n") == b""
        metrics = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert b"backhaul_client_sessions_connected" in metrics
