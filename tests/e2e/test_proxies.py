"""The tunnel through real customer-site proxies (tests/e2e/proxies.py): squid as an HTTP
CONNECT proxy with Basic login, squid denying CONNECT, dante as a SOCKS5 proxy. Through each:
registration, requests, a WebSocket, reconnection after the proxy restarts; refusals give one
clear line naming the proxy and never the password; the proxy really carried the tunnel."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tunnel_client.pinning import spki_pin
from tunnel_client.proxy import redact, with_credentials

from ..waiting import wait_until
from .helpers import Certs, RunningClient, Stack, stack, upstream
from .proxies import PROXY_PASSWORD, PROXY_USER, RunningProxy, dante, mitmproxy, squid
from .test_tls import _leaf_der
from .test_websocket import ws_app

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


def hello_app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 100)

    app = ws_app()
    app.router.add_get("/hello", hello)
    return app


#: Every proxy the client is tested through: squid with Basic, squid offering NTLM first,
#: dante (SOCKS5), mitmproxy intercepting TLS (the client trusts its CA and uses --auth
#: challenge, pinning the exit server's key).
KINDS = ["squid", "squid-ntlm", "dante", "mitmproxy"]


@contextmanager
def proxy_of(kind: str, certs: Certs, server_port: int) -> Iterator[tuple[RunningProxy, str, dict[str, Any]]]:
    """A running proxy, the --proxy URL a client gives it (credentials included) and the
    client's other options for it."""
    if kind.startswith("squid"):
        with squid([server_port], login=True, ntlm=kind == "squid-ntlm") as p:
            yield p, with_credentials(p.url, PROXY_USER, PROXY_PASSWORD), {}
    elif kind == "dante":
        with dante() as p:
            yield p, p.url, {}
    else:
        with mitmproxy(certs.ca) as p:
            assert p.ca_file is not None
            yield p, p.url, {"ca_file": p.ca_file, "auth": "challenge", "pin": [spki_pin(_leaf_der(certs.cert))]}


@asynccontextmanager
async def proxied(certs: Certs, kind: str) -> AsyncIterator[tuple[Stack, RunningProxy, str, str, dict[str, Any]]]:
    async with upstream(hello_app()) as up, stack(certs) as s:
        with proxy_of(kind, certs, s.server.control_port) as (proxy, url, options):
            yield s, proxy, url, up.url, options


def peer_port(client: RunningClient) -> int:
    conn = client.client.links[0].conn
    assert conn is not None and conn.ws is not None
    return int(conn.ws.transport.get_extra_info("peername")[1])


async def get(s: Stack, path: str = "/hello") -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.get(s.base + path) as resp:
            return resp.status, await resp.read()


