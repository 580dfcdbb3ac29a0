"""High availability: replicas share a host, failover without errors, several servers per
name, upstream health withdrawing routes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

import tunnel_client.client as client_module
from exit_server import ExitServer
from tunnel_client import TunnelClient

from ..waiting import wait_until
from .helpers import TOKEN, Certs, _token_auth, client_config, server_config, stack, upstream

pytestmark = pytest.mark.asyncio
BIN = Path(sys.executable).parent


STATE = web.AppKey("state", dict)


def slow_app() -> web.Application:
    state = {"healthy": True}

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("d", "0.2")))
        return web.Response(text="ok")

    async def post(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(float(request.query.get("d", "3")))
        return web.Response(text="posted")

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200 if state["healthy"] else 503)

    app = web.Application()
    app[STATE] = state
    app.router.add_get("/healthz", health)
    app.router.add_post("/post", post)
    app.router.add_get("/{tail:.*}", slow)
    return app


async def test_two_replicas_share_a_hostname(certs: Certs) -> None:
    async with upstream(slow_app()) as up, stack(certs) as s:
        await s.add_client([f"svc.example.com={up.url}"], instance_id="replica-a")
        await s.add_client([f"svc.example.com={up.url}"], instance_id="replica-b")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as http:

            async def call() -> int:
                async with http.get(s.base + "/?d=0.3", headers={"Host": "svc.example.com"}) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(call() for _ in range(60)))
        assert statuses == [200] * 60
        per_instance = Counter({t.instance_id: t.requests for t in s.server.registry.tunnels.values()})
        assert set(per_instance) == {"replica-a", "replica-b"}
        assert min(per_instance.values()) >= 20, per_instance  # least-streams balancing splits the load


async def test_failover_when_a_replica_is_killed(certs: Certs, tmp_path: Path) -> None:
    async with upstream(slow_app()) as up, stack(certs) as s:
        token = tmp_path / "token"
        token.write_text(TOKEN)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
        procs = {}
        for name in ("replica-a", "replica-b"):
            procs[name] = subprocess.Popen(
                [
                    str(BIN / "tunnel-client"),
                    "run",
                    "--server",
                    f"wss://localhost:{s.server.control_port}",
                    "--ca-file",
                    str(certs.ca),
                    "--token-file",
                    str(token),
                    "--upstream",
                    f"svc.example.com={up.url}",
                    "--instance-id",
                    name,
                    "--admin-addr",
                    "127.0.0.1:0",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        try:
            await wait_until(lambda: len(s.server.registry.tunnels) == 2, 10, what="both replicas registered")
            failures: list[str] = []
            done = 0
            stop = asyncio.Event()
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as http:

                async def worker() -> None:
                    nonlocal done
                    while not stop.is_set():
                        try:
                            async with http.get(s.base + "/?d=0.2", headers={"Host": "svc.example.com"}) as r:
                                await r.read()
                                if r.status != 200:
                                    failures.append(f"status {r.status}")
                        except aiohttp.ClientError as exc:
                            failures.append(repr(exc))
                        done += 1

                async def post() -> int:
                    async with http.post(
                        s.base + "/post?d=3", data=b"x" * 100, headers={"Host": "svc.example.com"}
                    ) as r:
                        return r.status

                post_task = asyncio.create_task(post())
                victim = await wait_until(
                    lambda: next((t.instance_id for t in s.server.registry.tunnels.values() if t.in_flight), None),
                    5,
                    what="the POST in flight on one replica",
                )
                workers = [asyncio.create_task(worker()) for _ in range(10)]
                await wait_until(lambda: done >= 20, 10, what="GETs served by both replicas")
                procs[victim].send_signal(signal.SIGKILL)  # no go-away, no drain
                at_kill = done
                await wait_until(lambda: done >= at_kill + 40, 15, what="GETs served after the kill")
                stop.set()
                await asyncio.wait_for(asyncio.gather(*workers), 10)
                post_status = await asyncio.wait_for(post_task, 10)
            assert failures == []  # every GET in flight on the dead replica was repeated elsewhere
            assert done > 50
            assert post_status == 502  # a POST whose body was sent is not repeated
            assert {t.instance_id for t in s.server.registry.tunnels.values()} == {"replica-a", "replica-b"} - {victim}
        finally:
            for proc in procs.values():
                proc.kill()
                proc.wait()


async def test_server_name_with_several_addresses_gets_a_session_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("tunnel.test")
    blobs = (("ca.pem", ca.cert_pem), ("key.pem", cert.private_key_pem), ("cert.pem", cert.cert_chain_pems[0]))
    for name, blob in blobs:
        blob.write_to_path(str(tmp_path / name))
    certs = Certs(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem")
    first = ExitServer(server_config(certs, control_addr="127.0.0.1:0"), auth=_token_auth())
    await first.start()
    second = ExitServer(server_config(certs, control_addr=f"127.0.0.2:{first.control_port}"), auth=_token_auth())
    await second.start()

    async def fake_resolve(host: str) -> list[str]:
        assert host == "tunnel.test"
        return ["127.0.0.1", "127.0.0.2"]

    monkeypatch.setattr(client_module, "resolve", fake_resolve)
    async with upstream(slow_app()) as up:
        config = client_config(certs, first, [f"default={up.url}"], server=[f"wss://tunnel.test:{first.control_port}"])
        client = TunnelClient(config, token=TOKEN)
        task = asyncio.create_task(client.run())
        try:
            await client.wait_connected(10)
            assert len(client.links) == 2
            assert len(first.registry.tunnels) == 1 and len(second.registry.tunnels) == 1
            async with aiohttp.ClientSession() as http:
                for server in (first, second):
                    async with http.get(f"http://127.0.0.1:{server.public_port}/?d=0") as r:
                        assert r.status == 200
        finally:
            await client.shutdown(1)
            await task
            await first.close()
            await second.close()


async def test_unhealthy_upstream_route_is_withdrawn_and_restored(certs: Certs) -> None:
    app = slow_app()
    async with upstream(app) as healthy_up, upstream(slow_app()) as sick_up, stack(certs) as s:
        common = {"health_interval": 0.2, "health_fall": 2, "health_rise": 2}
        await s.add_client(
            [f"svc.example.com={healthy_up.url}"],
            instance_id="good",
            health_path=["svc.example.com=/healthz"],
            **common,
        )
        sick_app_state = None
        for runner_app in (sick_up.runner.app,):
            sick_app_state = runner_app[STATE]
        assert sick_app_state is not None
        await s.add_client(
            [f"svc.example.com={sick_up.url}"], instance_id="sick", health_path=["svc.example.com=/healthz"], **common
        )
        sick_app_state["healthy"] = False
        await wait_until(
            lambda: [t.instance_id for t in s.server.registry.table.lookup("svc.example.com", "/")] == ["good"],
            5,
            what="the sick replica withdrawn",
        )
        async with aiohttp.ClientSession() as http:
            for _ in range(20):
                async with http.get(s.base + "/?d=0", headers={"Host": "svc.example.com"}) as r:
                    assert r.status == 200
        assert next(t for t in s.server.registry.tunnels.values() if t.instance_id == "sick").requests == 0
        app[STATE]["healthy"] = False  # now the only healthy replica turns sick too: 503 at once
        await wait_until(lambda: not s.server.registry.table.lookup("svc.example.com", "/"), 5, what="no route")
        async with aiohttp.ClientSession() as http:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            async with http.get(s.base + "/?d=0", headers={"Host": "svc.example.com"}) as r:
                assert r.status == 503
            assert loop.time() - t0 < 0.5
        sick_app_state["healthy"] = True
        await wait_until(
            lambda: [t.instance_id for t in s.server.registry.table.lookup("svc.example.com", "/")] == ["sick"],
            5,
            what="the recovered replica routed again",
        )
