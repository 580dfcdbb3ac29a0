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
    broken = original.replace("Port: 8443\n      Protocol: TCP\n", "Port: 8443\n      Protocol: TCPX\n")
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
    assert len(listeners) == 3
    (tls,) = [lst for lst in listeners.values() if lst.get("Condition") == "ExitServerTls"]
    assert (tls["Properties"]["Port"], tls["Properties"]["Protocol"]) == (443, "TCP"), "exit-server TLS: pass-through"

    for name, tg in _resources(t, "AWS::ElasticLoadBalancingV2::TargetGroup").items():
        props = tg["Properties"]
        assert props["TargetType"] == "ip", name
        assert (props["HealthCheckPort"], props["HealthCheckPath"]) == ("8690", "/readyz"), name

    (taskdef,) = _resources(t, "AWS::ECS::TaskDefinition").values()
    props = taskdef["Properties"]
    assert props["RequiresCompatibilities"] == ["FARGATE"] and props["NetworkMode"] == "awsvpc"
    assert "ExecutionRoleArn" in props and "TaskRoleArn" in props
    (container,) = props["ContainerDefinitions"]
    secrets = {s["Name"]: s["ValueFrom"] for s in container["Secrets"] if "Name" in s}
    # the shared token, unless TokensSecretArn gives a tokens file (per-client tokens, aws_roles)
    (choice,) = [s["Fn::If"] for s in container["Secrets"] if "Fn::If" in s and s["Fn::If"][0] == "HasTokensFile"]
    assert choice[1] == {"Name": "TOKENS_TOML", "ValueFrom": {"Ref": "TokensSecretArn"}}
    assert choice[2] == {"Name": "BACKHAUL_TOKEN", "ValueFrom": {"Ref": "TunnelTokenSecret"}}
    assert set(secrets) == {"TLS_CERT_PEM", "TLS_KEY_PEM"}
    env = {e["Name"]: e["Value"] for e in container["Environment"] if "Name" in e}
    assert env["BACKHAUL_CONTROL_ADDR"].endswith(":8443") and env["BACKHAUL_ADMIN_ADDR"] == "0.0.0.0:8690"
    assert "BACKHAUL_TOKEN" not in env and "--token " not in " ".join(container["Command"])
    assert container["StopTimeout"] > int(env["BACKHAUL_DRAIN_TIMEOUT"])
    (log_group,) = _resources(t, "AWS::Logs::LogGroup")
    assert container["LogConfiguration"]["Options"]["awslogs-group"] == {"Ref": log_group}
    ports = {p["ContainerPort"] for p in container["PortMappings"] if "ContainerPort" in p}
    assert ports == {8080, 8443, 8690}

    (service,) = _resources(t, "AWS::ECS::Service").values()
    sprops = service["Properties"]
    assert sprops["LaunchType"] == "FARGATE" and sprops["DesiredCount"] == {"Ref": "ExitServers"}
    assert {lb["ContainerPort"] for lb in sprops["LoadBalancers"] if "ContainerPort" in lb} == {8080, 8443}


def _if(value: Any, condition: str) -> Any:
    """The true branch of ``{"Fn::If": [condition, then, else]}``."""
    assert isinstance(value, dict) and value["Fn::If"][0] == condition, value
    return value["Fn::If"][1]


