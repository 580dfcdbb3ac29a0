"""exit_server.public: the fused header passes give what the general helpers give."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from exit_server.public import _reply_headers, _upstream_headers, _upstream_headers_slow
from shared.httputil import strip_hop_by_hop

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


@given(headers, st.booleans(), st.sampled_from(["", "127.0.0.1"]), st.sampled_from(["", "a.example:80"]))
def test_upstream_headers_match_the_general_path(
    pairs: list[tuple[str, str]], websocket: bool, peer: str, host: str
) -> None:
    raw = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs)
    assert _upstream_headers(raw, "rid", peer, "https", host, websocket) == _upstream_headers_slow(
        raw, "rid", peer, "https", host, websocket
    )


@given(headers)
def test_reply_headers_match_the_general_path(pairs: list[tuple[str, str]]) -> None:
    reply = (*pairs, ("X-Request-Id", "rid"))
    kept = strip_hop_by_hop(reply)
    unsized = [p for p in kept if p[0].lower() != "content-length"]
    assert _reply_headers(reply) == (kept, unsized if len(unsized) != len(kept) else None)
