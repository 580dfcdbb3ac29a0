"""The audit log through the real tunnel: one chained line per stream, across a restart, checked
by ``tunnel-client audit verify``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from .helpers import Certs, stack, upstream

pytestmark = pytest.mark.asyncio

HOST = {"Host": "app.example.com"}


def app() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=b"r" * 100 + body)

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", echo)
    return application


async def test_every_stream_is_logged_and_the_chain_survives_a_restart(certs: Certs, tmp_path: Path) -> None:
    log_file = tmp_path / "audit.jsonl"
    async with upstream(app()) as up, stack(certs) as s:
        running = await s.add_client(
            [f"app.example.com={up.url}"], audit_log=log_file, allow_path=["app.example.com=/api/*"]
        )
        async with aiohttp.ClientSession() as http:
            async with http.get(s.base + "/api/a?token=secret", headers=HOST) as r:
                assert r.status == 200 and len(await r.read()) == 100
            async with http.post(s.base + "/api/b", data=b"x" * 1000, headers=HOST) as r:
                assert r.status == 200 and len(await r.read()) == 1100
            async with http.get(s.base + "/admin", headers=HOST) as r:
                assert r.status == 403
            async with http.get(s.base + "/api/c", headers={"Host": "other.example.com"}) as r:
                assert r.status == 503  # no tunnel for that host: never reaches the client
        session_id = running.client.links[0].session_id
        await running.stop()
        lines = [json.loads(line) for line in log_file.read_text().splitlines()]
        assert [(r["method"], r["path"], r["status"], r["reset"]) for r in lines] == [
            ("GET", "/api/a", 200, None),
            ("POST", "/api/b", 200, None),
            ("GET", "/admin", None, "FORBIDDEN"),
        ]
        assert all(
            r["session"] == session_id
            and r["kind"] == "http"
            and r["caller"] == "127.0.0.1"
            and r["host"] == "app.example.com"
            for r in lines
        )
        assert [(r["bytes_in"], r["bytes_out"]) for r in lines] == [(0, 100), (1000, 1100), (0, 0)]
        assert lines[0]["upstream"] == "app.example.com" and lines[0]["duration_ms"] > 0
        assert "secret" not in log_file.read_text()  # query strings are never logged
        # A restart continues the chain.
        running = await s.add_client([f"app.example.com={up.url}"], audit_log=log_file)
        async with aiohttp.ClientSession() as http:
            async with http.get(s.base + "/again", headers=HOST) as r:
                assert r.status == 200
        await running.stop()
    out = subprocess.run(
        [str(Path(sys.executable).parent / "tunnel-client"), "audit", "verify", str(log_file)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok 4 lines, head ")
    data = log_file.read_bytes().splitlines(keepends=True)
    log_file.write_bytes(b"".join([data[0], data[2], data[3]]))  # a line removed
    out = subprocess.run(
        [str(Path(sys.executable).parent / "tunnel-client"), "audit", "verify", str(log_file)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and out.stdout.startswith("line 2: ")


async def test_websocket_streams_are_logged(certs: Certs, tmp_path: Path) -> None:
    log_file = tmp_path / "audit.jsonl"

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    application = web.Application()
    application.router.add_get("/ws", ws_handler)
    async with upstream(application) as up, stack(certs) as s:
        running = await s.add_client([f"app.example.com={up.url}"], audit_log=log_file)
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(s.base + "/ws", headers=HOST) as ws:
                await ws.send_str("hello")
                assert (await ws.receive()).data == "hello"
        await asyncio.sleep(0.2)
        await running.stop()
    (record,) = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert (record["kind"], record["method"], record["path"], record["status"]) == ("websocket", "GET", "/ws", 101)
    assert record["bytes_in"] > 0 and record["bytes_out"] > 0


async def test_tcp_streams_are_logged(certs: Certs, tmp_path: Path) -> None:
    from .test_tcp import port_range

    log_file = tmp_path / "audit.jsonl"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(b"got:" + data)
        await writer.drain()
        writer.close()

    echo = await asyncio.start_server(handle, "127.0.0.1", 0)
    base, rng = port_range()
    try:
        async with stack(certs, tcp_port_range=rng) as s:
            running = await s.add_client(
                [], tcp=[f"{base}=127.0.0.1:{echo.sockets[0].getsockname()[1]}"], audit_log=log_file
            )
            reader, writer = await asyncio.open_connection("127.0.0.1", base)
            writer.write(b"x" * 500)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"got:" + b"x" * 500
            writer.close()
            await asyncio.sleep(0.2)
            await running.stop()
    finally:
        echo.close()
    (record,) = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert (record["kind"], record["upstream"], record["status"]) == ("tcp", f"tcp:{base}", 200)
    assert (record["bytes_in"], record["bytes_out"]) == (500, 504)
    assert record["caller"].startswith("127.0.0.1")
