"""tunnel_client/daemon.py desired_routes: the agent's /v1/tasks and docker inspect to routes."""

from __future__ import annotations

from typing import Any

from tunnel_client.daemon import HostDiscovery, desired_routes


def task(arn: str, docker_id: str, desired: str = "RUNNING", known: str = "RUNNING") -> dict[str, Any]:
    return {
        "Arn": arn,
        "DesiredStatus": desired,
        "KnownStatus": known,
        "Containers": [{"DockerId": docker_id, "Name": "app"}],
    }


def inspect(labels: dict[str, str], ports: dict[str, Any], mode: str = "bridge") -> dict[str, Any]:
    return {"Config": {"Labels": labels}, "HostConfig": {"NetworkMode": mode}, "NetworkSettings": {"Ports": ports}}


def specs(tasks: list[dict[str, Any]], containers: dict[str, dict[str, Any]]) -> list[str]:
    return [d.spec for d in desired_routes({"Tasks": tasks}, containers)]


def test_bridge_mode_uses_the_mapped_host_port() -> None:
    c = inspect({"backhaul.host": "a.test, B.test", "backhaul.path": "/api/"}, {"80/tcp": [{"HostPort": "32769"}]})
    assert specs([task("t", "x")], {"x": c}) == [
        "a.test/api=http://127.0.0.1:32769",
        "b.test/api=http://127.0.0.1:32769",
    ]


def test_backhaul_port_picks_among_several_and_host_mode_uses_it_directly() -> None:
    ports = {"80/tcp": [{"HostPort": "1"}], "8080/tcp": [{"HostPort": "2"}]}
    assert specs([task("t", "x")], {"x": inspect({"backhaul.host": "a.test", "backhaul.port": "8080"}, ports)}) == [
        "a.test=http://127.0.0.1:2"
    ]
    assert specs([task("t", "x")], {"x": inspect({"backhaul.host": "a.test"}, ports)}) == []  # ambiguous: skipped
    host = inspect({"backhaul.host": "a.test", "backhaul.port": "9000", "backhaul.scheme": "h2c"}, {}, "host")
    assert specs([task("t", "x")], {"x": host}) == ["a.test=h2c://127.0.0.1:9000"]


def test_only_running_tasks_with_labels_count() -> None:
    c = inspect({"backhaul.host": "a.test"}, {"80/tcp": [{"HostPort": "5"}]})
    assert specs([task("t", "x", desired="STOPPED")], {"x": c}) == []
    assert specs([task("t", "x", known="PENDING")], {"x": c}) == []
    assert specs([task("t", "x")], {}) == []  # no docker inspect
    assert specs([task("t", "x")], {"x": inspect({}, {"80/tcp": [{"HostPort": "5"}]})}) == []
    assert specs([task("t", "x")], {"x": inspect({"backhaul.host": "a.test"}, {"80/tcp": []})}) == []  # unpublished


def test_apply_adds_withdraws_and_removes_after_the_drain() -> None:
    log: list[tuple[str, str]] = []

    def note(what: str) -> Any:
        return lambda up: log.append((what, f"{up.host}={up.origin}"))

    d = HostDiscovery("http://a", "unix:///s", note("add"), note("withdraw"), note("remove"), lambda: None, drain=0)
    c = inspect({"backhaul.host": "a.test"}, {"80/tcp": [{"HostPort": "5"}]})
    d.apply(desired_routes({"Tasks": [task("t", "x")]}, {"x": c}))
    d.apply(desired_routes({"Tasks": [task("t", "x")]}, {"x": c}))  # unchanged: nothing
    d.apply([])
    assert log == [
        ("add", "a.test=http://127.0.0.1:5"),
        ("withdraw", "a.test=http://127.0.0.1:5"),
        ("remove", "a.test=http://127.0.0.1:5"),
    ]
    assert d.current == {} and d.draining == {}
