"""The client's admin listener (``--admin-addr``): ``/healthz`` (200 only while at least one
session is connected and registered) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.aio.sockopts import listening_port
from shared.runtime.plainmetrics import StreamTally

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from .client import TunnelClient

__all__ = ["AdminServer", "ClientMetrics"]


class _LinkCollector:
    def __init__(self, client: TunnelClient) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
    """The client's metrics: plain numbers while it runs, a registry of its own built at the
    first scrape. prometheus_client is imported then, not at start: a sidecar in every task
    whose /metrics nobody reads does not pay its import (about 10 ms and 1.7 MiB)."""

    def __init__(self, client: TunnelClient) -> None:
        self._client = client
        self._registry: CollectorRegistry | None = None
        #: collectors to add to the registry when it is built (shared/runtime/procmetrics.py)
        self.extra: list[Callable[[CollectorRegistry], None]] = []
        # plain numbers on the hot path, metric families at scrape time (shared/runtime/plainmetrics.py)
        self._reconnects: dict[str, int] = {}
        #: served streams; counted by the forwarder (tunnel_client/upstream.py, Forwarder.serve)
        self.tally = StreamTally()

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry (made, and prometheus_client imported, on first use)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry()
            registry.register(_LinkCollector(self._client))
            registry.register(_StreamCollector(self))
            for add in self.extra:
                add(registry)
            self._registry = registry
        return self._registry

    def reconnected(self, server: str) -> None:
        """Count one session (re)connection attempt after the first to ``server``."""
        self._reconnects[server] = self._reconnects.get(server, 0) + 1


class _StreamCollector:
    """``backhaul_client_reconnects``, ``backhaul_client_streams`` and
    ``backhaul_client_stream_duration_seconds``."""

    def __init__(self, metrics: ClientMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        reconnects = CounterMetricFamily(
            "backhaul_client_reconnects", "Session (re)connection attempts after the first", labels=["server"]
        )
        for server, n in sorted(self.metrics._reconnects.items()):
            reconnects.add_metric([server], n)
        yield reconnects
        streams = CounterMetricFamily(
            "backhaul_client_streams", "Streams served by kind and outcome", labels=["kind", "outcome"]
        )
        for (kind, outcome), n in sorted(self.metrics.tally.streams.items()):
            streams.add_metric([kind, outcome], n)
        duration = HistogramMetricFamily(
            "backhaul_client_stream_duration_seconds", "Time to serve a stream", labels=["kind"]
        )
        for kind, hist in sorted(self.metrics.tally.durations.items()):
            duration.add_metric([kind], hist.buckets(), hist.total)
        yield streams
        yield duration


#: Reason phrases of the statuses the admin listener answers.
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
#: A request head larger than this, or slower than :data:`_HEAD_TIMEOUT` seconds, is dropped.
_MAX_HEAD = 8192
_HEAD_TIMEOUT = 10.0


class AdminServer:
    """The client's admin listener on plain asyncio (no web framework: it answers two GETs,
    and a sidecar in every task should not load one for that). One request per connection:
    ``GET``/``HEAD`` of ``/healthz`` or ``/metrics``; other paths 404, other methods 405, a
    malformed request line 400; a head over 8 KiB or not complete within 10 s is dropped."""

    def __init__(self, client: TunnelClient) -> None:
        self.client = client
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port.

        Raises:
            OSError: the address cannot be bound.
        """
        server = await asyncio.start_server(self._accept, host, port, reuse_address=True, limit=_MAX_HEAD)
        try:
            bound = listening_port(server.sockets)
        except OSError:
            server.close()
            raise
        self._server = server
        return bound

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_HEAD_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                return
            status, content_type, body, head_only = self.answer(head.split(b"\r\n", 1)[0])
            lines = [
                f"HTTP/1.1 {status} {_REASONS[status]}",
                f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}",
                "Connection: close",
            ]
            if status == 405:
                lines.append("Allow: GET, HEAD")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()

    def answer(self, request_line: bytes) -> tuple[int, str, bytes, bool]:
        """(status, content type, body, HEAD) for one request line (sans-I/O: tested alone)."""
        parts = request_line.decode("latin-1").split(" ")
        text = "text/plain; charset=utf-8"
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, text, b"bad request\n", False
        method, path = parts[0], parts[1].partition("?")[0]
        head_only = method == "HEAD"
        if path not in ("/healthz", "/metrics"):
            return 404, text, b"not found\n", head_only
        if method not in ("GET", "HEAD"):
            return 405, text, b"method not allowed\n", False
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return 200, CONTENT_TYPE_LATEST, generate_latest(self.client.metrics.registry), head_only
        audit = self.client.forwarder.audit
        if audit is not None and audit.failing:
            what = "refusing streams" if audit.fail_closed else "streams served unaudited"
            return 503, text, f"audit log cannot be written: {what}\n".encode(), head_only
        if any(link.connected for link in self.client.links):
            return 200, text, b"ok\n", head_only
        return 503, text, b"not connected\n", head_only
