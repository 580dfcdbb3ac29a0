"""shared.routing: host and path matching (docs/PROTOCOL.md section 11)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.routing import RouteTable, normalize_host, path_matches


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        ("App.Example.COM", "app.example.com"),
        ("app.example.com:8443", "app.example.com"),
        ("app.example.com.", "app.example.com"),
        ("app.example.com.:80", "app.example.com"),
        ("  spaced.example  ", "spaced.example"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        ("[::1", "[::1"),
        ("::1", "::1"),  # bare IPv6 (no port can be told apart): kept whole
        ("", ""),
    ],
)
def test_normalize_host(raw: str, host: str) -> None:
    assert normalize_host(raw) == host


@pytest.mark.parametrize(
    ("prefix", "path", "ok"),
    [
        ("/", "/anything", True),
        ("/", "", True),
        ("/api", "/api", True),
        ("/api", "/api/", True),
        ("/api", "/api/v1", True),
        ("/api", "/apix", False),
        ("/api", "/ap", False),
        ("/api", "/other", False),
        ("/api/", "/api/v1", True),
        ("/api/", "/api", False),
    ],
)
def test_path_matches(prefix: str, path: str, ok: bool) -> None:
    assert path_matches(prefix, path) is ok


def table(*entries: tuple[str, str, str]) -> RouteTable[str]:
    t: RouteTable[str] = RouteTable()
    for host, prefix, value in entries:
        t.add(host, prefix, value)
    return t


def test_exact_beats_wildcard_beats_default() -> None:
    t = table(
        ("app.example.com", "/", "exact"),
        ("*.example.com", "/", "wild"),
        ("default", "/", "default"),
    )
    assert t.lookup("app.example.com", "/x") == ["exact"]
    assert t.lookup("other.example.com", "/x") == ["wild"]
    assert t.lookup("a.b.example.com", "/x") == ["wild"]
    assert t.lookup("example.com", "/x") == ["default"]  # a wildcard needs at least one label
    assert t.lookup("elsewhere.org", "/") == ["default"]


def test_longest_wildcard_suffix_wins() -> None:
    t = table(("*.example.com", "/", "short"), ("*.eu.example.com", "/", "long"))
    assert t.lookup("a.eu.example.com", "/") == ["long"]
    assert t.lookup("a.us.example.com", "/") == ["short"]
    assert t.lookup("eu.example.com", "/") == ["short"]


def test_longest_path_prefix_on_a_segment_boundary() -> None:
    t = table(("h", "/", "root"), ("h", "/api", "api"), ("h", "/api/v2", "v2"))
    assert t.lookup("h", "/api/v2/x") == ["v2"]
    assert t.lookup("h", "/api/v1") == ["api"]
    assert t.lookup("h", "/apiv2") == ["root"]
    assert t.lookup("h", "/") == ["root"]


def test_chosen_host_does_not_fall_back_when_no_prefix_matches() -> None:
    t = table(("h", "/api", "api"), ("default", "/", "default"))
    assert t.lookup("h", "/other") == []  # the host is chosen first, then the path
    t = table(("h", "/api", "api"), ("h", "/v1", "v1"))
    assert t.lookup("h", "/v2") == []


def test_no_match() -> None:
    assert RouteTable[str]().lookup("h", "/") == []
    assert table(("*.example.com", "/", "w")).lookup("example.org", "/") == []


def test_several_values_share_a_key_and_remove() -> None:
    t = table(("H", "/", "a"), ("h", "/", "b"))
    assert t.lookup("h", "/") == ["a", "b"]
    assert t.holders("h", "/") == ["a", "b"]
    t.remove("h", "/", "a")
    assert t.lookup("h", "/") == ["b"]
    t.remove("h", "/", "missing")  # not there: nothing happens
    t.remove("h", "/", "b")
    assert t.lookup("h", "/") == [] and list(t.keys()) == []
    t.remove("h", "/", "b")
    t.remove("nowhere", "/", "b")


def test_remove_keeps_other_prefixes_and_cleans_empty_hosts() -> None:
    t = table(("*.example.com", "/", "w"), ("*.example.com", "/api", "wa"), ("default", "/", "d"), ("x", "/", "x"))
    t.remove("*.example.com", "/", "w")
    assert sorted(t.keys()) == [("*.example.com", "/api"), ("default", "/"), ("x", "/")]
    t.remove("*.example.com", "/api", "wa")
    t.remove("default", "/", "d")
    t.remove("x", "/", "x")
    assert list(t.keys()) == []
    assert t._wild == {} and t._exact == {} and t._default == {}


def test_holders_and_keys() -> None:
    t = table(("a.example", "/p", "1"), ("*.example", "/", "2"), ("default", "/q", "3"))
    assert t.holders("a.example", "/p") == ["1"]
    assert t.holders("a.example", "/") == []
    assert t.holders("missing", "/") == []
    assert t.holders("default", "/") == []
    assert list(t.keys()) == [("a.example", "/p"), ("*.example", "/"), ("default", "/q")]
    # holders returns a copy
    t.holders("a.example", "/p").append("x")
    assert t.holders("a.example", "/p") == ["1"]


def test_empty_default_bucket_means_no_match() -> None:
    t = table(("default", "/", "d"))
    t.remove("default", "/", "d")
    assert t.lookup("anything", "/") == []


segment = st.text(alphabet="abc", min_size=1, max_size=3)


@given(st.lists(segment, max_size=4), st.lists(segment, max_size=4))
def test_path_matches_agrees_with_segments(prefix_parts: list[str], path_parts: list[str]) -> None:
    prefix = "/" + "/".join(prefix_parts)
    path = "/" + "/".join(path_parts)
    expected = prefix == "/" or path_parts[: len(prefix_parts)] == prefix_parts
    assert path_matches(prefix, path) is expected


def test_match_names_the_pattern() -> None:
    t = table(("app.example.com", "/", "e"), ("*.example.com", "/api", "w"), ("default", "/", "d"))
    assert t.match("app.example.com", "/x") == ("app.example.com", ["e"])
    assert t.match("a.b.example.com", "/api/v1") == ("*.example.com", ["w"])
    assert t.match("a.example.com", "/other") == ("", [])  # the wildcard was chosen, no prefix matched
    assert t.match("example.org", "/") == ("default", ["d"])
    assert RouteTable[str]().match("h", "/") == ("", [])


def test_host_holders() -> None:
    t = table(("h", "/", "a"), ("h", "/api", "b"), ("*.x", "/", "c"))
    assert sorted(t.host_holders("h")) == ["a", "b"]
    assert t.host_holders("*.x") == ["c"]
    assert t.host_holders("missing") == []
