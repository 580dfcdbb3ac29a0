"""ECS task metadata: labels and route discovery from recorded metadata documents."""

from __future__ import annotations

import json
from pathlib import Path

from tunnel_client.ecs import discover_routes, labels_from_task

DATA = Path(__file__).resolve().parents[1] / "e2e" / "data"


def _load(name: str) -> dict[str, object]:
    return json.loads((DATA / name).read_text())  # type: ignore[no-any-return]


def test_route_discovery_bridge_mode_uses_container_addresses_and_labels() -> None:
    assert discover_routes(_load("ecs_container_bridge.json"), _load("ecs_task_bridge.json")) == [
        "app.example.com=http://172.17.0.2:8080",
        "www.example.com=http://172.17.0.2:8080",
        "metrics.example.com/api=http://172.17.0.4:9100",
    ]


def test_route_discovery_host_mode_uses_loopback() -> None:
    task = _load("ecs_task_host.json")
    text = json.dumps(task).replace("UPSTREAM_PORT", "3000")
    assert discover_routes(_load("ecs_container_host.json"), json.loads(text)) == [
        "host-app.example.com=http://127.0.0.1:3000"
    ]


def test_route_discovery_skips_ambiguous_or_bad_ports() -> None:
    own = {"DockerId": "me"}
    task = {
        "Containers": [
            {
                "DockerId": "a",
                "Name": "two-ports",
                "Labels": {"backhaul.host": "a.example.com"},
                "Ports": [{"ContainerPort": 1}, {"ContainerPort": 2}],
            },
            {"DockerId": "b", "Name": "bad", "Labels": {"backhaul.host": "b.example.com", "backhaul.port": "http"}},
            {
                "DockerId": "c",
                "Name": "tls",
                "Labels": {"backhaul.host": "c.example.com", "backhaul.port": "8443", "backhaul.scheme": "https"},
            },
            {"DockerId": "me", "Name": "self", "Labels": {"backhaul.host": "self.example.com", "backhaul.port": "1"}},
        ]
    }
    assert discover_routes(own, task) == ["c.example.com=https://127.0.0.1:8443"]


def test_labels_from_task_short_cluster_name() -> None:
    labels = labels_from_task(_load("ecs_task_bridge.json"))
    assert labels["ecs.cluster"] == "customer-site-7"
    assert labels["ecs.service"] == "vendor-app"
    assert labels_from_task({"Cluster": "plain"}) == {"ecs.cluster": "plain"}
