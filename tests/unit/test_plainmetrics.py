"""shared/runtime/plainmetrics.py: plain-number histograms give the same exposition as
prometheus_client's own Histogram, and the exit server's and the client's collectors expose
the series their prometheus_client metrics used to (names, labels, values)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from exit_server.observe import Exchange, Metrics
from exit_server.routes import Registry
from shared.runtime.plainmetrics import DEFAULT_BUCKETS, PlainFamily, PlainHistogram

BOUNDS = (0.001, 0.01, 0.1, 1.0, 10.0)


def _exposition(registry: CollectorRegistry) -> str:
    # prometheus_client adds *_created series of its own; they carry a timestamp, not a value
    return "\n".join(line for line in generate_latest(registry).decode().splitlines() if "_created" not in line)


class _One(Collector):
    def __init__(self, hist: PlainHistogram) -> None:
        self.hist = hist

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily("h_seconds", "doc", labels=["k"])
        family.add_metric(["v"], self.hist.buckets(), self.hist.total)
        yield family


@given(st.lists(st.one_of(st.sampled_from(BOUNDS), st.floats(0, 20, allow_nan=False)), max_size=50))
def test_same_exposition_as_prometheus_client(values: list[float]) -> None:
    theirs = CollectorRegistry()
    reference = Histogram("h_seconds", "doc", ["k"], buckets=BOUNDS, registry=theirs).labels("v")
    ours = PlainHistogram(BOUNDS)
    mine = CollectorRegistry()
    mine.register(_One(ours))
    for value in values:
        reference.observe(value)
        ours.observe(value)
    assert _exposition(mine) == _exposition(theirs)
    assert ours.count == len(values)


def test_default_bounds_are_prometheus_client_defaults() -> None:
    assert (*DEFAULT_BUCKETS, float("inf")) == Histogram.DEFAULT_BUCKETS


def test_exit_server_series() -> None:
    metrics = Metrics(Registry())
    for status, head, out in ((200, 0.002, 100), (200, 0.3, 0), (503, None, 0)):
        ex = Exchange("id", "GET", "a.example", "/", "127.0.0.1", route="a.example" if status == 200 else "unrouted")
        ex.status, ex.head_seconds, ex.bytes_out = status, head, out
        if status == 503:
            ex.rejected = "no_tunnel"
        metrics.finish(ex)
    text = generate_latest(metrics.registry).decode()
    assert 'backhaul_http_requests_total{code="2xx",host="a.example"} 2.0' in text
    assert 'backhaul_http_requests_total{code="5xx",host="unrouted"} 1.0' in text
    assert 'backhaul_http_response_head_seconds_bucket{host="a.example",le="0.0025"} 1.0' in text
    assert 'backhaul_http_response_head_seconds_count{host="a.example"} 2.0' in text
    assert 'backhaul_http_request_duration_seconds_count{host="unrouted"} 1.0' in text
    assert 'backhaul_http_bytes_total{direction="out",host="a.example"} 100.0' in text
    assert 'direction="in"' not in text  # no series before first use
    assert 'backhaul_rejected_requests_total{reason="no_tunnel"} 1.0' in text
    assert re.search(r'backhaul_http_request_duration_seconds_sum\{host="a.example"\} [0-9.e-]+', text)


def test_log_throttle_one_line_per_key_per_period_and_counts_the_rest() -> None:
    from exit_server.observe import LogThrottle

    throttle = LogThrottle(period=10, max_keys=3)
    assert throttle.allow("t1", 0.0) == 0
    assert [throttle.allow("t1", t) for t in (1.0, 2.0, 9.9)] == [None, None, None]
    assert throttle.allow("t2", 5.0) == 0  # keys are independent
    assert throttle.allow("t1", 10.0) == 3  # the next line says how many were held back
    assert throttle.allow("t1", 12.0) is None
    throttle.allow("t3", 13.0)
    throttle.allow("t4", 25.0)  # over max_keys: lapsed keys are forgotten
    assert len(throttle._next) <= 3


class _Families(Collector):
    def __init__(self, *families: PlainFamily) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield from family.collect()


@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 5)), max_size=20),
    st.lists(st.floats(-5, 5, allow_nan=False), max_size=5),
)
def test_counter_and_gauge_families_expose_what_prometheus_client_does(
    incs: list[tuple[str, int]], sets: list[float]
) -> None:
    """The exit server's counters and gauge (exit_server/observe.py) as plain numbers: the same
    HELP, TYPE and samples as prometheus_client's Counter and Gauge (minus their _created)."""
    theirs = CollectorRegistry()
    plain_counter = Counter("c_events", "events", registry=theirs)
    labelled = Counter("c_results", "results", ["result"], registry=theirs)
    gauge = Gauge("g_up", "up or not", registry=theirs)
    mine = PlainFamily("counter", "c_events", "events")
    mine_labelled = PlainFamily("counter", "c_results", "results", ["result"])
    mine_gauge = PlainFamily("gauge", "g_up", "up or not")
    for label, n in incs:
        plain_counter.inc(n)
        mine.inc(n)
        labelled.labels(label).inc(n)
        mine_labelled.labels(label).inc(n)
    for value in sets:
        gauge.set(value)
        mine_gauge.set(value)
    ours = CollectorRegistry()
    ours.register(_Families(mine, mine_labelled, mine_gauge))
    assert _exposition(ours) == _exposition(theirs)
    assert mine.value == sum(n for _, n in incs)


def test_plain_family_label_values_must_match_the_names() -> None:
    family = PlainFamily("counter", "c_results", "results", ["result"])
    with pytest.raises(ValueError, match="1 label values expected, got 2"):
        family.labels("a", "b")
    with pytest.raises(ValueError, match="use labels"):
        family.inc()
    with pytest.raises(ValueError, match="0 label values expected"):
        PlainFamily("counter", "c_events", "events").labels("a")


def test_exit_server_counters_keep_their_names() -> None:
    """What /metrics showed when these were prometheus_client metrics, series for series."""
    metrics = Metrics(Registry())
    metrics.auth_failures.inc()
    metrics.descriptors.labels("emfile").inc()
    metrics.acme_orders.labels("issued").inc()
    metrics.tls_handshakes.labels("ok").inc()
    metrics.tcp_connections.labels("7000").inc()
    metrics.state_store_up.set(1)
    metrics.registered("c", "i1")
    metrics.registered("c", "i1")
    text = generate_latest(metrics.registry).decode()
    for line in (
        "# TYPE backhaul_auth_failures_total counter",
        "backhaul_auth_failures_total 1.0",
        'backhaul_descriptor_exhaustion_total{reason="emfile"} 1.0',
        'backhaul_acme_orders_total{result="issued"} 1.0',
        'backhaul_public_tls_handshakes_total{result="ok"} 1.0',
        'backhaul_tcp_connections_total{port="7000"} 1.0',
        "# TYPE backhaul_state_store_up gauge",
        "backhaul_state_store_up 1.0",
        "backhaul_tunnel_registrations_total 2.0",
        "backhaul_tunnel_reconnects_total 1.0",
        "backhaul_tunnels_connected",
    ):
        assert line in text
    assert metrics.registry is metrics.registry  # built once
