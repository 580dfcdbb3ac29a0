"""--auth challenge through TLS interception (shared/challenge.py): an intercepting relay that
terminates the client's TLS with its own CA and opens its own TLS to the exit server, as a
corporate TLS-inspecting proxy does, recording every plaintext byte. Through it the tunnel
works and the recording holds no token and nothing that replays a registration; a substitute
server is refused before anything derived from the token is sent; old servers and tokens
made before challenge verifiers fail clearly. tests/e2e/test_mitmproxy.py does the same
through mitmproxy itself."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from shared import challenge
from tunnel_client.pinning import spki_pin

from ..waiting import wait_until
from .helpers import TOKEN, Certs, stack, upstream
from .sec_helpers import token_stack, write_tokens
from .test_tls import _leaf_der

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


@dataclass
class Interceptor:
    """A TLS-terminating relay on 127.0.0.1: the client sees ``ca``'s certificate for
    localhost; the relay connects to the exit server with its own TLS."""

    port: int
    ca_file: Path
    client_bytes: bytearray = field(default_factory=bytearray)  # what the client sent, decrypted
    server_bytes: bytearray = field(default_factory=bytearray)


@contextlib.asynccontextmanager
async def interceptor(tmp_path: Path, target_port: int, real_ca: Path) -> AsyncIterator[Interceptor]:
    ca = trustme.CA(organization_name="Corporate Inspection")
    ca_file = tmp_path / "inspection-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    front = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(front)
    back = ssl.create_default_context(cafile=str(real_ca))
    tasks: set[asyncio.Task[None]] = set()
    box: list[Interceptor] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", target_port, ssl=back, server_hostname="localhost"
        )

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError, ssl.SSLError):
                while data := await src.read(65536):
                    record += data
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError, RuntimeError):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, box[0].client_bytes), pipe(up_reader, writer, box[0].server_bytes))

    def spawn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(relay(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(spawn, "127.0.0.1", 0, ssl=front)
    box.append(Interceptor(server.sockets[0].getsockname()[1], ca_file))
    try:
        yield box[0]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def hello_app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="through")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    return app


async def get(base: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(base + "/") as resp:
        return resp.status, await resp.text()


async def test_through_interception_no_reusable_secret_and_no_replay(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pin = spki_pin(_leaf_der(certs.cert))
    async with upstream(hello_app()) as up, stack(certs) as s:
        async with interceptor(tmp_path, s.server.control_port, certs.ca) as mitm:
            client = await s.add_client(
                [f"default={up.url}"],
                server=[f"wss://localhost:{mitm.port}"],
                ca_file=mitm.ca_file,  # the site trusts its proxy's CA, as such sites do
                pin=[pin],
                auth="challenge",
            )
            assert await get(s.base) == (200, "through")
            assert "TLS interception: the certificate seen is" in caplog.text and "Corporate Inspection" in caplog.text
            recorded = bytes(mitm.client_bytes)
            keys = challenge.derive_keys(TOKEN)
            assert b"Backhaul-Auth: challenge-v1" in recorded
            for secret in (TOKEN.encode(), keys.client_key, keys.stored_key, keys.server_key):
                assert secret not in recorded
            assert b"authorization" not in recorded.lower()
            await client.stop()
            s.clients.remove(client)
            # replaying what the client sent (upgrade request and proof) gets a new nonce and a refusal
            failures = s.server.control.auth_failures
            head_end = recorded.index(b"\r\n\r\n") + 4
            ctx = ssl.create_default_context(cafile=str(certs.ca))
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", s.server.control_port, ssl=ctx, server_hostname="localhost"
            )
            writer.write(recorded[:head_end])
            response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert response.startswith(b"HTTP/1.1 101")
            writer.write(recorded[head_end:])  # the recorded proof (and whatever followed)
            await writer.drain()
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(reader.read(), 10)  # closed by the server
            writer.close()
            await wait_until(
                lambda: s.server.control.auth_failures == failures + 1, timeout=10, what="the replay refused"
            )
            assert not s.server.registry.tunnels


async def test_a_substituted_server_gets_nothing_derived_from_the_token(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The interceptor answers the upgrade itself (its own key, signing correctly): the pin
    check fails and the client sends no proof."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf = ca.issue_cert("localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(leaf.private_key_pem.bytes(), None)
    received: list[bytes] = []

    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        import base64
        import hashlib

        lines = head.decode().split("\r\n")
        offered = next(x.partition(":")[2].strip() for x in lines if x.lower().startswith("backhaul-auth:"))
        fields = challenge.parse_header(offered)
        ws_key = next(x.partition(":")[2].strip() for x in lines if x.lower().startswith("sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1((ws_key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        spki = challenge.spki_of(key)  # type: ignore[arg-type]
        snonce = b"s" * 32
        t = challenge.transcript(str(fields["id"]), fields["cnonce"], snonce, spki)  # type: ignore[arg-type]
        answer = challenge.format_header(snonce=snonce, key=spki, sig=challenge.sign(key, t))  # type: ignore[arg-type]
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n" + f"{challenge.HEADER}: {answer}\r\n\r\n".encode()
        )
        await writer.drain()
        with contextlib.suppress(Exception):
            received.append(await asyncio.wait_for(reader.read(65536), 5))
        writer.close()

    server = await asyncio.start_server(fake, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    real_pin = spki_pin(_leaf_der(certs.cert))
    try:
        async with stack(certs) as s:
            await s.add_client(
                ["default=http://127.0.0.1:9"],
                server=[f"wss://localhost:{port}"],
                ca_file=ca_file,
                pin=[real_pin],
                auth="challenge",
                wait=False,
            )
            await wait_until(lambda: "is not a --pin key" in caplog.text, timeout=10, what="the refusal")
            await wait_until(lambda: bool(received), timeout=10, what="the fake server saw the end")
            assert challenge.PROOF_PREFIX not in b"".join(received)  # a close frame at most, no proof
    finally:
        server.close()


async def test_registry_tokens_and_the_old_ones_without_a_verifier(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from exit_server.tokens import load_entries, save_entries

    path = tmp_path / "tokens.toml"
    tokens = write_tokens(path, {"acme": ["app.test"], "legacy": ["old.test"]})
    entries = load_entries(path)
    entries["legacy"].challenge = ""  # made before challenge verifiers existed
    save_entries(path, entries)
    pin = spki_pin(_leaf_der(certs.cert))
    async with upstream(hello_app()) as up, token_stack(certs, path) as s:
        await s.add_client(tokens["acme"], [f"app.test={up.url}"], pin=[pin], auth="challenge")
        async with aiohttp.ClientSession() as http:
            async with http.get(s.base + "/", headers={"Host": "app.test"}) as resp:
                assert resp.status == 200
        legacy = await s.add_client(tokens["legacy"], [f"old.test={up.url}"], pin=[pin], auth="challenge", wait=False)
        await wait_until(lambda: "challenge authentication refused" in caplog.text, timeout=10, what="refused")
        assert "4401" in caplog.text and not legacy.client.connected
        # the same legacy token still works with a bearer token
        await s.add_client(tokens["legacy"], [f"old.test={up.url}"])


async def test_a_server_without_challenge_support_is_named(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    pin = spki_pin(_leaf_der(certs.cert))
    async with stack(certs) as s:
        s.server.control.signer = s.server.control.signer_file = None  # as a server from before challenges
        await s.add_client(["default=http://127.0.0.1:9"], pin=[pin], auth="challenge", wait=False)
        await wait_until(lambda: "HTTP 401" in caplog.text or "401" in caplog.text, timeout=10, what="refused")
        assert "Authorization" not in caplog.text


async def test_challenge_needs_a_pin() -> None:
    from tunnel_client import ClientConfig

    with pytest.raises(ValueError, match="--auth challenge needs --pin"):
        ClientConfig(server=["wss://x:1"], upstream=["default=http://x"], auth="challenge")
