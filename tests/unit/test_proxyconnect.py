"""tunnel_client/proxyconnect.py without sockets: the CONNECT exchange with Basic, NTLM-style
multi-round logins (a stub context), drained 407 bodies, a proxy that closes between rounds,
and every way it is refused."""

from __future__ import annotations

import base64

import pytest

from tunnel_client import proxyconnect
from tunnel_client.proxyconnect import MAX_ROUNDS, ConnectHandshake, ConnectRefused

LOGIN = ("svc", "pw")


def answer(status: int, *headers: str, body: bytes = b"", chunked: bool = False) -> bytes:
    reason = {200: "Connection established", 407: "Proxy Authentication Required", 403: "Forbidden"}[status]
    lines = [f"HTTP/1.1 {status} {reason}", *headers]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7))
        payload += b"0\r\n\r\n"
    else:
        if status != 200:
            lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def feed_in_pieces(hs: ConnectHandshake, data: bytes, size: int = 3) -> proxyconnect.Answer:
    got = None
    for i in range(0, len(data), size):
        assert got is None, "answer complete before all its bytes"
        got = hs.receive(data[i : i + size])
    assert got is not None
    return got


def auth_of(request: bytes) -> str | None:
    for line in request.decode().split("\r\n"):
        if line.lower().startswith("proxy-authorization:"):
            return line.partition(":")[2].strip()
    return None


def test_open_at_once_without_a_login() -> None:
    hs = ConnectHandshake("tunnel.test:443", None, "proxy", "ua")
    request = hs.request()
    assert (
        request.startswith(b"CONNECT tunnel.test:443 HTTP/1.1\r\nHost: tunnel.test:443\r\n")
        and auth_of(request) is None
    )
    assert hs.next_step(feed_in_pieces(hs, answer(200)))


def test_basic_is_sent_only_after_the_proxy_asks_and_the_407_body_is_drained() -> None:
    hs = ConnectHandshake("t:443", LOGIN, "proxy", "ua")
    assert auth_of(hs.request()) is None  # never a password before the proxy names its scheme
    first = feed_in_pieces(hs, answer(407, 'Proxy-Authenticate: Basic realm="corp"', body=b"<html>" * 50, chunked=True))
    assert not hs.next_step(first) and first.keep_alive
    assert auth_of(hs.request()) == "Basic " + base64.b64encode(b"svc:pw").decode()
    assert hs.next_step(feed_in_pieces(hs, answer(200)))


def test_a_wrong_basic_password_is_refused_with_what_was_offered() -> None:
    hs = ConnectHandshake("t:443", LOGIN, "proxy", "ua")
    hs.request()
    hs.next_step(feed_in_pieces(hs, answer(407, "Proxy-Authenticate: Basic realm=x")))
    hs.request()
    with pytest.raises(ConnectRefused) as info:
        hs.next_step(feed_in_pieces(hs, answer(407, "Proxy-Authenticate: Basic realm=x")))
    assert info.value.status == 407 and info.value.offered == ["Basic"]


class StubContext:
    """Two messages out, the challenge in between: the shape of NTLM."""

    def __init__(self) -> None:
        self.seen: list[bytes | None] = []

    def step(self, in_token: bytes | None = None) -> bytes | None:
        self.seen.append(in_token)
        return b"type1" if in_token is None else b"type3:" + in_token


