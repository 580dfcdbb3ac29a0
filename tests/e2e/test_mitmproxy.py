"""The tunnel through mitmproxy (PyPI, installed by `make test` into .venv-mitm) intercepting
TLS with its own CA, as a corporate inspecting proxy does: with --auth challenge the tunnel
works and mitmproxy's recorded flows hold no token and no key derived from it; with a bearer
token the same recording holds the token (which is why the mode exists, and proof that the
check can see a secret when there is one)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from shared import challenge
from tunnel_client.pinning import spki_pin

from ..waiting import wait_until
from .helpers import TOKEN, Certs, stack, upstream
from .test_tls import _leaf_der

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
MITMDUMP = Path(os.environ.get("BACKHAUL_MITMDUMP", ROOT / ".venv-mitm" / "bin" / "mitmdump"))


@dataclass
class Mitm:
    port: int
    ca_file: Path
    flows: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # mitmdump writes out its flows
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def mitmdump(tmp_path: Path, server_ca: Path) -> AsyncIterator[Mitm]:
    if not MITMDUMP.exists():
        raise RuntimeError(f"mitmdump not found at {MITMDUMP}: `make test` installs it into .venv-mitm")
    confdir = tmp_path / "mitm"
    confdir.mkdir()
    flows = tmp_path / "flows.mitm"
    port = _free_port()
    log = (tmp_path / "mitmdump.log").open("wb")
    process = subprocess.Popen(
        [
            str(MITMDUMP),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(port),
            "--set",
            f"confdir={confdir}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={server_ca}",
            "--set",
            "connection_strategy=lazy",
            "-w",
            str(flows),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    mitm = Mitm(port, confdir / "mitmproxy-ca-cert.pem", flows, process)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"mitmdump exited: {(tmp_path / 'mitmdump.log').read_text()[-2000:]}")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0 and mitm.ca_file.exists()

        await wait_until(ready, timeout=30, what="mitmdump listening")
        yield mitm
    finally:
        mitm.stop()
        log.close()


def app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="inspected")

    application = web.Application()
    application.router.add_get("/{tail:.*}", hello)
    return application


@pytest.mark.parametrize("auth", ["challenge", "bearer"])
async def test_through_mitmproxy(certs: Certs, tmp_path: Path, auth: str, caplog: pytest.LogCaptureFixture) -> None:
    pin = spki_pin(_leaf_der(certs.cert))
    async with upstream(app()) as up, stack(certs) as s, mitmdump(tmp_path, certs.ca) as mitm:
        options: dict[str, object] = {"pin": [pin], "auth": "challenge"} if auth == "challenge" else {}
        client = await s.add_client(
            [f"default={up.url}"], proxy=f"http://127.0.0.1:{mitm.port}", ca_file=mitm.ca_file, **options
        )
        async with aiohttp.ClientSession() as http, http.get(s.base + "/") as resp:
            assert (resp.status, await resp.text()) == (200, "inspected")
        await client.stop()
        s.clients.remove(client)
        mitm.stop()
        recorded = mitm.flows.read_bytes()
        assert b"localhost" in recorded  # mitmproxy did record the tunnel's flow
        keys = challenge.derive_keys(TOKEN)
        if auth == "challenge":
            assert "TLS interception" in caplog.text and "mitmproxy" in caplog.text
            assert b"Backhaul-Auth" in recorded
            for secret in (TOKEN.encode(), keys.client_key, keys.stored_key, keys.server_key):
                assert secret not in recorded
        else:
            assert TOKEN.encode() in recorded  # a bearer token is exposed to an inspecting proxy


async def test_mitmproxy_answering_for_the_server_gets_no_proof(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """mitmproxy passing the upgrade on but the exit server's key not the pinned one (the
    client pins another key): the client refuses after the server's answer, before a proof."""
    other_pin = "sha256:" + "B" * 43 + "="
    async with stack(certs) as s, mitmdump(tmp_path, certs.ca) as mitm:
        failures = s.server.control.auth_failures
        await s.add_client(
            ["default=http://127.0.0.1:9"],
            proxy=f"http://127.0.0.1:{mitm.port}",
            ca_file=mitm.ca_file,
            pin=[other_pin],
            auth="challenge",
            wait=False,
        )
        await wait_until(lambda: "is not a --pin key" in caplog.text, timeout=20, what="the refusal")
        assert s.server.control.auth_failures == failures  # no proof reached the server
        assert not s.server.registry.tunnels
