"""Floods of wrong credentials from one address (issue 15 item 5): attempts are counted when
they start, so a concurrent flood is evaluated at most ``burst`` times, and clients from other
addresses do not queue behind it."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import ssl
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from ..waiting import wait_until
from .helpers import Certs, stack, upstream
from .sec_helpers import echo_app, token_stack, write_tokens
from .test_access import PASSWORD, write_access

FLOOD = 60
BURST = 10  # FailureLimiter's default: 10 failures free, then 1 per second


@pytest.mark.asyncio
async def test_token_flood_is_evaluated_at_most_burst_times_and_others_pass(certs: Certs, tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.toml", {"acme": ["acme.example"]})
    wrong = tokens["acme"][:16] + "x" * (len(tokens["acme"]) - 16)  # a real token id: scrypt runs
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    quiet = logging.getLogger("test.rawclient")
    async with token_stack(certs, tmp_path / "tokens.toml") as s:
        url = f"wss://localhost:{s.server.control_port}"

        async def attempt(token: str, source: str) -> int:
            try:
                ws = await connect(
                    url,
                    ssl=ctx,
                    additional_headers={"Authorization": f"Bearer {token}"},
                    local_addr=(source, 0),
                    logger=quiet,
                    open_timeout=30,
                )
            except InvalidStatus as exc:
                return exc.response.status_code
            await ws.close()
            return 101

        loop = asyncio.get_running_loop()
        started = loop.time()
        flood = [asyncio.create_task(attempt(wrong, "127.0.0.3")) for _ in range(FLOOD)]
        await asyncio.sleep(0)  # the flood's connections are on their way
        good_started = loop.time()
        assert await attempt(tokens["acme"], "127.0.0.2") == 101
        good_took = loop.time() - good_started
        statuses = await asyncio.gather(*flood)
        elapsed = loop.time() - started
    evaluated = statuses.count(401)
    assert statuses.count(401) + statuses.count(429) == FLOOD
    assert evaluated <= BURST + math.ceil(elapsed), (evaluated, elapsed)  # 3d9815c: all 60
    assert good_took < 1.0, good_took  # 3d9815c: seconds, queued behind the flood's scrypt


@pytest.mark.asyncio
async def test_password_flood_is_evaluated_at_most_burst_times_and_others_pass(certs: Certs, tmp_path: Path) -> None:
    write_access(tmp_path / "access.toml")
    async with upstream(echo_app()) as up, stack(certs, access=tmp_path / "access.toml") as s:
        await s.add_client([f"secure.example={up.url}"])

        async def get(password: str, source: str) -> int:
            auth = "Basic " + base64.b64encode(f"alice:{password}".encode()).decode()
            connector = aiohttp.TCPConnector(local_addr=(source, 0))
            async with (
                aiohttp.ClientSession(connector=connector) as http,
                http.get(s.base + "/p", headers={"Host": "secure.example", "Authorization": auth}) as r,
            ):
                return r.status

        loop = asyncio.get_running_loop()
        started = loop.time()
        flood = [asyncio.create_task(get("wrong password", "127.0.0.3")) for _ in range(FLOOD)]
        await asyncio.sleep(0)
        good_started = loop.time()
        assert await get(PASSWORD, "127.0.0.2") == 200
        good_took = loop.time() - good_started
        statuses = await asyncio.gather(*flood)
        elapsed = loop.time() - started
    evaluated = statuses.count(401)
    assert evaluated + statuses.count(429) == FLOOD
    assert evaluated <= BURST + math.ceil(elapsed), (evaluated, elapsed)
    assert good_took < 1.0, good_took


@pytest.mark.asyncio
async def test_slow_drip_body_gets_408_at_the_minimum_rate(certs: Certs) -> None:
    """One byte every 0.2 s never trips the idle timeout (1 s), but falls below the minimum
    body rate (100 B/s after the first second): 408 within seconds, not the upstream timeout
    (3d9815c kept the stream for as long as the drip went on)."""
    async with upstream(echo_app()) as up, stack(certs, body_timeout=1.0, body_min_rate=100.0) as s:
        await s.add_client([f"default={up.url}"])
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port)
        try:
            writer.write(b"POST /drip HTTP/1.1\r\nHost: a.example\r\nContent-Length: 1000\r\n\r\n")
            loop = asyncio.get_running_loop()
            started = loop.time()
            head = b""
            for _ in range(100):  # bounded: 20 s of drip at most
                writer.write(b"x")
                await writer.drain()
                try:
                    async with asyncio.timeout(0.2):  # the drip's pace, and a look for the answer
                        head = await reader.readuntil(b"\r\n\r\n")
                    break
                except TimeoutError:
                    continue
            took = loop.time() - started
            assert head.startswith(b"HTTP/1.1 408"), head
            assert took < 1.0 + 0.5 + 2.0, took  # grace + the bytes' allowance + scheduling
        finally:
            writer.transport.abort()


@pytest.mark.asyncio
async def test_per_caller_stream_cap_is_429_and_spares_other_callers(certs: Certs) -> None:
    async with (
        upstream(echo_app()) as up,
        stack(certs, max_streams_per_caller=2, body_timeout=30.0, body_min_rate=0.0) as s,
    ):
        await s.add_client([f"default={up.url}"])
        holders = []
        try:
            for _ in range(2):  # two uploads that never finish hold the caller's two streams
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", s.server.public_port, local_addr=("127.0.0.3", 0)
                )
                writer.write(b"POST /hold HTTP/1.1\r\nHost: a.example\r\nContent-Length: 100\r\n\r\nx")
                await writer.drain()
                holders.append(writer)
            await wait_until(lambda: s.server.public.in_flight == 2, 10, what="two uploads in flight")

            async def get(source: str) -> tuple[int, str | None]:
                connector = aiohttp.TCPConnector(local_addr=(source, 0))
                async with (
                    aiohttp.ClientSession(connector=connector) as http,
                    http.get(s.base + "/x", headers={"Host": "a.example"}) as r,
                ):
                    return r.status, r.headers.get("Retry-After")

            assert await get("127.0.0.3") == (429, "1")
            assert (await get("127.0.0.2"))[0] == 200
        finally:
            for writer in holders:
                writer.transport.abort()
        await wait_until(lambda: s.server.public.in_flight == 0, 10, what="uploads ended")
        assert (await get("127.0.0.3"))[0] == 200  # the count went back down
        assert not s.server.public._per_caller


@pytest.mark.asyncio
async def test_route_series_are_capped_and_dropped_with_their_routes(certs: Certs) -> None:
    """Issue 15 item 8: a tenant's names cannot grow /metrics and the dashboard without end."""
    from prometheus_client import generate_latest

    async with upstream(echo_app()) as up, stack(certs, max_routes_per_client=12) as s:
        s.server.metrics.max_series = 5
        client = await s.add_client([f"n{i}.x.test={up.url}" for i in range(20)])
        tunnel = next(iter(s.server.registry.tunnels.values()))
        assert len(tunnel.routes) == 12  # the rest refused: --max-routes-per-client
        async with aiohttp.ClientSession() as http:
            statuses = []
            for i in range(20):
                async with http.get(s.base + "/", headers={"Host": f"n{i}.x.test"}) as r:
                    statuses.append(r.status)
        assert statuses == [200] * 12 + [503] * 8

        def hosts() -> set[str]:
            text = generate_latest(s.server.metrics.registry).decode()
            lines = [line for line in text.splitlines() if line.startswith("backhaul_http_requests_total{")]
            return {line.split('host="')[1].split('"')[0] for line in lines}

        assert len(hosts()) <= 5 + 1 and "other" in hosts()
        assert len(s.server.metrics.host_stats()) <= 5 + 1
        await client.stop()
        await wait_until(lambda: not s.server.registry.tunnels, 10, what="session gone")
        s.server.metrics.series_ttl = 0.0  # no session serves those routes: their series go
        assert hosts() <= {"other", "unrouted"}
        assert set(s.server.metrics.host_stats()) <= {"other", "unrouted"}


