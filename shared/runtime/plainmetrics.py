"""Counters and histograms kept as plain numbers on the hot path, exported to Prometheus at
scrape time.

prometheus_client's ``Counter.inc`` and ``Histogram.observe`` take a lock and make several
Python calls each (an observability check, the value's ``inc``); at four to six of them per
request they were a visible share of the per-request profile (docs/BENCHMARKS.md). Both
processes are single-threaded event loops, so the numbers need no lock; a custom collector
turns them into metric families when /metrics is read. The exposition (names, labels, bucket
bounds) is the same as prometheus_client's own metrics give.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["DEFAULT_BUCKETS", "PlainHistogram"]

#: prometheus_client's default histogram bounds (without +Inf).
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class PlainHistogram:
    """One histogram series: per-bucket counts and the sum of observed values."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # a bound is inclusive: value <= le
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, +Inf last, as ``HistogramMetricFamily`` takes them."""
        from prometheus_client.utils import floatToGoString  # at scrape time (procmetrics.py)

        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out
