"""The edge owns Host and the forwarding headers; hop-by-hop details (issue 15 items 1-4).

Each test sends raw bytes to a real exit server and looks at what a real upstream received."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from .helpers import Certs, stack, upstream
from .sec_helpers import raw_exchange
from .test_access import write_access

pytestmark = pytest.mark.asyncio


def recorder(seen: list[web.Request]) -> web.Application:
    """An upstream answering with the Host it got; records every request."""

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        await request.read()
        return web.Response(text=f"host={request.headers.get('Host')}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def test_absolute_form_target_sets_the_host_the_upstream_sees(certs: Certs, tmp_path: Path) -> None:
    """`GET http://open.example/` with `Host: secure.example`: routed and checked as
    open.example, so the upstream must see open.example, never the protected name."""
    write_access(tmp_path / "access.toml")
    seen: list[web.Request] = []
    async with upstream(recorder(seen)) as up, stack(certs, access=tmp_path / "access.toml") as s:
        await s.add_client([f"default={up.url}"])
        port = s.server.public_port
        resp = await raw_exchange(port, b"GET http://open.example/x HTTP/1.1\r\nHost: secure.example\r\n\r\n")
        assert resp.status == 200
        assert seen[-1].headers["Host"] == "open.example"
        assert seen[-1].headers["X-Forwarded-Host"] == "open.example"
        assert seen[-1].path == "/x"
        # the other way round: the protected name in the target needs credentials
        resp = await raw_exchange(port, b"GET http://secure.example/x HTTP/1.1\r\nHost: open.example\r\n\r\n")
        assert resp.status == 401
        assert len(seen) == 1


async def test_connection_naming_host_does_not_remove_host(certs: Certs) -> None:
    seen: list[web.Request] = []
    async with upstream(recorder(seen)) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        for connection in (b"Host", b"close, host", b"X-Forwarded-Host, X-Forwarded-For, X-Request-Id"):
            resp = await raw_exchange(
                s.server.public_port,
                b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: " + connection + b"\r\n\r\n",
            )
            assert resp.status == 200, connection
            got = seen[-1].headers
            assert got["Host"] == "shop.example", connection
            assert got["X-Forwarded-Host"] == "shop.example"
            assert got["X-Forwarded-For"] == "127.0.0.1"
            assert "X-Request-Id" in got


async def test_caller_forwarding_headers_are_replaced(certs: Certs) -> None:
    seen: list[web.Request] = []
    async with upstream(recorder(seen)) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        resp = await raw_exchange(
            s.server.public_port,
            b"GET / HTTP/1.1\r\nHost: shop.example\r\n"
            b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: admin.example\r\n"
            b"Forwarded: for=10.0.0.1;proto=https;host=admin.example\r\nX-Real-IP: 10.0.0.1\r\n"
            b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Port: 443\r\n\r\n",
        )
        assert resp.status == 200
        got = seen[-1].headers
        assert got.getall("X-Forwarded-Proto") == ["http"]
        assert got.getall("X-Forwarded-Host") == ["shop.example"]
        assert got.getall("X-Real-IP") == ["127.0.0.1"]
        assert got.getall("Forwarded") == ['for=127.0.0.1;host="shop.example";proto=http']
        assert got.getall("X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]  # the chain is extended
        assert "X-Forwarded-Port" not in got


async def test_trusted_proxies_keep_their_forwarding_headers(certs: Certs) -> None:
    """From a trusted peer the headers a load balancer wrote are taken: the caller is the
    rightmost untrusted X-Forwarded-For address, the scheme the proxy's."""
    seen: list[web.Request] = []
    async with upstream(recorder(seen)) as up, stack(certs, trusted_proxies=["127.0.0.0/8"]) as s:
        await s.add_client([f"default={up.url}"])
        resp = await raw_exchange(
            s.server.public_port,
            b"GET / HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-For: 198.51.100.7, 203.0.113.9, 127.0.0.5\r\n\r\n",
        )
        assert resp.status == 200
        got = seen[-1].headers
        assert got["X-Forwarded-Proto"] == "https"
        assert got["X-Real-IP"] == "203.0.113.9"
        assert got["X-Forwarded-For"] == "198.51.100.7, 203.0.113.9, 127.0.0.5, 127.0.0.1"
        assert got["Forwarded"] == 'for=203.0.113.9;host="shop.example";proto=https'


