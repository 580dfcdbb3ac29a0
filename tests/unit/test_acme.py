"""exit_server.acme without a CA: the schedule (renewal at two thirds with jitter, backoff,
Retry-After, the hourly order cap), which names are wanted, the storage rules (0600, atomic),
the HTTP-01 answer's Host check and the TLS-ALPN-01 certificate (RFC 8737). tests/e2e/test_acme.py
runs the same code against pebble."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import hashlib
import ssl
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509

from exit_server import acme as acme_mod
from exit_server.acme import (
    ORDERS_PER_HOUR,
    TLSALPN01,
    AcmeFiles,
    AcmeIssuer,
    Challenges,
    _Failed,
    _Network,
    renew_at,
    retry_after_seconds,
    retry_delay,
    tls_alpn_context,
)
from exit_server.certstore import CertStore
from tests.waiting import wait_until

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_renewal_lands_between_three_fifths_and_two_thirds_of_the_lifetime() -> None:
    end = T0 + dt.timedelta(days=90)
    lifetime = (end - T0).total_seconds()
    seen = [renew_at(T0, end) for _ in range(500)]
    for at in seen:
        fraction = (at - T0.timestamp()) / lifetime
        assert 2 / 3 - 0.05 <= fraction <= 2 / 3
    assert len({round(a) for a in seen}) > 400  # jittered, not one instant for a fleet


def test_retry_delays_grow_then_stay_hourly_and_rate_limits_wait_an_hour() -> None:
    for failures, base in ((1, 60), (2, 120), (3, 300), (4, 600), (5, 1800), (6, 3600), (40, 3600)):
        for _ in range(50):
            assert base * 0.9 <= retry_delay(failures) <= base
    assert retry_delay(1, rate_limited=True) >= 3600 * 0.9


def test_retry_after_in_seconds_or_as_a_date() -> None:
    now = T0.timestamp()
    assert retry_after_seconds("120", now) == 120
    date = email.utils.format_datetime(T0 + dt.timedelta(hours=2), usegmt=True)
    assert retry_after_seconds(date, now) == pytest.approx(7200)
    assert retry_after_seconds(email.utils.format_datetime(T0 - dt.timedelta(hours=1), usegmt=True), now) == 0
    assert retry_after_seconds("99999999", now) == 7 * 86400  # capped at a week
    for junk in (None, "", "soon", "-5", "1e9"):
        assert retry_after_seconds(junk, now) is None


def test_the_network_layer_keeps_the_retry_after_of_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def answer(status: int, headers: dict[str, str]) -> requests.Response:
        response = requests.Response()
        response.status_code = status
        response.headers.update(headers)
        response._content = b"{}"
        return response

    replies = [answer(429, {"Retry-After": "3600"}), answer(200, {"Retry-After": "1"})]
    monkeypatch.setattr(requests.Session, "request", lambda *a, **k: replies.pop(0))
    net = _Network(key=None)  # type: ignore[arg-type]
    net._send_request("GET", "https://ca.test/x")
    assert net.retry_after == "3600"
    net._send_request("GET", "https://ca.test/x")
    assert net.retry_after == "3600"  # a success does not clear what the error said


def test_account_and_certificate_files_are_private_and_replaced_whole(tmp_path: Path) -> None:
    files = AcmeFiles(tmp_path / "acme")
    key = files.account_key()
    assert files.account_key().private_numbers() == key.private_numbers()  # made once, then read
    files.save_account_url("https://ca.test/dir", "https://ca.test/acct/1")
    assert files.account_url("https://ca.test/dir") == "https://ca.test/acct/1"
    assert files.account_url("https://other.test/dir") is None  # an account belongs to its CA
    files.save_cert("app.test", b"chain", b"key")
    files.save_cert("app.test", b"chain2", b"key2")
    assert files.stored() == ["app.test"]
    for path in tmp_path.joinpath("acme").rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o600, path
            assert not path.name.startswith("."), f"temporary file left behind: {path}"
    assert files.paths("app.test")[0].read_bytes() == b"chain2"


def test_an_unreadable_account_key_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "account-key.pem").write_text("not a key")
    with pytest.raises(Exception, match="--acme-dir: cannot read"):
        AcmeFiles(tmp_path).account_key()


def test_http01_answers_only_the_pending_token_for_its_own_host() -> None:
    c = Challenges()
    c.http["tok"] = ("app.test", "tok.thumb")
    assert c.http_answer("app.test", "/.well-known/acme-challenge/tok") == "tok.thumb"
    assert c.http_answer("evil.test", "/.well-known/acme-challenge/tok") is None  # DNS rebinding
    assert c.http_answer("app.test", "/.well-known/acme-challenge/other") is None
    assert c.http_answer("app.test", "/tok") is None


def test_tls_alpn01_certificate_carries_the_critical_acme_identifier() -> None:
    ctx = tls_alpn_context("app.test", "tok.thumb")
    assert isinstance(ctx, ssl.SSLContext)
    # the context holds the certificate; rebuild the expected extension from the key authorization
    digest = hashlib.sha256(b"tok.thumb").digest()
    cert = acme_mod._alpn_certificate("app.test", "tok.thumb")[0]
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31"))
    assert ext.critical and ext.value.public_bytes() == b"\x04\x20" + digest
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["app.test"]


def test_the_tls_alpn01_challenge_is_known_to_the_acme_package() -> None:
    from acme import challenges

    chall = challenges.Challenge.from_json({"type": "tls-alpn-01", "token": "a" * 43, "url": "x"})
    assert isinstance(chall, TLSALPN01)
    assert TLSALPN01.response_cls().to_partial_json() == {}  # RFC 8555: the answer is {}


class Clock:
    def __init__(self) -> None:
        self.now = T0.timestamp()

    def __call__(self) -> float:
        return self.now


def issuer(tmp_path: Path, clock: Clock, results: list[str]) -> AcmeIssuer:
    return AcmeIssuer(
        "https://ca.test/dir",
        AcmeFiles(tmp_path),
        CertStore(None),
        on_result=results.append,
        clock=clock,
    )


def test_wanted_names_skip_wildcards_default_and_repeats(tmp_path: Path) -> None:
    a = issuer(tmp_path, Clock(), [])
    for name in ("*.apps.test", "default", "App.Test.", "app.test"):
        a.want(name)
    assert a.pending() == {"app.test"}


@pytest.mark.asyncio
async def test_a_failure_backs_off_honours_retry_after_and_counts(tmp_path: Path) -> None:
    clock, results = Clock(), []
    a = issuer(tmp_path, clock, results)

    def fail(name: str) -> tuple[bytes, bytes]:
        raise _Failed("urn:ietf:params:acme:error:rateLimited: too many", rate_limited=True, retry_after=5 * 3600)

    a._obtain = fail  # type: ignore[method-assign]
    a.want("app.test")
    await a._attempt(asyncio.get_running_loop(), "app.test")
    state = a._states["app.test"]
    assert results == ["failed"] and state.failures == 1
    assert state.next_try == pytest.approx(clock.now + 5 * 3600)  # the CA's Retry-After, not 1 minute
    assert a._due()[0] == []
    [status] = a.status()
    assert status["state"] == "ordering" and status["failures"] == 1
    assert status["next_attempt"] == dt.datetime.fromtimestamp(state.next_try, dt.UTC).isoformat(timespec="seconds")
    clock.now += 5 * 3600
    assert a._due()[0] == ["app.test"]
    a._executor.shutdown()


@pytest.mark.asyncio
async def test_orders_per_hour_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock, results = Clock(), []
    a = issuer(tmp_path, clock, results)
    attempted: list[str] = []

    async def attempt(loop: Any, name: str) -> None:
        attempted.append(name)
        a._wanted.discard(name)

    monkeypatch.setattr(a, "_attempt", attempt)
    for i in range(ORDERS_PER_HOUR + 5):
        a.want(f"h{i}.test")
    a.start()
    try:
        await wait_until(lambda: len(attempted) >= ORDERS_PER_HOUR, timeout=10, what="the first hour's orders")
        await asyncio.sleep(0)  # one more turn of the task: it must not start another order
        assert len(attempted) == ORDERS_PER_HOUR
        clock.now += 3601
        a._wake.set()
        await wait_until(lambda: len(attempted) == ORDERS_PER_HOUR + 5, timeout=10, what="the rest, an hour later")
    finally:
        await a.close()


def test_a_rejected_nonce_is_retried_at_once_a_few_times(tmp_path: Path) -> None:
    a = issuer(tmp_path, Clock(), [])
    outcomes: list[object] = [_Failed("badNonce", bad_nonce=True), _Failed("badNonce", bad_nonce=True), (b"c", b"k")]

    def once(name: str) -> tuple[bytes, bytes]:
        outcome = outcomes.pop(0)
        if isinstance(outcome, _Failed):
            raise outcome
        return outcome  # type: ignore[return-value]

    a._obtain_once = once  # type: ignore[method-assign]
    assert a._obtain("app.test") == (b"c", b"k")
    outcomes[:] = [_Failed("badNonce", bad_nonce=True)] * 3
    with pytest.raises(_Failed):
        a._obtain("app.test")
    outcomes[:] = [_Failed("malformed")]
    with pytest.raises(_Failed, match="malformed"):
        a._obtain("app.test")
    a._executor.shutdown()


def test_a_withdrawn_order_drops_only_its_own_challenge_answers() -> None:
    """A fleet's order withdraws exactly what it placed (its tokens, its TLS-ALPN-01 key
    authorization): a later order's answers for the same name, which may arrive first on a
    server, stay in place for the CA's validation."""
    answers = Challenges()
    answers.http["old-token"] = ("app.test", "old-validation")
    answers.http["new-token"] = ("app.test", "new-validation")
    answers.http["other-token"] = ("other.test", "other-validation")
    answers.alpn["app.test"] = ssl.create_default_context()
    answers.alpn_keys["app.test"] = "new-key"  # the newer order replaced the old one's answer
    answers.forget("app.test", ["old-token"], ["old-key"])
    assert set(answers.http) == {"new-token", "other-token"}
    assert "app.test" in answers.alpn
    answers.forget("app.test", ["new-token"], ["new-key"])
    assert set(answers.http) == {"other-token"} and "app.test" not in answers.alpn
    assert "app.test" not in answers.alpn_keys


def test_a_late_done_from_an_earlier_order_keeps_a_later_orders_answers(tmp_path: Path) -> None:
    """The fleet's channel (exit_server/acmefleet.py) as a server sees it: a later order's
    answer for a name arrives, then the earlier order's "done" for the same name. The later
    answer stays: the CA is about to validate it."""
    a = issuer(tmp_path, Clock(), [])
    a._on_fleet({"kind": "http", "token": "tok-new", "name": "app.test", "validation": "val-new"})
    a._on_fleet({"kind": "done", "name": "app.test", "tokens": ["tok-old"], "alpn": []})
    assert a.challenges.http_answer("app.test", "/.well-known/acme-challenge/tok-new") == "val-new"
    a._on_fleet({"kind": "done", "name": "app.test", "tokens": ["tok-new"], "alpn": []})
    assert a.challenges.http_answer("app.test", "/.well-known/acme-challenge/tok-new") is None
