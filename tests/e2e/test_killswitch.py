"""The local kill switch: a file or SIGUSR1 withdraws the tunnel (503 at the exit server) until
it is lifted; then the client is back within about two seconds."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from ..waiting import wait_until
from .helpers import TOKEN, Certs, stack, upstream

pytestmark = pytest.mark.asyncio

HOST = {"Host": "app.example.com"}


def app() -> web.Application:
    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="up")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(text="late")

    application = web.Application()
    application.router.add_get("/slow", slow)
    application.router.add_get("/{tail:.*}", fast)
    return application


async def status(base: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/x", headers=HOST) as r:
            await r.read()
            return r.status


async def wait_status(base: str, expected: int, timeout: float) -> float:
    """Poll until the public listener answers ``expected``; return how long it took."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with asyncio.timeout(timeout):
        while await status(base) != expected:
            await asyncio.sleep(0.05)
    return loop.time() - t0


async def test_kill_switch_file_withdraws_and_returns(certs: Certs, tmp_path: Path) -> None:
    kill = tmp_path / "kill"
    async with upstream(app()) as up, stack(certs) as s:
        running = await s.add_client([f"app.example.com={up.url}"], kill_switch_file=kill)
        client = running.client
        assert await status(s.base) == 200
        async with aiohttp.ClientSession() as http:
            in_flight = asyncio.create_task(http.get(s.base + "/slow", headers=HOST))
            await wait_until(lambda: s.server.public.in_flight >= 1, 5, what="the slow request in flight")
            kill.touch()
            assert await wait_status(s.base, 503, 3) < 2
            # withdrawn first (503 at once), then the session closes (its close handshake)
            await wait_until(
                lambda: not client.connected and not s.server.registry.tunnels, 3, what="the session closed"
            )
            # In-flight requests are cut, not drained (an emergency stop): 502 or a broken body.
            try:
                async with asyncio.timeout(5):
                    resp = await in_flight
                    assert resp.status == 502
                    resp.release()
            except aiohttp.ClientError:
                pass
        # Stays withdrawn: no reconnect while the file exists. A deliberate wait, not
        # synchronisation: "nothing happens" over several kill-switch polls and backoff delays.
        await asyncio.sleep(1.5)
        assert not client.connected and await status(s.base) == 503
        kill.unlink()
        took = await wait_status(s.base, 200, 5)
        assert took < 2.5, f"back after {took:.1f}s"
        assert client.connected


async def test_client_started_with_the_file_never_connects(certs: Certs, tmp_path: Path) -> None:
    kill = tmp_path / "kill"
    kill.touch()
    async with upstream(app()) as up, stack(certs) as s:
        running = await s.add_client([f"app.example.com={up.url}"], kill_switch_file=kill, wait=False)
        await asyncio.sleep(1.5)  # deliberate: it must not connect during several kill-switch polls
        assert not running.client.connected and not s.server.registry.tunnels
        assert await status(s.base) == 503
        kill.unlink()
        await running.client.wait_connected(3)
        assert await status(s.base) == 200


async def test_toggle_withdraws_and_returns_in_process(certs: Certs) -> None:
    async with upstream(app()) as up, stack(certs) as s:
        running = await s.add_client([f"app.example.com={up.url}"])
        running.client.killswitch.toggle()  # what SIGUSR1 does
        assert await wait_status(s.base, 503, 3) < 2
        running.client.killswitch.toggle()
        await running.client.wait_connected(3)
        assert await status(s.base) == 200


async def test_sigusr1_toggles_a_real_process(certs: Certs, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    async with upstream(app()) as up, stack(certs) as s:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
        env["BACKHAUL_ADMIN_ADDR"] = "127.0.0.1:0"
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "tunnel-client"),
                "run",
                "--server",
                f"wss://localhost:{s.server.control_port}",
                "--ca-file",
                str(certs.ca),
                "--token-file",
                str(token_file),
                "--upstream",
                f"app.example.com={up.url}",
                "--backoff-base",
                "0.2",
                "--backoff-cap",
                "1",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            await wait_status(s.base, 200, 15)
            proc.send_signal(signal.SIGUSR1)
            assert await wait_status(s.base, 503, 3) < 2
            await asyncio.sleep(1)  # deliberate: it stays withdrawn, no reconnect meanwhile
            assert await status(s.base) == 503
            proc.send_signal(signal.SIGUSR1)
            assert await wait_status(s.base, 200, 5) < 2.5
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            out, _ = await asyncio.to_thread(proc.communicate, None, 10)
        assert "kill switch engaged (SIGUSR1)" in out
        assert "kill switch lifted" in out
