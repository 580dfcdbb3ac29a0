"""ACME for a fleet (exit_server/acmefleet.py): three exit servers sharing a real
``redis-server`` behind a real HAProxy, against a real pebble validating through the balancer
(so the CA's validation reaches any of the three, not necessarily the one that ordered). One
client registers three names on all three servers at once: each name is ordered once, and all
three servers serve that same certificate."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest
from aiohttp import web

from exit_server.server import ExitServer
from tests.ports import free_port
from tests.waiting import wait_until
from tunnel_client.client import TunnelClient

from .haproxy import haproxy
from .helpers import Certs, RunningClient, client_config, server_config, upstream
from .pebble import pebble
from .test_acme import served_serial
from .test_fleet_state import Redis, add_client, redis_server  # noqa: F401 (the fixture)

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed (scripts/ci-deps.sh)"),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed (scripts/ci-deps.sh)"),
]

NAMES = ["app.test", "b.apps.test", "c.apps.test"]


def hello() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {request.host}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    return app


def total(servers: list[ExitServer], result: str) -> float:
    return sum(
        s.metrics.registry.get_sample_value("backhaul_acme_orders_total", {"result": result}) or 0.0 for s in servers
    )


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
async def test_three_servers_order_once_per_name_and_all_serve_it(
    certs: Certs,
    redis_server: Redis,  # noqa: F811
    tmp_path: Path,
    challenge: str,
) -> None:
    token = add_client(redis_server.url, "acme", NAMES)
    # where pebble validates: the balancer
    http_front, tls_front = free_port(), free_port()
    with pebble(tmp_path, http_front, tls_front) as ca:
        servers = [
            ExitServer(
                server_config(
                    certs,
                    public_tls_addr="127.0.0.1:0",
                    acme_dir=tmp_path / f"acme{i}",
                    acme_directory=ca.directory,
                    acme_ca_file=ca.ca_file,
                    acme_challenge=challenge,
                    acme_domain=["app.test", "*.apps.test"],
                    state=redis_server.url,
                )
            )
            for i in range(3)
        ]
        running: RunningClient | None = None
        try:
            for server in servers:
                await server.start()
            backends = [(s.public_port, s.admin_port) for s in servers]
            tls_ports = [s.public_tls_port for s in servers]
            async with (
                haproxy(tmp_path, backends, front=http_front, also={tls_front: tls_ports}),
                upstream(hello()) as up,
            ):
                client = TunnelClient(
                    client_config(certs, servers, [f"{name}={up.url}" for name in NAMES]), token=token
                )
                running = RunningClient(client, asyncio.create_task(client.run()))
                # the three servers want the three names at the same moment

                def all_served() -> bool:
                    for server in servers:
                        assert server.certs is not None
                        for name in NAMES:
                            served = server.certs.lookup(name)
                            if served is None or served.source != "acme":
                                return False
                    return True

                await wait_until(all_served, timeout=90, what="every server serves every name")
                # (a peer may serve a certificate before its orderer has counted it)
                await wait_until(lambda: total(servers, "issued") >= len(NAMES), what="the orders counted")
                assert total(servers, "issued") == len(NAMES)  # one order per hostname
                assert total(servers, "failed") == 0  # validation reached whichever server it reached
                root = tmp_path / "pebble-root.pem"
                root.write_bytes(await asyncio.to_thread(ca.root))
                for name in NAMES:
                    serials = {await asyncio.to_thread(served_serial, s.public_tls_port, name, root) for s in servers}
                    assert len(serials) == 1, f"{name}: {serials}"  # the same certificate on all three
                    curl = await asyncio.to_thread(
                        subprocess.run,
                        ["curl", "-sS", "--cacert", str(root), "--resolve", f"{name}:{tls_front}:127.0.0.1",
                         f"https://{name}:{tls_front}/x"],
                        capture_output=True,
                        text=True,
                        timeout=30,
                    )  # fmt: skip
                    assert curl.returncode == 0 and curl.stdout == f"hello from {name}:{tls_front}", curl.stderr
        finally:
            if running is not None:
                with contextlib.suppress(Exception):
                    await running.stop()
            for server in servers:
                await server.close()


async def test_a_lock_left_by_a_dead_server_expires_and_the_name_is_ordered(
    certs: Certs,
    redis_server: Redis,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that died while ordering leaves its lock behind: the others wait (no second
    order meanwhile), and once the lock expires one of them orders. LOCK_TTL is 3 s here
    instead of 10 minutes; a waiting server looks again every 5 to 10 s."""
    import redis

    from exit_server import acmefleet

    monkeypatch.setattr(acmefleet, "LOCK_TTL", 3.0)
    token = add_client(redis_server.url, "acme", ["app.test"])
    held = redis.Redis.from_url(redis_server.url)
    held.set(acmefleet.LOCK + "app.test", "dead-server:0", px=3000)  # as the dead server left it
    held.close()
    http_port, tls_port = free_port(), free_port()
    with pebble(tmp_path, http_port, tls_port) as ca:
        server = ExitServer(
            server_config(
                certs,
                public_addr=f"127.0.0.1:{http_port}",
                public_tls_addr=f"127.0.0.1:{tls_port}",
                acme_dir=tmp_path / "acme",
                acme_directory=ca.directory,
                acme_ca_file=ca.ca_file,
                acme_domain=["app.test"],
                state=redis_server.url,
            )
        )
        await server.start()
        running: RunningClient | None = None
        try:
            async with upstream(hello()) as up:
                client = TunnelClient(client_config(certs, server, [f"app.test={up.url}"]), token=token)
                running = RunningClient(client, asyncio.create_task(client.run()))
                assert server.acme is not None and server.certs is not None
                acme = server.acme

                def waiting() -> bool:
                    state = acme._states.get("app.test")
                    return state is not None and state.next_try > 0 and "app.test" in acme.pending()

                await wait_until(waiting, what="the name wanted, its lock held by the dead server")
                assert acme.attempts == 0  # waiting for the lock, not ordering
                await wait_until(
                    lambda: (c := server.certs.lookup("app.test")) is not None and c.source == "acme",  # type: ignore[union-attr]
                    timeout=3 + 10 + 30,  # the lock's life, one wait, an order
                    what="ordered once the dead server's lock expired",
                )
                # the server's own fleet channel may serve the stored certificate before the
                # order's end counts it, as in the three-server test
                await wait_until(lambda: total([server], "issued") >= 1, what="the order counted")
                assert total([server], "issued") == 1 and total([server], "failed") == 0
        finally:
            if running is not None:
                with contextlib.suppress(Exception):
                    await running.stop()
            await server.close()
