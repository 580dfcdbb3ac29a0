"""deploy/systemd units: a structural check of the sandboxing that always runs, and
``systemd-analyze verify`` / ``security --offline`` where systemd-analyze can run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from exit_server.config import ServerConfig
from tunnel_client.config import ClientConfig

UNIT_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNITS = {
    "backhaul-exit-server.service": ("exit-server", ServerConfig),
    "backhaul-tunnel-client.service": ("tunnel-client", ClientConfig),
}

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """systemd's unit syntax: [Section], Key=Value, repeatable keys, # and ; comments, and
    backslash continuation lines. An empty assignment (``Key=``) is kept as ``""``."""
    unit: Unit = defaultdict(lambda: defaultdict(list))
    section = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if pending:
            line = pending + " " + line
            pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit[section]  # noqa: B018 - create the section
            continue
        assert section is not None, f"assignment outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=Value line: {raw!r}"
        unit[section][key.strip()].append(value.strip())
    return unit


def load(name: str) -> Unit:
    return parse_unit((UNIT_DIR / name).read_text())


def last(unit: Unit, key: str, section: str = "Service") -> str:
    values = unit[section].get(key)
    assert values, f"{key}= missing from [{section}]"
    return values[-1]


def seconds(value: str) -> float:
    total = 0.0
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    for number, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[suffix]
    return total


def test_both_units_exist() -> None:
    assert sorted(p.name for p in UNIT_DIR.glob("*.service")) == sorted(UNITS)


def test_parser_handles_repeats_empties_and_continuations() -> None:
    unit = parse_unit("[Service]\n# c\nA=1\nA=2\nB=\nC=x \\\n  y\n")
    assert unit["Service"]["A"] == ["1", "2"]
    assert unit["Service"]["B"] == [""]
    assert unit["Service"]["C"] == ["x y"]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_sandboxing(name: str) -> None:
    unit = load(name)
    expected = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "Restart": "always",
        "KillSignal": "SIGTERM",
    }
    for key, value in expected.items():
        assert last(unit, key) == value, f"{name}: {key}={value} expected"
    families = last(unit, "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"], name
    filters = " ".join(unit["Service"].get("SystemCallFilter", []))
    assert "@system-service" in filters.split(), name
    assert set(unit["Unit"].get("After", [""])[0].split()) >= {"network-online.target"}
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_secrets_and_command_line(name: str) -> None:
    program, _ = UNITS[name]
    unit = load(name)
    credentials = unit["Service"].get("LoadCredential", [])
    env_files = unit["Service"].get("EnvironmentFile", [])
    assert credentials or env_files, f"{name}: secrets need LoadCredential= or EnvironmentFile="
    for env_file in env_files:
        assert re.fullmatch(r"-?/etc/backhaul/[\w.-]+\.env", env_file), env_file
    for credential in credentials:
        cred_name, _, source = credential.partition(":")
        assert cred_name and source.startswith("/etc/backhaul/"), credential
    (exec_start,) = unit["Service"]["ExecStart"]
    argv = exec_start.split()
    assert argv[0] == f"/opt/backhaul/bin/{program}" and argv[1] == "run", exec_start
    assert "--token" not in argv and not any(a.startswith("--token=") for a in argv), "token never on argv"
    if "token" in {c.partition(":")[0] for c in credentials}:
        assert "${CREDENTIALS_DIRECTORY}/token" in argv[argv.index("--token-file") + 1]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_stop_timeout_exceeds_drain_timeout(name: str) -> None:
    _, config = UNITS[name]
    drain = float(config.model_fields["drain_timeout"].default)
    assert seconds(last(load(name), "TimeoutStopSec")) > drain


# --- systemd-analyze ------------------------------------------------------------------------------


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); structural checks still ran")
    return exe


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, encoding="utf-8", errors="replace", timeout=60, check=False)


def _staged_units(tmp_path: Path) -> list[Path]:
    """Copies whose ExecStart points at this checkout's entry points: verify insists that the
    binary exists, and /opt/backhaul is where the units expect a production install."""
    bindir = Path(sys.executable).parent
    staged = []
    for name, (program, _) in UNITS.items():
        target = bindir / program
        if not target.exists():
            found = shutil.which(program)
            target = Path(found) if found else Path("/bin/true")
        text = (UNIT_DIR / name).read_text().replace(f"/opt/backhaul/bin/{program}", str(target))
        path = tmp_path / name
        path.write_text(text)
        staged.append(path)
    return staged


def _unusable(result: subprocess.CompletedProcess[str], staged: list[Path]) -> str | None:
    """The reason systemd-analyze cannot work here, when its complaint is about the machine
    (no manager, no /run/systemd, seccomp unsupported) and names none of our units."""
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and output and not any(p.name in output for p in staged):
        return output.splitlines()[0]
    return None


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = _analyze()
    staged = _staged_units(tmp_path)
    result = _run(exe, "verify", "--man=no", *map(str, staged))
    reason = _unusable(result, staged)
    if reason:
        pytest.skip(f"systemd-analyze verify cannot run in this container: {reason}")
    # verify exits 0 even for unknown keys and unparsable values: any output is a finding.
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output


def test_systemd_analyze_verify_reports_mistakes(tmp_path: Path) -> None:
    exe = _analyze()
    staged = _staged_units(tmp_path)
    bad = staged[0]
    bad.write_text(bad.read_text().replace("ProtectSystem=strict", "ProtectSystem=strickt\nSandboxing=yes"))
    result = _run(exe, "verify", "--man=no", str(bad))
    reason = _unusable(result, [bad])
    if reason:
        pytest.skip(f"systemd-analyze verify cannot run in this container: {reason}")
    output = result.stdout + result.stderr
    assert "strickt" in output and "Sandboxing" in output, output


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_analyze_security_exposure(name: str, tmp_path: Path) -> None:
    exe = _analyze()
    (path,) = [p for p in _staged_units(tmp_path) if p.name == name]
    result = _run(exe, "security", "--offline=yes", "--no-pager", str(path))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline is unavailable here: {result.stderr.strip()[:200]}")
    assert float(match.group(1)) <= 2.5, result.stdout