def test_exit_server_tls_mode() -> None:
    """PublicTls=exit-server: 80 and 443 passed through to the container, ACME state on a
    retained, encrypted EFS volume mounted where BACKHAUL_ACME_DIR points, private to the
    image's user, reachable only from the task; the NLB-TLS mode stays available."""
    t = parse(EXIT_SERVER)
    assert t["Parameters"]["PublicTls"]["AllowedValues"] == ["none", "load-balancer", "exit-server"]
    assert {"LoadBalancerTlsNeedsACertificate", "ExitServerTlsNeedsNames"} <= set(t["Rules"])
    tgs = _resources(t, "AWS::ElasticLoadBalancingV2::TargetGroup")
    assert tgs["PublicTlsTargetGroup"]["Properties"]["Port"] == 8444
    (taskdef,) = _resources(t, "AWS::ECS::TaskDefinition").values()
    props = taskdef["Properties"]
    (container,) = props["ContainerDefinitions"]
    env = {}
    for item in container["Environment"]:
        if "Fn::If" in item:
            item = item["Fn::If"][1]
        env[item["Name"]] = item["Value"]
    assert env["BACKHAUL_PUBLIC_TLS_ADDR"] == "0.0.0.0:8444" and env["BACKHAUL_REDIRECT_HTTP"] == "true"
    assert env["BACKHAUL_ACME_DOMAIN"] == {"Ref": "AcmeDomains"}
    (volume,) = _if(props["Volumes"], "ExitServerTls")
    (mount,) = _if(container["MountPoints"], "ExitServerTls")
    assert mount["SourceVolume"] == volume["Name"] and mount["ContainerPath"] == env["BACKHAUL_ACME_DIR"]
    efs = volume["EFSVolumeConfiguration"]
    assert efs["TransitEncryption"] == "ENABLED" and efs["AuthorizationConfig"]["IAM"] == "ENABLED"
    fs = t["Resources"]["CertFileSystem"]
    assert fs["DeletionPolicy"] == "Retain" and fs["Properties"]["Encrypted"] is True
    ap = t["Resources"]["CertAccessPoint"]["Properties"]
    dockerfile = (EXIT_SERVER.parents[1] / "docker" / "Dockerfile").read_text()
    assert f"USER {ap['PosixUser']['Uid']}:{ap['PosixUser']['Gid']}" in dockerfile
    assert ap["RootDirectory"]["CreationInfo"]["Permissions"] == "0700"
    nfs = t["Resources"]["CertFileSystemSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert nfs == [
        {
            "Description": "NFS from the exit server task",
            "IpProtocol": "tcp",
            "FromPort": 2049,
            "ToPort": 2049,
            "SourceSecurityGroupId": {"Ref": "TaskSecurityGroup"},
        }
    ]
    mounts = _resources(t, "AWS::EFS::MountTarget")
    assert len(mounts) == 2
    (service,) = _resources(t, "AWS::ECS::Service").values()
    subnets = _if(service["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]["Subnets"], "ExitServerTls")
    assert sorted(str(m["Properties"]["SubnetId"]) for m in mounts.values()) == sorted(str(x) for x in subnets)


def test_exit_server_fleet() -> None:
    """ExitServers tasks (default 2) sharing an ElastiCache made here (TLS, AUTH from Secrets
    Manager, Multi-AZ, kept as a snapshot) or StateEndpoint; each task relays to its peers on
    8080 from its own security group; one task without StateEndpoint runs with no Redis."""
    t = parse(EXIT_SERVER)
    params = t["Parameters"]
    assert params["ExitServers"]["Default"] == 2 and params["ExitServers"]["MinValue"] == 1
    assert {"FleetKeepsClientsInTheStore", "StatePasswordOnlyWithAnEndpoint"} <= set(t["Rules"])
    conditions = t["Conditions"]
    assert conditions["MakeStateStore"] == {
        "Fn::And": [{"Condition": "Fleet"}, {"Fn::Equals": [{"Ref": "StateEndpoint"}, ""]}]
    }
    store = t["Resources"]["StateStore"]
    props = store["Properties"]
    assert store["Condition"] == "MakeStateStore" and store["DeletionPolicy"] == "Snapshot"
    assert props["TransitEncryptionEnabled"] is True and props["AtRestEncryptionEnabled"] is True
    assert props["AutomaticFailoverEnabled"] is True and props["NumCacheClusters"] == 2
    assert "StatePasswordSecret" in props["AuthToken"]["Fn::Sub"]
    ingress = t["Resources"]["TaskPeerIngress"]["Properties"]
    assert (ingress["FromPort"], ingress["SourceSecurityGroupId"]) == (8080, {"Ref": "TaskSecurityGroup"})
    (taskdef,) = _resources(t, "AWS::ECS::TaskDefinition").values()
    (container,) = taskdef["Properties"]["ContainerDefinitions"]
    (state,) = [_if(e, "Fleet") for e in container["Environment"] if "Fn::If" in e and e["Fn::If"][0] == "Fleet"]
    assert state["Name"] == "BACKHAUL_STATE"
    assert state["Value"]["Fn::If"][1]["Fn::Sub"].startswith("rediss://")  # TLS to the store made here
    (password,) = [
        _if(s, "MakeStateStore") for s in container["Secrets"] if "Fn::If" in s and s["Fn::If"][0] == "MakeStateStore"
    ]
    assert password == {"Name": "BACKHAUL_STATE_PASSWORD", "ValueFrom": {"Ref": "StatePasswordSecret"}}
    script = container["Command"][-1]
    assert "ECS_CONTAINER_METADATA_URI_V4" in script and 'BACKHAUL_PEER_URL="http://$ip:8080"' in script


def test_the_fleet_start_script_takes_its_peer_url_from_the_task_metadata(tmp_path: Path) -> None:
    """The container's start script, run by sh against a task metadata endpoint served here
    (the v4 container response shape: Networks[0].IPv4Addresses), with `exit-server` replaced
    by a stub that prints what it was given."""
    import http.server
    import json
    import subprocess
    import sys
    import threading

    t = parse(EXIT_SERVER)
    (taskdef,) = _resources(t, "AWS::ECS::TaskDefinition").values()
    (container,) = taskdef["Properties"]["ContainerDefinitions"]
    stub = tmp_path / "exit-server"
    stub.write_text('#!/bin/sh\necho "args: $*"\necho "peer: $BACKHAUL_PEER_URL"\n')
    stub.chmod(0o755)

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"Networks": [{"NetworkMode": "awsvpc", "IPv4Addresses": ["10.0.1.23"]}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {  # `python` is the image's interpreter: here the test's
            "PATH": f"{tmp_path}:{Path(sys.executable).parent}:/usr/bin:/bin",
            "TLS_CERT_PEM": "cert",
            "TLS_KEY_PEM": "key",
            "BACKHAUL_STATE": "rediss://store.example:6379/0",
            "ECS_CONTAINER_METADATA_URI_V4": f"http://127.0.0.1:{server.server_port}/v4/abc",
        }
        out = subprocess.run(["sh", *container["Command"][1:]], env=env, capture_output=True, text=True, timeout=30)
        del env["BACKHAUL_STATE"]  # a single exit server: no peer URL, no metadata call
        single = subprocess.run(["sh", *container["Command"][1:]], env=env, capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 0, out.stderr
    assert "peer: http://10.0.1.23:8080" in out.stdout and "args: run --tls-cert" in out.stdout
    assert single.returncode == 0 and "peer: \n" in single.stdout, single.stdout + single.stderr
