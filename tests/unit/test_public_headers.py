"""exit_server.public: the fused header passes give what the general helpers give."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from exit_server.public import Edge, _reply_headers, _upstream_headers, _upstream_headers_slow
from shared.forwarding import TrustedProxies, parse_networks
from shared.httputil import EDGE_OWNED, strip_hop_by_hop

names = st.sampled_from(
    [
        "Host",
        "connection",
        "Connection",
        "Upgrade",
        "Keep-Alive",
        "TE",
        "Expect",
        "X-Request-Id",
        "X-Forwarded-For",
        "x-forwarded-proto",
        "X-Forwarded-Host",
        "Accept",
        "Content-Length",
        "Set-Cookie",
        "X-Secret",
        "Transfer-Encoding",
        "\xc0b",
    ]
)
tokens = st.lists(
    st.sampled_from(
        [
            "keep-alive",
            "close",
            "Upgrade",
            "x-secret",
            "X-Forwarded-For",
            "x-forwarded-host",
            "accept",
            "connection",
            " ",
            "",
            "Expect",
            "te",
            "\xc0B",
        ]
    ),
    max_size=4,
).map(",".join)
headers = st.lists(st.tuples(names, st.one_of(st.sampled_from(["1", " 10.0.0.1 ", "", "a, b"]), tokens)), max_size=10)


@given(
    headers,
    st.booleans(),
    st.sampled_from(["", "127.0.0.1"]),
    st.sampled_from(["", "a.example:80"]),
    st.booleans(),
)
def test_upstream_headers_match_the_general_path(
    pairs: list[tuple[str, str]], websocket: bool, peer: str, host: str, trusted: bool
) -> None:
    raw = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs)
    edge = Edge("rid", peer, "https", host, TrustedProxies(parse_networks(["127.0.0.0/8"])) if trusted else None)
    assert _upstream_headers(raw, edge, websocket) == _upstream_headers_slow(raw, edge, websocket)


@given(headers, st.booleans())
def test_the_edge_owns_host_and_forwarding_fields(pairs: list[tuple[str, str]], websocket: bool) -> None:
    raw = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs)
    out = _upstream_headers(raw, Edge("rid", "192.0.2.7", "https", "a.example"), websocket)
    owned = [(name.lower(), value) for name, value in out if name.lower() in EDGE_OWNED]
    assert out[0] == ("Host", "a.example")
    assert sorted(name for name, _ in owned) == sorted(
        ["host", "x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip", "forwarded"]
    )
    assert ("x-real-ip", "192.0.2.7") in owned and ("x-forwarded-proto", "https") in owned
    assert dict(owned)["x-forwarded-for"].endswith("192.0.2.7")
    assert not any("_" in name for name, _ in out)


@given(headers)
def test_reply_headers_match_the_general_path(pairs: list[tuple[str, str]]) -> None:
    reply = (*pairs, ("X-Request-Id", "rid"))
    kept = strip_hop_by_hop(reply)
    unsized = [p for p in kept if p[0].lower() != "content-length"]
    assert _reply_headers(reply) == (kept, unsized if len(unsized) != len(kept) else None)
