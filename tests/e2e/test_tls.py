"""TLS of the control endpoint: an sslyze scan (TLS 1.2/1.3 only, AEAD suites only, no
compression, no Heartbleed/ROBOT/CCS injection), public-key pinning on the client (the token is
never sent to an unpinned server), and mutual TLS."""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from pathlib import Path

import pytest
import trustme

from exit_server import ExitServer
from tunnel_client import ClientConfig, TunnelClient
from tunnel_client.pinning import parse_pin, spki_pin

from .helpers import TOKEN, Certs, client_config, server_config, stack

AEAD_MARKERS = ("_GCM_", "_CHACHA20_POLY1305_", "_CCM")


def scan_tls(port: int) -> object:
    """An sslyze scan of 127.0.0.1:``port`` with SNI ``localhost``."""
    from sslyze import (
        ScanCommand,
        Scanner,
        ServerNetworkLocation,
        ServerScanRequest,
        ServerScanStatusEnum,
    )

    commands = {
        ScanCommand.SSL_2_0_CIPHER_SUITES,
        ScanCommand.SSL_3_0_CIPHER_SUITES,
        ScanCommand.TLS_1_0_CIPHER_SUITES,
        ScanCommand.TLS_1_1_CIPHER_SUITES,
        ScanCommand.TLS_1_2_CIPHER_SUITES,
        ScanCommand.TLS_1_3_CIPHER_SUITES,
        ScanCommand.TLS_COMPRESSION,
        ScanCommand.HEARTBLEED,
        ScanCommand.ROBOT,
        ScanCommand.OPENSSL_CCS_INJECTION,
        ScanCommand.SESSION_RENEGOTIATION,
    }
    location = ServerNetworkLocation(hostname="localhost", port=port, ip_address="127.0.0.1")
    scanner = Scanner()
    scanner.queue_scans([ServerScanRequest(server_location=location, scan_commands=commands)])
    (result,) = list(scanner.get_results())
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    return result.scan_result


def assert_strict_tls(scan: object) -> None:
    """TLS 1.2 and 1.3 only, AEAD suites with forward secrecy only, no compression,
    Heartbleed, CCS injection, ROBOT or client renegotiation."""
    from sslyze import RobotScanResultEnum, ScanCommandAttemptStatusEnum

    def result(name: str) -> object:
        attempt = getattr(scan, name)
        assert attempt.status == ScanCommandAttemptStatusEnum.COMPLETED, (name, attempt.error_trace)
        return attempt.result

    for old in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites"):
        assert not result(old).accepted_cipher_suites, f"{old} must be refused"  # type: ignore[attr-defined]
    tls12 = [c.cipher_suite.name for c in result("tls_1_2_cipher_suites").accepted_cipher_suites]  # type: ignore[attr-defined]
    tls13 = [c.cipher_suite.name for c in result("tls_1_3_cipher_suites").accepted_cipher_suites]  # type: ignore[attr-defined]
    assert tls12 and tls13, "TLS 1.2 and 1.3 are both offered"
    for name in tls12 + tls13:
        assert any(marker in name for marker in AEAD_MARKERS), f"non-AEAD suite accepted: {name}"
    assert all("ECDHE" in name for name in tls12), tls12  # forward secrecy
    assert result("tls_compression").supports_compression is False  # type: ignore[attr-defined]
    assert result("heartbleed").is_vulnerable_to_heartbleed is False  # type: ignore[attr-defined]
    assert result("openssl_ccs_injection").is_vulnerable_to_ccs_injection is False  # type: ignore[attr-defined]
    assert result("robot").robot_result in (  # type: ignore[attr-defined]
        RobotScanResultEnum.NOT_VULNERABLE_RSA_NOT_SUPPORTED,
        RobotScanResultEnum.NOT_VULNERABLE_NO_ORACLE,
    )
    assert result("session_renegotiation").is_vulnerable_to_client_renegotiation_dos is False  # type: ignore[attr-defined]


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_sslyze_scan_of_the_control_listener(certs: Certs) -> None:
    async with stack(certs) as s:
        scan = await asyncio.to_thread(scan_tls, s.server.control_port)
    assert_strict_tls(scan)


