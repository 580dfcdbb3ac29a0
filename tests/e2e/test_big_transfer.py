"""1 GiB up and down through real exit-server and tunnel-client processes, watching their RSS."""

from __future__ import annotations

import hashlib
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from .helpers import TOKEN, Certs
from .test_cli import Proc, free_port, wait_port, wait_status

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.one_loop]  # real processes under test

GIB = 1 << 30
CHUNK = bytes(range(256)) * 4096  # 1 MiB pattern

UPSTREAM = """
import hashlib
from aiohttp import web
CHUNK = bytes(range(256)) * 4096
async def download(r):
    n = int(r.query["n"])
    resp = web.StreamResponse(headers={"Content-Length": str(n)})
    await resp.prepare(r)
    sent = 0
    while sent < n:
        part = CHUNK[: min(len(CHUNK), n - sent)]
        await resp.write(part)
        sent += len(part)
    await resp.write_eof()
    return resp
async def upload(r):
    h = hashlib.sha256(); total = 0
    async for chunk in r.content.iter_any():
        h.update(chunk); total += len(chunk)
    return web.json_response({"total": total, "sha256": h.hexdigest()})
app = web.Application(client_max_size=0)
app.router.add_get("/download", download)
app.router.add_post("/upload", upload)
web.run_app(app, host="127.0.0.1", port=PORT, print=None)
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def tunnel_processes(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[tuple[int, Proc, Proc]]:
    tmp = tmp_path_factory.mktemp("big")
    up_port, public, control = free_port(), free_port(), free_port()
    script = tmp / "up.py"
    script.write_text(UPSTREAM.replace("PORT", str(up_port)))
    up = subprocess.Popen([sys.executable, str(script)])
    server = Proc(
        [
            "exit-server",
            "run",
            "--public-addr",
            f"127.0.0.1:{public}",
            "--control-addr",
            f"127.0.0.1:{control}",
            "--tls-cert",
            str(certs.cert),
            "--tls-key",
            str(certs.key),
        ],
        {"BACKHAUL_TOKEN": TOKEN},
    )
    client = Proc(
        [
            "tunnel-client",
            "run",
            "--server",
            f"wss://localhost:{control}",
            "--ca-file",
            str(certs.ca),
            "--upstream",
            f"default=http://127.0.0.1:{up_port}",
        ],
        {"BACKHAUL_TOKEN": TOKEN},
    )
    try:
        wait_port(up_port)
        wait_port(public)
        wait_status(f"http://127.0.0.1:{public}/download?n=10", "x", 200)
        yield public, server, client
    finally:
        server.stop()
        client.stop()
        up.kill()
        up.wait()


async def _pattern(total: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        part = CHUNK[: min(len(CHUNK), total - sent)]
        sent += len(part)
        yield part


def _expected_sha(total: int) -> str:
    h = hashlib.sha256()
    full, rest = divmod(total, len(CHUNK))
    for _ in range(full):
        h.update(CHUNK)
    h.update(CHUNK[:rest])
    return h.hexdigest()


async def test_one_gib_download_streams_with_bounded_memory(tunnel_processes: tuple[int, Proc, Proc]) -> None:
    public, server, client = tunnel_processes
    before = (rss_kib(server.popen.pid), rss_kib(client.popen.pid))
    peak = list(before)
    h = hashlib.sha256()
    total = 0
    t0 = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"http://127.0.0.1:{public}/download?n={GIB}") as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                h.update(chunk)
                total += len(chunk)
                if total % (64 << 20) < len(chunk):
                    peak = [max(peak[0], rss_kib(server.popen.pid)), max(peak[1], rss_kib(client.popen.pid))]
    elapsed = time.monotonic() - t0
    assert total == GIB
    assert h.hexdigest() == _expected_sha(GIB)
    growth = [(p - b) / 1024 for p, b in zip(peak, before, strict=True)]
    print(
        f"1 GiB download: {GIB / elapsed / 2**20:.0f} MiB/s, RSS growth server {growth[0]:.1f} MiB, "
        f"client {growth[1]:.1f} MiB"
    )
    assert growth[0] < 64 and growth[1] < 64


async def test_one_gib_upload_streams_with_bounded_memory(tunnel_processes: tuple[int, Proc, Proc]) -> None:
    public, server, client = tunnel_processes
    before = (rss_kib(server.popen.pid), rss_kib(client.popen.pid))
    peak = list(before)
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent, peak
        async for part in _pattern(GIB):
            sent += len(part)
            if sent % (64 << 20) < len(part):
                peak = [max(peak[0], rss_kib(server.popen.pid)), max(peak[1], rss_kib(client.popen.pid))]
            yield part

    t0 = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.post(
            f"http://127.0.0.1:{public}/upload", data=body(), headers={"Content-Length": str(GIB)}
        ) as r:
            assert r.status == 200
            result = await r.json()
    elapsed = time.monotonic() - t0
    assert result["total"] == GIB
    assert result["sha256"] == _expected_sha(GIB)
    growth = [(p - b) / 1024 for p, b in zip(peak, before, strict=True)]
    print(
        f"1 GiB upload: {GIB / elapsed / 2**20:.0f} MiB/s, RSS growth server {growth[0]:.1f} MiB, "
        f"client {growth[1]:.1f} MiB"
    )
    assert growth[0] < 64 and growth[1] < 64


@pytest.fixture(scope="module")
def tls_processes(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[tuple[int, Proc, Proc]]:
    """The public HTTPS listener with the tunnel on the same port (--control-hostname): the
    client reaches nothing but the public TLS port."""
    tmp = tmp_path_factory.mktemp("big-tls")
    cert_dir = tmp / "public-certs"
    cert_dir.mkdir()
    (cert_dir / "app.localhost.pem").write_bytes(certs.app_cert.read_bytes())
    (cert_dir / "app.localhost-key.pem").write_bytes(certs.app_key.read_bytes())
    up_port, public, tls = free_port(), free_port(), free_port()
    script = tmp / "up.py"
    script.write_text(UPSTREAM.replace("PORT", str(up_port)))
    up = subprocess.Popen([sys.executable, str(script)])
    server = Proc(
        [
            "exit-server",
            "run",
            "--public-addr",
            f"127.0.0.1:{public}",
            "--control-addr",
            "127.0.0.1:0",
            "--public-tls-addr",
            f"127.0.0.1:{tls}",
            "--public-cert-dir",
            str(cert_dir),
            "--control-hostname",
            "localhost",
            "--tls-cert",
            str(certs.cert),
            "--tls-key",
            str(certs.key),
        ],
        {"BACKHAUL_TOKEN": TOKEN},
    )
    client = Proc(
        [
            "tunnel-client",
            "run",
            "--server",
            f"wss://localhost:{tls}",
            "--ca-file",
            str(certs.ca),
            "--upstream",
            f"default=http://127.0.0.1:{up_port}",
        ],
        {"BACKHAUL_TOKEN": TOKEN},
    )
    try:
        wait_port(up_port)
        wait_port(public)
        wait_status(f"http://127.0.0.1:{public}/download?n=10", "x", 200)
        yield tls, server, client
    finally:
        server.stop()
        client.stop()
        up.kill()
        up.wait()


async def test_one_gib_download_over_the_public_tls_listener(
    tls_processes: tuple[int, Proc, Proc], certs: Certs
) -> None:
    tls, server, client = tls_processes
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    h = hashlib.sha256()
    total = 0
    t0 = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        async with http.get(
            f"https://127.0.0.1:{tls}/download?n={GIB}",
            headers={"Host": "app.localhost"},
            server_hostname="app.localhost",
        ) as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                h.update(chunk)
                total += len(chunk)
    elapsed = time.monotonic() - t0
    assert total == GIB
    assert h.hexdigest() == _expected_sha(GIB)
    print(f"1 GiB download over public TLS (tunnel on the same port): {GIB / elapsed / 2**20:.0f} MiB/s")


@pytest.fixture(scope="module", params=["squid", "squid-ntlm", "dante", "mitmproxy"])
def proxied_processes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, certs: Certs
) -> Iterator[tuple[int, Proc, Proc]]:
    """The tunnel-client process reaching its exit server through a real proxy, named the way
    a site names it: HTTPS_PROXY in the environment (squid with its login in the URL, Basic or
    NTLM; dante's socks5h://; mitmproxy intercepting TLS, with --auth challenge)."""
    from tunnel_client.pinning import spki_pin
    from tunnel_client.proxy import with_credentials

    from .proxies import PROXY_PASSWORD, PROXY_USER, dante, mitmproxy, squid
    from .test_tls import _leaf_der

    tmp = tmp_path_factory.mktemp(f"big-{request.param}")
    up_port, public, control = free_port(), free_port(), free_port()
    script = tmp / "up.py"
    script.write_text(UPSTREAM.replace("PORT", str(up_port)))
    up = subprocess.Popen([sys.executable, str(script)])
    kind = request.param
    if kind.startswith("squid"):
        proxy_cm = squid([control], login=True, ntlm=kind == "squid-ntlm")
    else:
        proxy_cm = dante() if kind == "dante" else mitmproxy(certs.ca)
    proxy = proxy_cm.__enter__()
    url = with_credentials(proxy.url, PROXY_USER, PROXY_PASSWORD) if kind.startswith("squid") else proxy.url
    extra = []
    if kind == "mitmproxy":
        assert proxy.ca_file is not None
        extra = ["--auth", "challenge", "--pin", spki_pin(_leaf_der(certs.cert))]
    server = Proc(
        [
            "exit-server",
            "run",
            "--public-addr",
            f"127.0.0.1:{public}",
            "--control-addr",
            f"127.0.0.1:{control}",
            "--tls-cert",
            str(certs.cert),
            "--tls-key",
            str(certs.key),
        ],
        {"BACKHAUL_TOKEN": TOKEN},
    )
    client = Proc(
        [
            "tunnel-client",
            "run",
            "--server",
            f"wss://localhost:{control}",
            "--ca-file",
            str(proxy.ca_file or certs.ca),
            "--upstream",
            f"default=http://127.0.0.1:{up_port}",
            *extra,
        ],
        {"BACKHAUL_TOKEN": TOKEN, "HTTPS_PROXY": url, "NO_PROXY": "example.com"},
    )
    try:
        wait_port(up_port)
        wait_port(public)
        wait_status(f"http://127.0.0.1:{public}/download?n=10", "x", 200)
        yield public, server, client
    finally:
        server.stop()
        output = client.stop()
        assert f"via {proxy.url.partition('//')[0]}//" in output and "(HTTPS_PROXY)" in output, output[-2000:]
        assert PROXY_PASSWORD not in output
        proxy_cm.__exit__(None, None, None)
        up.kill()
        up.wait()


async def test_one_gib_download_through_a_proxy(proxied_processes: tuple[int, Proc, Proc]) -> None:
    public, server, client = proxied_processes
    h = hashlib.sha256()
    total = 0
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        async with http.get(f"http://127.0.0.1:{public}/download?n={GIB}", headers={"Host": "app.test"}) as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                h.update(chunk)
                total += len(chunk)
    elapsed = time.monotonic() - t0
    assert total == GIB
    assert h.hexdigest() == _expected_sha(GIB)
    print(f"1 GiB download through the proxy: {GIB / elapsed / 2**20:.0f} MiB/s")
