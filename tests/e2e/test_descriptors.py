"""Running out of file descriptors, and idle keep-alive connections (issue 24 item 8), on a real
exit-server process started with a low open-file limit."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from shared.runtime.fdlimit import DescriptorAlarm, public_connection_limit

from ..waiting import wait_until
from .helpers import TOKEN, Certs
from .test_cli import free_port, wait_port

BIN = Path(sys.executable).parent
LIMIT = 256


def _low_limit() -> None:  # runs in the child before exec: soft and hard limits both LIMIT
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


@pytest.mark.asyncio
async def test_descriptor_exhaustion_keeps_admin_and_tunnels_and_says_so(certs: Certs, tmp_path: Path) -> None:
    public, control, admin = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    env["BACKHAUL_TOKEN"] = TOKEN
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [
                str(BIN / "exit-server"),
                "run",
                "--public-addr",
                f"127.0.0.1:{public}",
                "--control-addr",
                f"127.0.0.1:{control}",
                "--admin-addr",
                f"127.0.0.1:{admin}",
                "--tls-cert",
                str(certs.cert),
                "--tls-key",
                str(certs.key),
                "--header-timeout",
                "60",
            ],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_low_limit,
        )
    writers: list[asyncio.StreamWriter] = []
    try:
        await asyncio.to_thread(wait_port, public)
        await asyncio.to_thread(wait_port, admin)
        allowed = public_connection_limit(LIMIT)
        busy = 0
        for _ in range(LIMIT + 20):  # more idle callers than the process has descriptors
            reader, writer = await asyncio.open_connection("127.0.0.1", public)
            writers.append(writer)
            if len(writers) > allowed:
                try:
                    async with asyncio.timeout(5):
                        head = await reader.read(100)
                except (TimeoutError, ConnectionError):
                    head = b""
                busy += head.startswith(b"HTTP/1.1 503")
        assert busy >= LIMIT + 20 - allowed - 5  # the callers past the reserve are told at once
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{admin}/healthz") as r:
                assert r.status == 200  # the admin port still answers
            async with http.get(f"http://127.0.0.1:{admin}/metrics") as r:
                text = await r.text()
        line = next(
            x for x in text.splitlines() if x.startswith('backhaul_descriptor_exhaustion_total{reason="reserve"}')
        )
        assert float(line.split()[-1]) >= busy
        # A tunnel client still gets in.
        from tunnel_client import TunnelClient

        from .helpers import client_config

        class _Where:
            control_port = control

        config = client_config(certs, _Where(), ["default=http://127.0.0.1:9"])  # type: ignore[arg-type]
        client = TunnelClient(config, token=TOKEN)
        task = asyncio.create_task(client.run())
        try:
            await client.wait_connected(10)
        finally:
            await client.shutdown(drain_timeout=1)
            await task
    finally:
        for writer in writers:
            writer.transport.abort()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = log_path.read_text()
    assert "new callers get 503" in out
    assert out.count("new callers get 503") <= 3  # throttled: one line per 10 s


@pytest.mark.asyncio
async def test_idle_keepalive_connections_are_closed(certs: Certs) -> None:
    """--keepalive-timeout: 3d9815c kept idle callers for aiohttp's 3,630 s."""
    from .helpers import stack

    async with stack(certs, keepalive_timeout=0.5) as s:
        readers = []
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port)
            writer.write(b"GET / HTTP/1.1\r\nHost: nobody.example\r\n\r\n")
            await writer.drain()
            readers.append((reader, writer))
        for reader, writer in readers:
            async with asyncio.timeout(10):  # 0.5 s idle, plus aiohttp's keep-alive check period
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 503")
                await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
                assert await reader.read() == b""  # closed by the server
            writer.close()


def test_descriptor_alarm_is_throttled(caplog: pytest.LogCaptureFixture) -> None:
    counted: list[int] = []
    alarm = DescriptorAlarm(lambda: counted.append(1), interval=10.0)
    caplog.set_level(logging.ERROR)
    exc = OSError(errno.EMFILE, "Too many open files")
    for now in (0.0, 1.0, 2.0, 11.0):
        alarm.report(now, exc)
    assert len(counted) == 4 and alarm.seen == 4
    lines = [r.getMessage() for r in caplog.records if "out of file descriptors" in r.getMessage()]
    assert len(lines) == 2 and "2 more since the last such line" in lines[1]


@pytest.mark.asyncio
async def test_descriptor_alarm_catches_loop_reports(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    alarm = DescriptorAlarm()
    alarm.install(loop)
    try:
        caplog.set_level(logging.ERROR)
        loop.call_exception_handler(
            {"message": "socket.accept() out of system resource", "exception": OSError(errno.EMFILE, "x")}
        )
        assert alarm.seen == 1
        await wait_until(lambda: any("out of file descriptors" in r.getMessage() for r in caplog.records), 5)
    finally:
        loop.set_exception_handler(previous)
