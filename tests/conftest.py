"""Every async test runs on both event loops: plain asyncio and uvloop (when installed), except
those marked ``one_loop``: tests of separate processes, whose own loops do not depend on the
test's, run once.

No test may bind a default or fixed port (the defaults may be taken on the machine that runs the
suite): every listen address a test leaves at its default comes from these variables, which the
settings models read, so it is port 0."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import Any

import pytest

for _name in ("PUBLIC_ADDR", "CONTROL_ADDR", "ADMIN_ADDR"):
    os.environ["BACKHAUL_" + _name] = "127.0.0.1:0"


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
