"""The public HTTPS listener (--public-tls-addr): certificates chosen per SNI name from
--public-cert-dir (wildcards one label deep), unknown names refused with unrecognized_name,
X-Forwarded-Proto https, --hsts, --redirect-http, WebSockets, reload on change, and the same
TLS rules as the control listener (sslyze)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from tests.names import dual_name, needs_ipv6
from tests.waiting import wait_until

from .helpers import Certs, stack, upstream
from .test_tls import assert_strict_tls, scan_tls

pytestmark = pytest.mark.asyncio


@dataclass
class PublicPKI:
    ca: trustme.CA
    ca_file: Path
    cert_dir: Path

    def add(self, name: str, *, file_name: str | None = None) -> None:
        """Issue a certificate for ``name`` into the directory (atomically, as certbot does)."""
        cert = self.ca.issue_cert(name)
        stem = file_name or name
        for suffix, blob in (
            (".pem", b"".join(p.bytes() for p in cert.cert_chain_pems)),
            ("-key.pem", cert.private_key_pem.bytes()),
        ):
            tmp = self.cert_dir / f".{stem}{suffix}.tmp"
            tmp.write_bytes(blob)
            tmp.rename(self.cert_dir / f"{stem}{suffix}")

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[PublicPKI]:
    ca = trustme.CA()
    ca_file = tmp_path / "public-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_dir = tmp_path / "public-certs"
    cert_dir.mkdir()
    pki = PublicPKI(ca, ca_file, cert_dir)
    for name in ("app.test", "*.wild.test", "localhost"):
        pki.add(name)
    yield pki


async def echo_app() -> web.Application:
    async def headers(request: web.Request) -> web.Response:
        return web.json_response({k: v for k, v in request.headers.items()})

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_bytes(msg.data if msg.type == aiohttp.WSMsgType.BINARY else msg.data.encode())
        return sock

    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/{tail:.*}", headers)
    return app


def peer_names(port: int, server_name: str | None, ctx: ssl.SSLContext, address: str = "127.0.0.1") -> list[str]:
    """The DNS names of the certificate the listener presents for ``server_name``."""
    with socket.create_connection((address, port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            cert = tls.getpeercert()
    assert cert is not None
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


def tls_overrides(pki: PublicPKI, **extra: object) -> dict[str, object]:
    return {"public_tls_addr": "127.0.0.1:0", "public_cert_dir": pki.cert_dir, **extra}


async def test_https_request_through_a_tunnel(certs: Certs, pki: PublicPKI) -> None:
    async with upstream(await echo_app()) as up, stack(certs, **tls_overrides(pki, hsts=31536000)) as s:
        await s.add_client([f"app.test={up.url}"])
        port = s.server.public_tls_port
        conn = aiohttp.TCPConnector(ssl=pki.client_context())
        async with aiohttp.ClientSession(connector=conn) as session:
            async with session.get(
                f"https://127.0.0.1:{port}/hello", headers={"Host": "app.test"}, server_hostname="app.test"
            ) as resp:
                assert resp.status == 200
                seen = json.loads(await resp.text())
                assert resp.headers["Strict-Transport-Security"] == "max-age=31536000"
        assert seen["X-Forwarded-Proto"] == "https"
        assert "proto=https" in seen["Forwarded"]
        assert seen["Host"] == "app.test"
        # the plain listener still answers, and says http
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{s.base}/", headers={"Host": "app.test"}) as resp:
                assert resp.status == 200
                assert json.loads(await resp.text())["X-Forwarded-Proto"] == "http"
                assert "Strict-Transport-Security" not in resp.headers


async def test_certificate_per_sni_name_and_wildcards(certs: Certs, pki: PublicPKI) -> None:
    async with stack(certs, **tls_overrides(pki)) as s:
        port = s.server.public_tls_port
        ctx = pki.client_context()
        assert await asyncio.to_thread(peer_names, port, "app.test", ctx) == ["app.test"]
        assert await asyncio.to_thread(peer_names, port, "shop.wild.test", ctx) == ["*.wild.test"]
        for refused in ("other.test", "a.b.wild.test", "wild.test"):
            with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"):
                await asyncio.to_thread(peer_names, port, refused, ctx)
        no_sni = ssl.create_default_context(cafile=str(pki.ca_file))
        no_sni.check_hostname = False
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"):
            await asyncio.to_thread(peer_names, port, None, no_sni)


async def test_redirect_http_to_https(certs: Certs, pki: PublicPKI) -> None:
    async with stack(certs, **tls_overrides(pki, redirect_http=True)) as s:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{s.base}/pay?x=1", headers={"Host": "App.Test:80"}, data=b"body", allow_redirects=False
            ) as resp:
                assert resp.status == 308
                assert resp.headers["Location"] == f"https://app.test:{s.server.public_tls_port}/pay?x=1"


async def test_websocket_over_the_public_tls_listener(certs: Certs, pki: PublicPKI) -> None:
    async with upstream(await echo_app()) as up, stack(certs, **tls_overrides(pki)) as s:
        await s.add_client([f"app.test={up.url}"])
        conn = aiohttp.TCPConnector(ssl=pki.client_context())
        async with aiohttp.ClientSession(connector=conn) as session:
            async with session.ws_connect(
                f"wss://127.0.0.1:{s.server.public_tls_port}/ws",
                headers={"Host": "app.test"},
                server_hostname="app.test",
            ) as sock:
                for i in range(5):
                    await sock.send_bytes(b"frame %d" % i)
                    msg = await sock.receive(timeout=5)
                    assert msg.data == b"frame %d" % i


async def test_a_new_certificate_file_is_served_without_a_restart(certs: Certs, pki: PublicPKI) -> None:
    async with stack(certs, **tls_overrides(pki)) as s:
        port = s.server.public_tls_port
        ctx = pki.client_context()
        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(peer_names, port, "late.test", ctx)
        pki.add("late.test")

        async def served() -> bool:
            try:
                return await asyncio.to_thread(peer_names, port, "late.test", ctx) == ["late.test"]
            except ssl.SSLError:
                return False

        await wait_until(served, timeout=10, what="the new certificate is served (directory polled every second)")


@pytest.mark.timeout(180)
async def test_sslyze_scan_of_the_public_tls_listener(certs: Certs, pki: PublicPKI) -> None:
    async with stack(certs, **tls_overrides(pki)) as s:
        scan = await asyncio.to_thread(scan_tls, s.server.public_tls_port)
    assert_strict_tls(scan)


async def test_a_client_with_only_the_public_tls_port(certs: Certs, pki: PublicPKI) -> None:
    """--control-hostname: the tunnel shares the public TLS port (SNI localhost, the control
    certificate), so a site that allows outbound 443 only is enough; public names on the same
    port still get their own certificates."""
    overrides = tls_overrides(pki, control_hostname="localhost")
    async with upstream(await echo_app()) as up, stack(certs, **overrides) as s:
        port = s.server.public_tls_port
        await s.add_client([f"app.test={up.url}"], server=[f"wss://localhost:{port}"])
        # --auth challenge on the shared port too (the 101's Backhaul-Auth comes from the same handshake)
        from tunnel_client.pinning import spki_pin

        from .test_tls import _leaf_der

        pin = spki_pin(_leaf_der(certs.cert))
        await s.add_client([f"app.test={up.url}"], server=[f"wss://localhost:{port}"], auth="challenge", pin=[pin])
        conn = aiohttp.TCPConnector(ssl=pki.client_context())
        async with aiohttp.ClientSession(connector=conn) as session:
            async with session.get(
                f"https://127.0.0.1:{port}/via-443", headers={"Host": "app.test"}, server_hostname="app.test"
            ) as resp:
                assert resp.status == 200
                assert json.loads(await resp.text())["X-Forwarded-Proto"] == "https"
        samples = {
            sample.labels["result"]: sample.value
            for metric in s.server.metrics.tls_handshakes.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        }
        assert samples.get("ok", 0) >= 2  # the tunnel and the caller


@needs_ipv6
async def test_listeners_on_every_address_of_their_name(
    certs: Certs, pki: PublicPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--public-tls-addr, --control-addr, --public-addr and --admin-addr given a name with an
    IPv4 and an IPv6 address listen on both, one port for all (shared/aio/sockopts.py)."""
    name = dual_name(monkeypatch)
    addrs = {flag: f"{name}:0" for flag in ("public_tls_addr", "control_addr", "public_addr", "admin_addr")}
    async with stack(certs, **tls_overrides(pki, **addrs)) as s:
        server = s.server
        for address in ("127.0.0.1", "::1"):
            names = await asyncio.to_thread(
                peer_names, server.public_tls_port, "app.test", pki.client_context(), address
            )
            assert names == ["app.test"]
            for port, request, status in (
                (server.control_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),  # plain HTTP to a TLS port
                (server.public_port, b"GET / HTTP/1.1\r\nHost: nobody.test\r\n\r\n", b"503"),  # no tunnel
                (server.admin_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"200"),
            ):
                reader, writer = await asyncio.open_connection(address, port)
                writer.write(request)
                answer = await asyncio.wait_for(reader.readline(), 10)
                assert answer.startswith(b"HTTP/1.1 " + status + b" "), (address, port, answer)
                writer.close()
        await s.add_client(["app.test=http://127.0.0.1:9"], server=[f"wss://127.0.0.1:{server.control_port}"])


