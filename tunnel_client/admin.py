"""The client's admin listener (``--admin-addr``): ``/healthz`` (200 only while at least one
session is connected and registered) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .client import TunnelClient

__all__ = ["ClientMetrics", "admin_app"]


class _LinkCollector(Collector):
    def __init__(self, client: TunnelClient) -> None:
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily]:
        connected = GaugeMetricFamily("backhaul_client_sessions_connected", "Registered sessions per exit server",
                                      labels=["server"])
        streams = GaugeMetricFamily("backhaul_client_streams_in_flight", "Streams being served")
        total = 0
        for link in self.client.links:
            connected.add_metric([link.url], 1 if link.connected else 0)
            if link.conn is not None and not link.conn.closed:
                total += link.conn.streams_in_flight
        streams.add_metric([], total)
        yield connected
        yield streams


class ClientMetrics:
    """The client's metrics, in a registry of its own."""

    def __init__(self, client: TunnelClient) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reconnects = Counter("backhaul_client_reconnects", "Session (re)connection attempts after the first",
                                  ["server"], registry=r)
        self.streams = Counter("backhaul_client_streams", "Streams served by kind and outcome",
                               ["kind", "outcome"], registry=r)
        self.duration = Histogram("backhaul_client_stream_duration_seconds", "Time to serve a stream", ["kind"],
                                  registry=r)
        r.register(_LinkCollector(client))
        # labelled children kept: labels() costs more than the increment (a hot-path profile)
        self._streams: dict[tuple[str, str], Any] = {}
        self._durations: dict[str, Any] = {}

    def stream_done(self, kind: str, outcome: str, seconds: float) -> None:
        """Count one served stream (labels are bounded: stream kinds x outcomes)."""
        counter = self._streams.get((kind, outcome))
        if counter is None:
            counter = self._streams[kind, outcome] = self.streams.labels(kind, outcome)
        counter.inc()
        hist = self._durations.get(kind)
        if hist is None:
            hist = self._durations[kind] = self.duration.labels(kind)
        hist.observe(seconds)


def admin_app(client: TunnelClient) -> web.Application:
    """The aiohttp application of the client's admin listener."""

    async def healthz(request: web.Request) -> web.Response:
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
