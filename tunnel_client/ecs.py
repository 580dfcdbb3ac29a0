"""Amazon ECS task metadata (endpoint v4): labels for registration and route discovery from
the sibling containers' Docker labels (``backhaul.host``, ``backhaul.port``, ``backhaul.path``).

Only the local metadata endpoint the ECS agent announces in ``ECS_CONTAINER_METADATA_URI_V4``
is ever read; it is a link-local or loopback address on the instance."""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["METADATA_ENV", "discover_routes", "fetch_metadata", "labels_from_task"]

log = logging.getLogger(__name__)

METADATA_ENV = "ECS_CONTAINER_METADATA_URI_V4"


async def fetch_metadata(base: str | None = None, timeout: float = 3.0) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Return (this container's metadata, the task's metadata), or None outside ECS.

    Raises:
        OSError-family / aiohttp.ClientError / ValueError: the endpoint is set but unusable.
    """
    base = base if base is not None else os.environ.get(METADATA_ENV)
    if not base:
        return None
    import aiohttp  # only under ECS: a client elsewhere never loads it

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        async with http.get(base) as resp:
            resp.raise_for_status()
            container = await resp.json(content_type=None)
        async with http.get(base.rstrip("/") + "/task") as resp:
            resp.raise_for_status()
            task = await resp.json(content_type=None)
    if not isinstance(container, dict) or not isinstance(task, dict):
        raise ValueError("task metadata is not a JSON object")
    return container, task


def _short(arn: str) -> str:
    return arn.rsplit("/", 1)[-1] if arn.startswith("arn:") else arn


def labels_from_task(task: dict[str, Any]) -> dict[str, str]:
    """Registration labels: cluster, task ARN, family, revision, service name."""
    labels = {
        "ecs.cluster": _short(str(task.get("Cluster", ""))),
        "ecs.task_arn": str(task.get("TaskARN", "")),
        "ecs.family": str(task.get("Family", "")),
        "ecs.revision": str(task.get("Revision", "")),
        "ecs.service": str(task.get("ServiceName", "")),
    }
    return {k: v[:256] for k, v in labels.items() if v}


def _address(container: dict[str, Any]) -> str:
    for network in container.get("Networks") or []:
        mode = str(network.get("NetworkMode", ""))
        addresses = network.get("IPv4Addresses") or []
        if mode == "bridge" and addresses:
            return str(addresses[0])  # the container's address on the Docker bridge
        if mode in ("host", "awsvpc"):
            return "127.0.0.1"
    return "127.0.0.1"


def discover_routes(own: dict[str, Any], task: dict[str, Any]) -> list[str]:
    """``HOST[/PREFIX]=URL`` upstream specs for every sibling container labelled
    ``backhaul.host`` (comma-separated patterns allowed). The port is ``backhaul.port``, or
    the container's only port mapping; ``backhaul.scheme`` may be ``https``."""
    specs: list[str] = []
    own_id = own.get("DockerId")
    for container in task.get("Containers") or []:
        if container.get("DockerId") == own_id:
            continue
        labels = container.get("Labels") or {}
        hosts = [h.strip().lower() for h in str(labels.get("backhaul.host", "")).split(",") if h.strip()]
        if not hosts:
            continue
        port = str(labels.get("backhaul.port", "")).strip()
        if not port:
            mappings = container.get("Ports") or []
            if len(mappings) != 1:
                log.warning(
                    "ecs: container %s has backhaul.host but %d ports and no backhaul.port; skipped",
                    container.get("Name"),
                    len(mappings),
                )
                continue
            port = str(mappings[0].get("ContainerPort", ""))
        if not port.isdigit():
            log.warning("ecs: container %s: bad backhaul.port %r; skipped", container.get("Name"), port)
            continue
        scheme = "https" if labels.get("backhaul.scheme") == "https" else "http"
        path = str(labels.get("backhaul.path", "")).strip().strip("/")
        for host in hosts:
            specs.append(f"{host}{'/' + path if path else ''}={scheme}://{_address(container)}:{port}")
    return specs
