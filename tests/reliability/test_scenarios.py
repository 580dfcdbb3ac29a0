"""The reliability scenarios in their short (CI) lengths, against real processes: a client
killed mid-stream, a silent link loss, the exit server killed and restarted with 20 clients,
upstream faults, a degraded link, overload, and a soak with reconnect churn.

The scenarios live in reliability/ (``make reliability`` runs the full lengths and writes
docs/RELIABILITY.md); each test prints what it measured.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "reliability"))

import rel_scenarios  # noqa: E402


@pytest.mark.parametrize("key", list(rel_scenarios.SCENARIOS))
def test_scenario_short(key: str) -> None:
    result = asyncio.run(rel_scenarios.SCENARIOS[key](True))
    print(result.summary())
    assert result.passed, result.summary()
