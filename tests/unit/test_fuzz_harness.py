"""The atheris target in fuzz/ stays runnable: hypothesis drives the same ``fuzz_one`` in CI
(atheris itself is not a test dependency; see fuzz/README.md for long runs)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HARNESS = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_session.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_session", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _load()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_fuzz_target_holds_on_generated_inputs(data: bytes) -> None:
    harness.fuzz_one(data)


def test_fuzz_target_reaches_the_stream_state_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random programs get past the frame header checks into streams, data and resets, on
    both roles (the structured frame builder is doing its job)."""
    seen: set[str] = set()
    check = harness._check_events

    def spy(session: object) -> None:
        events = session.events()  # type: ignore[attr-defined]
        seen.update(f"{session.role.value}:{type(e).__name__}" for e in events)  # type: ignore[attr-defined]
        session._events = events  # type: ignore[attr-defined]
        check(session)

    monkeypatch.setattr(harness, "_check_events", spy)
    rng = random.Random(0)
    for _ in range(3000):
        harness.fuzz_one(rng.randbytes(rng.randint(1, 600)))
    assert {
        "client:StreamOpened",
        "client:DataReceived",
        "client:ResetReceived",
        "client:ConnectionFailed",
        "server:ReplyReceived",
        "server:DataReceived",
        "server:ResetReceived",
        "server:WindowUpdated",
        "server:GoAwayReceived",
    } <= seen, sorted(seen)
