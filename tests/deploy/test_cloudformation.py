"""deploy/cloudformation/*.yaml are cfn-lint clean (errors, warnings and informational checks,
in several regions), and the exit server template has the shape the docs promise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

cfnlint_api = pytest.importorskip("cfnlint.api", reason="cfn-lint is not installed (test extra: cfn-lint)")
from cfnlint.config import ManualArgs  # noqa: E402
from cfnlint.decode.decode import decode_str  # noqa: E402

CFN_DIR = Path(__file__).resolve().parents[2] / "deploy" / "cloudformation"
TEMPLATES = sorted(CFN_DIR.glob("*.yaml"))
EXIT_SERVER = CFN_DIR / "exit-server.yaml"
REGIONS = ["us-east-1", "eu-west-1", "ap-southeast-2"]


def lint(text: str) -> list[Any]:
    return list(cfnlint_api.lint(text, config=ManualArgs(regions=REGIONS, include_checks=["I"])))


def describe(matches: list[Any]) -> str:
    return "\n".join(f"{m.rule.id} line {m.linenumber}: {m.message}" for m in matches)


def parse(path: Path) -> dict[str, Any]:
    template, errors = decode_str(path.read_text())
    assert not errors and template is not None, describe(errors or [])
    return dict(template)


def test_templates_exist() -> None:
    assert EXIT_SERVER in TEMPLATES


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_cfn_lint_clean(path: Path) -> None:
    matches = lint(path.read_text())
    assert not matches, f"cfn-lint findings in {path.name}:\n{describe(matches)}"


def test_cfn_lint_is_really_checking() -> None:
    original = EXIT_SERVER.read_text()
    broken = original.replace("Protocol: TCP\n      DefaultActions", "Protocol: TCPX\n      DefaultActions")
    broken = broken.replace("LaunchType: FARGATE", "LaunchType: EXTERNAL_ISH")
    assert broken.count("TCPX") == 1 and "EXTERNAL_ISH" in broken
    text = describe(lint(broken))
    assert "TCPX" in text and "EXTERNAL_ISH" in text, text


def _resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def test_exit_server_shape() -> None:
    t = parse(EXIT_SERVER)
    params = t["Parameters"]
    assert {
        "VpcId",
        "LoadBalancerSubnetIds",
        "TaskSubnetIds",
        "Image",
        "TlsCertificateSecretArn",
        "TlsKeySecretArn",
    } <= set(params)

    (nlb,) = _resources(t, "AWS::ElasticLoadBalancingV2::LoadBalancer").values()
    assert nlb["Properties"]["Type"] == "network"
    listeners = _resources(t, "AWS::ElasticLoadBalancingV2::Listener")
    control = [lst for lst in listeners.values() if lst["Properties"]["Port"] == 8443]
    assert len(control) == 1 and control[0]["Properties"]["Protocol"] == "TCP", "control must be TCP pass-through"
    assert len(listeners) == 2

    for name, tg in _resources(t, "AWS::ElasticLoadBalancingV2::TargetGroup").items():
        props = tg["Properties"]
        assert props["TargetType"] == "ip", name
        assert (props["HealthCheckPort"], props["HealthCheckPath"]) == ("8690", "/readyz"), name

    (taskdef,) = _resources(t, "AWS::ECS::TaskDefinition").values()
    props = taskdef["Properties"]
    assert props["RequiresCompatibilities"] == ["FARGATE"] and props["NetworkMode"] == "awsvpc"
    assert "ExecutionRoleArn" in props and "TaskRoleArn" in props
    (container,) = props["ContainerDefinitions"]
    secrets = {s["Name"]: s["ValueFrom"] for s in container["Secrets"]}
    token_secrets = _resources(t, "AWS::SecretsManager::Secret")
    assert secrets["BACKHAUL_TOKEN"] == {"Ref": next(iter(token_secrets))}
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["BACKHAUL_CONTROL_ADDR"].endswith(":8443") and env["BACKHAUL_ADMIN_ADDR"] == "0.0.0.0:8690"
    assert "BACKHAUL_TOKEN" not in env and "--token " not in " ".join(container["Command"])
    assert container["StopTimeout"] > int(env["BACKHAUL_DRAIN_TIMEOUT"])
    (log_group,) = _resources(t, "AWS::Logs::LogGroup")
    assert container["LogConfiguration"]["Options"]["awslogs-group"] == {"Ref": log_group}
    ports = {p["ContainerPort"] for p in container["PortMappings"]}
    assert ports == {8080, 8443, 8690}

    (service,) = _resources(t, "AWS::ECS::Service").values()
    sprops = service["Properties"]
    assert sprops["LaunchType"] == "FARGATE" and sprops["DesiredCount"] == 1
    assert {lb["ContainerPort"] for lb in sprops["LoadBalancers"]} == {8080, 8443}
