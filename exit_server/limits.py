"""Per-source rate limit for failed authentication (control endpoint and public access rules).

A token bucket per source address: ``burst`` failures are free, then one more per ``1/rate``
seconds. While the bucket is empty every attempt from that source (even a correct one) is
answered 429 with ``Retry-After``, so guessing cannot go faster than ``rate`` per second per
address. IPv6 sources are grouped by /64 (one host usually owns a whole /64). Memory is bounded:
full buckets are forgotten, and past ``max_sources`` the oldest entries are dropped.

An attempt is charged when it *starts* (:meth:`FailureLimiter.attempt`) and refunded when it
succeeds, so concurrent wrong guesses cannot all pass the check while the first ones are still
being verified (issue 15 item 5: 60 concurrent guesses were all evaluated). :class:`SourceGate`
lets one verification per source run at a time, so one address's flood cannot fill the shared
verification slots and make clients from other addresses wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

__all__ = ["FailureLimiter", "SourceGate", "source_key"]


def source_key(address: str) -> str:
    """The bucket key of a peer address: the IPv4 address, or the IPv6 /64."""
    if ":" not in address:  # IPv4 as the socket reports it (canonical): no parse per request
        return address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class FailureLimiter:
    """Token bucket of authentication failures per source.

    Args:
        burst: failures allowed before limiting starts.
        rate: failures per second allowed after the burst.
        max_sources: how many sources to remember at most.
        clock: monotonic clock (tests pass a fake one).
    """

    def __init__(
        self, burst: int = 10, rate: float = 1.0, max_sources: int = 65536, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.max_sources = max_sources
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, stamp)

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self.burst
        tokens, stamp = entry
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        if tokens >= self.burst:
            del self._buckets[key]
        return tokens

    def retry_after(self, address: str) -> int | None:
        """Seconds to wait when ``address`` is limited now, else None."""
        if not self._buckets:
            return None
        key = source_key(address)
        tokens = self._tokens(key, self.clock())
        if tokens >= 1.0:
            return None
        return max(1, math.ceil((1.0 - tokens) / self.rate))

    def attempt(self, address: str) -> int | None:
        """Charge one attempt from ``address`` now: None when it may go on (call
        :meth:`success` if it succeeds), else the seconds to wait (nothing charged)."""
        key = source_key(address)
        now = self.clock()
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            return max(1, math.ceil((1.0 - tokens) / self.rate))
        self._buckets[key] = (tokens - 1.0, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return None

    def success(self, address: str) -> None:
        """Refund the attempt :meth:`attempt` charged: it succeeded."""
        key = source_key(address)
        entry = self._buckets.get(key)
        if entry is None:
            return
        tokens = min(self.burst, entry[0] + 1.0)
        if tokens >= self.burst:
            del self._buckets[key]
        else:
            self._buckets[key] = (tokens, entry[1])

    def failure(self, address: str) -> None:
        """Record one failed attempt from ``address``."""
        key = source_key(address)
        now = self.clock()
        tokens = self._tokens(key, now)
        self._buckets[key] = (max(tokens - 1.0, -self.burst), now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)


class SourceGate:
    """At most one verification in flight per source (IPv4 address or IPv6 /64); the others
    from that source wait their turn, sources never wait for each other."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, address: str) -> AsyncIterator[None]:
        key = source_key(address)
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
