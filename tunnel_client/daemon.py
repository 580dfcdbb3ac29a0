"""Daemon mode (``--upstream-from-host``): one tunnel client per ECS Anywhere instance (an ECS
daemon service) publishes the containers of every task on its host that carry ``backhaul.*``
labels, following the ECS agent's introspection API (``GET /v1/tasks``) for which tasks run
and where their ports landed, and the Docker Engine API (``GET /containers/{id}/json``) for
the labels and host ports (bridge mode with dynamic host ports included).

Routes follow the tasks live: a task that starts gets its routes within one poll; a task whose
desired status turns STOPPED (ECS sends SIGTERM only after that) has its routes withdrawn from
the exit server first, served for a drain period for requests already under way, then removed;
a changed host port (a task replaced) swaps the target. When the agent or Docker cannot be
asked (the agent restarting), the last known routes stay: nothing is withdrawn on an outage.

The decision is :func:`desired_routes`, a pure function of the two APIs' JSON; the asyncio part
only polls and applies differences.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import Upstream, parse_upstream

__all__ = ["Discovered", "HostDiscovery", "desired_routes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Discovered:
    """One route a task's container offers: ``spec`` is an ``--upstream`` value."""

    spec: str
    task_arn: str
    container: str


def _mapped_port(inspect: dict[str, Any], container_port: str) -> str | None:
    """The host port Docker mapped ``container_port``/tcp to (bridge mode), or None."""
    ports = (inspect.get("NetworkSettings") or {}).get("Ports") or {}
    for binding in ports.get(f"{container_port}/tcp") or []:
        host_port = str(binding.get("HostPort", ""))
        if host_port.isdigit():
            return host_port
    return None


def desired_routes(tasks: dict[str, Any], containers: dict[str, dict[str, Any]]) -> list[Discovered]:
    """The routes of every running task on this host.

    Args:
        tasks: the agent's ``/v1/tasks`` answer.
        containers: ``docker inspect`` of each container, by Docker id (missing ones skipped).
    """
    found: list[Discovered] = []
    for task in tasks.get("Tasks") or []:
        if task.get("DesiredStatus") != "RUNNING" or task.get("KnownStatus") != "RUNNING":
            continue  # starting, or on its way out: not (or no longer) routed
        arn = str(task.get("Arn", ""))
        for container in task.get("Containers") or []:
            inspect = containers.get(str(container.get("DockerId", "")))
            if inspect is None:
                continue
            labels = (inspect.get("Config") or {}).get("Labels") or {}
            hosts = [h.strip().lower() for h in str(labels.get("backhaul.host", "")).split(",") if h.strip()]
            if not hosts:
                continue
            name = str(container.get("Name", container.get("DockerName", "?")))
            port = str(labels.get("backhaul.port", "")).strip()
            mode = (inspect.get("HostConfig") or {}).get("NetworkMode", "bridge")
            exposed = list(((inspect.get("NetworkSettings") or {}).get("Ports") or {}).keys())
            if not port:
                if len(exposed) != 1:
                    log.warning("daemon: %s has backhaul.host but %d ports and no backhaul.port", name, len(exposed))
                    continue
                port = exposed[0].partition("/")[0]
            if not port.isdigit():
                log.warning("daemon: %s: bad backhaul.port %r", name, port[:20])
                continue
            if mode == "host":
                target = port  # the container listens on the host itself
            else:
                mapped = _mapped_port(inspect, port)
                if mapped is None:
                    log.warning("daemon: %s: port %s is not published on the host; skipped", name, port)
                    continue
                target = mapped
            scheme = "https" if labels.get("backhaul.scheme") == "https" else "http"
            if labels.get("backhaul.scheme") == "h2c":
                scheme = "h2c"
            path = str(labels.get("backhaul.path", "")).strip().strip("/")
            for host in hosts:
                spec = f"{host}{'/' + path if path else ''}={scheme}://127.0.0.1:{target}"
                found.append(Discovered(spec, arn, name))
    return found


