"""tunnel_client/admin.py AdminServer.answer without sockets: /healthz and /metrics by GET or
HEAD, 404, 405, 400; the audit log's failure makes /healthz 503. The listener itself is
exercised by the e2e tests (tunnel-client healthcheck, /metrics scrapes)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from tunnel_client.admin import AdminServer


def server(connected: bool, audit: Any = None) -> AdminServer:
    registry = CollectorRegistry()
    Counter("backhaul_test_total", "a test counter", registry=registry).inc()
    client = SimpleNamespace(
        links=[SimpleNamespace(connected=connected)],
        forwarder=SimpleNamespace(audit=audit),
        metrics=SimpleNamespace(registry=registry),
    )
    return AdminServer(client)  # type: ignore[arg-type]


def test_healthz_and_metrics() -> None:
    assert server(True).answer(b"GET /healthz HTTP/1.1")[:3:2] == (200, b"ok\n")
    assert server(False).answer(b"GET /healthz?x=1 HTTP/1.0")[:3:2] == (503, b"not connected\n")
    status, content_type, body, head_only = server(True).answer(b"GET /metrics HTTP/1.1")
    assert status == 200 and content_type.startswith("text/plain") and b"backhaul_test_total 1.0" in body
    assert server(True).answer(b"HEAD /metrics HTTP/1.1")[3] is True


def test_errors() -> None:
    assert server(True).answer(b"GET / HTTP/1.1")[0] == 404
    assert server(True).answer(b"POST /healthz HTTP/1.1")[0] == 405
    for bad in (b"GET /healthz", b"GET /healthz SPDY/3", b"\xff\xfe", b""):
        assert server(True).answer(bad)[0] == 400


def test_a_failing_audit_log_is_unhealthy() -> None:
    audit = SimpleNamespace(failing=True, fail_closed=True)
    status, _, body, _ = server(True, audit).answer(b"GET /healthz HTTP/1.1")
    assert status == 503 and b"refusing streams" in body


def test_client_metrics_are_plain_numbers_until_the_first_scrape() -> None:
    """ClientMetrics counts without prometheus_client and builds its registry when /metrics is
    first read: reconnects, streams and durations, and the extra collectors, all in it."""
    from prometheus_client import generate_latest

    from tunnel_client.admin import ClientMetrics

    client = SimpleNamespace(links=[], forwarder=SimpleNamespace(audit=None))
    metrics = ClientMetrics(client)  # type: ignore[arg-type]
    added: list[CollectorRegistry] = []
    metrics.extra.append(added.append)
    metrics.reconnected("wss://a.example")
    metrics.reconnected("wss://a.example")
    metrics.tally.done("http", "ok", 0.02)  # as Forwarder.serve counts a stream
    assert metrics._registry is None and not added
    registry = metrics.registry
    assert added == [registry] and metrics.registry is registry  # built once
    text = generate_latest(registry).decode()
    assert 'backhaul_client_reconnects_total{server="wss://a.example"} 2.0' in text
    assert 'backhaul_client_streams_total{kind="http",outcome="ok"} 1.0' in text
    assert 'backhaul_client_stream_duration_seconds_bucket{kind="http",le="0.025"} 1.0' in text
    metrics.reconnected("wss://a.example")
    assert 'backhaul_client_reconnects_total{server="wss://a.example"} 3.0' in generate_latest(registry).decode()