def test_ntlm_is_preferred_and_runs_its_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    contexts: list[StubContext] = []

    def make(scheme: str, login: tuple[str, str], host: str) -> StubContext:
        assert (scheme, login, host) == ("ntlm", LOGIN, "proxy.corp")
        contexts.append(StubContext())
        return contexts[-1]

    monkeypatch.setattr(proxyconnect, "_context", make)
    monkeypatch.setattr(proxyconnect, "spnego_available", lambda: True)
    hs = ConnectHandshake("t:443", LOGIN, "proxy.corp", "ua")
    hs.request()
    offer = answer(407, "Proxy-Authenticate: Basic realm=x", "Proxy-Authenticate: NTLM")
    assert not hs.next_step(feed_in_pieces(hs, offer))
    assert auth_of(hs.request()) == "NTLM " + base64.b64encode(b"type1").decode()
    challenge = base64.b64encode(b"nonce").decode()
    assert not hs.next_step(feed_in_pieces(hs, answer(407, f"Proxy-Authenticate: NTLM {challenge}")))
    assert auth_of(hs.request()) == "NTLM " + base64.b64encode(b"type3:nonce").decode()
    assert hs.next_step(feed_in_pieces(hs, answer(200)))
    assert contexts[0].seen == [None, b"nonce"]


def test_a_proxy_closing_between_rounds_restarts_the_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxyconnect, "_context", lambda *a: StubContext())
    monkeypatch.setattr(proxyconnect, "spnego_available", lambda: True)
    hs = ConnectHandshake("t:443", LOGIN, "p", "ua")
    hs.request()
    closing = feed_in_pieces(hs, answer(407, "Proxy-Authenticate: NTLM", "Connection: close"))
    assert not hs.next_step(closing) and not closing.keep_alive
    hs.restart()  # the caller opened a new connection
    assert auth_of(hs.request()) == "NTLM " + base64.b64encode(b"type1").decode()


def test_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    hs = ConnectHandshake("t:443", LOGIN, "p", "ua")
    hs.request()
    with pytest.raises(ConnectRefused, match="403 Forbidden"):
        hs.next_step(feed_in_pieces(hs, answer(403)))
    # NTLM only, without pyspnego: refused, naming what was offered
    monkeypatch.setattr(proxyconnect, "spnego_available", lambda: False)
    hs = ConnectHandshake("t:443", LOGIN, "p", "ua")
    hs.request()
    with pytest.raises(ConnectRefused) as info:
        hs.next_step(feed_in_pieces(hs, answer(407, "Proxy-Authenticate: NTLM", "Proxy-Authenticate: Negotiate")))
    assert info.value.offered == ["NTLM", "Negotiate"]
    # no login configured
    hs = ConnectHandshake("t:443", None, "p", "ua")
    hs.request()
    with pytest.raises(ConnectRefused):
        hs.next_step(feed_in_pieces(hs, answer(407, "Proxy-Authenticate: Basic realm=x")))


def test_rounds_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxyconnect, "_context", lambda *a: StubContext())
    monkeypatch.setattr(proxyconnect, "spnego_available", lambda: True)
    hs = ConnectHandshake("t:443", LOGIN, "p", "ua")
    with pytest.raises(ConnectRefused):
        for _ in range(MAX_ROUNDS + 1):
            hs.request()
            hs.next_step(feed_in_pieces(hs, answer(407, "Proxy-Authenticate: NTLM Zm9v")))
    assert hs.rounds <= MAX_ROUNDS


@pytest.mark.parametrize(
    "bad",
    [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 abc Nope\r\n\r\n", b"HTTP/1.1 407 x\r\nContent-Length: 9999999\r\n\r\n"],
)
def test_garbage_from_the_proxy_is_an_error(bad: bytes) -> None:
    hs = ConnectHandshake("t:443", None, "p", "ua")
    hs.request()
    with pytest.raises(ValueError):
        hs.receive(bad)


def test_a_head_without_end_is_bounded() -> None:
    hs = ConnectHandshake("t:443", None, "p", "ua")
    hs.request()
    with pytest.raises(ValueError, match="too large"):
        for _ in range(100):
            hs.receive(b"X-Filler: " + b"a" * 1000 + b"\r\n")


def test_a_bad_chunk_size_is_an_error() -> None:
    hs = ConnectHandshake("t:443", None, "p", "ua")
    hs.request()
    with pytest.raises(ValueError, match="chunk"):
        hs.receive(b"HTTP/1.1 407 x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n")