class HostDiscovery:
    """Polls the agent and Docker, and applies route changes through the callbacks.

    Args:
        add: serve a new upstream (routes announced by ``announce``).
        withdraw: stop announcing an upstream (the exit server stops sending new requests).
        remove: forget an upstream after its drain.
        announce: send the current route set to the exit servers.
    """

    def __init__(
        self,
        agent_uri: str,
        docker_host: str,
        add: Callable[[Upstream], None],
        withdraw: Callable[[Upstream], None],
        remove: Callable[[Upstream], None],
        announce: Callable[[], None],
        interval: float = 1.0,
        drain: float = 10.0,
        timeout: float = 3.0,
    ) -> None:
        self.agent_uri = agent_uri.rstrip("/")
        self.docker_host = docker_host
        self.interval = interval
        self.drain = drain
        self.timeout = timeout
        self._add, self._withdraw, self._remove, self._announce = add, withdraw, remove, announce
        self.current: dict[str, Upstream] = {}  # spec -> upstream being served
        self.draining: dict[str, tuple[Upstream, float]] = {}  # spec -> (upstream, removal time)
        self.polls = 0
        self.failures = 0
        self.last_error = ""

    async def run(self, stop: asyncio.Event) -> None:
        import aiohttp

        connector: aiohttp.BaseConnector
        base_docker = "http://docker"
        if self.docker_host.startswith("unix://"):
            connector = aiohttp.UnixConnector(path=self.docker_host[len("unix://") :])
        else:
            connector = aiohttp.TCPConnector()
            base_docker = self.docker_host.replace("tcp://", "http://").rstrip("/")
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout) as agent,
            aiohttp.ClientSession(timeout=timeout, connector=connector) as docker,
        ):
            while not stop.is_set():
                await self.poll_once(agent, docker, base_docker)
                try:
                    async with asyncio.timeout(self.interval):
                        await stop.wait()
                except TimeoutError:
                    pass

    async def poll_once(self, agent: Any, docker: Any, base_docker: str) -> None:
        import aiohttp

        self.polls += 1
        try:
            async with agent.get(f"{self.agent_uri}/v1/tasks") as resp:
                resp.raise_for_status()
                tasks = await resp.json(content_type=None)
            containers: dict[str, dict[str, Any]] = {}
            for task in tasks.get("Tasks") or []:
                for container in task.get("Containers") or []:
                    docker_id = str(container.get("DockerId", ""))
                    if not docker_id or not docker_id.isalnum():
                        continue
                    async with docker.get(f"{base_docker}/containers/{docker_id}/json") as resp:
                        if resp.status == 404:
                            continue  # gone between the two calls
                        resp.raise_for_status()
                        containers[docker_id] = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, AttributeError) as exc:
            self.failures += 1
            error = f"{type(exc).__name__}: {exc}"
            if error != self.last_error:
                log.warning("daemon: cannot read the ECS agent or Docker (%s); keeping the current routes", error)
            self.last_error = error
            self._finish_drains()
            return
        if self.last_error:
            log.info("daemon: ECS agent and Docker answering again")
            self.last_error = ""
        self.apply(desired_routes(tasks, containers))

    def apply(self, found: list[Discovered]) -> None:
        """Move to the route set ``found``: add new ones, start draining the ones gone."""
        wanted = {d.spec: d for d in found}
        changed = False
        for spec, d in wanted.items():
            if spec in self.current:
                continue
            upstream = parse_upstream(spec)
            self.draining.pop(spec, None)
            self.current[spec] = upstream
            self._add(upstream)
            log.info("daemon: route %s (task %s, container %s)", spec, d.task_arn.rsplit("/", 1)[-1], d.container)
            changed = True
        for spec in [s for s in self.current if s not in wanted]:
            upstream = self.current.pop(spec)
            self._withdraw(upstream)
            self.draining[spec] = (upstream, time.monotonic() + self.drain)
            log.info("daemon: route %s withdrawn; removed after %.0fs of drain", spec, self.drain)
            changed = True
        if changed:
            self._announce()
        self._finish_drains()

    def _finish_drains(self) -> None:
        now = time.monotonic()
        for spec, (upstream, due) in list(self.draining.items()):
            if due <= now:
                del self.draining[spec]
                self._remove(upstream)
                log.info("daemon: route %s removed", spec)
