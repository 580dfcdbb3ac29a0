"""Public HTTP/2 through the tunnel: curl --http2 (ALPN on the TLS listener) and
--http2-prior-knowledge (h2c, off by default), HTTP/1.1 beside it, translation both ways
(HTTP/1.1 caller to an h2c upstream, HTTP/2 caller to an HTTP/1.1 upstream), trailers both
ways, resets both ways, a version 1 tunnel client, and the access log and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
import trustme
from aiohttp import web

import tunnel_client.client
from tests.waiting import wait_until

from .h2client import H2Caller, get
from .h2server import h2c_upstream
from .helpers import Certs, Stack, stack, upstream

pytestmark = pytest.mark.asyncio


async def echo_app() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "headers": list(request.headers.items()),
                "body": body.decode("latin-1"),
                "version": f"{request.version.major}.{request.version.minor}",
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "20", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode("latin-1"), err.decode("latin-1")


@pytest.fixture
def public_pki(tmp_path: Path) -> tuple[Path, Path]:
    ca = trustme.CA()
    ca_file = tmp_path / "public-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_dir = tmp_path / "public"
    cert_dir.mkdir()
    cert = ca.issue_cert("app.test")
    (cert_dir / "app.test.pem").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    (cert_dir / "app.test-key.pem").write_bytes(cert.private_key_pem.bytes())
    return ca_file, cert_dir


async def test_curl_http2_prior_knowledge_and_http1_on_the_plain_listener(certs: Certs) -> None:
    async with upstream(await echo_app()) as up, stack(certs, h2c=True) as s:
        await s.add_client([f"app.test={up.url}"])
        code, out, err = await curl(
            "-i", "--http2-prior-knowledge", "-H", "Host: app.test", "-H", "X-Forwarded-For: 6.6.6.6",
            "-d", "hello", f"{s.base}/h2?q=1",
        )  # fmt: skip
        assert code == 0, err
        head, _, body = out.partition("\r\n\r\n")
        assert head.startswith("HTTP/2 200")
        seen = json.loads(body)
        fields = dict(seen["headers"])
        assert seen["body"] == "hello"
        assert fields["Host"] == "app.test"  # the edge's, from :authority
        assert fields["X-Real-IP"] == "127.0.0.1"  # the caller's own XFF is not believed
        assert fields["X-Forwarded-For"] == "6.6.6.6, 127.0.0.1"  # only extended
        assert fields["X-Forwarded-Proto"] == "http"
        # HTTP/1.1 keeps working beside it
        code, out, err = await curl("-i", "--http1.1", "-H", "Host: app.test", f"{s.base}/h1")
        assert code == 0, err
        assert out.startswith("HTTP/1.1 200")


async def test_h2c_is_off_by_default(certs: Certs) -> None:
    async with upstream(await echo_app()) as up, stack(certs) as s:
        await s.add_client([f"app.test={up.url}"])
        code, out, _ = await curl("-i", "--http2-prior-knowledge", "-H", "Host: app.test", f"{s.base}/")
        assert code != 0 or not out.startswith("HTTP/2")


async def test_curl_http2_by_alpn_on_the_tls_listener(certs: Certs, public_pki: tuple[Path, Path]) -> None:
    ca_file, cert_dir = public_pki
    async with (
        upstream(await echo_app()) as up,
        stack(certs, public_tls_addr="127.0.0.1:0", public_cert_dir=cert_dir, hsts=600) as s,
    ):
        await s.add_client([f"app.test={up.url}"])
        port = s.server.public_tls_port
        url = f"https://app.test:{port}/tls"
        resolve = f"app.test:{port}:127.0.0.1"
        code, out, err = await curl("-i", "--http2", "--cacert", str(ca_file), "--resolve", resolve, url)
        assert code == 0, err
        head, _, body = out.partition("\r\n\r\n")
        assert head.startswith("HTTP/2 200"), head
        assert "strict-transport-security: max-age=600" in head
        fields = dict(json.loads(body)["headers"])
        assert fields["X-Forwarded-Proto"] == "https"
        # an HTTP/1.1-only caller gets HTTP/1.1 on the same port
        code, out, err = await curl("-i", "--http1.1", "--cacert", str(ca_file), "--resolve", resolve, url)
        assert code == 0, err
        assert out.startswith("HTTP/1.1 200")


async def test_no_http2_offers_only_http1(certs: Certs, public_pki: tuple[Path, Path]) -> None:
    ca_file, cert_dir = public_pki
    async with (
        upstream(await echo_app()) as up,
        stack(certs, public_tls_addr="127.0.0.1:0", public_cert_dir=cert_dir, no_http2=True) as s,
    ):
        await s.add_client([f"app.test={up.url}"])
        port = s.server.public_tls_port
        code, out, err = await curl(
            "-i", "--http2", "--cacert", str(ca_file), "--resolve", f"app.test:{port}:127.0.0.1",
            f"https://app.test:{port}/",
        )  # fmt: skip
        assert code == 0, err
        assert out.startswith("HTTP/1.1 200")


@pytest_asyncio.fixture
async def h2stack(certs: Certs) -> AsyncIterator[tuple[Stack, Any]]:
    async with h2c_upstream() as (url, seen), upstream(await echo_app()) as h1, stack(certs, h2c=True) as s:
        await s.add_client([f"h2.test={url}", f"h1.test={h1.url}"])
        yield s, seen


async def test_http1_caller_to_an_h2c_upstream(h2stack: tuple[Stack, Any]) -> None:
    s, seen = h2stack
    async with aiohttp.ClientSession() as session:
        for i in range(3):
            async with session.post(
                f"{s.base}/echo/{i}?x=1", data=b"body" * 1000, headers={"Host": "h2.test", "Cookie": "a=1; b=2"}
            ) as resp:
                assert resp.status == 200
                account = await resp.json()
        assert resp.version == aiohttp.HttpVersion11
    assert account["method"] == "POST" and account["path"] == "/echo/2?x=1"
    assert account["authority"] == "h2.test" and account["scheme"] == "http"
    assert account["body_len"] == 4000
    names = [n for n, _ in account["fields"]]
    assert "host" not in names and "connection" not in names and "transfer-encoding" not in names
    assert ("x-forwarded-for", "127.0.0.1") in [tuple(f) for f in account["fields"]]
    assert seen.connections == 1  # one multiplexed connection, not one per request


async def test_http2_caller_to_an_http1_upstream_joins_cookies(h2stack: tuple[Stack, Any]) -> None:
    s, _ = h2stack
    caller = await H2Caller.open(s.server.public_port)
    try:
        answer = await caller.request(
            "h1.test", "/c", "POST", [("cookie", "a=1"), ("cookie", "b=2")], body=b"x" * 70_000
        )
    finally:
        await caller.close()
    assert answer.status == 200
    seen = json.loads(answer.body)
    fields = [(n.lower(), v) for n, v in seen["headers"]]
    assert [v for n, v in fields if n == "cookie"] == ["a=1; b=2"]
    assert len(seen["body"]) == 70_000
    assert seen["version"] == "1.1"


async def test_trailers_both_ways(h2stack: tuple[Stack, Any]) -> None:
    s, seen = h2stack
    caller = await H2Caller.open(s.server.public_port)
    try:
        answer = await caller.request(
            "h2.test",
            "/echo",
            "POST",
            [("te", "trailers"), ("content-type", "application/octet-stream")],
            body=b"payload",
            trailers=[("x-checksum", "abc123")],
        )
    finally:
        await caller.close()
    assert answer.status == 200
    account = json.loads(answer.body)
    assert account["trailers"] == [["x-checksum", "abc123"]]
    assert ["te", "trailers"] in account["fields"]
    assert answer.trailers == [("x-upstream", "h2"), ("x-echo-x-checksum", "abc123")]


@pytest.mark.parametrize("early", [False, True])
async def test_upstream_reset_reaches_the_h2_caller_with_its_code(h2stack: tuple[Stack, Any], early: bool) -> None:
    s, _ = h2stack
    caller = await H2Caller.open(s.server.public_port)
    try:
        answer = await caller.request("h2.test", f"/reset{'-early' if early else ''}/13")  # HTTP_1_1_REQUIRED
    finally:
        await caller.close()
    assert answer.reset == 13
    if not early:
        assert answer.status == 200 and answer.body == b"hello"


async def test_upstream_reset_aborts_an_http1_body(h2stack: tuple[Stack, Any]) -> None:
    s, _ = h2stack
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{s.base}/reset/2", headers={"Host": "h2.test"}) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()


async def test_caller_reset_cancels_the_upstream_stream(h2stack: tuple[Stack, Any]) -> None:
    s, seen = h2stack
    caller = await H2Caller.open(s.server.public_port, window=0)  # the response can never finish
    try:
        sid = caller.start(get("h2.test", "/big/1000000"))
        await wait_until(lambda: any(r["path"] == "/big/1000000" for r in seen.requests), what="upstream got it")
        caller.h2.reset_stream(sid, 8)  # CANCEL
        caller.flush()
        await wait_until(lambda: seen.resets, timeout=5, what="upstream saw RST_STREAM")
        assert seen.resets[0][1] == 8
    finally:
        await caller.close()


async def test_version_1_client_gets_502_for_trailers(certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tunnel_client.client, "SUPPORTED_VERSIONS", (1,))
    async with h2c_upstream() as (url, _), upstream(await echo_app()) as h1, stack(certs, h2c=True) as s:
        await s.add_client([f"h2.test={url}", f"h1.test={h1.url}"])
        (tunnel,) = s.server.registry.tunnels.values()
        assert tunnel.conn.session.version == 1
        caller = await H2Caller.open(s.server.public_port)
        try:
            refused = await caller.request("h2.test", "/echo", headers=[("te", "trailers")])
            plain = await caller.request("h1.test", "/plain")
        finally:
            await caller.close()
        assert refused.status == 502 and b"cannot carry trailers" in refused.body
        assert plain.status == 200
        # gRPC says so too, as UNAVAILABLE
        with grpc.insecure_channel(
            f"127.0.0.1:{s.server.public_port}", options=[("grpc.default_authority", "h2.test")]
        ) as channel:
            call = channel.unary_unary("/x.Y/Z")
            with pytest.raises(grpc.RpcError) as info:
                await asyncio.to_thread(call, b"", timeout=10)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_grpc_to_an_http1_upstream_is_a_clear_error(certs: Certs) -> None:
    async with upstream(await echo_app()) as h1, stack(certs, h2c=True) as s:
        await s.add_client([f"h1.test={h1.url}"])
        with grpc.insecure_channel(
            f"127.0.0.1:{s.server.public_port}", options=[("grpc.default_authority", "h1.test")]
        ) as channel:
            call = channel.unary_unary("/x.Y/Z")
            with pytest.raises(grpc.RpcError) as info:
                await asyncio.to_thread(call, b"", timeout=10)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "is HTTP/1.1; gRPC needs an h2c:// or https:// (h2) upstream" in (info.value.details() or "")


async def test_access_log_and_metrics_name_the_protocol(
    h2stack: tuple[Stack, Any], caplog: pytest.LogCaptureFixture
) -> None:
    s, _ = h2stack
    caplog.set_level(logging.INFO, logger="backhaul.access")
    caller = await H2Caller.open(s.server.public_port)
    try:
        assert (await caller.request("h1.test", "/logged")).status == 200
    finally:
        await caller.close()
    await wait_until(lambda: any("/logged HTTP/2" in r.getMessage() for r in caplog.records), what="access line")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{s.server.admin_port}/metrics") as resp:
            text = await resp.text()
    assert 'backhaul_http_requests_by_protocol_total{protocol="HTTP/2"}' in text


async def test_drain_lets_an_http2_stream_finish_and_sends_goaway(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """h2 (this caller's library) stops reading at a GOAWAY, so the stream's 200 is checked
    in the access log: it was served in full during the drain."""
    caplog.set_level(logging.INFO, logger="backhaul.access")
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="finished")

    app = web.Application()
    app.router.add_get("/slow", slow)
    async with upstream(app) as up, stack(certs, h2c=True) as s:
        await s.add_client([f"app.test={up.url}"])
        caller = await H2Caller.open(s.server.public_port)
        try:
            sid = caller.start(get("app.test", "/slow"))
            await wait_until(lambda: s.server.public.in_flight == 1, what="request in flight")
            shutdown = asyncio.create_task(s.server.shutdown(drain_timeout=10))
            await wait_until(lambda: s.server.public.draining, what="draining")
            pumping = asyncio.create_task(caller.pump())  # the GOAWAY arrives while the stream runs
            await asyncio.wait_for(pumping, 5)
            assert caller.goaway is not None and caller.goaway.error_code == 0
            assert caller.goaway.last_stream_id == sid
            release.set()
            await shutdown
        finally:
            await caller.close()
    assert any('"GET /slow HTTP/2" 200' in r.getMessage() for r in caplog.records)
