"""What the exit server records about each public exchange: the access log line and the
Prometheus metrics (bounded labels: the matched route pattern, never a path or an id)."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from shared.runtime.plainmetrics import PlainFamily, PlainHistogram

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily, Metric

    from shared.runtime.accesslog import AccessWriter

    from .routes import Registry

__all__ = ["Exchange", "LogThrottle", "Metrics", "request_id"]

access_log = logging.getLogger("backhaul.access")
#: Set by ``exit-server run`` with text logs (shared/runtime/accesslog.py): access lines skip the
#: logging module, same text. None: through ``access_log`` (JSON logs, tests' caplog).
ACCESS_WRITER: AccessWriter | None = None

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNROUTED = "unrouted"
#: The ``host`` label of exchanges on routes past ``Metrics.max_series``.
OTHER = "other"
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


# A generated X-Request-Id is 24 hex characters: 12 from a random per-process prefix (48 bits
# from os.urandom at import) and 12 from a per-process counter. It is a correlation id, not a
# secret: unique within the process by construction and across processes and restarts with
# overwhelming probability, not guessable before the process has handed one out, and it costs
# no getrandom syscall per request (secrets.token_hex did, on the hot path). Nothing may use it
# for authorization: the next id of a process is predictable from a previous one.
class _Ids:
    """The prefix and the counter (a native class in the compiled build: 0.18 us an id,
    against 0.54 for an f-string over ``itertools.count``)."""

    __slots__ = ("prefix", "next_n")

    def __init__(self) -> None:
        self.prefix = os.urandom(6).hex()
        self.next_n = int.from_bytes(os.urandom(3), "big")  # a random start, too

    def make(self) -> str:
        n = self.next_n
        self.next_n = (n + 1) & 0xFFFFFFFFFFFF
        return "%s%012x" % (self.prefix, n)  # noqa: UP031 (compiled: 0.18 us, an f-string 0.30)


_IDS: Final = _Ids()


def request_id(presented: str | None) -> str:
    """Keep a caller's well-formed X-Request-Id, otherwise make a new one."""
    if presented and _REQUEST_ID.match(presented):
        return presented
    return _IDS.make()


class LogThrottle:
    """At most one log line per key every ``period`` seconds, for conditions that can repeat
    thousands of times a second under overload (a tunnel's stream limit): the line that gets
    through says how many were held back, and the metric counts every one."""

    def __init__(self, period: float = 10.0, max_keys: int = 1024) -> None:
        self.period = period
        self.max_keys = max_keys
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str, now: float) -> int | None:
        """None when this occurrence should not be logged; otherwise how many were held back
        since the last line for ``key``."""
        if now < self._next.get(key, 0.0):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if len(self._next) >= self.max_keys and key not in self._next:  # bounded: forget lapsed keys
            for stale in [k for k, t in self._next.items() if t <= now]:
                del self._next[stale]
                self._held.pop(stale, None)
        self._next[key] = now + self.period
        return self._held.pop(key, 0)


