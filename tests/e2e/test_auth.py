"""Authentication before the upgrade, TLS verification, and the plaintext guard."""

from __future__ import annotations

import asyncio
import logging
import ssl

import aiohttp
import pytest
import trustme
from aiohttp import web
from pydantic import ValidationError
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from exit_server import ExitServer, ServerConfig
from shared.errors import ConfigError
from tunnel_client import ClientConfig, TunnelClient

from ..waiting import wait_until
from .helpers import TOKEN, Certs, client_config, server_config, stack, upstream

pytestmark = pytest.mark.asyncio


def _ctx(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca))


@pytest.mark.parametrize("header", [None, "Bearer wrong-token", "Basic " + TOKEN, "Bearer "])
async def test_missing_or_wrong_token_is_401_before_upgrade(
    certs: Certs, caplog: pytest.LogCaptureFixture, header: str | None
) -> None:
    caplog.set_level(logging.DEBUG)
    async with stack(certs) as s:
        headers = {"Authorization": header} if header else {}
        with pytest.raises(InvalidStatus) as info:
            # This raw test client logs its own headers at DEBUG: give it a logger kept out of the check.
            await connect(
                f"wss://localhost:{s.server.control_port}",
                ssl=_ctx(certs),
                additional_headers=headers,
                logger=logging.getLogger("test.rawclient"),
            )
        assert info.value.response.status_code == 401
        assert s.server.control.auth_failures == 1
        assert not s.server.registry.tunnels
    text = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("test."))
    assert "authentication failed" in text
    assert "wrong-token" not in text and TOKEN not in text


async def test_client_with_wrong_token_never_registers(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with stack(certs) as s:
        client = TunnelClient(client_config(certs, s.server, ["default=http://127.0.0.1:9"]), token="nope")
        task = asyncio.create_task(client.run())
        await asyncio.sleep(1.0)
        assert not client.connected and not s.server.registry.tunnels
        await client.shutdown(0)
        await task
    assert any("token refused (401)" in r.getMessage() for r in caplog.records)


async def test_client_never_sends_token_to_unverified_server(certs: Certs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rogue_ca = trustme.CA()
    rogue = rogue_ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    rogue.configure_cert(ctx)
    received = bytearray()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            received.extend(await reader.read(65536))
        except (ssl.SSLError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    config = ClientConfig(
        server=[f"wss://localhost:{port}"],
        ca_file=certs.ca,
        upstream=["default=http://127.0.0.1:9"],
        backoff_base=0.2,
        backoff_cap=0.5,
    )
    client = TunnelClient(config, token=TOKEN)
    task = asyncio.create_task(client.run())
    await asyncio.sleep(1.0)
    assert not client.connected
    await client.shutdown(0)
    await task
    server.close()
    await server.wait_closed()
    assert TOKEN.encode() not in received
    assert received == b""  # the TLS handshake failed before any HTTP byte


async def test_exit_server_refuses_to_start_without_token(certs: Certs) -> None:
    with pytest.raises(ConfigError, match="token is required"):
        ExitServer(server_config(certs))
    with pytest.raises(ConfigError, match="token is required"):
        ExitServer(server_config(certs, token="   "))


async def test_plaintext_only_with_flag_and_on_loopback(certs: Certs) -> None:
    with pytest.raises(ValidationError, match="loopback"):
        ServerConfig(control_addr="0.0.0.0:8443", insecure_plaintext=True)
    with pytest.raises(ValidationError, match="tls-cert"):
        ServerConfig(control_addr="127.0.0.1:8443")
    with pytest.raises(ValidationError, match="insecure-plaintext"):
        ClientConfig(server=["ws://127.0.0.1:1"], upstream=["default=http://x"])
    with pytest.raises(ValidationError, match="loopback"):
        ClientConfig(server=["ws://example.com:1"], upstream=["default=http://x"], insecure_plaintext=True)

    async def h(request: web.Request) -> web.Response:
        return web.Response(text="plain ok")

    app = web.Application()
    app.router.add_get("/", h)
    async with upstream(app) as up:
        server = ExitServer(
            ServerConfig(public_addr="127.0.0.1:0", control_addr="127.0.0.1:0", insecure_plaintext=True, token=TOKEN)
        )
        await server.start()
        client = TunnelClient(
            ClientConfig(
                server=[f"ws://127.0.0.1:{server.control_port}"],
                insecure_plaintext=True,
                upstream=[f"default={up.url}"],
            ),
            token=TOKEN,
        )
        task = asyncio.create_task(client.run())
        try:
            await client.wait_connected(5)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{server.public_port}/") as r:
                    assert await r.text() == "plain ok"
        finally:
            await client.shutdown(1)
            await task
            await server.close()


async def test_control_endpoint_speaks_tls_only(certs: Certs) -> None:
    async with stack(certs) as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.control_port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(1024), 5)
        assert not data.startswith(b"HTTP/1.1 101")
        writer.close()


@pytest.mark.parametrize("auth", ["bearer", "challenge"])
async def test_a_session_keeps_no_handshake_state(certs: Certs, auth: str, caplog: pytest.LogCaptureFixture) -> None:
    """Once a session runs, the exit server holds neither the opening handshake's headers
    (websockets keeps its request and response for the tunnel's lifetime) nor the challenge's
    transcript; the tunnel serves as before, and closes cleanly (a close frame after the
    handshake goes through websockets' own parser, which must still see the request)."""
    from tunnel_client.pinning import spki_pin

    from .test_tls import _leaf_der

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", hello)
    extra = {"auth": "challenge", "pin": [spki_pin(_leaf_der(certs.cert))]} if auth == "challenge" else {}
    async with upstream(app) as up, stack(certs) as s:
        running = await s.add_client([f"default={up.url}"], **extra)
        (conn,) = s.server.control.connections
        ws = conn.ws
        assert ws is not None and ws.request is not None and ws.response is not None
        assert not ws.request.headers and not ws.response.headers
        assert not hasattr(ws, "backhaul_challenge") and not hasattr(ws, "backhaul_challenge_answer")
        assert getattr(ws, "backhaul_client_id", None) == "default"
        async with aiohttp.ClientSession() as http, http.get(s.base) as r:
            assert r.status == 200 and await r.text() == "ok"
        await running.stop()  # the client's close frame reaches websockets' own parser
        s.clients.remove(running)
        await wait_until(lambda: not s.server.control.connections, 10, what="the session closed")
        assert "Fatal error" not in caplog.text and "AssertionError" not in caplog.text
        assert "websocket closed: no close frame" not in caplog.text
