"""shared.proxyproto: PROXY protocol v2 headers (haproxy proxy-protocol.txt section 2.2)."""

from __future__ import annotations

import pytest

from shared.proxyproto import SIGNATURE, proxy_v2_header, split_hostport


def test_signature() -> None:
    assert SIGNATURE == bytes.fromhex("0d0a0d0a000d0a515549540a")


def test_ipv4_golden() -> None:
    assert proxy_v2_header("192.0.2.1:56324", "198.51.100.2:443") == SIGNATURE + bytes.fromhex(
        "21 11 000c c0000201 c6336402 dc04 01bb"
    )


def test_ipv6_golden() -> None:
    assert proxy_v2_header("[2001:db8::1]:1", "[::1]:2") == SIGNATURE + bytes.fromhex(
        "21 21 0024 20010db8000000000000000000000001 00000000000000000000000000000001 0001 0002"
    )


@pytest.mark.parametrize(("source", "destination"), [("192.0.2.1:1", "[::1]:2"), ("[::1]:1", "192.0.2.1:2")])
def test_mixed_families_are_sent_as_ipv6(source: str, destination: str) -> None:
    header = proxy_v2_header(source, destination)
    assert header[12:16] == bytes.fromhex("21 21 0024")
    assert bytes.fromhex("00000000000000000000ffffc0000201") in header


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("1.2.3.4:5", ("1.2.3.4", 5)), ("[::1]:5", ("::1", 5)), ("::1:5", ("::1", 5))],
)
def test_split_hostport(value: str, parsed: tuple[str, int]) -> None:
    assert split_hostport(value) == parsed


@pytest.mark.parametrize("value", ["1.2.3.4", "example.com:80", "1.2.3.4:http"])
def test_split_hostport_errors(value: str) -> None:
    with pytest.raises(ValueError):
        split_hostport(value)


def test_parse_round_trips_and_waits_for_more() -> None:
    from shared.proxyproto import parse_proxy_v2

    for source, expected in (("192.0.2.1:56324", "192.0.2.1"), ("[2001:db8::1]:1", "2001:db8::1")):
        header = proxy_v2_header(source, "198.51.100.2:443")
        for cut in range(len(header)):
            assert parse_proxy_v2(header[:cut]) is None
        assert parse_proxy_v2(header + b"GET /") == (len(header), expected)
    mixed = proxy_v2_header("192.0.2.1:1", "[::1]:2")  # IPv4-mapped: reported as IPv4
    assert parse_proxy_v2(mixed) == (len(mixed), "192.0.2.1")


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        SIGNATURE + bytes.fromhex("31 11 000c") + bytes(12),  # version 3
        SIGNATURE + bytes.fromhex("21 11 ffff"),  # longer than accepted
    ],
)
def test_parse_refuses(data: bytes) -> None:
    from shared.proxyproto import parse_proxy_v2

    with pytest.raises(ValueError):
        parse_proxy_v2(data)


def test_parse_local_command() -> None:
    from shared.proxyproto import parse_proxy_v2

    assert parse_proxy_v2(SIGNATURE + bytes.fromhex("20 00 0000")) == (16, None)
