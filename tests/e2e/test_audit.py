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

from ..waiting import wait_until
from .helpers import Certs, stack, upstream

pytestmark = pytest.mark.asyncio

HOST = {"Host": "app.example.com"}


def _records(log_file: Path) -> int:
    """Complete lines written so far (a stream's record lands when the stream has ended)."""
    return log_file.read_bytes().count(b"\n") if log_file.exists() else 0


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
        await wait_until(lambda: _records(log_file), 10, what="the stream's audit record")
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
            await wait_until(lambda: _records(log_file), 10, what="the stream's audit record")
            await running.stop()
    finally:
        echo.close()
    (record,) = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert (record["kind"], record["upstream"], record["status"]) == ("tcp", f"tcp:{base}", 200)
    assert (record["bytes_in"], record["bytes_out"]) == (500, 504)
    assert record["caller"].startswith("127.0.0.1")


def _small_files(limit: int) -> None:  # in the client process before exec
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


async def test_audit_log_that_cannot_be_written_refuses_streams_then_resumes(certs: Certs, tmp_path: Path) -> None:
    """Issue 24 item 9 (fail closed, the default). The client process may not grow files past
    3,000 bytes (RLIMIT_FSIZE: the kernel fails the write, as a full disk does): streams are
    refused (503), /healthz says why, and when the limit is lifted the client writes what it
    held and serves again: every request answered 200 is in an intact chain. 3d9815c logged
    one error, kept serving unaudited and never resumed."""
    import os
    import resource
    from functools import partial

    from .helpers import TOKEN
    from .test_cli import free_port

    log_file = tmp_path / "audit.jsonl"
    admin = free_port()
    async with upstream(app()) as up, stack(certs) as s:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
        env["BACKHAUL_TOKEN"] = TOKEN
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "tunnel-client"),
            "run",
            "--server",
            f"wss://localhost:{s.server.control_port}",
            "--ca-file",
            str(certs.ca),
            "--upstream",
            f"app.example.com={up.url}",
            "--audit-log",
            str(log_file),
            "--admin-addr",
            f"127.0.0.1:{admin}",
            "--log-level",
            "warning",
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=partial(_small_files, 3000),
        )
        try:
            await wait_until(lambda: bool(s.server.registry.tunnels), 20, what="client registered")
            async with aiohttp.ClientSession() as http:

                async def get(path: str) -> int:
                    async with http.get(s.base + path, headers=HOST) as r:
                        await r.read()
                        return r.status

                async def admin_get(path: str) -> tuple[int, str]:
                    async with http.get(f"http://127.0.0.1:{admin}{path}") as r:
                        return r.status, await r.text()

                answered = []
                for i in range(60):  # ~400 bytes a record: the limit is reached within a dozen
                    status = await get(f"/before/{i}")
                    if status == 503:
                        break
                    assert status == 200
                    answered.append(f"/before/{i}")
                else:
                    raise AssertionError("never refused")
                status, text = await admin_get("/healthz")
                assert status == 503 and "audit log" in text
                metrics = (await admin_get("/metrics"))[1]
                assert "backhaul_client_audit_failing 1.0" in metrics
                assert await get("/during") == 503  # still refused: nothing unaudited
                resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

                async def healthy() -> bool:
                    return (await admin_get("/healthz"))[0] == 200

                await wait_until(healthy, 10, what="auditing resumed")  # retried every second
                for i in range(5):
                    assert await get(f"/after/{i}") == 200
                    answered.append(f"/after/{i}")
                metrics = (await admin_get("/metrics"))[1]
                assert "backhaul_client_audit_failing 0.0" in metrics
                assert "backhaul_client_audit_lost_records_total 0.0" in metrics
        finally:
            proc.terminate()
            _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert b"write failed" in err and b"auditing resumed" in err
    verify = subprocess.run(
        [str(Path(sys.executable).parent / "tunnel-client"), "audit", "verify", str(log_file)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["path"] for r in records if r["status"] == 200] == answered  # none served unaudited
    refused = [r for r in records if r["reset"] == "REFUSED"]
    assert refused and all(r["status"] is None for r in refused)  # refusals are recorded too