def _results(server: ExitServer) -> dict[str, float]:
    return {
        sample.labels["result"]: sample.value
        for metric in server.metrics.control_tls_handshakes.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


@pytest.mark.asyncio
async def test_control_port_drops_silent_and_plain_callers(certs: Certs) -> None:
    """A caller that sends no ClientHello is closed after --handshake-timeout, plain HTTP to
    the control port gets a 400 that says so, and a tunnel still connects by IP address (no
    SNI); each counted in backhaul_control_tls_handshakes_total."""
    timeout = 0.5
    async with stack(certs, handshake_timeout=timeout) as s:
        port = s.server.control_port
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened = loop.time()
        assert await asyncio.wait_for(reader.read(), timeout + 10) == b""
        assert loop.time() - opened >= timeout * 0.9  # not before the deadline (timer granularity)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 400 ") and b"plain HTTP" in answer
        writer.close()
        await s.add_client(["default=http://127.0.0.1:9"], server=[f"wss://127.0.0.1:{port}"])  # by IP: no SNI
        assert _results(s.server) == {"timeout": 1, "not_tls": 1, "ok": 1}


def _leaf_der(cert_pem: Path) -> bytes:
    first = cert_pem.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    return ssl.PEM_cert_to_DER_cert(first)


def test_pin_format() -> None:
    assert len(parse_pin("sha256:" + base64.b64encode(b"x" * 32).decode())) == 32
    for bad in ("md5:AAAA", "sha256:not base64!", "sha256:" + base64.b64encode(b"short").decode(), "AAAA"):
        with pytest.raises(ValueError):
            parse_pin(bad)
    with pytest.raises(ValueError, match="--pin|pin"):
        ClientConfig(server=["wss://x:1"], upstream=["default=http://x"], pin=["sha256:nope"])


@pytest.mark.asyncio
async def test_pinned_server_is_accepted(certs: Certs) -> None:
    pin = spki_pin(_leaf_der(certs.cert))
    other = "sha256:" + base64.b64encode(b"\0" * 32).decode()
    async with stack(certs) as s:
        running = await s.add_client(["default=http://127.0.0.1:9"], pin=[other, pin])  # rotation: any pin matches
        assert running.client.connected


@pytest.mark.asyncio
async def test_token_is_never_sent_to_an_unpinned_server(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A server the CA vouches for (hostname and chain are fine) but with another key than the pinned one.
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    pinned = ca.issue_cert("localhost", "127.0.0.1")
    rogue = ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    rogue.configure_cert(ctx)
    received = bytearray()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            received.extend(await asyncio.wait_for(reader.read(65536), 3))
        except (ssl.SSLError, ConnectionError, TimeoutError):
            pass
        writer.transport.abort()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    pin = spki_pin(ssl.PEM_cert_to_DER_cert(pinned.cert_chain_pems[0].bytes().decode()))
    config = ClientConfig(
        server=[f"wss://localhost:{port}"],
        ca_file=tmp_path / "ca.pem",
        upstream=["default=http://127.0.0.1:9"],
        backoff_base=0.2,
        backoff_cap=0.5,
        admin_addr="",
        pin=[pin],
    )
    caplog.set_level(logging.INFO)
    client = TunnelClient(config, token=TOKEN)
    task = asyncio.create_task(client.run())
    try:
        await asyncio.sleep(1.5)
        assert not client.connected
    finally:
        await client.shutdown(0)
        await task
        server.close()
        await server.wait_closed()
    refusals = [r for r in caplog.records if "matches no --pin" in r.getMessage()]
    assert len(refusals) >= 2  # TLS verification passed each time: only the pin refused the server
    assert bytes(received) == b""  # not one HTTP byte, so never the token


@pytest.mark.asyncio
async def test_mutual_tls(certs: Certs, tmp_path: Path) -> None:
    client_ca = trustme.CA()
    client_ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
    good = client_ca.issue_cert("tunnel-client.example")
    good.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    stranger = trustme.CA().issue_cert("tunnel-client.example")
    stranger.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "stranger.pem"))

    from exit_server.control import SharedTokenAuth

    server = ExitServer(server_config(certs, client_ca=tmp_path / "client-ca.pem"), auth=SharedTokenAuth(TOKEN))
    await server.start()
    try:
        for cert in (None, tmp_path / "stranger.pem"):
            client = TunnelClient(
                client_config(certs, server, ["default=http://127.0.0.1:9"], client_cert=cert), token=TOKEN
            )
            task = asyncio.create_task(client.run())
            await asyncio.sleep(0.8)
            assert not client.connected and not server.registry.tunnels
            await client.shutdown(0)
            await task
        client = TunnelClient(
            client_config(certs, server, ["default=http://127.0.0.1:9"], client_cert=tmp_path / "client.pem"),
            token=TOKEN,
        )
        task = asyncio.create_task(client.run())
        await client.wait_connected(5)
        await client.shutdown(1)
        await task
    finally:
        await server.close()


def test_old_protocols_refused_by_python_client_too(certs: Certs) -> None:
    from shared.aio.tls import AEAD_CIPHERS, server_context

    ctx = server_context(certs.cert, certs.key)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert all(any(m in c["name"] for m in ("GCM", "CHACHA20")) for c in ctx.get_ciphers()), ctx.get_ciphers()
    assert "AESGCM" in AEAD_CIPHERS
