"""What the exit server records about each public exchange: the access log line and the
Prometheus metrics (bounded labels: the matched route pattern, never a path or an id)."""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .routes import Registry

__all__ = ["Exchange", "Metrics", "request_id"]

access_log = logging.getLogger("backhaul.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNROUTED = "unrouted"
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


# A generated X-Request-Id is 24 hex characters: 12 from a random per-process prefix (48 bits
# from os.urandom at import) and 12 from a per-process counter. It is a correlation id, not a
# secret: unique within the process by construction and across processes and restarts with
# overwhelming probability, not guessable before the process has handed one out, and it costs
# no getrandom syscall per request (secrets.token_hex did, on the hot path). Nothing may use it
# for authorization: the next id of a process is predictable from a previous one.
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(3), "big"))  # a random start, too


def request_id(presented: str | None) -> str:
    """Keep a caller's well-formed X-Request-Id, otherwise make a new one."""
    if presented and _REQUEST_ID.match(presented):
        return presented
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFF:012x}"


@dataclass(slots=True)
class Exchange:
    """One public request (or TCP connection) from arrival to the last byte."""

    request_id: str
    method: str
    host: str
    path: str
    caller: str
    started: float = field(default_factory=time.perf_counter)
    route: str = UNROUTED
    tunnel_id: str = "-"
    status: int = 0
    head_seconds: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    rejected: str | None = None
    continue_sent: bool = False  # "100 Continue" goes out once, even when the request is retried

    def mark_head(self) -> None:
        self.head_seconds = time.perf_counter() - self.started


class _RouteMetrics:
    """The labelled children of one route pattern, made once (``labels()`` is slow): a
    prometheus_client child stays valid for the life of its metric. Children appear on first
    use, as with ``labels()`` at the call site, so /metrics shows no new zero series."""

    __slots__ = ("metrics", "host", "codes", "duration", "head", "bytes_in", "bytes_out", "totals")

    def __init__(self, metrics: Metrics, host: str, totals: list[float]) -> None:
        self.metrics = metrics
        self.host = host
        self.codes: dict[int, Counter] = {}  # status // 100 -> requests child
        self.duration = metrics.duration.labels(host)  # observed for every exchange
        self.head: Histogram | None = None
        self.bytes_in: Counter | None = None
        self.bytes_out: Counter | None = None
        self.totals = totals  # the same list as Metrics._hosts[host]

    def code(self, status_class: int) -> Counter:
        child = self.codes[status_class] = self.metrics.requests.labels(self.host, f"{status_class}xx")
        return child


class _TunnelCollector(Collector):
    """Gauges computed at scrape time from the live registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        tunnels = list(self.registry.tunnels.values())
        connected = GaugeMetricFamily("backhaul_tunnels_connected", "Tunnel sessions connected",
                                      labels=["client_id", "ecs_cluster", "ecs_service"])
        counts: dict[tuple[str, str, str], int] = {}
        for t in tunnels:
            key = (t.client_id, t.labels.get("ecs.cluster", ""), t.labels.get("ecs.service", ""))
            counts[key] = counts.get(key, 0) + 1
        for key, n in sorted(counts.items()):
            connected.add_metric(list(key), n)
        yield connected
        streams = GaugeMetricFamily("backhaul_streams_in_flight", "Streams open over all tunnels")
        streams.add_metric([], sum(t.in_flight for t in tunnels))
        yield streams


class Metrics:
    """The exit server's Prometheus metrics, in a registry of its own (several servers can
    live in one process, as in the tests)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("backhaul_http_requests", "Public requests by route and status class",
                                ["host", "code"], registry=r)
        self.duration = Histogram("backhaul_http_request_duration_seconds", "Time from request to last byte",
                                  ["host"], buckets=_BUCKETS, registry=r)
        self.head = Histogram("backhaul_http_response_head_seconds", "Time from request to response head",
                              ["host"], buckets=_BUCKETS, registry=r)
        self.bytes = Counter("backhaul_http_bytes", "Body bytes by route and direction", ["host", "direction"],
                             registry=r)
        self.rejected = Counter("backhaul_rejected_requests", "Requests refused by a limit or policy",
                                ["reason"], registry=r)
        self.auth_failures = Counter("backhaul_auth_failures", "Failed tunnel authentications", registry=r)
        self.registrations = Counter("backhaul_tunnel_registrations", "Tunnel sessions registered", registry=r)
        self.reconnects = Counter("backhaul_tunnel_reconnects",
                                  "Registrations by a client instance that had a session before", registry=r)
        self.tcp_connections = Counter("backhaul_tcp_connections", "Public TCP connections accepted", ["port"],
                                       registry=r)
        r.register(_TunnelCollector(registry))
        self._seen_instances: dict[str, None] = {}
        # Per-route running totals for the dashboard: [requests, 5xx, seconds].
        self._hosts: dict[str, list[float]] = {}
        self._routes: dict[str, _RouteMetrics] = {}
        self._rejected: dict[str, Counter] = {}

    def host_stats(self) -> dict[str, dict[str, float]]:
        """Cumulative totals per route pattern (the dashboard differentiates them)."""
        return {host: {"requests": v[0], "errors": v[1], "seconds": v[2]} for host, v in self._hosts.items()}

    def registered(self, client_id: str, instance_id: str) -> None:
        self.registrations.inc()
        key = f"{client_id}/{instance_id}"
        if key in self._seen_instances:
            self.reconnects.inc()
        else:
            self._seen_instances[key] = None
            if len(self._seen_instances) > 10_000:  # bounded memory: forget the oldest
                self._seen_instances.pop(next(iter(self._seen_instances)))

    def finish(self, ex: Exchange) -> None:
        """Record a finished exchange: metrics and one access-log line."""
        total = time.perf_counter() - ex.started
        host = ex.route
        route = self._routes.get(host)
        if route is None:
            totals = self._hosts.get(host)
            if totals is None:
                totals = self._hosts[host] = [0, 0, 0.0]
            route = self._routes[host] = _RouteMetrics(self, host, totals)
        status = ex.status
        status_class = status // 100
        (route.codes.get(status_class) or route.code(status_class)).inc()
        route.duration.observe(total)
        if ex.head_seconds is not None:
            if route.head is None:
                route.head = self.head.labels(host)
            route.head.observe(ex.head_seconds)
        if ex.bytes_in:
            if route.bytes_in is None:
                route.bytes_in = self.bytes.labels(host, "in")
            route.bytes_in.inc(ex.bytes_in)
        if ex.bytes_out:
            if route.bytes_out is None:
                route.bytes_out = self.bytes.labels(host, "out")
            route.bytes_out.inc(ex.bytes_out)
        if ex.rejected:
            rejected = self._rejected.get(ex.rejected)
            if rejected is None:
                rejected = self._rejected[ex.rejected] = self.rejected.labels(ex.rejected)
            rejected.inc()
        totals = route.totals
        totals[0] += 1
        totals[1] += status >= 500
        totals[2] += total
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                '%s %s "%s %s" %d in=%d out=%d %.1fms tunnel=%s id=%s',
                ex.caller, ex.host, ex.method, ex.path, ex.status, ex.bytes_in, ex.bytes_out, total * 1000,
                ex.tunnel_id, ex.request_id,
                extra={"request_id": ex.request_id, "host": ex.host, "method": ex.method, "path": ex.path,
                       "status": ex.status, "bytes_in": ex.bytes_in, "bytes_out": ex.bytes_out,
                       "duration_ms": round(total * 1000, 3), "tunnel_id": ex.tunnel_id, "caller": ex.caller},
            )