@pytest.mark.parametrize("kind", KINDS)
async def test_register_serve_websocket_and_survive_a_proxy_restart(
    certs: Certs, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with proxied(certs, kind) as (s, proxy, url, up, options):
        client = await s.add_client([f"default={up}"], proxy=url, **options)
        assert await get(s) == (200, b"x" * 100)
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{s.base}/ws") as ws:
                await ws.send_str("through the proxy")
                assert (await ws.receive()).data == "through the proxy"
                await ws.send_bytes(b"\x00" * 200_000)
                assert (await ws.receive()).data == b"\x00" * 200_000
        # the proxy carried it: the tunnel's socket is connected to the proxy's port
        assert peer_port(client) == proxy.port
        # the proxy dies and comes back on the same port: the client reconnects through it (a new
        # session: the reconnect can be quicker than any poll for the gap between the two)
        link = client.client.links[0]
        before = link.session_id
        proxy.restart()
        await wait_until(
            lambda: link.session_id != before and client.client.connected,
            timeout=30,
            what="a new session via the proxy",
        )
        assert await get(s) == (200, b"x" * 100)
        assert client.client.links[0].reconnects >= 1
    text = caplog.text
    assert f"via {redact(url)} (--proxy)" in text
    assert PROXY_PASSWORD not in text and "pr0xy" not in text  # never the password, in any form


async def test_squid_without_the_login_or_denying_says_so_in_one_line(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    async with upstream(hello_app()) as up, stack(certs) as s:
        port = s.server.control_port
        with squid([port], login=True) as p:
            wrong = with_credentials(p.url, PROXY_USER, "not the password")
            await check_refused(
                s, caplog, [f"default={up.url}"], wrong, "407 Proxy Authentication Required", "--proxy-auth-file"
            )
            assert "not the password" not in caplog.text and "not%20the%20password" not in caplog.text
        with squid([port], deny=True) as p:
            await check_refused(s, caplog, [f"default={up.url}"], p.url, "403 Forbidden", "deny CONNECT")
        with squid([port + 1 if port < 65535 else port - 1]) as p:  # squid's port ACL leaves ours out
            await check_refused(s, caplog, [f"default={up.url}"], p.url, "403 Forbidden", "deny CONNECT")


async def check_refused(
    s: Stack, caplog: pytest.LogCaptureFixture, upstreams: list[str], proxy: str, status: str, hint: str
) -> None:
    caplog.clear()
    client = await s.add_client(upstreams, proxy=proxy, wait=False)
    line = await wait_until(
        lambda: next((r.getMessage() for r in caplog.records if "answered CONNECT" in r.getMessage()), None),
        timeout=20,
        what="the refusal logged",
    )
    assert status in line and hint in line and "proxy http://" in line, line
    assert not client.client.connected
    await client.stop()
    s.clients.remove(client)


async def test_the_client_follows_https_proxy_and_no_proxy(
    certs: Certs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without --proxy the environment decides, as curl's does: HTTPS_PROXY is used, and
    NO_PROXY naming the server makes the tunnel direct (and says why)."""
    caplog.set_level(logging.INFO)
    async with proxied(certs, "dante") as (s, proxy, url, up, _):
        monkeypatch.setenv("HTTPS_PROXY", url)
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # upstreams never use a proxy
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
        client = await s.add_client([f"default={up}"])
        assert await get(s) == (200, b"x" * 100)
        assert "via socks5h://127.0.0.1" in caplog.text and "(HTTPS_PROXY)" in caplog.text
        assert peer_port(client) == proxy.port
        await client.stop()
        s.clients.remove(client)
        monkeypatch.setenv("NO_PROXY", "example.com,localhost")
        caplog.clear()
        client = await s.add_client([f"default={up}"])
        assert await get(s) == (200, b"x" * 100)
        assert "direct (NO_PROXY entry 'localhost' matches localhost)" in caplog.text
        assert peer_port(client) == s.server.control_port


async def test_ntlm_login_through_squid(certs: Certs) -> None:
    """squid offering NTLM (its ntlm_fake_auth helper runs the real three-message exchange)
    and Basic: the client answers NTLM, on one connection, and the tunnel serves."""
    async with upstream(hello_app()) as up, stack(certs) as s:
        with squid([s.server.control_port], login=True, ntlm=True) as proxy:
            url = with_credentials(proxy.url, PROXY_USER, PROXY_PASSWORD)
            client = await s.add_client([f"default={up.url}"], proxy=url)
            assert await get(s) == (200, b"x" * 100)
            assert peer_port(client) == proxy.port
            await client.stop()
            s.clients.remove(client)
            # squid logs the tunnel when it closes, with the user NTLM authenticated
            line = await wait_until(
                lambda: next((x for x in proxy.connections().splitlines() if "TCP_TUNNEL/200" in x), None),
                timeout=10,
                what="squid's access log line",
            )
            # an authenticated user (ntlm_fake_auth reads NTLM's UTF-16 names as C strings: "s\\s")
            assert "CONNECT localhost" in line and line.split()[7] != "-", line
            denied = [x for x in proxy.connections().splitlines() if "TCP_DENIED/407" in x]
            assert len(denied) == 2, denied  # no credentials, then NTLM's challenge: three requests in all


async def test_several_servers_through_one_proxy(certs: Certs) -> None:
    """Two --server (the HA set-up) through one squid: a session to each, both via the proxy,
    and the public traffic of each exit server served."""
    from exit_server import ExitServer

    from .helpers import _token_auth, server_config

    second = ExitServer(server_config(certs), auth=_token_auth())
    await second.start()
    try:
        async with upstream(hello_app()) as up, stack(certs) as s:
            ports = [s.server.control_port, second.control_port]
            with squid(ports, login=True) as proxy:
                url = with_credentials(proxy.url, PROXY_USER, PROXY_PASSWORD)
                client = await s.add_client(
                    [f"default={up.url}"], server=[f"wss://localhost:{p}" for p in ports], proxy=url
                )
                assert [link.proxy.url for link in client.client.links] == [url] * 2
                for link in client.client.links:
                    assert link.conn is not None and link.conn.ws is not None
                    assert link.conn.ws.transport.get_extra_info("peername")[1] == proxy.port
                for base in (s.base, f"http://127.0.0.1:{second.public_port}"):
                    async with aiohttp.ClientSession() as http, http.get(base + "/hello") as resp:
                        assert resp.status == 200
    finally:
        await second.close()
