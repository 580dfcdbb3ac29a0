"""Issue 21's fleet, as deployed: three exit servers sharing a real ``redis-server`` (--state,
--peer-url) behind a real HAProxy (tests/e2e/haproxy.py), two tunnel clients linked to all
three, every public request through the balancer.

* a token added with ``exit-server token add --state`` works on every server;
* a revoke closes that client's sessions on all three within a second, the other client's stay;
* Redis stopped for 20 s under load: 0 failed requests, changes refused, then resumed and the
  servers converge;
* the partition case: one client's link to one server cut, 0 errors through the balancer, the
  cut server relaying to a peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from exit_server.__main__ import main as exit_server_main
from exit_server.server import ExitServer
from exit_server.state import read_state
from tests.waiting import wait_until
from tunnel_client.client import TunnelClient

from .haproxy import Balancer, haproxy
from .helpers import Certs, RunningClient, client_config, server_config, upstream
from .sec_helpers import echo_app
from .test_fleet_relay import CuttableRelay
from .test_fleet_state import Redis, add_client, free_port, redis_server  # noqa: F401 (the fixture)

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed (scripts/ci-deps.sh)"),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed (scripts/ci-deps.sh)"),
]


@dataclass
class Fleet:
    servers: list[ExitServer]
    balancer: Balancer
    certs: Certs
    redis: Redis
    clients: list[RunningClient] = field(default_factory=list)

    async def client(self, token: str, upstreams: list[str], **overrides: Any) -> RunningClient:
        client = TunnelClient(client_config(self.certs, self.servers, upstreams, **overrides), token=token)
        running = RunningClient(client, asyncio.create_task(client.run()))
        self.clients.append(running)
        return running

    def version(self, n: int) -> bool:
        return all(s.state is not None and s.state.version == n for s in self.servers)


def registered(server: ExitServer, client_id: str) -> bool:
    return any(t.client_id == client_id for t in server.registry.tunnels.values())


def cli(*args: str) -> str:
    """``exit-server ARGS`` in this process; its standard output (a new token)."""
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        assert exit_server_main(list(args)) == 0
    return out.getvalue().strip()


@pytest_asyncio.fixture
async def fleet(certs: Certs, redis_server: Redis, tmp_path: Path) -> AsyncIterator[Fleet]:  # noqa: F811
    add_client(redis_server.url, "seed", ["seed.test"])  # the store exists before the servers
    servers = []
    for _ in range(3):
        port = free_port()
        config = server_config(
            certs,
            public_addr=f"127.0.0.1:{port}",
            state=redis_server.url,
            state_resync=1.0,
            peer_url=f"http://127.0.0.1:{port}",
            heartbeat_interval=0.5,
            heartbeat_timeout=2.0,
        )
        servers.append(ExitServer(config))
    f: Fleet | None = None
    try:  # a server that fails to start closes itself; the finally closes the ones before it
        for server in servers:
            await server.start()
        async with haproxy(tmp_path, [(s.public_port, s.admin_port) for s in servers]) as balancer:
            f = Fleet(servers, balancer, certs, redis_server)
            yield f
            for running in f.clients:
                with contextlib.suppress(Exception):
                    await running.stop()
    finally:
        for server in servers:
            await server.close()


async def through(fleet: Fleet, http: aiohttp.ClientSession, host: str, path: str = "/") -> int:
    async with http.get(f"http://127.0.0.1:{fleet.balancer.port}{path}", headers={"Host": host}) as resp:
        await resp.read()
        return resp.status


def fresh_connections() -> aiohttp.ClientSession:
    """A new TCP connection per request, so round robin spreads requests over the three."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def test_tokens_added_and_revoked_through_the_store_reach_every_server(fleet: Fleet) -> None:
    url = fleet.redis.url
    token = cli("token", "add", "--state", url, "--client", "acme", "--host", "app.test")
    other = cli("token", "add", "--state", url, "--client", "other", "--host", "other.test")
    await wait_until(lambda: fleet.version(3), timeout=1.0, interval=0.01, what="every server has both within 1 s")
    async with upstream(echo_app()) as up:
        await fleet.client(token, [f"app.test={up.url}"])
        await fleet.client(other, [f"other.test={up.url}"])
        await wait_until(
            lambda: all(registered(s, "acme") and registered(s, "other") for s in fleet.servers),
            what="both clients on all three",
        )
        async with fresh_connections() as http:
            for _ in range(30):  # ten rounds of the balancer's three
                assert await through(fleet, http, "app.test") == 200
                assert await through(fleet, http, "other.test") == 200
            started = time.monotonic()
            cli("token", "revoke", "--state", url, "--client", "acme")
            await wait_until(lambda: not any(registered(s, "acme") for s in fleet.servers), timeout=1.0,
                             interval=0.01, what="acme's sessions closed on all three within 1 s")  # fmt: skip
            assert time.monotonic() - started < 1.0
            for _ in range(30):
                assert await through(fleet, http, "app.test") == 503
                assert await through(fleet, http, "other.test") == 200
        assert all(registered(s, "other") for s in fleet.servers)


