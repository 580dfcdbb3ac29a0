"""shared.runtime.runner.tune_malloc: glibc's thresholds fixed, unless the environment sets them."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from shared.runtime.runner import tune_malloc

SNIPPET = "from shared.runtime.runner import tune_malloc; print(tune_malloc())"
ROOT = Path(__file__).resolve().parents[2]


def run(env_extra: dict[str, str]) -> str:
    env = {"PATH": "/usr/bin:/bin", **env_extra}
    return subprocess.run(
        [sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_thresholds_are_set_on_glibc() -> None:
    assert run({}) == "malloc mmap threshold 256 KiB, trim threshold 16 MiB"


@pytest.mark.parametrize("name", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"])
def test_the_environment_wins(name: str) -> None:
    assert (
        run({name: "1048576" if name != "GLIBC_TUNABLES" else "glibc.malloc.trim_threshold=1048576"})
        == "malloc tunables from the environment"
    )


def test_in_process_call_reports_what_it_did() -> None:
    assert tune_malloc().startswith("malloc")
