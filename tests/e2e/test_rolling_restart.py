"""Rolling restart of three exit servers behind HAProxy (TCP mode, health checks on /readyz)
under load: every server is restarted in turn and the public error count stays at zero."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from ..waiting import wait_until
from .haproxy import CONFIG
from .helpers import TOKEN, Certs, upstream
from .test_cli import free_port, wait_port

pytestmark = pytest.mark.asyncio
BIN = Path(sys.executable).parent

HAPROXY_CFG = CONFIG  # tests/e2e/haproxy.py: TCP, round robin, /readyz checks


class ExitProcess:
    def __init__(self, certs: Certs, public: int, control: int, admin: int) -> None:
        self.args = [
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
            "--shutdown-delay",
            "1.0",
            "--drain-timeout",
            "10",
            "--min-ready-tunnels",
            "1",
        ]  # back in the balancer once the client is
        self.public, self.control, self.admin = public, control, admin
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
        env["BACKHAUL_TOKEN"] = TOKEN
        self.proc = subprocess.Popen(self.args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(30)


async def _tunnels_connected(admin: int) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{admin}/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("backhaul_tunnels_connected{")
    )


async def _haproxy_all_up(sock: Path) -> bool:
    """Whether HAProxy's stats socket reports all three backend servers UP."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(b"show stat\n")
    await writer.drain()
    text = (await reader.read()).decode()
    writer.close()
    rows = [line.split(",") for line in text.splitlines() if line.startswith("exits,es")]
    return sum(1 for row in rows if row[17] == "UP") == 3


async def test_rolling_restart_behind_haproxy_has_no_errors(certs: Certs) -> None:
    haproxy = shutil.which("haproxy")
    assert haproxy is not None, "haproxy is missing: `make test` installs it (scripts/ci-deps.sh)"

    async def h(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{t:.*}", h)
    servers = [ExitProcess(certs, free_port(), free_port(), free_port()) for _ in range(3)]
    front = free_port()
    lines = "\n".join(
        f"    server es{i} 127.0.0.1:{s.public} check port {s.admin} inter 200 fall 1 rise 2"
        for i, s in enumerate(servers)
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "haproxy.cfg"
        sock = Path(tmp) / "haproxy.sock"
        cfg.write_text(HAPROXY_CFG.format(front=front, servers=lines, sock=sock, extra=""))
        async with upstream(app) as up:
            for s in servers:
                s.start()
            proxy = subprocess.Popen(
                [haproxy, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
            env["BACKHAUL_TOKEN"] = TOKEN
            client_args = [
                str(BIN / "tunnel-client"),
                "run",
                "--ca-file",
                str(certs.ca),
                "--admin-addr",
                "127.0.0.1:0",
                "--upstream",
                f"default={up.url}",
                "--backoff-base",
                "0.3",
                "--backoff-cap",
                "1",
            ]
            for s in servers:
                client_args += ["--server", f"wss://localhost:{s.control}"]
            client = subprocess.Popen(client_args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                for s in servers:
                    await asyncio.to_thread(wait_port, s.public)
                    await asyncio.to_thread(wait_port, s.admin)  # bound after the public port
                await asyncio.to_thread(wait_port, front)
                for s in servers:
                    async with asyncio.timeout(15):
                        while await _tunnels_connected(s.admin) < 1:
                            await asyncio.sleep(0.1)
                await wait_until(lambda: _haproxy_all_up(sock), 15, 0.1, "haproxy: every server up")
                errors: list[str] = []
                counts = {"ok": 0, "repeated": 0}
                stop = asyncio.Event()
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=20)) as http:

                    async def worker() -> None:
                        while not stop.is_set():
                            for attempt in (1, 2):
                                try:
                                    async with http.get(f"http://127.0.0.1:{front}/x") as r:
                                        body = await r.text()
                                        if r.status != 200 or body != "ok":
                                            errors.append(f"{r.status} {body[:40]}")
                                        counts["ok"] += 1
                                    break
                                except aiohttp.ServerDisconnectedError:
                                    # A reused keep-alive connection closed under a new request,
                                    # before any response byte: clients repeat such a GET
                                    # (RFC 9112 section 9.3.1). Counted; a second failure is an error.
                                    if attempt == 2:
                                        errors.append("disconnected twice")
                                    counts["repeated"] += 1
                                except aiohttp.ClientError as exc:
                                    errors.append(repr(exc))
                                    break

                    workers = [asyncio.create_task(worker()) for _ in range(10)]
                    for s in servers:
                        at_start = counts["ok"]
                        await wait_until(lambda n=at_start: counts["ok"] >= n + 30, 15, what="load before the restart")
                        assert await asyncio.to_thread(s.stop) == 0
                        s.start()
                        await asyncio.to_thread(wait_port, s.admin)
                        async with asyncio.timeout(15):
                            while await _tunnels_connected(s.admin) < 1:
                                await asyncio.sleep(0.1)
                        await wait_until(lambda: _haproxy_all_up(sock), 15, 0.1, "haproxy marks it up again")
                    at_end = counts["ok"]
                    await wait_until(lambda: counts["ok"] >= at_end + 30, 15, what="load after the last restart")
                    stop.set()
                    await asyncio.wait_for(asyncio.gather(*workers), 20)
                print(
                    f"rolling restart: {counts['ok']} requests, {len(errors)} errors, "
                    f"{counts['repeated']} keep-alive repeats"
                )
                assert errors == []
                assert counts["ok"] > 300
            finally:
                client.kill()
                proxy.kill()
                for s in servers:
                    if s.proc is not None and s.proc.poll() is None:
                        s.proc.kill()
                    if s.proc is not None:
                        s.proc.wait()
                for p in (client, proxy):
                    p.wait()