@pytest.mark.one_loop  # 20 s of load: the loop kinds are covered by the other fleet tests
async def test_redis_stopped_for_20_s_under_load_loses_nothing(fleet: Fleet) -> None:
    url = fleet.redis.url
    token = add_client(url, "acme", ["app.test"])
    other = add_client(url, "other", ["other.test"])
    await wait_until(lambda: fleet.version(3), what="synced")
    async with upstream(echo_app()) as up:
        await fleet.client(token, [f"app.test={up.url}"])
        await fleet.client(other, [f"other.test={up.url}"])
        await wait_until(
            lambda: all(registered(s, "acme") and registered(s, "other") for s in fleet.servers), what="registered"
        )
        results: dict[int, int] = {}
        done = asyncio.Event()

        async def load(host: str) -> None:  # bounded in time (the event) and in count
            async with fresh_connections() as http:
                for _ in range(20_000):
                    if done.is_set():
                        return
                    status = await through(fleet, http, host)
                    results[status] = results.get(status, 0) + 1

        workers = [asyncio.create_task(load(host)) for host in ("app.test", "other.test") for _ in range(2)]
        try:
            fleet.redis.stop()
            await wait_until(lambda: not any(s.state is not None and s.state.up for s in fleet.servers), timeout=10,
                             what="every server noticed")  # fmt: skip
            stopped = time.monotonic()
            with pytest.raises(SystemExit) as refused:
                cli("token", "add", "--state", url, "--client", "late", "--host", "late.test")
            assert refused.value.code == 1
            await asyncio.sleep(max(0.0, 20.0 - (time.monotonic() - stopped)))  # the outage itself: 20 s
            assert all(s.ready for s in fleet.servers)  # Redis is not in the request path
            fleet.redis.start()
            late = cli("token", "add", "--state", url, "--client", "late", "--host", "late.test")
            await wait_until(lambda: all(s.state is not None and s.state.up for s in fleet.servers), timeout=15,
                             what="every server reconnected")  # fmt: skip
            await wait_until(lambda: fleet.version(4), timeout=5, what="converged on the store's version")
        finally:
            done.set()
            await asyncio.gather(*workers)
        assert set(results) == {200} and results[200] >= 500, results  # 0 failed
        entries, version = read_state(url, None)
        assert {"seed", "acme", "other", "late"} <= set(entries) and version == 4
        assert all(registered(s, "acme") and registered(s, "other") for s in fleet.servers)
        await fleet.client(late, [f"late.test={up.url}"])
        await wait_until(lambda: all(registered(s, "late") for s in fleet.servers), what="the new client everywhere")
        async with fresh_connections() as http:
            for _ in range(9):
                assert await through(fleet, http, "late.test") == 200


async def test_the_partition_case_through_the_balancer(fleet: Fleet) -> None:
    """One client's control connection to one server is dropped (that server stays up and in
    the balancer): requests for its hostname see 0 errors, those landing there are relayed."""
    token = add_client(fleet.redis.url, "acme", ["app.test"])
    await wait_until(lambda: fleet.version(2), what="synced")
    cut = fleet.servers[2]
    relay = CuttableRelay(cut.control_port)
    port = await relay.start()
    try:
        async with upstream(echo_app()) as up:
            servers = [f"wss://localhost:{s.control_port}" for s in fleet.servers[:2]] + [f"wss://localhost:{port}"]
            await fleet.client(token, [f"app.test={up.url}"], server=servers)
            await wait_until(lambda: all(registered(s, "acme") for s in fleet.servers), what="linked to all three")
            await wait_until(
                lambda: cut.peers is not None and cut.peers.peer_for("app.test", "/") is not None,
                what="the peers' routes known to the server about to be cut",
            )
            relay.cut()
            await wait_until(lambda: not registered(cut, "acme"), timeout=5, what="the cut server lost its session")
            assert await fleet.balancer.up() == 3  # still in the balancer
            async with fresh_connections() as http:
                statuses = [await through(fleet, http, "app.test", f"/{i}") for i in range(300)]
            assert statuses.count(200) == 300
            assert cut.peers is not None and cut.peers.relayed.get("ok", 0) >= 90  # a third of them
    finally:
        await relay.close()
