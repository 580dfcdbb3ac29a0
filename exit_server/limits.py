"""Per-source rate limit for failed authentication (control endpoint and public access rules).

A token bucket per source address: ``burst`` failures are free, then one more per ``1/rate``
seconds. While the bucket is empty every attempt from that source (even a correct one) is
answered 429 with ``Retry-After``, so guessing cannot go faster than ``rate`` per second per
address. IPv6 sources are grouped by /64 (one host usually owns a whole /64). Memory is bounded:
full buckets are forgotten, and past ``max_sources`` the oldest entries are dropped.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["FailureLimiter", "source_key"]


def source_key(address: str) -> str:
    """The bucket key of a peer address: the IPv4 address, or the IPv6 /64."""
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

    def failure(self, address: str) -> None:
        """Record one failed attempt from ``address``."""
        key = source_key(address)
        now = self.clock()
        tokens = self._tokens(key, now)
        self._buckets[key] = (max(tokens - 1.0, -self.burst), now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
