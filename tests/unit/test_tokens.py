"""exit_server.tokens, hashing and limits: patterns, the token format, the file, the registry,
scrypt hashes and the failure limiter (no sockets)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from exit_server.hashing import HashFormatError, hash_secret, parse_hash, verify_secret
from exit_server.limits import FailureLimiter, source_key
from exit_server.routes import Registry, Tunnel
from exit_server.tokens import (
    Principal,
    TokenRegistry,
    host_allowed,
    load_entries,
    new_entry,
    parse_token,
    render_entries,
    save_entries,
    validate_pattern,
)
from shared.errors import ConfigError
from shared.messages import RouteSpec, TcpSpec


@pytest.mark.parametrize(
    ("pattern", "host", "allowed"),
    [
        ("app.example.com", "app.example.com", True),
        ("app.example.com", "x.app.example.com", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "*.a.example.com", True),
        ("*.example.com", "*.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "*.com", False),
        ("*.example.com", "badexample.com", False),
        ("*.example.com", "default", False),
        ("default", "default", True),
        ("*", "default", True),
        ("*", "anything.example", True),
    ],
)
def test_host_patterns(pattern: str, host: str, allowed: bool) -> None:
    assert host_allowed(pattern, host) is allowed


def test_pattern_validation() -> None:
    assert validate_pattern(" App.Example.COM. ") == "app.example.com"
    for bad in ("a.*.example", "**.x", "exa mple.com", "", "*x.example"):
        with pytest.raises(ValueError):
            validate_pattern(bad)


def test_token_format() -> None:
    entry, token = new_entry("acme", ["acme.example"], [])
    assert parse_token(token) == (entry.token_id, token.split("_", 2)[2])
    assert verify_secret(token.split("_", 2)[2], entry.hash)
    for bad in ("", "bh_", "bh_zzzzzzzzzzzz_" + "a" * 43, "xx_" + token[3:], token + "!"):
        assert parse_token(bad) is None


def test_hash_format() -> None:
    digest = hash_secret("s3cret", ln=10)
    assert digest.startswith("scrypt$ln=10,r=8,p=1$") and "s3cret" not in digest
    assert verify_secret("s3cret", digest) and not verify_secret("s3cret!", digest)
    assert hash_secret("s3cret", ln=10) != digest  # salted
    for bad in ("", "bcrypt$x", "scrypt$ln=99,r=8,p=1$AA$AA", "scrypt$ln=10$AA$AA", "scrypt$ln=10,r=8,p=1$!!$AA"):
        with pytest.raises(HashFormatError):
            parse_hash(bad)
    with pytest.raises(ValueError):
        hash_secret("")


def test_file_round_trip_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    a, _ = new_entry("acme", ["*.acme.example", "acme.example"], [7000, 7000, 6000])
    b, _ = new_entry("zeta.corp", ["*"], [])
    save_entries(path, {"acme": a, "zeta.corp": b})
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.toml"]  # no temporary file left behind
    loaded = load_entries(path)
    assert loaded["acme"].tcp_ports == [6000, 7000]
    assert loaded["acme"].principal() == a.principal()
    assert render_entries(loaded) == path.read_text()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[clients.acme]\ntoken_id = 'abc'\n", "token_id"),
        ("[clients.'bad id']\n", "bad client id"),
        ("[clients.acme]\ntoken_id = '0123456789ab'\nhash = 'plain'\n", "hash is not"),
        ("other = 1\n", "unknown top-level"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_entries(path)


def test_duplicate_token_ids_are_refused(tmp_path: Path) -> None:
    a, _ = new_entry("a", ["a.example"], [])
    b, _ = new_entry("b", ["b.example"], [])
    b.token_id = a.token_id
    save_entries(tmp_path / "t.toml", {"a": a, "b": b})
    with pytest.raises(ConfigError, match="used twice"):
        load_entries(tmp_path / "t.toml")


def test_registry_authenticates_caches_and_revokes(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    a, token_a = new_entry("acme", ["acme.example"], [])
    b, token_b = new_entry("beta", ["beta.example"], [])
    save_entries(path, {"acme": a, "beta": b})
    registry = TokenRegistry(path)

    async def run() -> None:
        p = await registry(token_a)
        assert p is not None and p.client_id == "acme" and p.hosts == ("acme.example",)
        assert await registry(token_a) == p  # cached
        assert await registry(token_a[:-1] + ("A" if token_a[-1] != "A" else "B")) is None
        assert await registry("bh_000000000000_" + "a" * 43) is None  # unknown id
        assert await registry("not-a-token") is None
        assert registry.current(p) == p
        entries = load_entries(path)
        entries["acme"].revoked = True
        save_entries(path, entries)
        assert registry.reload() is True
        assert registry.current(p) is None
        assert await registry(token_a) is None  # the cache went with the reload
        assert await registry(token_b) is not None
        assert registry.reload() is False  # nothing changed

    asyncio.run(run())


def test_changed_policy_counts_as_changed_credentials(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    a, _ = new_entry("acme", ["acme.example"], [])
    save_entries(path, {"acme": a})
    registry = TokenRegistry(path)
    before = a.principal()
    a.hosts = ["acme.example", "more.example"]
    save_entries(path, {"acme": a})
    registry.reload()
    assert registry.current(before) is None


def test_registry_applies_the_policy() -> None:
    registry = Registry(range(7000, 7010))
    policy = Principal("acme", ("*.acme.example",), frozenset({7001}))
    tunnel = Tunnel("s1", "acme", "i1", "-", conn=None, policy=policy)
    granted, ports, refused, _ = registry.add(
        tunnel,
        [RouteSpec(host="a.acme.example"), RouteSpec(host="evil.example")],
        [TcpSpec(port=7001), TcpSpec(port=7002)],
    )
    assert [r.host for r in granted] == ["a.acme.example"]
    assert [p.port for p in ports] == [7001]
    assert {r.route for r in refused} == {"evil.example/", "tcp:7002"}
    assert all("not allowed" in r.reason for r in refused)
    # Health updates (Routes) cannot widen what the credentials allow.
    assert [r.route for r in registry.set_routes(tunnel, [RouteSpec(host="evil.example")])] == ["evil.example/"]


def test_hostname_belongs_to_its_tenant_whatever_the_path() -> None:
    registry = Registry()
    a = Tunnel("s1", "alpha", "i", "-", conn=None)
    b = Tunnel("s2", "beta", "i", "-", conn=None)
    registry.add(a, [RouteSpec(host="shop.example", path_prefix="/")])
    granted, _, refused, replaced = registry.add(
        b, [RouteSpec(host="shop.example", path_prefix="/api"), RouteSpec(host="shop.example")]
    )
    assert granted == [] and replaced is None
    assert all("another client" in r.reason for r in refused)


def test_failure_limiter() -> None:
    now = [0.0]
    limiter = FailureLimiter(burst=3, rate=1.0, max_sources=2, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1") is None
        limiter.failure("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 1
    assert limiter.retry_after("10.0.0.2") is None  # per source
    now[0] += 1.0
    assert limiter.retry_after("10.0.0.1") is None  # one more attempt per second
    limiter.failure("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 1
    now[0] += 10.0
    assert limiter.retry_after("10.0.0.1") is None
    assert not limiter._buckets  # full buckets are forgotten
    for n in range(5):
        limiter.failure(f"10.0.1.{n}")
    assert len(limiter._buckets) == 2  # bounded memory


def test_source_key_groups_ipv6_by_64() -> None:
    assert source_key("2001:db8::1") == source_key("2001:db8::ffff") == "2001:db8::/64"
    assert source_key("2001:db8:0:1::1") != source_key("2001:db8::1")
    assert source_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert source_key("not-an-ip") == "not-an-ip"


def test_world_readable_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens.toml"
    a, _ = new_entry("acme", ["acme.example"], [])
    save_entries(path, {"acme": a})
    os.chmod(path, 0o644)
    TokenRegistry(path)
    assert any("chmod 600" in r.getMessage() for r in caplog.records)


def test_attempts_are_charged_when_they_start() -> None:
    """Concurrent attempts cannot all pass the check before the first failure is recorded:
    each start takes a token; a success gives it back."""
    now = [0.0]
    limiter = FailureLimiter(burst=10, rate=1.0, clock=lambda: now[0])
    started = [limiter.attempt("10.0.0.1") for _ in range(60)]  # 60 verifications in flight
    assert started.count(None) == 10 and all(r == 1 for r in started[10:])
    assert limiter.attempt("10.0.0.2") is None  # another source is not affected
    limiter.success("10.0.0.2")
    assert "10.0.0.2" not in limiter._buckets  # refunded: forgotten
    limiter.success("10.0.0.1")  # one of the ten succeeded: one more may start
    assert limiter.attempt("10.0.0.1") is None
    assert limiter.attempt("10.0.0.1") == 1


@pytest.mark.asyncio
async def test_source_gate_serialises_per_source_only() -> None:
    import asyncio

    from exit_server.limits import SourceGate

    gate = SourceGate()
    order: list[str] = []
    release = asyncio.Event()

    async def verify(source: str, name: str) -> None:
        async with gate.hold(source):
            order.append(name)
            await release.wait()

    first = asyncio.create_task(verify("10.0.0.1", "a1"))
    second = asyncio.create_task(verify("10.0.0.1", "a2"))
    other = asyncio.create_task(verify("10.0.0.2", "b1"))
    for _ in range(5):
        await asyncio.sleep(0)  # let each task run to its lock (no timing involved)
    assert order == ["a1", "b1"]  # a2 waits for a1; b1 waits for nobody
    release.set()
    await asyncio.gather(first, second, other)
    assert order == ["a1", "b1", "a2"] and not gate._locks