def test_access_log_escapes_control_characters() -> None:
    """Issue 15 item 7, through a real exit-server process and its text log: a percent-encoded
    CR LF, ESC and NUL in the path cannot forge a line or reach the terminal raw."""
    import signal
    import socket
    import subprocess

    from .test_cli import Proc, free_port, wait_port

    public, control = free_port(), free_port()
    server = Proc(
        [
            "exit-server",
            "run",
            "--public-addr",
            f"127.0.0.1:{public}",
            "--control-addr",
            f"127.0.0.1:{control}",
            "--insecure-plaintext",
        ],
        {"BACKHAUL_TOKEN": "log-injection-token"},
    )
    try:
        wait_port(public)
        forged = b"GET /a%0d%0a2026-01-01T00:00:00Z%20INFO%20forged%1b[31m%00 HTTP/1.1\r\nHost: x.example\r\n\r\n"
        with socket.create_connection(("127.0.0.1", public), timeout=5) as sock:
            sock.sendall(forged)
            assert sock.recv(100).startswith(b"HTTP/1.1 503")
    finally:
        server.popen.send_signal(signal.SIGTERM)
        try:
            server.popen.wait(15)
        except subprocess.TimeoutExpired:
            pass
        out = server.stop()
    lines = [line for line in out.splitlines() if "x.example" in line]
    assert len(lines) == 1, out  # one access line: nothing forged
    assert "\x1b" not in out and "\x00" not in out and "\r" not in out
    assert "\\x0d\\x0a" in lines[0] and "\\x1b" in lines[0] and "\\x00" in lines[0]