async def test_silent_and_non_tls_callers_do_not_hold_the_port(certs: Certs, pki: PublicPKI) -> None:
    async with stack(certs, **tls_overrides(pki, header_timeout=0.5)) as s:
        port = s.server.public_tls_port
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        plain = socket.create_connection(("127.0.0.1", port))
        plain.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        try:
            # a real caller is served while twenty say nothing
            assert await asyncio.to_thread(peer_names, port, "app.test", pki.client_context()) == ["app.test"]
            plain.settimeout(5)
            answer = b""
            while chunk := plain.recv(4096):  # plain HTTP on the TLS port: a 400 that says so, then FIN
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 400 ") and answer.endswith(b"plain HTTP sent to the HTTPS port\r\n")
            await wait_until(lambda: s.server._front is not None and s.server._front.waiting == 0, timeout=5)
        finally:
            for sock in [*silent, plain]:
                sock.close()


async def test_certificates_in_the_admin_api_and_metrics(certs: Certs, pki: PublicPKI) -> None:
    async with stack(certs, **tls_overrides(pki, admin_token="admin-token-0123456789")) as s:
        await asyncio.to_thread(peer_names, s.server.public_tls_port, "app.test", pki.client_context())
        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(peer_names, s.server.public_tls_port, "nope.test", pki.client_context())
        admin = f"http://127.0.0.1:{s.server.admin_port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{admin}/api/certificates") as resp:
                assert resp.status == 401
            async with session.get(
                f"{admin}/api/certificates", headers={"Authorization": "Bearer admin-token-0123456789"}
            ) as resp:
                listed = (await resp.json())["certificates"]
            async with session.get(f"{admin}/metrics") as resp:
                metrics = await resp.text()
    assert [c["name"] for c in listed] == ["*.wild.test", "app.test", "localhost"]
    assert all(c["source"] == "file" and c["seconds_left"] > 0 and c["issuer"] for c in listed)
    assert 'backhaul_public_cert_expiry_seconds{host="app.test",source="file"}' in metrics
    assert 'backhaul_public_tls_handshakes_total{result="ok"} 1.0' in metrics
    assert 'backhaul_public_tls_handshakes_total{result="unknown_name"} 1.0' in metrics


