"""shared.h1server, the public listener's HTTP/1.1 parser, without sockets: events, limits and
their statuses, pipelining, upgrades, and byte-at-a-time feeding."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.h1server import (
    FIELD_LIMIT,
    HEAD_BYTES_LIMIT,
    MAX_HEADERS,
    REQUEST_LINE_LIMIT,
    Body,
    End,
    Event,
    H1Parser,
    Head,
    ParseError,
    Upgraded,
)
from tests.e2e.test_framing_oracle import connection_bytes, h11_reads

HOST = b"Host: a.example\r\n"


def _feed(data: bytes, step: int = 0) -> list[Event]:
    parser = H1Parser()
    if not step:
        return parser.feed(data)
    events: list[Event] = []
    for i in range(0, len(data), step):
        events += parser.feed(data[i : i + step])
    return events


def _bodies(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Body))


@pytest.mark.parametrize("step", [0, 1, 7])
def test_pipelined_requests_in_order_whatever_the_cuts(step: int) -> None:
    data = (
        b"POST /a?x=1 HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n\r\nhello"
        b"PUT /b HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        b"GET /c HTTP/1.0\r\n" + HOST + b"\r\n"
    )
    events = _feed(data, step)
    heads = [e for e in events if isinstance(e, Head)]
    assert [(h.method, h.target, h.version) for h in heads] == [
        ("POST", "/a?x=1", (1, 1)),
        ("PUT", "/b", (1, 1)),
        ("GET", "/c", (1, 0)),
    ]
    assert heads[0].content_length == 5 and not heads[0].chunked
    assert heads[1].chunked and heads[1].content_length is None
    assert heads[0].keep_alive and not heads[2].keep_alive
    assert heads[0].raw_headers == ((b"Host", b"a.example"), (b"Content-Length", b"5"))
    assert sum(isinstance(e, End) for e in events) == 3
    assert _bodies(events) == b"helloabcde"
    kinds = [type(e).__name__ for e in events if not isinstance(e, Body)]
    assert kinds == ["Head", "End", "Head", "End", "Head", "End"]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /" + b"a" * REQUEST_LINE_LIMIT + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414),
        (b"GET / HTTP/1.1\r\nX-A: " + b"v" * FIELD_LIMIT + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n", 431),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: +1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked, identity\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET / HTTP/1.1\r\nX-A : b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),
        (b"\x16\x03\x01\x00\x05hello", 400),
    ],
)
def test_limits_and_malformed_heads(data: bytes, status: int) -> None:
    for step in (0, 1):
        events = _feed(data, step)
        errors = [e for e in events if isinstance(e, ParseError)]
        assert len(errors) == 1 and errors[0].status == status, (step, events[-1:])
        assert isinstance(events[-1], ParseError)
        assert b"vvvv" not in errors[0].reason.encode() and b"aaaa" not in errors[0].reason.encode()


def test_just_under_the_limits_is_a_request() -> None:
    data = (
        b"GET /" + b"a" * (REQUEST_LINE_LIMIT - 1) + b" HTTP/1.1\r\n"
        b"X-A: " + b"v" * (FIELD_LIMIT - 3) + b"\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS - 1))
    ) + b"\r\n"
    events = _feed(data)
    assert [type(e) for e in events] == [Head, End]


def test_an_unfinished_head_is_bounded() -> None:
    """A head that never ends cannot hold more than HEAD_BYTES_LIMIT (and one read) in memory:
    every header under its own limit, the total over."""
    parser = H1Parser()
    parser.feed(b"GET / HTTP/1.1\r\n")
    fed = 0
    events: list[Event] = []
    while not events and fed <= 2 * HEAD_BYTES_LIMIT:
        events = parser.feed(b"X-A: " + b"v" * 4000 + b"\r\n")
        fed += 4007
    assert events == [ParseError(431, "request head too large")]
    assert fed <= HEAD_BYTES_LIMIT + 4007
    assert parser.done and parser.feed(b"GET / HTTP/1.1\r\n\r\n") == []


def test_nothing_after_an_error() -> None:
    parser = H1Parser()
    events = parser.feed(b"GET / HTTP/1.1\r\n" + HOST + b"\r\nBAD REQUEST LINE\r\n\r\n")
    assert [type(e) for e in events] == [Head, End, ParseError]
    assert parser.feed(b"GET / HTTP/1.1\r\n" + HOST + b"\r\n") == []


def test_malformed_chunk_after_the_head() -> None:
    events = _feed(b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n-1\r\n")
    assert [type(e) for e in events] == [Head, Body, ParseError]


@pytest.mark.parametrize("step", [0, 1])
def test_upgrade_hands_over_the_rest(step: int) -> None:
    head = b"GET /ws HTTP/1.1\r\n" + HOST + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    parser = H1Parser()
    events: list[Event] = []
    data = head + b"\x81\x05hello"
    for i in range(0, len(data), step or len(data)):
        events += parser.feed(data[i : i + (step or len(data))])
    head_event = events[0]
    assert isinstance(head_event, Head) and head_event.upgrade
    assert isinstance(events[1], End)
    raw = b"".join(e.data for e in events if isinstance(e, Upgraded))
    assert raw == b"\x81\x05hello"[: len(raw)]
    assert parser.done


def test_version_and_keep_alive() -> None:
    (h10,) = [e for e in _feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n") if isinstance(e, Head)]
    assert h10.version == (1, 0) and h10.keep_alive
    (close,) = [e for e in _feed(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n") if isinstance(e, Head)]
    assert not close.keep_alive
    (v2,) = [e for e in _feed(b"GET / HTTP/2.0\r\n" + HOST + b"\r\n") if isinstance(e, Head)]
    assert v2.version == (2, 0)  # the listener answers 505 (exit_server/httpguard.py)


def test_closed_parser_drops_its_cycle() -> None:
    parser = H1Parser()
    parser.close()
    assert parser.done and parser.feed(b"GET / HTTP/1.1\r\n\r\n") == []


def _parser_reads(data: bytes, step: int) -> tuple[list[tuple[bytes, bytes, bytes]], bool]:
    """The requests H1Parser reads from ``data`` fed ``step`` bytes at a time, and whether it
    stopped on an error. A request whose head the listener refuses (exit_server/httpguard.py
    ``head_problem``: a coding other than plain chunked, Transfer-Encoding on HTTP/1.0) ends
    the connection there, as the listener does."""
    parser = H1Parser()
    reads: list[tuple[bytes, bytes, bytes]] = []
    current: list[bytes] = []
    for i in range(0, len(data), step):
        for event in parser.feed(data[i : i + step]):
            if isinstance(event, Head):
                te = [v for n, v in event.raw_headers if n.lower() == b"transfer-encoding"]
                if te and (len(te) > 1 or te[0].strip().lower() != b"chunked" or event.version < (1, 1)):
                    return reads, True
                current = [event.method.encode(), event.target.encode(), b""]
            elif isinstance(event, Body):
                current[2] += event.data
            elif isinstance(event, End):
                reads.append((current[0], current[1], current[2]))
            elif isinstance(event, ParseError):
                return reads, True
    return reads, False


@settings(max_examples=400, deadline=None, derandomize=True)
@given(drawn=connection_bytes(), step=st.sampled_from([1, 3, 64, 1 << 20]))
def test_request_boundaries_are_what_h11_reads(drawn: Any, step: int) -> None:
    """The differential test of the performance issue, without sockets: whatever the cuts,
    what the parser reads is a prefix of what h11 reads (the same methods, targets and bodies:
    never a smuggled request nor a body framed otherwise); for well-formed bytes, all of it.
    tests/e2e/test_framing_oracle.py checks the same through a running exit server."""
    expected, how = h11_reads(drawn.data)
    seen, refused = _parser_reads(drawn.data, step)
    if refused or how.startswith("error"):
        assert seen == expected[: len(seen)], (drawn.data, seen, expected, how)
    else:
        assert seen[: len(expected)] == expected, (drawn.data, seen, expected, how)
        assert len(seen) <= len(expected) + 1, (drawn.data, seen, expected, how)  # h11 closes after /end
    if drawn.strict:
        assert seen == expected and how == "closed", (drawn.data, seen, expected, how)


@pytest.mark.parametrize(
    ("target", "origin", "path"),
    [
        ("/a%20b?q=1#f", "/a%20b?q=1#f", "/a b"),
        ("http://h.example/p%41?x#f", "/p%41?x", "/pA"),
        ("http://h.example", "/", "/"),
        ("http://h.example?x", "/?x", "/"),
        ("http://u@h.example:8080/a/b", "/a/b", "/a/b"),
        ("*", "*", "*"),
        ("h.example:443", "h.example:443", "h.example:443"),
    ],
)
def test_origin_form_and_the_routed_path(target: str, origin: str, path: str) -> None:
    """One reduction of a target (shared/httputil.py) serves both what the upstream is sent
    (exit_server/headers.py ``origin_form``) and what routes match (exit_server/h1.py)."""
    from exit_server.h1 import decode_path
    from shared.httputil import origin_form_of

    assert origin_form_of(target) == origin
    assert decode_path(target) == path
