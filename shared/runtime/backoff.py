"""Reconnect delays: exponential backoff with full jitter (docs/PROTOCOL.md section 10)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

__all__ = ["backoff_delays"]


def backoff_delays(
    base: float = 1.0,
    cap: float = 30.0,
    factor: float = 2.0,
    rand: Callable[[float, float], float] = random.uniform,
) -> Iterator[float]:
    """Yield reconnect delays forever: ``uniform(0, min(cap, base * factor**attempt))``.

    Full jitter spreads a crowd of clients that lost the same server, so they do not all
    come back in the same instant. Restart the generator after a successful session.

    Args:
        base: the ceiling of the first delay, in seconds.
        cap: the largest ceiling.
        factor: growth of the ceiling per attempt.
        rand: the random source (tests pass a deterministic one).

    Raises:
        ValueError: at the call, not at the first ``next()``: ``base <= 0``, ``cap < base``
            or ``factor < 1``.
    """
    if base <= 0 or cap < base or factor < 1:
        raise ValueError("need 0 < base <= cap and factor >= 1")
    return _delays(base, cap, factor, rand)


def _delays(base: float, cap: float, factor: float, rand: Callable[[float, float], float]) -> Iterator[float]:
    ceiling = base
    while True:
        yield rand(0.0, ceiling)
        ceiling = min(cap, ceiling * factor)
