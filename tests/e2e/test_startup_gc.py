"""The collector paused while `exit-server run` and `tunnel-client run` start, back on and with
the start-up objects frozen once they serve (shared/runtime/gcpause.py); nothing changes for a
process that only imports the packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import BIN, TOKEN, Certs, retrying_client_args

#: Run in a child: the command's own argv, the package import (which pauses), then the command,
#: while a thread waits for the collector to come back and stops the process with SIGTERM.
_PROBE = """
import gc, json, os, signal, sys, threading, time
sys.argv = json.loads(sys.argv[1])
import {package}
paused = not gc.isenabled()
def watch():
    deadline = time.monotonic() + 60
    while not gc.isenabled() and time.monotonic() < deadline:
        time.sleep(0.01)
    print(json.dumps({{"paused": paused, "enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}}), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
from {package}.__main__ import main
sys.exit(main())
"""


def _probe(package: str, argv: list[str], tmp_path: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    env.update(BACKHAUL_TOKEN=TOKEN, BACKHAUL_RUN_DIR=str(tmp_path / "run"))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(package=package), json.dumps(argv)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    (line,) = [line for line in out.stdout.splitlines() if line.startswith('{"paused"')]  # after its own lines
    result: dict[str, object] = json.loads(line)
    return result


def test_exit_server_run_pauses_the_collector_until_it_serves(tmp_path: Path) -> None:
    argv = [str(BIN / "exit-server"), "run", "--insecure-plaintext", "--log-level", "warning"]
    for flag in ("--public-addr", "--control-addr", "--admin-addr"):
        argv += [flag, "127.0.0.1:0"]
    state = _probe("exit_server", argv, tmp_path)
    assert state["paused"] is True and state["enabled"] is True
    assert isinstance(state["frozen"], int) and state["frozen"] > 10_000  # the imports' objects


def test_tunnel_client_run_pauses_the_collector_until_it_starts(certs: Certs, tmp_path: Path) -> None:
    argv = retrying_client_args(certs, "--admin-addr", "127.0.0.1:0")
    state = _probe("tunnel_client", argv, tmp_path)
    assert state["paused"] is True and state["enabled"] is True
    assert isinstance(state["frozen"], int) and state["frozen"] > 10_000


@pytest.mark.parametrize(
    ("package", "argv"),
    [
        ("exit_server", ["/usr/bin/exit-server", "token", "list"]),  # another subcommand
        ("exit_server", ["/usr/bin/python3", "run"]),  # not the command's script
        ("tunnel_client", ["/usr/bin/pytest"]),
    ],
)
def test_importing_the_package_elsewhere_leaves_the_collector_alone(package: str, argv: list[str]) -> None:
    code = (
        f"import gc, sys; sys.argv = {json.dumps(argv)}; import {package}; print(gc.isenabled(), gc.get_freeze_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "0"]
