"""Daemon mode (--upstream-from-host) against an ECS agent introspection API and a Docker Engine
API served by the test, with the JSON shapes of their documentation (ECS: "Amazon ECS container
agent introspection", ``GET /v1/tasks``; Docker Engine API ``GET /containers/{id}/json``, served
on a unix socket as dockerd does). What they do not reproduce: the agent's other endpoints,
Docker's event stream (the client polls), and real containers (the "containers" are aiohttp
servers on 127.0.0.1 whose ports stand for the host ports Docker mapped)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from tests.waiting import wait_until

from .helpers import Certs, Stack, stack, upstream

pytestmark = pytest.mark.asyncio


@dataclass
class FakeHost:
    """What the agent and Docker report; tests edit it."""

    tasks: list[dict[str, Any]] = field(default_factory=list)
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    agent_down: bool = False
    agent_calls: int = 0

    def run_task(self, arn: str, docker_id: str, host_port: int, labels: dict[str, str]) -> None:
        """A task with one container whose port 80 Docker mapped to ``host_port`` (bridge mode)."""
        self.tasks.append(
            {
                "Arn": f"arn:aws:ecs:eu-west-1:123456789012:task/edge/{arn}",
                "DesiredStatus": "RUNNING",
                "KnownStatus": "RUNNING",
                "Family": "web",
                "Version": "3",
                "Containers": [
                    {
                        "DockerId": docker_id,
                        "DockerName": f"ecs-web-3-app-{docker_id[:8]}",
                        "Name": "app",
                        "Ports": [{"ContainerPort": 80, "Protocol": "tcp", "HostPort": host_port}],
                    }
                ],
            }
        )
        self.containers[docker_id] = {
            "Id": docker_id,
            "Name": f"/ecs-web-3-app-{docker_id[:8]}",
            "Config": {"Labels": {"com.amazonaws.ecs.task-arn": arn, **labels}},
            "HostConfig": {"NetworkMode": "bridge"},
            "NetworkSettings": {"Ports": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(host_port)}]}},
        }

    def stop_task(self, arn: str) -> None:
        for task in self.tasks:
            if task["Arn"].endswith("/" + arn):
                task["DesiredStatus"] = "STOPPED"

    def remove_task(self, arn: str) -> None:
        self.tasks = [t for t in self.tasks if not t["Arn"].endswith("/" + arn)]


@contextlib.asynccontextmanager
async def fake_apis(tmp_path: Path) -> AsyncIterator[tuple[FakeHost, str, str]]:
    host = FakeHost()

    async def tasks(request: web.Request) -> web.Response:
        host.agent_calls += 1
        if host.agent_down:
            return web.Response(status=503, text="agent restarting")
        return web.json_response({"Tasks": host.tasks})

    async def inspect(request: web.Request) -> web.Response:
        found = host.containers.get(request.match_info["id"])
        if found is None:
            return web.json_response({"message": "No such container"}, status=404)
        return web.json_response(found)

    agent_app = web.Application()
    agent_app.router.add_get("/v1/tasks", tasks)
    docker_app = web.Application()
    docker_app.router.add_get("/containers/{id}/json", inspect)
    agent = web.AppRunner(agent_app, access_log=None)
    docker = web.AppRunner(docker_app, access_log=None)
    await agent.setup()
    await docker.setup()
    site = web.TCPSite(agent, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    sock = tmp_path / "docker.sock"
    await web.UnixSite(docker, str(sock)).start()
    try:
        yield host, f"http://127.0.0.1:{port}", f"unix://{sock}"
    finally:
        await agent.cleanup()
        await docker.cleanup()


def named_app(name: str, slow: asyncio.Event | None = None) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        if request.path == "/slow" and slow is not None:
            await slow.wait()
        return web.Response(text=name)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def get(s: Stack, path: str = "/") -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{s.base}{path}", headers={"Host": "app.test"}) as resp:
            return resp.status, await resp.text()


@pytest_asyncio.fixture
async def daemon(certs: Certs, tmp_path: Path) -> AsyncIterator[tuple[Stack, FakeHost]]:
    async with fake_apis(tmp_path) as (host, agent_uri, docker_host), stack(certs) as s:
        await s.add_client(
            [],
            upstream_from_host=True,
            ecs_agent_uri=agent_uri,
            docker_host=docker_host,
            discovery_interval=0.1,
            discovery_drain=1.0,
        )
        yield s, host


async def test_a_task_started_is_routed_within_2_seconds(daemon: tuple[Stack, FakeHost]) -> None:
    s, host = daemon
    assert (await get(s))[0] == 503
    async with upstream(named_app("one")) as up:
        host.run_task("t1", "a" * 64, up.port, {"backhaul.host": "app.test"})
        await wait_until(lambda: _is(get(s), (200, "one")), timeout=2.0, interval=0.05, what="routed in 2 s")


async def _is(answer: Any, expected: tuple[int, str]) -> bool:
    return bool(await answer == expected)


async def test_a_task_stopped_drains_then_loses_its_route(daemon: tuple[Stack, FakeHost]) -> None:
    s, host = daemon
    release = asyncio.Event()
    async with upstream(named_app("one", release)) as up:
        host.run_task("t1", "b" * 64, up.port, {"backhaul.host": "app.test"})
        await wait_until(lambda: _is(get(s), (200, "one")), what="routed")
        in_flight = asyncio.create_task(get(s, "/slow"))
        await asyncio.sleep(0.2)  # deliberate: the slow request reaches the upstream first
        host.stop_task("t1")  # desired STOPPED: ECS stops the container only after this
        await wait_until(lambda: _is(get(s), (503, "no tunnel available for this host\n")), what="withdrawn")
        release.set()
        assert await in_flight == (200, "one")  # the request under way finished (drain)
        client = s.clients[0].client
        await wait_until(lambda: client.forwarder.match("app.test", "/") is None, timeout=5, what="removed")


async def test_a_dynamic_port_change_is_followed(daemon: tuple[Stack, FakeHost]) -> None:
    s, host = daemon
    async with upstream(named_app("old")) as old, upstream(named_app("new")) as new:
        host.run_task("t1", "c" * 64, old.port, {"backhaul.host": "app.test"})
        await wait_until(lambda: _is(get(s), (200, "old")), what="old task routed")
        # the service replaced the task: a new one on another host port, the old one gone
        host.remove_task("t1")
        host.run_task("t2", "d" * 64, new.port, {"backhaul.host": "app.test"})
        await wait_until(lambda: _is(get(s), (200, "new")), timeout=2.0, what="new port in 2 s")
        for _ in range(5):
            assert await get(s) == (200, "new")


async def test_the_agent_restarting_does_not_drop_routes(daemon: tuple[Stack, FakeHost]) -> None:
    s, host = daemon
    async with upstream(named_app("one")) as up:
        host.run_task("t1", "e" * 64, up.port, {"backhaul.host": "app.test"})
        await wait_until(lambda: _is(get(s), (200, "one")), what="routed")
        host.agent_down = True
        calls = host.agent_calls
        await wait_until(lambda: host.agent_calls >= calls + 10, what="ten polls against a down agent")
        assert await get(s) == (200, "one")
        host.agent_down = False
        await wait_until(lambda: host.agent_calls >= calls + 15, what="agent back")
        assert await get(s) == (200, "one")
