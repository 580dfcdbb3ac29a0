"""Guardrail rules on request heads (tunnel_client/guard.py), with properties over arbitrary
targets: whatever passes can never move the upstream URL off its configured origin."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from yarl import URL

from shared.frames import ResetCode
from shared.heads import RequestHead, StreamKind
from tunnel_client import guard
from tunnel_client.guard import (
    MAX_HEADER_BYTES,
    Guard,
    Refused,
    canonical_path,
    check_headers,
    check_method,
    check_tcp_target,
    parse_allow_paths,
    path_allowed,
    split_target,
)

latin1 = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=80)
tricky = st.lists(
    st.sampled_from(
        [
            "/",
            "//",
            "@",
            ":",
            "..",
            ".",
            "%2e",
            "%2E",
            "%2f",
            "%5c",
            "\\",
            "?",
            "#",
            ";",
            "a",
            "evil",
            "127.0.0.1",
            ":1",
            "%",
            "%zz",
            " ",
            "\r\n",
            "http:",
            "%40",
        ]
    ),
    max_size=12,
).map("".join)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/", ("/", None)),
        ("/a/b?x=1&y=%20z", ("/a/b", "x=1&y=%20z")),
        ("/a/../b", ("/b", None)),
        ("/a/%2e%2E/b", ("/b", None)),
        ("/../../etc/passwd", ("/etc/passwd", None)),
        ("/a/b/..", ("/a/", None)),
        ("/a/./b/.", ("/a/b/", None)),
        ("/%7e%41%2f%2F", ("/~A%2F%2F", None)),
        ("/a\\b", ("/a%5Cb", None)),
        ("/\xe9", ("/%E9", None)),
        ("/x@evil:1/y", ("/x@evil:1/y", None)),
        ("/x?", ("/x", "")),
        ("/x?a=%zz", ("/x", "a=%25zz")),
    ],
)
def test_split_target_canonical(target: str, expected: tuple[str, str | None]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "",
        "*",
        "http://169.254.169.254/",
        "//evil/x",
        "@evil:1/",
        "evil:1",
        ":1/x",
        "/x y",
        "/x\r\nHost: e",
        "/x\x00",
        "/x#f",
        "/x%zz",
        "/x%2",
        "/..;/a",
        "/a/.;x/b",
        "/a/..//evil",
        "/%2e%2e//evil",
        "/" + "a" * 20_000,
    ],
)
def test_split_target_refuses(target: str) -> None:
    with pytest.raises(Refused) as info:
        split_target(target)
    assert info.value.code is ResetCode.FORBIDDEN


@given(st.one_of(latin1, tricky, tricky.map(lambda t: "/" + t)))
@example("/@evil:1/")
@example("/%2e%2e/%2e%2e//evil")
def test_whatever_passes_keeps_the_origin(target: str) -> None:
    try:
        path, query = split_target(target)
    except Refused:
        return
    assert path.startswith("/") and not path.startswith("//")
    assert path.isascii() and all(0x21 <= ord(c) < 0x7F for c in path + (query or ""))
    assert "#" not in path + (query or "")
    assert "/../" not in path + "/" and "/./" not in path + "/"
    assert canonical_path(path) == path  # idempotent: what was checked is what is sent
    for base in ("", "/base"):
        url = URL.build(
            scheme="http", authority="127.0.0.1:3000", path=base + path, query_string=query or "", encoded=True
        )
        assert (url.host, url.port) == ("127.0.0.1", 3000)
        reparsed = URL(f"http://127.0.0.1:3000{base}{path}" + ("" if query is None else "?" + query), encoded=True)
        assert (reparsed.host, reparsed.port) == ("127.0.0.1", 3000)


@given(st.text(max_size=20), st.text(max_size=20), st.sampled_from(["\r", "\n", "\x00", "\x7f", "\x1b"]))
def test_controls_in_header_values_are_refused(before: str, after: str, bad: str) -> None:
    with pytest.raises(Refused):
        check_headers([("X-Test", before + bad + after)])


def test_header_rules() -> None:
    check_headers([("X-Ok", "a\tb c"), ("Set-Cookie", "a=b; Path=/"), ("X-Latin", "\xe9")])
    for name in ("", "X A", "X:A", "X\r\nY", "X\x00"):
        with pytest.raises(Refused):
            check_headers([(name, "v")])
    with pytest.raises(Refused, match="too large"):
        check_headers([("X-Big", "v" * (MAX_HEADER_BYTES + 1))])


@pytest.mark.parametrize("method", ["GET", "POST", "PROPFIND", "M-SEARCH", "PURGE"])
def test_token_methods_pass(method: str) -> None:
    check_method(method, StreamKind.HTTP)


@pytest.mark.parametrize("method", ["", "CONNECT", "connect", "GET /", "GET\r\n", "G\x00T", "X" * 40])
def test_bad_methods_are_refused(method: str) -> None:
    with pytest.raises(Refused):
        check_method(method, StreamKind.HTTP)


def test_websocket_is_get() -> None:
    check_method("GET", StreamKind.WEBSOCKET)
    with pytest.raises(Refused):
        check_method("POST", StreamKind.WEBSOCKET)


@pytest.mark.parametrize(
    "target", ["", "0", "65536", "99999", "+80", "-1", "8 0", "８０", "7\xb2", "127.0.0.1:80", "123456"]
)
def test_tcp_target_must_be_a_port(target: str) -> None:
    with pytest.raises(Refused) as info:
        check_tcp_target(target)
    assert info.value.code is ResetCode.NO_UPSTREAM


def test_tcp_target_ok() -> None:
    assert check_tcp_target("1") == 1 and check_tcp_target("65535") == 65535


def test_guard_checks_the_whole_head() -> None:
    guard = Guard()
    head = RequestHead(StreamKind.HTTP, "GET", "/a/../b?q", "app.example.com:8080", "http", "", (("X", "1"),))
    assert guard.check_request(head) == ("/b", "q")
    for bad in (
        RequestHead(StreamKind.HTTP, "GET", "/", "a@b", "http", "", ()),
        RequestHead(StreamKind.HTTP, "GET", "/", "a b", "http", "", ()),
        RequestHead(StreamKind.HTTP, "GET", "/", "a/b", "http", "", ()),
    ):
        with pytest.raises(Refused):
            guard.check_request(bad)


def test_parse_allow_paths() -> None:
    assert parse_allow_paths(["app.example.com=/api/*,/health", "/metrics", "API.example.com/v1=/v1/*"]) == {
        ("app.example.com", "/"): ("/api/*", "/health", "/metrics"),
        ("api.example.com", "/v1"): ("/v1/*",),
    }
    assert parse_allow_paths(["*.example.com=/*", "default=/"]) == {
        ("*.example.com", "/"): ("/*",),
        ("default", "/"): ("/",),
    }
    for bad in (["/health"], ["=/x"], ["a=x"], ["a=/x*"], ["a=/*/x"], ["a=/a/../b"], ["a=/%7e"], ["a=/x y"]):
        with pytest.raises(ValueError):
            parse_allow_paths(bad)


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/api", True),
        ("/api/", True),
        ("/api/x/y", True),
        ("/health", True),
        ("/apix", False),
        ("/health/", False),
        ("/healthz", False),
        ("/API/x", False),
        ("/", False),
    ],
)
def test_path_allowed(path: str, allowed: bool) -> None:
    assert path_allowed(("/api/*", "/health"), path) is allowed


def test_everything_pattern() -> None:
    assert path_allowed(("/*",), "/") and path_allowed(("/*",), "/a/b")


def test_allow_list_refuses_escaped_separators() -> None:
    guard = Guard({("app", "/"): ("/api/*",)})
    guard.check_route("app", "/", "/api/x")
    guard.check_route("other", "/", "/admin")  # no list: everything
    for path in ("/admin", "/api/x%2F..%2F..%2Fadmin", "/api/a%5Cb"):
        with pytest.raises(Refused) as info:
            guard.check_route("app", "/", path)
        assert info.value.code is ResetCode.FORBIDDEN


# The per-character and per-header forms the fast paths stand in for (as before them): what
# passes, is refused or is rewritten must not change.
def _reference_check_headers(headers: list[tuple[str, str]]) -> None:
    total = 0
    for name, value in headers:
        total += len(name) + len(value)
        if total > MAX_HEADER_BYTES:
            raise Refused("request head too large")
        if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
            raise Refused("header name is not a token")
        if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value):
            raise Refused("control character in a header value")


def _outcome(call: Callable[[], object]) -> object:
    try:
        return call()
    except Refused:
        return Refused


_TRICKY = st.text(alphabet="/.%;:@?aZ09-_~2F5e!*= \t\r\n\x00\x7f\xe9\u0100", max_size=24)


@given(_TRICKY)
@example("/a/..;/b")
@example("//x")
@example("/a/.")
@example("")
@example("/%2e%2E/x")
def test_plain_path_fast_path_changes_nothing(path: str) -> None:
    slow = _outcome(lambda: guard._remove_dot_segments(guard._normalise_escapes(path)))
    assert _outcome(lambda: canonical_path(path)) == slow


@given(_TRICKY)
@example("a=%zz")
def test_plain_query_fast_path_changes_nothing(query: str) -> None:
    assert guard._canonical_query(query) == guard._canonical_query_general(query)


@given(st.lists(st.tuples(_TRICKY, _TRICKY), max_size=5))
@example([("X\nY", "v")])
@example([("A", "v"), ("", "w")])
@example([("A\n", "v")])
@example([("\nA", "v")])
@example([("A\n\nB", "v")])
@example([("", "v")])
@example([("A", "v\x7f")])
@example([("A", "\xe9\x01"), ("B", "\u0100")])
@example([("\xe9", "v")])
def test_header_check_in_two_calls_refuses_what_one_per_header_did(headers: list[tuple[str, str]]) -> None:
    assert (_outcome(lambda: check_headers(headers)) is Refused) == (
        _outcome(lambda: _reference_check_headers(headers)) is Refused
    )
