"""exit_server/headers.py: the one-pass header rewriting gives what a plain reading of the
rules gives (the reference below is the specification, not production code)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from exit_server.headers import Edge, reply_headers, upstream_headers
from shared.forwarding import TrustedProxies, forwarded_element, parse_networks
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


def reference(raw: tuple[tuple[bytes, bytes], ...], edge: Edge, websocket: bool) -> tuple[tuple[str, str], ...]:
    """The rules read plainly: hop-by-hop (and Connection-named) fields go, then Expect,
    names with "_" and every edge-owned field; the edge's own fields are added."""
    pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
    kept = strip_hop_by_hop(pairs, keep_upgrade=websocket)
    chain = [v.strip() for n, v in kept if n.lower() == "x-forwarded-for"]
    said = [v for n, v in kept if n.lower() == "x-forwarded-proto"]
    out = [(n, v) for n, v in kept if n.lower() not in EDGE_OWNED and n.lower() != "expect" and "_" not in n]
    client, proto = edge.peer, edge.proto
    if edge.trusted is not None:
        client = edge.trusted.client_of(chain, edge.peer)
        last = said[-1].split(",")[-1].strip().lower() if said else ""
        if last in ("http", "https"):
            proto = last
    forwarded_for = ", ".join(c for c in [*chain, edge.peer] if c)
    return (
        ("Host", edge.host),
        *out,
        ("X-Request-Id", edge.rid),
        ("X-Forwarded-For", forwarded_for),
        ("X-Forwarded-Proto", proto),
        *([("X-Forwarded-Host", edge.host)] if edge.host else []),
        ("X-Real-IP", client),
        ("Forwarded", forwarded_element(client, edge.host, proto)),
    )


@given(
    headers,
    st.booleans(),
    st.sampled_from(["", "127.0.0.1"]),
    st.sampled_from(["", "a.example:80"]),
    st.booleans(),
)
def test_upstream_headers_follow_the_rules(
    pairs: list[tuple[str, str]], websocket: bool, peer: str, host: str, trusted: bool
) -> None:
    raw = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs)
    edge = Edge("rid", peer, "https", host, TrustedProxies(parse_networks(["127.0.0.0/8"])) if trusted else None)
    assert upstream_headers(raw, edge, websocket) == reference(raw, edge, websocket)


@given(headers, st.booleans())
def test_the_edge_owns_host_and_forwarding_fields(pairs: list[tuple[str, str]], websocket: bool) -> None:
    raw = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs)
    out = upstream_headers(raw, Edge("rid", "192.0.2.7", "https", "a.example"), websocket)
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
    assert reply_headers(reply) == (kept, unsized if len(unsized) != len(kept) else None)
