"""The client's admin listener (``--admin-addr``): ``/healthz`` (200 only while at least one
session is connected and registered) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.runtime.plainmetrics import PlainHistogram

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .client import TunnelClient

__all__ = ["ClientMetrics", "admin_app"]


class _LinkCollector(Collector):
    def __init__(self, client: TunnelClient) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            "backhaul_client_sessions_connected", "Registered sessions per exit server", labels=["server"]
        )
        streams = GaugeMetricFamily("backhaul_client_streams_in_flight", "Streams being served")
        total = 0
        for link in self.client.links:
            connected.add_metric([link.url], 1 if link.connected else 0)
            if link.conn is not None and not link.conn.closed:
                total += link.conn.streams_in_flight
        streams.add_metric([], total)
        yield connected
        yield streams
        audit = self.client.forwarder.audit
        if audit is not None:
            failing = GaugeMetricFamily(
                "backhaul_client_audit_failing", "1 while the audit log cannot be written (streams refused if closed)"
            )
            failing.add_metric([], 1 if audit.failing else 0)
            yield failing
            lost = CounterMetricFamily("backhaul_client_audit_lost_records", "Audit records never written")
            lost.add_metric([], audit.lost)
            yield lost
            failures = CounterMetricFamily("backhaul_client_audit_write_failures", "Failed audit log writes")
            failures.add_metric([], audit.failures)
            yield failures


class ClientMetrics:
    """The client's metrics, in a registry of its own."""

    def __init__(self, client: TunnelClient) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reconnects = Counter(
            "backhaul_client_reconnects", "Session (re)connection attempts after the first", ["server"], registry=r
        )
        r.register(_LinkCollector(client))
        r.register(_StreamCollector(self))
        # plain numbers on the hot path, metric families at scrape time (shared/runtime/plainmetrics.py)
        self._streams: dict[tuple[str, str], int] = {}
        self._durations: dict[str, PlainHistogram] = {}

    def stream_done(self, kind: str, outcome: str, seconds: float) -> None:
        """Count one served stream (labels are bounded: stream kinds x outcomes)."""
        key = (kind, outcome)
        self._streams[key] = self._streams.get(key, 0) + 1
        hist = self._durations.get(kind)
        if hist is None:
            hist = self._durations[kind] = PlainHistogram()
        hist.observe(seconds)


class _StreamCollector(Collector):
    """``backhaul_client_streams`` and ``backhaul_client_stream_duration_seconds``."""

    def __init__(self, metrics: ClientMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        streams = CounterMetricFamily(
            "backhaul_client_streams", "Streams served by kind and outcome", labels=["kind", "outcome"]
        )
        for (kind, outcome), n in sorted(self.metrics._streams.items()):
            streams.add_metric([kind, outcome], n)
        duration = HistogramMetricFamily(
            "backhaul_client_stream_duration_seconds", "Time to serve a stream", labels=["kind"]
        )
        for kind, hist in sorted(self.metrics._durations.items()):
            duration.add_metric([kind], hist.buckets(), hist.total)
        yield streams
        yield duration


def admin_app(client: TunnelClient) -> web.Application:
    """The aiohttp application of the client's admin listener."""

    async def healthz(request: web.Request) -> web.Response:
        audit = client.forwarder.audit
        if audit is not None and audit.failing:
            what = "refusing streams" if audit.fail_closed else "streams served unaudited"
            return web.Response(status=503, text=f"audit log cannot be written: {what}\n")
        if any(link.connected for link in client.links):
            return web.Response(text="ok\n")
        return web.Response(status=503, text="not connected\n")

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(client.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
