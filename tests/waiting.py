"""Waiting for a condition with a deadline: the one way tests synchronise (no sleeps that
guess how long something takes). A condition that does not hold by the deadline fails the test
with what was awaited."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["wait_until", "wait_until_sync"]

T = TypeVar("T")


async def wait_until(
    predicate: Callable[[], T | Awaitable[T]], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``predicate`` (a plain or async callable) until it returns a true value; return it.

    Raises:
        AssertionError: not true within ``timeout`` seconds (the message says ``what``).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or _name(predicate)}")
        await asyncio.sleep(interval)


def wait_until_sync(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """:func:`wait_until` for synchronous tests (subprocesses, files).

    Raises:
        AssertionError: not true within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or _name(predicate)}")
        time.sleep(interval)
    return value


def _name(predicate: Callable[..., object]) -> str:
    return getattr(predicate, "__qualname__", repr(predicate))