@dataclass(slots=True, init=False)
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
    close_connection: bool = False  # answer with Connection: close (bytes after it are not HTTP)
    local_status: int | None = None  # the status this side decided before the reply (408: body idle)
    scheme: str = "http"  # "https" on the public TLS listener (else --public-scheme)
    protocol: str = "HTTP/1.1"  # the caller's HTTP version: HTTP/1.1 (or 1.0) or HTTP/2
    grpc_status: str | None = None  # a gRPC answer's grpc-status (trailers or Trailers-Only head)
    relayed_by: str | None = None  # the peer that relayed it here (exit_server/peers.py); "-": badly signed

    def __init__(
        self,
        request_id: str,
        method: str,
        host: str,
        path: str,
        caller: str,
        started: float | None = None,
        route: str = UNROUTED,
        tunnel_id: str = "-",
        status: int = 0,
        head_seconds: float | None = None,
        bytes_in: int = 0,
        bytes_out: int = 0,
        rejected: str | None = None,
        continue_sent: bool = False,
        close_connection: bool = False,
        local_status: int | None = None,
        scheme: str = "http",
        protocol: str = "HTTP/1.1",
        grpc_status: str | None = None,
        relayed_by: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.method = method
        self.host = host
        self.path = path
        self.caller = caller
        self.started = time.perf_counter() if started is None else started
        self.route = route
        self.tunnel_id = tunnel_id
        self.status = status
        self.head_seconds = head_seconds
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.rejected = rejected
        self.continue_sent = continue_sent
        self.close_connection = close_connection
        self.local_status = local_status
        self.scheme = scheme
        self.protocol = protocol
        self.grpc_status = grpc_status
        self.relayed_by = relayed_by

    def mark_head(self) -> None:
        self.head_seconds = time.perf_counter() - self.started


class _RouteMetrics:
    """What is recorded for one route pattern (the ``host`` label), as plain numbers. A
    series appears on first use, as with ``labels()`` at the call site, so /metrics shows no
    new zero series."""

    __slots__ = ("host", "codes", "duration", "head", "bytes_in", "bytes_out", "totals", "last")

    def __init__(self, host: str, totals: list[float]) -> None:
        self.host = host
        self.last = 0.0  # perf_counter() of the last exchange recorded
        self.codes: dict[int, int] = {}  # status // 100 -> requests
        self.duration = PlainHistogram(_BUCKETS)  # observed for every exchange
        self.head: PlainHistogram | None = None
        self.bytes_in: int | None = None
        self.bytes_out: int | None = None
        self.totals = totals  # the same list as Metrics._hosts[host]


class _ExchangeCollector:
    """The per-exchange metrics, made into metric families at scrape time from the plain
    numbers :meth:`Metrics.finish` keeps (shared/runtime/plainmetrics.py says why)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        self.metrics.prune()
        routes = list(self.metrics._routes.values())
        requests = CounterMetricFamily(
            "backhaul_http_requests", "Public requests by route and status class", labels=["host", "code"]
        )
        duration = HistogramMetricFamily(
            "backhaul_http_request_duration_seconds", "Time from request to last byte", labels=["host"]
        )
        head = HistogramMetricFamily(
            "backhaul_http_response_head_seconds", "Time from request to response head", labels=["host"]
        )
        body = CounterMetricFamily(
            "backhaul_http_bytes", "Body bytes by route and direction", labels=["host", "direction"]
        )
        for route in routes:
            for status_class, n in sorted(route.codes.items()):
                requests.add_metric([route.host, f"{status_class}xx"], n)
            duration.add_metric([route.host], route.duration.buckets(), route.duration.total)
            if route.head is not None:
                head.add_metric([route.host], route.head.buckets(), route.head.total)
            if route.bytes_in is not None:
                body.add_metric([route.host, "in"], route.bytes_in)
            if route.bytes_out is not None:
                body.add_metric([route.host, "out"], route.bytes_out)
        rejected = CounterMetricFamily(
            "backhaul_rejected_requests", "Requests refused by a limit or policy", labels=["reason"]
        )
        for reason, n in sorted(self.metrics._rejected.items()):
            rejected.add_metric([reason], n)
        protocols = CounterMetricFamily(
            "backhaul_http_requests_by_protocol", "Public requests by the caller's HTTP version", labels=["protocol"]
        )
        for protocol, n in sorted(self.metrics._protocols.items()):
            protocols.add_metric([protocol], n)
        grpc = CounterMetricFamily(
            "backhaul_grpc_responses", "gRPC answers by grpc-status (trailers or Trailers-Only)", labels=["grpc_status"]
        )
        for code, n in sorted(self.metrics._grpc.items()):
            grpc.add_metric([code], n)
        yield from (requests, duration, head, body, rejected, protocols, grpc)
        for plain in self.metrics.families:
            yield from plain.collect()


class _TunnelCollector:
    """Gauges computed at scrape time from the live registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from prometheus_client.core import GaugeMetricFamily

        tunnels = list(self.registry.tunnels.values())
        connected = GaugeMetricFamily(
            "backhaul_tunnels_connected",
            "Tunnel sessions connected",
            labels=["client_id", "ecs_cluster", "ecs_service"],
        )
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
    live in one process, as in the tests). Plain numbers while it runs; the registry is built,
    and prometheus_client imported, at the first scrape (8 ms and 1.1 MiB of every start
    otherwise: docs/BENCHMARKS.md, round 11)."""

    #: Most route series (``host`` label values) kept; exchanges on further routes are counted
    #: under ``host="other"`` (issue 15 item 8: every name ever registered kept its series).
    max_series = 1000
    #: A route no session serves any more keeps its series this long after its last request.
    series_ttl = 600.0

    def __init__(self, registry: Registry) -> None:
        self._tunnels = registry
        self._registry: CollectorRegistry | None = None
        #: collectors to add to the registry when it is built (process, relays, certificates)
        self.extra: list[Callable[[CollectorRegistry], None]] = []
        self.auth_failures = PlainFamily("counter", "backhaul_auth_failures", "Failed tunnel authentications")
        self.descriptors = PlainFamily(
            "counter",
            "backhaul_descriptor_exhaustion",
            "Public connections refused for lack of file descriptors: accept() failed (emfile), "
            "or answered 503 to keep the reserve (reserve)",
            ["reason"],
        )
        self.registrations = PlainFamily("counter", "backhaul_tunnel_registrations", "Tunnel sessions registered")
        self.state_store_up = PlainFamily(
            "gauge",
            "backhaul_state_store_up",
            "1 while the fleet state store (--state) answers, 0 while this server serves its last known state",
        )
        self.acme_orders = PlainFamily(
            "counter",
            "backhaul_acme_orders",
            "ACME attempts (orders and renewals) by result: issued or failed",
            ["result"],
        )
        self.tls_handshakes = PlainFamily(
            "counter",
            "backhaul_public_tls_handshakes",
            "Connections to the public TLS port by outcome: ok, unknown_name, no_sni, not_tls, timeout "
            "(no ClientHello in time), handshake_failed, busy (too many waiting for their ClientHello)",
            ["result"],
        )
        self.control_tls_handshakes = PlainFamily(
            "counter",
            "backhaul_control_tls_handshakes",
            "Connections to the control port (--control-addr) by outcome: ok, not_tls, timeout "
            "(no ClientHello in time), handshake_failed, busy (too many waiting for their ClientHello)",
            ["result"],
        )
        self.reconnects = PlainFamily(
            "counter", "backhaul_tunnel_reconnects", "Registrations by a client instance that had a session before"
        )
        self.tcp_connections = PlainFamily(
            "counter", "backhaul_tcp_connections", "Public TCP connections accepted", ["port"]
        )
        #: exported after the per-exchange families, in this order
        self.families = (
            self.auth_failures,
            self.descriptors,
            self.registrations,
            self.state_store_up,
            self.acme_orders,
            self.tls_handshakes,
            self.control_tls_handshakes,
            self.reconnects,
            self.tcp_connections,
        )
        self._seen_instances: dict[str, None] = {}
        # Per-route running totals for the dashboard: [requests, 5xx, seconds].
        self._hosts: dict[str, list[float]] = {}
        self._routes: dict[str, _RouteMetrics] = {}
        self._rejected: dict[str, int] = {}
        self._protocols: dict[str, int] = {}
        self._grpc: dict[str, int] = {}

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry (made, and prometheus_client imported, on first use)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry()
            registry.register(_ExchangeCollector(self))  # requests, durations, bytes, rejections, counters
            registry.register(_TunnelCollector(self._tunnels))
            for add in self.extra:
                add(registry)
            self._registry = registry
        return self._registry

    def prune(self) -> None:
        """Drop the series of routes no session serves that saw no request for ``series_ttl``."""
        cutoff = time.perf_counter() - self.series_ttl
        stale = [host for host, route in self._routes.items() if route.last < cutoff]
        if not stale:
            return
        served = {pattern for pattern, _ in self._tunnels.table.keys()} | {OTHER, UNROUTED}
        for host in stale:
            if host not in served:
                del self._routes[host]
                self._hosts.pop(host, None)

    def host_stats(self) -> dict[str, dict[str, float]]:
        """Cumulative totals per route pattern (the dashboard differentiates them)."""
        self.prune()
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
        now = time.perf_counter()
        total = now - ex.started
        host = ex.route
        route = self._routes.get(host)
        if route is None and len(self._routes) >= self.max_series:
            self.prune()
            if len(self._routes) >= self.max_series:
                host = OTHER
                route = self._routes.get(host)
        if route is None:
            totals = self._hosts.get(host)
            if totals is None:
                totals = self._hosts[host] = [0, 0, 0.0]
            route = self._routes[host] = _RouteMetrics(host, totals)
        status = ex.status
        status_class = status // 100
        codes = route.codes
        codes[status_class] = codes.get(status_class, 0) + 1
        route.duration.observe(total)
        if ex.head_seconds is not None:
            if route.head is None:
                route.head = PlainHistogram(_BUCKETS)
            route.head.observe(ex.head_seconds)
        if ex.bytes_in:
            route.bytes_in = (route.bytes_in or 0) + ex.bytes_in
        if ex.bytes_out:
            route.bytes_out = (route.bytes_out or 0) + ex.bytes_out
        if ex.rejected:
            self._rejected[ex.rejected] = self._rejected.get(ex.rejected, 0) + 1
        protocols = self._protocols
        protocols[ex.protocol] = protocols.get(ex.protocol, 0) + 1
        if ex.grpc_status is not None:
            code = ex.grpc_status if ex.grpc_status.isdigit() and len(ex.grpc_status) <= 2 else "other"
            self._grpc[code] = self._grpc.get(code, 0) + 1
        route.last = now
        totals = route.totals
        totals[0] += 1
        totals[1] += status >= 500
        totals[2] += total
        if access_log.isEnabledFor(logging.INFO):
            if ACCESS_WRITER is not None:  # exit-server run with text logs: the cheap path
                ACCESS_WRITER.write(
                    f'{ex.caller} {ex.host} "{ex.method} {ex.path} {ex.protocol}" {ex.status}'
                    f"{'' if ex.grpc_status is None else f' grpc-status={ex.grpc_status}'}"
                    f" in={ex.bytes_in} out={ex.bytes_out} {total * 1000:.1f}ms"
                    f" tunnel={ex.tunnel_id} id={ex.request_id}"
                )
                return
            access_log.info(
                '%s %s "%s %s %s" %d%s in=%d out=%d %.1fms tunnel=%s id=%s',
                ex.caller,
                ex.host,
                ex.method,
                ex.path,
                ex.protocol,
                ex.status,
                "" if ex.grpc_status is None else f" grpc-status={ex.grpc_status}",
                ex.bytes_in,
                ex.bytes_out,
                total * 1000,
                ex.tunnel_id,
                ex.request_id,
                extra={
                    "request_id": ex.request_id,
                    "host": ex.host,
                    "method": ex.method,
                    "path": ex.path,
                    "status": ex.status,
                    "protocol": ex.protocol,
                    "grpc_status": ex.grpc_status,
                    "bytes_in": ex.bytes_in,
                    "bytes_out": ex.bytes_out,
                    "duration_ms": round(total * 1000, 3),
                    "tunnel_id": ex.tunnel_id,
                    "caller": ex.caller,
                },
            )
