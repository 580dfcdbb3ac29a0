"""exit_server.access (site look-up, IP lists, challenges) and exit_server.httpguard (head
checks, reload polling), without sockets. The parser's limits: tests/unit/test_h1server.py."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from multidict import CIMultiDict

from exit_server.access import AccessRules
from exit_server.hashing import hash_secret
from exit_server.httpguard import head_problem
from exit_server.reload import Reloader
from shared.heads import RequestHead, StreamKind


def _rules(tmp_path: Path) -> AccessRules:
    path = tmp_path / "access.toml"
    path.write_text(
        '[[site]]\nhosts = ["a.example", "*.b.example"]\nallow_ips = ["10.0.0.0/8", "2001:db8::/32"]\n'
        '[[site]]\nhosts = ["*.x.b.example"]\nrealm = "inner"\n'
        f'basic = ["alice:{hash_secret("pw", ln=4)}"]\n'
        '[[site]]\nhosts = ["*"]\nallow_ips = ["192.0.2.1"]\n'
    )
    return AccessRules(path)


def test_most_specific_site_wins(tmp_path: Path) -> None:
    rules = _rules(tmp_path)
    site = rules.site_for("a.example")
    assert site is not None and site.allow_ips
    assert rules.site_for("q.b.example") is site
    inner = rules.site_for("y.x.b.example")
    assert inner is not None and inner.realm == "inner" and inner.needs_credentials
    fallback = rules.site_for("elsewhere.example")
    assert fallback is not None and fallback.hosts == ["*"]


def test_ip_allow_list(tmp_path: Path) -> None:
    site = _rules(tmp_path).site_for("a.example")
    assert site is not None
    assert site.ip_allowed("10.1.2.3") and site.ip_allowed("::ffff:10.1.2.3") and site.ip_allowed("2001:db8::5")
    assert not site.ip_allowed("11.0.0.1") and not site.ip_allowed(None) and not site.ip_allowed("garbage")


def test_challenge_and_strip(tmp_path: Path) -> None:
    rules = _rules(tmp_path)
    inner = rules.site_for("y.x.b.example")
    assert inner is not None and inner.challenge() == 'Basic realm="inner", charset="UTF-8"'
    head = RequestHead(StreamKind.HTTP, "GET", "/", "h", headers=(("Authorization", "Basic x"), ("A", "b")))
    assert rules.strip(head, "y.x.b.example").headers == (("A", "b"),)
    assert rules.strip(head, "a.example") is head  # no credentials there: untouched


def test_reload_detects_changes(tmp_path: Path) -> None:
    rules = _rules(tmp_path)
    assert rules.reload() is False
    (tmp_path / "access.toml").write_text('[[site]]\nhosts = ["a.example"]\nallow_ips = ["10.0.0.0/8"]\n')
    assert rules.reload() is True
    assert rules.site_for("q.b.example") is None


def test_reloader_polls_signatures(tmp_path: Path) -> None:
    rules = _rules(tmp_path)
    changes: list[int] = []
    reloader = Reloader([rules], lambda: changes.append(1))
    assert reloader.poll() is False
    path = tmp_path / "access.toml"
    path.write_text('[[site]]\nhosts = ["a.example"]\nallow_ips = ["10.0.0.0/8"]\n')
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    assert reloader.poll() is True and changes == [1]
    assert reloader.poll() is False


def _request(headers: list[tuple[bytes, bytes]], version: tuple[int, int] = (1, 1)) -> Any:
    decoded = CIMultiDict((k.decode(), v.decode()) for k, v in headers)
    return SimpleNamespace(raw_headers=tuple(headers), headers=decoded, version=version)


def test_head_problem() -> None:
    assert head_problem(_request([(b"Host", b"x")])) is None
    assert head_problem(_request([(b"X-%d" % i, b"v" * 6000) for i in range(3)])) == 431
    assert head_problem(_request([(b"Transfer-Encoding", b"chunked")])) is None
    assert head_problem(_request([(b"Transfer-Encoding", b"gzip, chunked")])) == 501
    assert head_problem(_request([(b"Transfer-Encoding", b"chunked")], (1, 0))) == 400
