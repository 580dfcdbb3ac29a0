"""`make dist` builds a wheel that works on its own: installed into a fresh virtualenv (no
source tree), both commands answer --version, `exit-server gen-certs` writes certificates, the
demo flow answers through the tunnel, and the LICENSE travels inside the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from shared.runtime.version import version

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("backhaul-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
    assert {"shared/py.typed", "exit_server/py.typed", "tunnel_client/py.typed"} <= set(names)
    assert not any(name.startswith("tests/") for name in names)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    subprocess.run([str(bin_dir / "pip"), "install", "-q", str(wheel)], check=True, capture_output=True, timeout=300)
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKHAUL_", "PYTHON"))}
    run_dir = tmp_path / "elsewhere"  # not the source tree: imports must come from the wheel
    run_dir.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, timeout=120, cwd=run_dir, env=clean_env
        )

    for prog in ("exit-server", "tunnel-client"):
        out = run(prog, "--version")
        assert out.returncode == 0 and out.stdout.strip() == f"{prog} {version()}", out.stdout + out.stderr
    out = run("exit-server", "gen-certs", "--out", str(tmp_path / "certs"), "--hostname", "localhost")
    assert out.returncode == 0, out.stderr
    assert {p.name for p in (tmp_path / "certs").iterdir()} >= {"ca.pem", "server.pem", "server-key.pem"}
    demo = subprocess.run(
        [str(bin_dir / "python"), str(ROOT / "scripts" / "demo.py"), "--once"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=run_dir,
        env=clean_env,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "Answer (200): Hello from the on-prem container!" in demo.stdout
