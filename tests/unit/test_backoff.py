"""shared.runtime.backoff: full-jitter reconnect delays (docs/PROTOCOL.md section 10), without sleeping."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.runtime.backoff import backoff_delays


def ceilings(**kwargs: float) -> list[float]:
    """The ceilings the generator draws under, by making rand return its upper bound."""
    delays = backoff_delays(rand=lambda low, high: high, **kwargs)
    return list(itertools.islice(delays, 8))


def test_defaults_double_from_one_second_up_to_thirty() -> None:
    assert ceilings() == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_custom_parameters() -> None:
    assert ceilings(base=0.5, cap=3.0, factor=3.0) == [0.5, 1.5, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]
    assert ceilings(base=2.0, cap=2.0, factor=1.0) == [2.0] * 8


def test_full_jitter_draws_from_zero() -> None:
    calls: list[tuple[float, float]] = []

    def rand(low: float, high: float) -> float:
        calls.append((low, high))
        return low

    delays = backoff_delays(rand=rand)
    assert [next(delays) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert calls == [(0.0, 1.0), (0.0, 2.0), (0.0, 4.0)]


def test_default_source_is_random_uniform() -> None:
    random.seed(1234)
    delays = list(itertools.islice(backoff_delays(), 50))
    assert all(0.0 <= d <= 30.0 for d in delays)
    assert len(set(delays)) == 50  # jittered, not a fixed schedule


def test_restarting_starts_over() -> None:
    first = backoff_delays(rand=lambda low, high: high)
    list(itertools.islice(first, 5))
    assert next(backoff_delays(rand=lambda low, high: high)) == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [{"base": 0.0}, {"base": -1.0}, {"base": 5.0, "cap": 4.0}, {"factor": 0.5}],
)
def test_invalid_parameters_raise_at_the_call(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="0 < base <= cap"):
        backoff_delays(**kwargs)


@given(
    st.floats(0.01, 10.0),
    st.floats(1.0, 100.0),
    st.floats(1.0, 4.0),
    st.integers(1, 40),
)
def test_delays_stay_within_the_ceiling(base: float, cap_factor: float, factor: float, n: int) -> None:
    cap = base * cap_factor
    rng = random.Random(n)
    for attempt, delay in enumerate(itertools.islice(backoff_delays(base, cap, factor, rng.uniform), n)):
        assert 0.0 <= delay <= min(cap, base * factor**attempt) * (1 + 1e-9)
