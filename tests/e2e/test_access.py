"""Access control on public routes (--access): basic auth, bearer tokens, IP allow-lists, the
failure rate limit, reload; all checked before a stream opens."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from exit_server.hashing import hash_secret, verify_secret

from .helpers import Certs, stack, upstream
from .sec_helpers import echo_app

PASSWORD = "correct horse battery staple"
BEARER = "ci-bearer-7f3a9c"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def write_access(path: Path, extra: str = "") -> None:
    path.write_text(
        "[[site]]\n"
        'hosts = ["secure.example"]\n'
        'realm = "secure"\n'
        f'basic = ["alice:{hash_secret(PASSWORD)}"]\n'
        f'bearer = ["ci:{hash_secret(BEARER)}"]\n'
        "\n[[site]]\n"
        'hosts = ["*.office.example"]\n'
        'allow_ips = ["10.0.0.0/8", "2001:db8::/32"]\n'
        "\n[[site]]\n"
        'hosts = ["local.example"]\n'
        'allow_ips = ["127.0.0.0/8"]\n' + extra
    )


async def _get(base: str, host: str, auth: str | None = None) -> tuple[int, dict[str, str], str]:
    headers = {"Host": host}
    if auth:
        headers["Authorization"] = auth
    async with aiohttp.ClientSession() as http, http.get(base + "/p", headers=headers) as r:
        return r.status, dict(r.headers), await r.text()


@pytest.mark.asyncio
async def test_basic_and_bearer_auth(certs: Certs, tmp_path: Path) -> None:
    write_access(tmp_path / "access.toml")
    seen: list[web.Request] = []
    hosts = ["secure.example", "open.example"]
    async with upstream(echo_app(seen)) as up, stack(certs, access=tmp_path / "access.toml") as s:
        await s.add_client([f"{h}={up.url}" for h in hosts])
        status, headers, body = await _get(s.base, "secure.example")
        assert status == 401 and body == "unauthorized\n"
        assert headers["WWW-Authenticate"] == 'Basic realm="secure", charset="UTF-8", Bearer realm="secure"'
        for wrong in (_basic("alice", "nope"), _basic("mallory", PASSWORD), "Bearer nope", "Basic !!!", "Digest x"):
            assert (await _get(s.base, "secure.example", wrong))[0] == 401
        assert not seen  # refused before a stream opened
        assert all(t.requests == 0 for t in s.server.registry.tunnels.values())
        assert (await _get(s.base, "secure.example", _basic("alice", PASSWORD)))[:3:2] == (200, "ok /p 0")
        assert (await _get(s.base, "secure.example", f"Bearer {BEARER}"))[0] == 200
        assert all("Authorization" not in r.headers for r in seen)  # consumed at the edge
        # Hosts without a site are open, and their Authorization header is the upstream's business.
        assert (await _get(s.base, "open.example", "Bearer upstream-token"))[0] == 200
        assert seen[-1].headers["Authorization"] == "Bearer upstream-token"


@pytest.mark.asyncio
async def test_ip_allow_list(certs: Certs, tmp_path: Path) -> None:
    write_access(tmp_path / "access.toml")
    seen: list[web.Request] = []
    async with upstream(echo_app(seen)) as up, stack(certs, access=tmp_path / "access.toml") as s:
        await s.add_client([f"*.office.example={up.url}", f"local.example={up.url}"])
        status, _, body = await _get(s.base, "wiki.office.example")
        assert (status, body) == (403, "forbidden\n")
        assert not seen
        assert (await _get(s.base, "local.example"))[0] == 200


@pytest.mark.asyncio
async def test_failed_credentials_are_rate_limited(certs: Certs, tmp_path: Path) -> None:
    write_access(tmp_path / "access.toml")
    async with upstream(echo_app()) as up, stack(certs, access=tmp_path / "access.toml") as s:
        await s.add_client([f"secure.example={up.url}"])
        statuses = [(await _get(s.base, "secure.example", _basic("alice", f"guess{i}"))) for i in range(11)]
        assert [st for st, _, _ in statuses] == [401] * 10 + [429]
        assert int(statuses[-1][1]["Retry-After"]) >= 1
        assert (await _get(s.base, "secure.example", _basic("alice", PASSWORD)))[0] == 429
        await asyncio.sleep(1.1)
        assert (await _get(s.base, "secure.example", _basic("alice", PASSWORD)))[0] == 200


@pytest.mark.asyncio
async def test_access_file_is_reloaded(certs: Certs, tmp_path: Path) -> None:
    path = tmp_path / "access.toml"
    write_access(path)
    async with upstream(echo_app()) as up, stack(certs, access=path) as s:
        await s.add_client([f"local.example={up.url}"])
        assert (await _get(s.base, "local.example"))[0] == 200
        path.write_text('[[site]]\nhosts = ["local.example"]\nallow_ips = ["192.0.2.0/24"]\n')
        assert s.server.reload("test")
        assert (await _get(s.base, "local.example"))[0] == 403


def test_hash_password_reads_stdin(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "exit-server"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    out = subprocess.run(
        [str(exe), "hash-password", "--user", "alice"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    user, _, digest = out.stdout.strip().partition(":")
    assert user == "alice" and digest.startswith("scrypt$") and verify_secret(PASSWORD, digest)
    assert PASSWORD not in out.stdout + out.stderr


@pytest.mark.asyncio
async def test_bad_access_file_is_a_config_error(certs: Certs, tmp_path: Path) -> None:
    from exit_server import ExitServer
    from shared.errors import ConfigError

    from .helpers import server_config

    bad = tmp_path / "bad.toml"
    for text, needle in [
        ('[[site]]\nhosts = ["x.example"]\n', "without rules"),
        ('[[site]]\nhosts = ["x.example"]\nallow_ips = ["nonsense"]\n', "allow_ips"),
        ('[[site]]\nhosts = ["x.example"]\nbasic = ["alice:plaintext"]\n', "hash-password"),
        ('[[site]]\nhosts = ["bad host"]\nallow_ips = ["10.0.0.0/8"]\n', "hostname pattern"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=needle) as info:
            ExitServer(server_config(certs, access=bad, token="t" * 20))
        assert "plaintext" not in str(info.value) or needle != "hash-password"


@pytest.mark.asyncio
async def test_empty_access_file_keeps_the_protection(certs: Certs, tmp_path: Path) -> None:
    """Issue 24 item 7: an empty (or mid-rewrite) file must not open every protected site."""
    path = tmp_path / "access.toml"
    write_access(path)
    async with upstream(echo_app()) as up, stack(certs, access=path) as s:
        await s.add_client([f"secure.example={up.url}"])
        assert (await _get(s.base, "secure.example"))[0] == 401
        path.write_text("")
        assert s.server.reload("test") is False
        assert (await _get(s.base, "secure.example"))[0] == 401
        path.write_text("site = []\n")  # the explicit way to say "no rules"
        assert s.server.reload("test") is True
        assert (await _get(s.base, "secure.example"))[0] == 200
