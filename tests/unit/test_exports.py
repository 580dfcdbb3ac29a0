"""Every shared module declares ``__all__``, and every name in it exists (the idea of
websockets' own export test)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODULES = sorted(
    ".".join(path.relative_to(SHARED.parent).with_suffix("").parts)
    for path in SHARED.rglob("*.py")
    if path.name != "__init__.py"
)


def test_modules_found() -> None:
    assert {"shared.errors", "shared.frames", "shared.mux", "shared.aio.connection"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_all_is_declared_and_complete(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{name} has no __all__"
    assert len(exported) == len(set(exported)), f"{name}.__all__ has duplicates"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"
    # Every public class and function defined here is exported.
    defined = [
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == name
    ]
    assert set(defined) <= set(exported), f"{name} does not export {sorted(set(defined) - set(exported))}"


def test_aio_package_is_only_a_marker() -> None:
    package = importlib.import_module("shared.aio")
    public = [n for n, obj in vars(package).items() if not n.startswith("_") and not inspect.ismodule(obj)]
    assert public == []
