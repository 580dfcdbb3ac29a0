"""Every file in deploy/ecs is a valid ECS request for external instances (ECS Anywhere).

Each ``taskdef-*.json`` is checked as the input of ``RegisterTaskDefinition`` and
``service.json`` as the input of ``CreateService`` against botocore's ECS model (see
ecs_validator.py for what the walk checks), then against the ECS Anywhere rules.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("botocore", reason="botocore is needed to load the ECS API model (test extra)")

from .ecs_validator import (  # noqa: E402
    ShapeValidator,
    ecs_model,
    external_service_rules,
    external_task_definition_rules,
    validate_request,
)

ECS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "ecs"
FILES = sorted(ECS_DIR.glob("*.json"))


def kind_of(path: Path) -> str:
    if path.name == "service.json" or path.name.startswith("service-"):
        return "service"
    if path.name.startswith("taskdef-"):
        return "task-definition"
    raise AssertionError(f"{path.name}: name it taskdef-*.json or service*.json so the test knows its operation")


def load(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        document = json.load(handle)
    assert isinstance(document, dict), f"{path.name}: top level must be an object"
    return document


def test_expected_files_exist() -> None:
    names = {p.name for p in FILES}
    assert {"taskdef-bridge.json", "taskdef-host.json", "taskdef-firelens.json", "service.json"} <= names
    assert {"taskdef-daemon.json", "service-daemon.json"} <= names  # daemon mode, IAM identity


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_matches_botocore_model(path: Path) -> None:
    operation = {"service": "CreateService", "task-definition": "RegisterTaskDefinition"}[kind_of(path)]
    errors = validate_request(load(path), operation)
    assert not errors, f"{path.name} is not a valid {operation} input:\n" + "\n".join(errors)


@pytest.mark.parametrize("path", [p for p in FILES if kind_of(p) == "task-definition"], ids=lambda p: p.name)
def test_task_definition_ecs_anywhere_rules(path: Path) -> None:
    errors = external_task_definition_rules(load(path))
    assert not errors, f"{path.name}:\n" + "\n".join(errors)


@pytest.mark.parametrize("path", [p for p in FILES if kind_of(p) == "service"], ids=lambda p: p.name)
def test_service_ecs_anywhere_rules(path: Path) -> None:
    service = load(path)
    errors = external_service_rules(service)
    assert not errors, f"{path.name}:\n" + "\n".join(errors)
    families = {load(p)["family"] for p in FILES if kind_of(p) == "task-definition"}
    assert service["taskDefinition"].split(":")[0] in families, "service must run one of deploy/ecs's families"


def test_variants_cover_bridge_host_and_firelens() -> None:
    docs = {p.name: load(p) for p in FILES if kind_of(p) == "task-definition"}
    assert docs["taskdef-bridge.json"]["networkMode"] == "bridge"
    assert docs["taskdef-host.json"]["networkMode"] == "host"
    firelens = docs["taskdef-firelens.json"]
    routers = [c for c in firelens["containerDefinitions"] if "firelensConfiguration" in c]
    assert len(routers) == 1 and "aws-for-fluent-bit" in routers[0]["image"]
    others = [c for c in firelens["containerDefinitions"] if c is not routers[0]]
    assert all(c["logConfiguration"]["logDriver"] == "awsfirelens" for c in others)
    valid_from = {"ssm", "secretsmanager"}
    daemon = docs["taskdef-daemon.json"]
    env = {e["name"]: e["value"] for e in daemon["containerDefinitions"][0]["environment"]}
    assert env["BACKHAUL_AUTH"] == "aws-iam" and env["BACKHAUL_UPSTREAM_FROM_HOST"] == "true"
    assert daemon["networkMode"] == "host" and daemon["taskRoleArn"]
    seen = {
        c["secrets"][0]["valueFrom"].split(":")[2]
        for d in docs.values()
        for c in d["containerDefinitions"]
        if c.get("secrets")
    }
    assert seen == valid_from, "the examples should show both SSM Parameter Store and Secrets Manager"


# --- the validator itself ---------------------------------------------------------------------


def _bridge() -> dict[str, Any]:
    return copy.deepcopy(load(ECS_DIR / "taskdef-bridge.json"))


def test_validator_catches_bad_enum_and_unknown_key() -> None:
    doc = _bridge()
    doc["networkMode"] = "bridged"  # not a NetworkMode
    client = next(c for c in doc["containerDefinitions"] if c["name"] == "tunnel-client")
    client["dependsOn"][0]["condition"] = "HEALTHLY"  # not a ContainerCondition, nested in a list
    client["healthcheck"] = client.pop("healthCheck")  # unknown member (wrong case)
    doc["containerDefinitions"][0]["memory"] = "256"  # a string where an integer belongs
    del doc["family"]  # a required member

    errors = ShapeValidator().validate(doc, ecs_model().operation_model("RegisterTaskDefinition").input_shape)
    text = "\n".join(errors)
    assert "networkMode: 'bridged' is not a valid NetworkMode" in text
    assert "dependsOn[0].condition: 'HEALTHLY' is not a valid ContainerCondition" in text
    assert "containerDefinitions[1].healthcheck: unknown member of ContainerDefinition" in text
    assert "did you mean 'healthCheck'?" in text
    assert "containerDefinitions[0].memory: expected an integer" in text
    assert "missing required member 'family'" in text
    assert len(errors) == 5, text
    # the combined entry point adds botocore's own ParamValidator, which agrees on the unknown
    # member, the type error and the missing member (it has no enum check: that is the walk's)
    combined = validate_request(doc, "RegisterTaskDefinition")
    botocore_lines = [e for e in combined if e.startswith("botocore:")]
    assert any('"healthcheck"' in e for e in botocore_lines), combined
    assert any("containerDefinitions[0].memory" in e for e in botocore_lines), combined
    assert any("family" in e for e in botocore_lines), combined


def test_validator_checks_lengths_maps_and_service_shapes() -> None:
    service = load(ECS_DIR / "service.json")
    service["tags"] = [{"key": f"k{i}", "value": "v"} for i in range(51)]  # Tags max 50
    service["launchType"] = "external"  # enums are case-sensitive
    service["deploymentConfiguration"]["deploymentCircuitBreaker"] = {"enable": "yes"}
    errors = validate_request(service, "CreateService")
    text = "\n".join(errors)
    assert "tags: length 51 is above the maximum 50" in text
    assert "launchType: 'external' is not a valid LaunchType" in text
    assert "deploymentCircuitBreaker.enable: expected a boolean" in text
    assert "missing required member 'rollback'" in text

    doc = _bridge()
    doc["containerDefinitions"][0]["logConfiguration"]["options"] = {"awslogs-group": 7}
    doc["containerDefinitions"][0]["logConfiguration"]["logDriver"] = "cloudwatch"
    errors = validate_request(doc, "RegisterTaskDefinition")
    text = "\n".join(errors)
    assert "options['awslogs-group']: expected a string" in text
    assert "logDriver: 'cloudwatch' is not a valid LogDriver" in text


def test_ecs_anywhere_rules_catch_awsvpc_and_load_balancers() -> None:
    doc = _bridge()
    doc["networkMode"] = "awsvpc"
    client = next(c for c in doc["containerDefinitions"] if c["name"] == "tunnel-client")
    client["environment"].append({"name": "BACKHAUL_TOKEN", "value": "s3cr3t"})
    client["dependsOn"] = []
    errors = "\n".join(external_task_definition_rules(doc))
    assert "networkMode awsvpc is not supported" in errors
    assert "links are only allowed in bridge network mode" in errors
    assert "BACKHAUL_TOKEN must come from secrets" in errors
    assert "must dependsOn the app with condition HEALTHY" in errors

    service = load(ECS_DIR / "service.json")
    service["launchType"] = "EC2"
    service["loadBalancers"] = [
        {
            "targetGroupArn": "arn:aws:elasticloadbalancing:REGION:ACCOUNT_ID:targetgroup/x/y",
            "containerName": "app",
            "containerPort": 80,
        }
    ]
    service["networkConfiguration"] = {"awsvpcConfiguration": {"subnets": ["subnet-1"]}}
    errors = "\n".join(external_service_rules(service))
    assert "launchType must be EXTERNAL" in errors
    assert "loadBalancers" in errors
    assert "networkConfiguration" in errors
    # all of which the API model itself accepts: the ECS Anywhere rules are what catches them
    assert validate_request(service, "CreateService") == []
