"""The tunnel through mitmproxy (PyPI, installed by `make test` into .venv-mitm) intercepting
TLS with its own CA, as a corporate inspecting proxy does (tests/e2e/proxies.py). With
--auth challenge the tunnel works, mitmproxy's recorded flows hold no token and no key derived
from it, and replaying the handshake they recorded to the exit server is refused; with a
bearer token the same recording holds the token (why the mode exists, and proof that the check
can see a secret when there is one); a key that is not the pinned one gets no proof."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from shared import challenge
from tunnel_client.pinning import spki_pin

from ..waiting import wait_until
from .helpers import TOKEN, Certs, Stack, stack, upstream
from .proxies import MITMDUMP, mitmproxy
from .test_tls import _leaf_der

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

#: Run by mitmproxy's own interpreter: the WebSocket flows of a flow file, as JSON.
EXTRACT = """
import json, sys
from mitmproxy import io
from mitmproxy.http import HTTPFlow
out = []
with open(sys.argv[1], "rb") as fh:
    for flow in io.FlowReader(fh).stream():
        if isinstance(flow, HTTPFlow) and flow.websocket is not None:
            out.append({
                "path": flow.request.path,
                "headers": [[k, v] for k, v in flow.request.headers.items(multi=True)],
                "from_client": [m.content.hex() for m in flow.websocket.messages if m.from_client],
            })
print(json.dumps(out))
"""


def recorded_websockets(flows: Path) -> list[dict[str, Any]]:
    python = MITMDUMP.parent / "python"
    out = subprocess.run([str(python), "-c", EXTRACT, str(flows)], capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout))


def masked_binary_frame(payload: bytes) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    head = bytes([0x82, 0x80 | n]) if n < 126 else bytes([0x82, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="inspected")

    application = web.Application()
    application.router.add_get("/{tail:.*}", hello)
    return application


async def replay(s: Stack, certs: Certs, flow: dict[str, Any]) -> bytes:
    """Send a recorded upgrade request and the client's first message to the exit server."""
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", s.server.control_port, ssl=ctx, server_hostname="localhost"
    )
    head = f"GET {flow['path']} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in flow["headers"]) + "\r\n"
    writer.write(head.encode())
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.write(masked_binary_frame(bytes.fromhex(flow["from_client"][0])))
    await writer.drain()
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(reader.read(), 15)  # the server closes
    writer.close()
    return answer


@pytest.mark.parametrize("auth", ["challenge", "bearer"])
async def test_through_mitmproxy(certs: Certs, auth: str, caplog: pytest.LogCaptureFixture) -> None:
    pin = spki_pin(_leaf_der(certs.cert))
    async with upstream(app()) as up, stack(certs) as s:
        with mitmproxy(certs.ca) as mitm:
            options: dict[str, object] = {"pin": [pin], "auth": "challenge"} if auth == "challenge" else {}
            client = await s.add_client([f"default={up.url}"], proxy=mitm.url, ca_file=mitm.ca_file, **options)
            async with aiohttp.ClientSession() as http, http.get(s.base + "/") as resp:
                assert (resp.status, await resp.text()) == (200, "inspected")
            await client.stop()
            s.clients.remove(client)
            mitm.stop()
            flows = mitm.directory / "flows.mitm"
            recorded = flows.read_bytes()
            (flow,) = recorded_websockets(flows)  # mitmproxy did see the tunnel, and recorded it
            keys = challenge.derive_keys(TOKEN)
            if auth == "bearer":
                assert TOKEN.encode() in recorded  # a bearer token is exposed to an inspecting proxy
                return
            assert "TLS interception" in caplog.text and "mitmproxy" in caplog.text
            assert any(k.lower() == challenge.HEADER.lower() for k, _ in flow["headers"])
            for secret in (TOKEN.encode(), keys.client_key, keys.stored_key, keys.server_key):
                assert secret not in recorded
            # what mitmproxy recorded, replayed: a new nonce, the old proof refused
            failures = s.server.control.auth_failures
            answer = await replay(s, certs, flow)
            assert answer.startswith(b"HTTP/1.1 101")
            await wait_until(
                lambda: s.server.control.auth_failures == failures + 1, timeout=10, what="the replay refused"
            )
            assert not s.server.registry.tunnels


async def test_a_key_that_is_not_the_pinned_one_gets_no_proof(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    """Through mitmproxy, with the client pinning a key the exit server does not hold: the
    client refuses after the server's answer, and no proof reaches the server."""
    other_pin = "sha256:" + "B" * 43 + "="
    async with stack(certs) as s:
        with mitmproxy(certs.ca) as mitm:
            failures = s.server.control.auth_failures
            await s.add_client(
                ["default=http://127.0.0.1:9"],
                proxy=mitm.url,
                ca_file=mitm.ca_file,
                pin=[other_pin],
                auth="challenge",
                wait=False,
            )
            await wait_until(lambda: "is not a --pin key" in caplog.text, timeout=20, what="the refusal")
            assert s.server.control.auth_failures == failures  # no proof reached the server
            assert not s.server.registry.tunnels
