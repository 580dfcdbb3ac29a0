"""exit_server.certstore: HOST.pem / HOST-key.pem pairs served per SNI name (wildcards one label
deep); a broken pair is skipped with a log line and never served; changes are picked up."""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from pathlib import Path

import pytest
import trustme

from exit_server.certstore import CertStore
from shared.errors import ConfigError


def write(ca: trustme.CA, directory: Path, stem: str, *names: str, **kwargs: dt.datetime) -> None:
    cert = ca.issue_cert(*(names or (stem,)), **kwargs)  # type: ignore[arg-type]
    (directory / f"{stem}.pem").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    (directory / f"{stem}-key.pem").write_bytes(cert.private_key_pem.bytes())


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def test_exact_and_wildcard_names(ca: trustme.CA, tmp_path: Path) -> None:
    write(ca, tmp_path, "app.test")
    write(ca, tmp_path, "*.wild.test")
    write(ca, tmp_path, "localhost")
    store = CertStore(tmp_path)
    assert store.reload(strict=True)
    assert [s.name for s in store.all()] == ["*.wild.test", "app.test", "localhost"]
    assert store.lookup("APP.test.") is not None and store.lookup("app.test").name == "app.test"  # type: ignore[union-attr]
    assert store.lookup("x.wild.test").name == "*.wild.test"  # type: ignore[union-attr]
    for miss in ("wild.test", "a.b.wild.test", "other.test", "", None):
        assert store.lookup(miss) is None
    served = store.lookup("app.test")
    assert served is not None and served.source == "file" and "trustme" in served.issuer.lower()


def test_broken_pairs_are_skipped_with_a_reason(
    ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(ca, tmp_path, "good.test")
    write(ca, tmp_path, "other.test", "not-other.test")  # does not name its file's host
    write(ca, tmp_path, "old.test", not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    write(ca, tmp_path, "swapped.test")
    (tmp_path / "swapped.test-key.pem").write_bytes((tmp_path / "good.test-key.pem").read_bytes())
    write(ca, tmp_path, "nokey.test")
    (tmp_path / "nokey.test-key.pem").unlink()
    (tmp_path / "bad name.pem").write_text("x")
    (tmp_path / "junk.test.pem").write_text("not a certificate")
    (tmp_path / "junk.test-key.pem").write_text("not a key")
    with caplog.at_level(logging.ERROR, logger="exit_server.certstore"):
        store = CertStore(tmp_path)
        store.reload(strict=True)
    assert [s.name for s in store.all()] == ["good.test"]
    text = caplog.text
    for reason in (
        "does not name other.test",
        "not valid now",
        "cannot load swapped.test.pem",
        "has no nokey.test-key.pem",
    ):
        assert reason in text, reason
    assert "bad name.pem is not HOST.pem" in text and "cannot read" in text


def test_reload_sees_added_replaced_and_removed_files(ca: trustme.CA, tmp_path: Path) -> None:
    store = CertStore(tmp_path)
    assert not store.reload(strict=True) and store.all() == []
    write(ca, tmp_path, "a.test")
    assert store.reload() and store.lookup("a.test") is not None
    assert not store.reload()  # nothing changed
    first = store.lookup("a.test")
    write(ca, tmp_path, "a.test", not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=3))
    assert store.reload() and store.lookup("a.test") is not first
    (tmp_path / "a.test.pem").unlink()
    assert store.reload() and store.lookup("a.test") is None


def test_an_unlistable_directory(tmp_path: Path) -> None:
    store = CertStore(tmp_path / "missing")
    with pytest.raises(ConfigError, match="--public-cert-dir"):
        store.reload(strict=True)
    assert not store.reload()  # later: logged, what was loaded is kept


def test_the_sni_callback_switches_context_or_refuses(ca: trustme.CA, tmp_path: Path) -> None:
    write(ca, tmp_path, "app.test")
    store = CertStore(tmp_path)
    store.reload(strict=True)
    listener = store.listener_context()
    assert listener.sni_callback is not None
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = listener.wrap_bio(incoming, outgoing, server_side=True)
    assert store.sni_callback(obj, "app.test", listener) is None
    assert obj.context is store.lookup("app.test").context  # type: ignore[union-attr]
    assert store.sni_callback(obj, "nope.test", listener) == ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
    assert store.sni_callback(obj, None, listener) == ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
