"""shared.forwarding: the caller behind trusted proxies, RFC 7239 elements."""

from __future__ import annotations

import pytest

from shared.forwarding import TrustedProxies, forwarded_element, parse_networks

LB = TrustedProxies(parse_networks(["10.0.0.0/8", "2001:db8::/32"]))


@pytest.mark.parametrize(
    ("chain", "expected"),
    [
        ([], "10.0.0.9"),  # no header: the trusted peer itself
        (["198.51.100.7"], "198.51.100.7"),
        (["1.2.3.4, 198.51.100.7"], "198.51.100.7"),  # the caller may have written 1.2.3.4
        (["198.51.100.7, 10.1.1.1", "10.2.2.2"], "198.51.100.7"),  # trusted hops skipped
        (["10.1.1.1, 10.2.2.2"], "10.1.1.1"),  # all trusted: the leftmost
        (["garbage, 198.51.100.7"], "198.51.100.7"),
        (["198.51.100.7, garbage"], "10.0.0.9"),  # unparseable right after the peer: the peer
        (["[2001:db9::1]:443"], "2001:db9::1"),
        (["198.51.100.7:5000"], "198.51.100.7"),
    ],
)
def test_client_of(chain: list[str], expected: str) -> None:
    assert LB.client_of(chain, "10.0.0.9") == expected


def test_contains_and_mapped_addresses() -> None:
    assert LB.contains("10.3.4.5") and LB.contains("::ffff:10.3.4.5") and LB.contains("2001:db8::1")
    assert not LB.contains("192.0.2.1") and not LB.contains("") and not LB.contains("nonsense")
    assert not TrustedProxies(())


def test_parse_networks_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match="'10.0.0.0/33'"):
        parse_networks(["10.0.0.0/8", "10.0.0.0/33"])


def test_forwarded_element() -> None:
    assert (
        forwarded_element("192.0.2.1", "a.example:8080", "https") == 'for=192.0.2.1;host="a.example:8080";proto=https'
    )
    assert forwarded_element("2001:db8::1", "", "http") == 'for="[2001:db8::1]";proto=http'
    assert forwarded_element("", 'x"y', "http") == 'for=unknown;host="x\\"y";proto=http'