async def test_websocket_check_is_token_based(certs: Certs) -> None:
    """`Connection: keep-alive, not-upgrade` is no upgrade request: an ordinary GET."""
    seen: list[web.Request] = []
    async with upstream(recorder(seen)) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        resp = await raw_exchange(
            s.server.public_port,
            b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: x-upgraded\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        assert resp.status == 200
        assert "Upgrade" not in seen[-1].headers


async def test_underscore_header_names_are_dropped(certs: Certs) -> None:
    seen: list[web.Request] = []
    async with upstream(recorder(seen)) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        resp = await raw_exchange(
            s.server.public_port, b"GET / HTTP/1.1\r\nHost: a.example\r\nX_Forwarded_For: 1.2.3.4\r\nX-Ok: 1\r\n\r\n"
        )
        assert resp.status == 200
        names = [name.lower() for name in seen[-1].headers]
        assert "x_forwarded_for" not in names and "x-ok" in names


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0", b"HTTP/0.9"])
async def test_other_http_versions_are_505(certs: Certs, version: bytes) -> None:
    seen: list[web.Request] = []
    async with upstream(recorder(seen)) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        resp = await raw_exchange(s.server.public_port, b"GET / " + version + b"\r\nHost: a.example\r\n\r\n")
        assert resp.status in (400, 505)  # 400 where the parser itself refuses the line
        assert resp.head.startswith(b"HTTP/1.")  # never echoes the version it refused
        assert resp.closed
        assert not seen


async def test_bytes_after_a_non_websocket_upgrade_are_not_lost_silently(certs: Certs) -> None:
    """A request pipelined behind an `Upgrade: h2c` request we do not relay: the first is
    answered with Connection: close and the connection closes, so the caller knows the second
    was not processed (3d9815c kept the connection open and dropped it)."""
    seen: list[web.Request] = []
    async with upstream(recorder(seen)) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port)
        try:
            writer.write(
                b"GET /one HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                b"GET /two HTTP/1.1\r\nHost: a.example\r\n\r\n"
            )
            await writer.drain()
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                rest = await reader.read()  # the body, then EOF: the server closed
            assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head
            assert rest == b"host=a.example"
            assert [r.path for r in seen] == ["/one"]
            assert "Upgrade" not in seen[0].headers
        finally:
            writer.close()


async def test_websocket_upgrade_with_a_body_is_400(certs: Certs) -> None:
    seen: list[web.Request] = []
    async with upstream(recorder(seen)) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        resp = await raw_exchange(
            s.server.public_port,
            b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Content-Length: 5\r\n\r\nhello",
            timeout=5,
        )
        assert resp.status == 400
        assert not seen


async def test_no_software_version_in_public_responses(certs: Certs) -> None:
    async with stack(certs) as s:
        for request in (
            b"GET / HTTP/1.1\r\nHost: a.example\r\nContent-Length: x\r\n\r\n",  # parse error: 400
            b"GET / HTTP/1.1\r\nHost: nobody.example\r\n\r\n",  # no tunnel: 503
        ):
            resp = await raw_exchange(s.server.public_port, request)
            assert resp.status in (400, 503)
            assert resp.header("Server") == "backhaul"


HAPROXY_CFG = """
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend public
    bind 127.0.0.1:{front}
    default_backend exit
backend exit
    server exit 127.0.0.1:{public} send-proxy-v2
"""


async def _get_from(source: str, port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


async def test_proxy_protocol_v2_from_haproxy(certs: Certs, tmp_path: Path) -> None:
    """HAProxy (TCP mode, send-proxy-v2) in front, trusted: the upstream sees the caller's
    address (127.0.0.2), not HAProxy's. The same header from an untrusted peer is refused."""
    import shutil
    import subprocess

    from shared.proxyproto import proxy_v2_header

    from ..waiting import wait_until
    from .test_cli import free_port

    haproxy = shutil.which("haproxy")
    assert haproxy is not None, "haproxy is missing: `make test` installs it (scripts/ci-deps.sh)"
    seen: list[web.Request] = []
    async with upstream(recorder(seen)) as up, stack(certs, trusted_proxies=["127.0.0.1/32"]) as s:
        await s.add_client([f"default={up.url}"])
        front = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(front=front, public=s.server.public_port))
        proxy = subprocess.Popen([haproxy, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:

            async def listening() -> bool:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", front)
                except OSError:
                    return False
                writer.close()
                return True

            await wait_until(listening, 15, what="haproxy listening")
            request = (
                b"GET /via HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n"
            )
            reply = await _get_from("127.0.0.2", front, request)
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
            got = seen[-1].headers
            assert got["X-Real-IP"] == "127.0.0.2"
            assert got["X-Forwarded-For"] == "6.6.6.6, 127.0.0.2"  # the caller's chain, then the caller
            assert got["Forwarded"] == 'for=127.0.0.2;host="shop.example";proto=http'
        finally:
            proxy.terminate()
            proxy.wait(10)
        # An untrusted peer cannot claim an address: its PROXY header is not HTTP (400).
        forged = proxy_v2_header("203.0.113.5:1000", f"127.0.0.1:{s.server.public_port}")
        reply = await _get_from("127.0.0.2", s.server.public_port, forged + request)
        assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n")[0]
        assert len(seen) == 1
