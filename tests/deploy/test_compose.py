"""deploy/compose.yaml (the local demo stack) and the BACKHAUL_* settings named anywhere under
deploy/: every such variable must be a real setting of the program that reads it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from exit_server.config import ServerConfig
from tunnel_client.config import ClientConfig

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read compose.yaml (test extra: pyyaml)")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"

#: Settings announced for both programs but not in the settings models yet (admin listener,
#: ECS-derived upstreams). Remove an entry once the model has the field.
PLANNED: dict[str, set[str]] = {"server": set(), "client": set()}  # settings referenced before they existed
MODELS = {"server": ServerConfig, "client": ClientConfig}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def program_of(command: list[str] | str) -> str | None:
    words = command if isinstance(command, list) else command.split()
    text = " ".join(words)
    if "exit-server run" in text:
        return "server"
    if "tunnel-client run" in text:
        return "client"
    return None


def check_names(names: set[str], side: str, where: str) -> list[str]:
    fields = set(MODELS[side].model_fields) | PLANNED[side]
    errors = []
    for name in sorted(names):
        if not name.startswith("BACKHAUL_"):
            continue
        field = name.removeprefix("BACKHAUL_").lower()
        if field not in fields:
            errors.append(f"{where}: {name} is not a {side} setting")
    return errors


def test_compose_services() -> None:
    services = compose()["services"]
    assert {"init", "exit-server", "app", "tunnel-client"} <= set(services)
    client = services["tunnel-client"]
    assert client["depends_on"]["exit-server"]["condition"] == "service_healthy"
    assert client["depends_on"]["app"]["condition"] == "service_healthy"
    assert services["exit-server"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert "tunnel-client healthcheck" not in json.dumps(services["exit-server"]["healthcheck"])
    assert "/readyz" in " ".join(services["exit-server"]["healthcheck"]["test"])
    for port in services["exit-server"]["ports"]:
        assert str(port).startswith("127.0.0.1:"), "the demo publishes on loopback only"
    assert "ports" not in services["app"], "the app is reached through the tunnel only"
    build = services["exit-server"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == ROOT / "deploy/docker/Dockerfile"
    upstream = environment(client)["BACKHAUL_UPSTREAM"]
    assert upstream.partition("=")[2].startswith("http://app:"), upstream


def test_compose_never_holds_a_token() -> None:
    for name, service in compose()["services"].items():
        env = environment(service)
        assert "BACKHAUL_TOKEN" not in env, f"{name}: use BACKHAUL_TOKEN_FILE"
        command = service.get("command", [])
        assert "--token " not in " ".join(command if isinstance(command, list) else [command]), name


def test_settings_named_in_compose_exist() -> None:
    errors: list[str] = []
    for name, service in compose()["services"].items():
        side = program_of(service.get("command", []))
        if side:
            errors += check_names(set(environment(service)), side, f"compose {name}")
    assert not errors, "\n".join(errors)


def test_settings_named_in_ecs_task_definitions_exist() -> None:
    errors: list[str] = []
    for path in sorted((ROOT / "deploy" / "ecs").glob("taskdef-*.json")):
        for container in json.loads(path.read_text())["containerDefinitions"]:
            side = program_of(container.get("command", []))
            names = {e["name"] for e in container.get("environment", [])}
            names |= {s["name"] for s in container.get("secrets", [])}
            if side:
                errors += check_names(names, side, f"{path.name} {container['name']}")
            else:
                assert not any(n.startswith("BACKHAUL_") for n in names), f"{path.name}: {container['name']}"
    assert not errors, "\n".join(errors)


def test_settings_named_in_cloudformation_and_systemd_exist() -> None:
    template = (ROOT / "deploy" / "cloudformation" / "exit-server.yaml").read_text()
    names = set(re.findall(r"\bName: (BACKHAUL_[A-Z_]+)\b", template))  # Environment and Secrets entries
    assert {"BACKHAUL_TOKEN", "BACKHAUL_CONTROL_ADDR"} <= names
    errors = check_names(names, "server", "exit-server.yaml")
    for unit, side in (("backhaul-exit-server.service", "server"), ("backhaul-tunnel-client.service", "client")):
        text = (ROOT / "deploy" / "systemd" / unit).read_text()
        errors += check_names(set(re.findall(r"\bBACKHAUL_[A-Z_]+\b", text)), side, unit)
    assert not errors, "\n".join(errors)


def test_check_names_catches_a_typo() -> None:
    assert check_names({"BACKHAUL_UPSTREAMS"}, "client", "x") == ["x: BACKHAUL_UPSTREAMS is not a client setting"]
    assert check_names({"BACKHAUL_SERVER"}, "server", "x") == ["x: BACKHAUL_SERVER is not a server setting"]
