"""docs/ECS-ANYWHERE.md: every repository path it names exists, and it covers the whole path
from an external instance to a public URL."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "ECS-ANYWHERE.md"


def test_named_files_exist() -> None:
    text = GUIDE.read_text()
    paths = set(re.findall(r"`((?:deploy|docs|tests)/[\w./*-]+)`", text))
    assert "deploy/cloudformation/exit-server.yaml" in paths
    missing = [p for p in sorted(paths) if not list(ROOT.glob(p))]
    assert not missing, f"the guide names files that do not exist: {missing}"


def test_guide_covers_the_whole_path() -> None:
    text = GUIDE.read_text()
    for needle in (
        "ssm create-activation",
        "ecs-anywhere-install",
        "cloudformation deploy",
        "TunnelTokenSecretArn",
        "register-task-definition",
        "create-service",
        "launchType",
        "bridge network mode",
        "host network mode",
        "FireLens",
        "Rotating the token",
        "Troubleshooting",
        "401",
        "503",
        "Heartbeats",
        "Clock",
        "Proxies",
        "deploy/compose.yaml",
        "PublicTls=exit-server",
        "AcmeDomains",
        "ControlHostname",
        "308 Permanent Redirect",
    ):
        assert needle in text, f"the guide does not mention {needle!r}"