async def test_access_rules_limits_and_drain_over_tls(certs: Certs, pki: PublicPKI, tmp_path: Path) -> None:
    """What the HTTP listener enforces holds over TLS: --access (401 then 200 with the
    password), --max-body (413), and a shutdown that drains a request in flight on a TLS
    connection before closing it."""
    from exit_server.tokens import hash_secret

    (tmp_path / "access.toml").write_text(
        f'[[site]]\nhosts = ["app.test"]\nrealm = "r"\nbasic = ["alice:{hash_secret("pw-0123456789")}"]\n'
    )

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(float(request.query.get("d", "0")))  # the upstream's own pace
        return web.Response(text="done")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    overrides = tls_overrides(pki, access=tmp_path / "access.toml", max_body=1000)
    async with upstream(app) as up, stack(certs, **overrides) as s:
        await s.add_client([f"app.test={up.url}"])
        port = s.server.public_tls_port
        login = {"Authorization": "Basic " + base64.b64encode(b"alice:pw-0123456789").decode()}
        url = f"https://127.0.0.1:{port}/"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pki.client_context())) as http:
            host = {"Host": "app.test"}
            async with http.get(url, headers=host, server_hostname="app.test") as resp:
                assert resp.status == 401 and "WWW-Authenticate" in resp.headers
            async with http.post(url, data=b"x" * 5000, headers=host | login, server_hostname="app.test") as resp:
                assert resp.status == 413
            in_flight = asyncio.ensure_future(http.get(url + "?d=1", headers=host | login, server_hostname="app.test"))
            await wait_until(lambda: s.server.public.in_flight >= 1, timeout=5, what="the request in flight")
            await s.server.shutdown(drain_timeout=5)
            resp = await in_flight
            assert resp.status == 200 and await resp.text() == "done"
            resp.release()
