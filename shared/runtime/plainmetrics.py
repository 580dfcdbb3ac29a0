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
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from prometheus_client.core import Metric

__all__ = ["DEFAULT_BUCKETS", "PlainFamily", "PlainHistogram", "PlainSeries", "StreamTally"]

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


class StreamTally:
    """Served streams counted by kind and outcome, and their durations by kind (the client's
    ``backhaul_client_streams`` and ``backhaul_client_stream_duration_seconds``). Here, in a
    compiled module, so that the per-stream count runs no interpreted code."""

    __slots__ = ("streams", "durations")

    def __init__(self) -> None:
        self.streams: dict[tuple[str, str], int] = {}
        self.durations: dict[str, PlainHistogram] = {}

    def done(self, kind: str, outcome: str, seconds: float) -> None:
        """Count one served stream (labels are bounded: stream kinds x outcomes)."""
        key = (kind, outcome)
        self.streams[key] = self.streams.get(key, 0) + 1
        hist = self.durations.get(kind)
        if hist is None:
            hist = self.durations[kind] = PlainHistogram()
        hist.observe(seconds)


class PlainSeries:
    """One counter or gauge series: a plain number (``inc`` and ``set`` as prometheus_client's)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value


class PlainFamily:
    """A counter or gauge kept as plain numbers, named as prometheus_client's ``Counter`` or
    ``Gauge`` would be: without label names one series (0 until changed), with them a series
    per label values made by the first ``labels()`` (so /metrics shows no zero series nobody
    used). :meth:`collect` makes its metric family at scrape time; prometheus_client is only
    imported then."""

    __slots__ = ("kind", "name", "documentation", "labelnames", "series")

    def __init__(
        self, kind: Literal["counter", "gauge"], name: str, documentation: str, labelnames: Sequence[str] = ()
    ) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.series: dict[tuple[str, ...], PlainSeries] = {} if self.labelnames else {(): PlainSeries()}

    def labels(self, *values: str) -> PlainSeries:
        """The series for these label values (made on first use).

        Raises:
            ValueError: not one value per label name.
        """
        if len(values) != len(self.labelnames) or not values:
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, got {len(values)}")
        found = self.series.get(values)
        if found is None:
            found = self.series[values] = PlainSeries()
        return found

    def _only(self) -> PlainSeries:
        if self.labelnames:
            raise ValueError(f"{self.name}: has labels {self.labelnames}: use labels()")
        return self.series[()]

    def inc(self, amount: float = 1.0) -> None:
        self._only().value += amount

    def set(self, value: float) -> None:
        self._only().value = value

    @property
    def value(self) -> float:
        """The value of a family without labels."""
        return self._only().value

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        kind = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = kind(self.name, self.documentation, labels=list(self.labelnames))
        for values, series in self.series.items():  # first use first, as prometheus_client
            family.add_metric(list(values), series.value)
        yield family
