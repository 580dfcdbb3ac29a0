"""shared.httputil: hop-by-hop removal and X-Forwarded-* (docs/PROTOCOL.md section 12)."""

from __future__ import annotations

from shared.httputil import HOP_BY_HOP, strip_hop_by_hop


def test_hop_by_hop_set() -> None:
    assert HOP_BY_HOP == {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }


def test_strip_hop_by_hop_keeps_order_and_repeats() -> None:
    headers = [
        ("Host", "a"),
        ("Connection", "keep-alive, X-Secret , "),
        ("Keep-Alive", "timeout=5"),
        ("Set-Cookie", "a=1"),
        ("X-Secret", "s"),
        ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "b=2"),
        ("TE", "trailers"),
    ]
    assert strip_hop_by_hop(headers) == [("Host", "a"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


def test_strip_hop_by_hop_accepts_any_iterable() -> None:
    assert strip_hop_by_hop(iter([("a", "1"), ("upgrade", "x")])) == [("a", "1")]


def test_keep_upgrade_for_websocket_streams() -> None:
    headers = [("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Keep-Alive", "1"), ("Sec-WebSocket-Key", "k")]
    assert strip_hop_by_hop(headers, keep_upgrade=True) == [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "k"),
    ]
    assert strip_hop_by_hop(headers) == [("Sec-WebSocket-Key", "k")]
