"""exit_server.clienthello: SNI and ALPN from real ClientHellos (made by OpenSSL through the ssl
module), any split of the bytes, and refusals of what is not a ClientHello."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exit_server.clienthello import MAX_HELLO, ClientHello, alert, parse_client_hello


def hello(server_name: str | None, alpn: list[str] | None = None, tls13: bool = True) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("tls13", [True, False])
def test_sni_and_alpn(tls13: bool) -> None:
    got = parse_client_hello(hello("App.Example.COM", ["h2", "http/1.1"], tls13))
    assert got == ClientHello("app.example.com", ("h2", "http/1.1"))


def test_no_sni() -> None:
    assert parse_client_hello(hello(None)) == ClientHello(None, ())


def test_acme_tls_alpn() -> None:
    assert parse_client_hello(hello("a.test", ["acme-tls/1"])) == ClientHello("a.test", ("acme-tls/1",))


data = hello("split.test", ["http/1.1"])


@given(st.integers(min_value=0, max_value=len(data) - 1))
def test_a_prefix_needs_more(cut: int) -> None:
    assert parse_client_hello(data[:cut]) is None


def test_a_hello_spanning_records() -> None:
    record = data
    body = record[5:]
    half = len(body) // 2
    split = b"\x16\x03\x01" + half.to_bytes(2, "big") + body[:half]
    split += b"\x16\x03\x01" + (len(body) - half).to_bytes(2, "big") + body[half:]
    assert parse_client_hello(split) == ClientHello("split.test", ("http/1.1",))


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",  # plain HTTP on the TLS port
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello
        b"\x17\x03\x03\x00\x01x",  # application data
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00",  # truncated body
    ],
)
def test_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_client_hello(raw)


def test_an_endless_hello_is_bounded() -> None:
    huge = b"\x16\x03\x01\x40\x00\x01\xff\xff\xff"  # a 16 KiB record declaring a 16 MiB ClientHello
    assert parse_client_hello(huge) is None  # the record is not complete yet
    with pytest.raises(ValueError):
        parse_client_hello(huge + bytes(MAX_HELLO))
    drip = b"".join(b"\x16\x03\x01\x00\x01\x01" for _ in range(2 * MAX_HELLO // 6 + 1))
    with pytest.raises(ValueError):
        parse_client_hello(drip)


def test_alert_record() -> None:
    assert alert(112) == b"\x15\x03\x01\x00\x02\x02\x70"
