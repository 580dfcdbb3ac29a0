"""Every async test runs on both event loops: plain asyncio and uvloop (when installed), except
those marked ``one_loop``: tests of separate processes, whose own loops do not depend on the
test's, run once.

No test may bind a default or fixed port (the defaults may be taken on the machine that runs the
suite): every listen address a test leaves at its default comes from these variables, which the
settings models read, so it is port 0.

The run tests one build, named in the report header: the pure-Python one (the checkout itself)
or, with ``BACKHAUL_EXPECT_COMPILED=1`` from a tree ``scripts/compiled.py`` made, the compiled
one (README, "Compiled build"), every module of setup.py's ``COMPILED`` an extension there. An
extension module in a pure run is refused: left beside a source file, it would shadow the edits
made since it was built."""

from __future__ import annotations

import asyncio
import importlib
import os
import runpy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

for _name in ("PUBLIC_ADDR", "CONTROL_ADDR", "ADMIN_ADDR"):
    os.environ["BACKHAUL_" + _name] = "127.0.0.1:0"

ROOT = Path(__file__).resolve().parent.parent
_BUILD = pytest.StashKey[str]()


def _build() -> str:
    """The build under test, checked: "pure Python" or "compiled (N modules)"."""
    names: tuple[str, ...] = runpy.run_path(str(ROOT / "setup.py"), run_name="backhaul_setup")["COMPILED"]
    files = {name: str(importlib.import_module(name.removesuffix(".py").replace("/", ".")).__file__) for name in names}
    compiled = sorted(name for name, file in files.items() if not file.endswith(".py"))
    if os.environ.get("BACKHAUL_EXPECT_COMPILED") == "1":
        pure = sorted(set(names) - set(compiled))
        if pure:
            raise pytest.UsageError(f"BACKHAUL_EXPECT_COMPILED=1, but these run as Python: {', '.join(pure)}")
        return f"compiled ({len(compiled)} modules, mypyc)"
    if compiled:
        raise pytest.UsageError(
            f"extension modules beside the sources ({files[compiled[0]]}, ...): they shadow the .py"
            " files; remove them, or test a scripts/compiled.py tree with BACKHAUL_EXPECT_COMPILED=1"
        )
    return "pure Python"


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_BUILD] = _build()


def pytest_report_header(config: pytest.Config) -> str:
    return f"backhaul build: {config.stash[_BUILD]}"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Callable[[], Any]]:
    factories: dict[str, Callable[[], Any]] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        return factories
    if item.get_closest_marker("one_loop") is not None:
        return {"uvloop": uvloop.new_event_loop}
    factories["uvloop"] = uvloop.new_event_loop
    return factories
