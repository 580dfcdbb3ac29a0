"""Per-client credentials (--tokens): allowed hostnames and ports, tenant isolation, revocation
that closes live sessions, rotation, and the rate limit on failed tokens."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from exit_server import ExitServer
from exit_server.tokens import load_entries, new_entry, save_entries
from shared.errors import ConfigError
from shared.frames import GoAwayCode

from ..waiting import wait_until
from .helpers import TOKEN, Certs, server_config, upstream
from .sec_helpers import echo_app, revoke, token_stack, write_tokens

pytestmark = pytest.mark.asyncio


async def _get(url: str, host: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url, headers={"Host": host}) as r:
        return r.status, await r.text()


async def test_client_may_register_only_its_hostnames(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    tokens = write_tokens(tmp_path / "tokens.toml", {"acme": ["*.acme.example", "acme.example"]})
    async with upstream(echo_app()) as up, token_stack(certs, tmp_path / "tokens.toml") as s:
        running = await s.add_client(
            tokens["acme"], [f"app.acme.example={up.url}", f"evil.example={up.url}", f"default={up.url}"]
        )
        link = running.client.links[0]
        assert link.connected
        (tunnel,) = s.server.registry.tunnels.values()
        assert tunnel.client_id == "acme"
        assert [r.host for r in tunnel.routes] == ["app.acme.example"]
        assert await _get(s.base + "/x", "app.acme.example") == (200, "ok /x 0")
        assert (await _get(s.base + "/x", "evil.example"))[0] == 503
    refused = [
        r.getMessage() for r in caplog.records if r.name == "tunnel_client.client" and "refused" in r.getMessage()
    ]
    assert any("evil.example" in m and "not allowed" in m for m in refused), refused
    assert any("default" in m and "not allowed" in m for m in refused), refused


async def test_tenant_cannot_take_over_another_tenants_hostname(certs: Certs, tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.toml", {"alpha": ["*"], "beta": ["*"]})
    async with (
        upstream(echo_app()) as up_a,
        upstream(echo_app()) as up_b,
        token_stack(certs, tmp_path / "tokens.toml") as s,
    ):
        await s.add_client(tokens["alpha"], [f"shop.example={up_a.url}"], instance_id="same")
        # beta asks for the same host, a path below it, and uses the same instance id.
        beta = await s.add_client(
            tokens["beta"],
            [f"shop.example={up_b.url}", f"shop.example/api={up_b.url}", f"beta.example={up_b.url}"],
            instance_id="same",
        )
        assert beta.client.connected
        by_client = {t.client_id: t for t in s.server.registry.tunnels.values()}
        assert set(by_client) == {"alpha", "beta"}  # beta replaced nothing
        assert [r.host + r.path_prefix for r in by_client["beta"].routes] == ["beta.example/"]
        for path in ("/", "/api/x"):
            async with aiohttp.ClientSession() as http:
                async with http.get(s.base + path, headers={"Host": "shop.example"}) as r:
                    assert r.status == 200
                    assert r.headers.get("X-Request-Id")
        assert s.server.registry.pick("shop.example", "/api/x") is by_client["alpha"]


async def test_revoked_client_is_closed_within_one_second(certs: Certs, tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    tokens = write_tokens(path, {"acme": ["acme.example"], "other": ["other.example"]})
    async with upstream(echo_app()) as up, token_stack(certs, path) as s:
        acme = await s.add_client(tokens["acme"], [f"acme.example={up.url}"])
        other = await s.add_client(tokens["other"], [f"other.example={up.url}"])
        conn = acme.client.links[0].conn
        assert conn is not None
        revoke(path, "acme")
        started = time.monotonic()
        assert s.server.reload("test") is True  # what SIGHUP does
        async with asyncio.timeout(1.0):
            while acme.client.links[0].connected or any(
                t.client_id == "acme" for t in s.server.registry.tunnels.values()
            ):
                await asyncio.sleep(0.01)
        assert time.monotonic() - started < 1.0
        assert conn.session.peer_goaway is not None and conn.session.peer_goaway[1] == GoAwayCode.AUTH_REVOKED
        assert other.client.connected  # only the revoked client is affected
        assert (await _get(s.base + "/", "acme.example"))[0] == 503
        await asyncio.sleep(1.0)  # deliberate: it keeps trying (backoff 0.2-1 s), and keeps being refused
        assert not acme.client.connected


@pytest.mark.parametrize("content", ["", "# being rewritten\n", "[clients.acme]\n"])
async def test_empty_or_truncated_tokens_file_keeps_the_credentials(certs: Certs, tmp_path: Path, content: str) -> None:
    """Issue 24 item 7: 3d9815c took an empty file for "no clients" and every tenant got 503.
    Only an explicit empty [clients] table revokes everyone."""
    path = tmp_path / "tokens.toml"
    tokens = write_tokens(path, {"acme": ["acme.example"]})
    async with upstream(echo_app()) as up, token_stack(certs, path) as s:
        acme = await s.add_client(tokens["acme"], [f"acme.example={up.url}"])
        path.write_text(content)
        assert s.server.reload("test") is False  # refused: the previous credentials stay
        assert acme.client.connected and s.server.registry.tunnels
        assert (await _get(s.base + "/", "acme.example"))[0] == 200
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        ws = await connect(  # a new session with the same token is still accepted
            f"wss://localhost:{s.server.control_port}",
            ssl=ctx,
            additional_headers={"Authorization": f"Bearer {tokens['acme']}"},
            logger=logging.getLogger("test.rawclient"),
        )
        await ws.close()
        path.write_text("[clients]\n")  # the explicit way to say "nobody"
        assert s.server.reload("test") is True
        await wait_until(lambda: not s.server.registry.tunnels, 5, what="acme's session closed")


async def test_file_change_is_picked_up_without_a_signal(certs: Certs, tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    tokens = write_tokens(path, {"acme": ["acme.example"]})
    async with upstream(echo_app()) as up, token_stack(certs, path) as s:
        acme = await s.add_client(tokens["acme"], [f"acme.example={up.url}"])
        revoke(path, "acme")
        started = time.monotonic()
        async with asyncio.timeout(2.5):  # one poll period (1 s), then under a second to close
            while acme.client.links[0].connected or s.server.registry.tunnels:
                await asyncio.sleep(0.02)
        assert time.monotonic() - started < 2.2


async def test_rotation_closes_old_sessions_and_the_new_token_works(certs: Certs, tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    tokens = write_tokens(path, {"acme": ["acme.example"]})
    async with upstream(echo_app()) as up, token_stack(certs, path) as s:
        old = await s.add_client(tokens["acme"], [f"acme.example={up.url}"])
        entries = load_entries(path)
        entries["acme"], new_token = new_entry("acme", ["acme.example"], [])
        save_entries(path, entries)
        s.server.reload("test")
        async with asyncio.timeout(1.0):
            while old.client.connected:
                await asyncio.sleep(0.01)
        await old.stop()
        await s.add_client(new_token, [f"acme.example={up.url}"])
        assert (await _get(s.base + "/", "acme.example"))[0] == 200


async def test_tcp_ports_are_bound_to_the_client(certs: Certs, tmp_path: Path) -> None:
    from tests.ports import free_port

    allowed, forbidden = free_port(), free_port()
    lo, hi = min(allowed, forbidden), max(allowed, forbidden)
    path = tmp_path / "tokens.toml"
    tokens = write_tokens(path, {"acme": ["acme.example"]}, ports={"acme": [allowed]})
    async with upstream(echo_app()) as up, token_stack(certs, path, tcp_port_range=f"{lo}-{hi}") as s:
        await s.add_client(
            tokens["acme"], [], tcp=[f"{allowed}=127.0.0.1:{up.port}", f"{forbidden}=127.0.0.1:{up.port}"]
        )
        (tunnel,) = s.server.registry.tunnels.values()
        assert tunnel.tcp_ports == [allowed]


async def test_failed_tokens_are_rate_limited_per_source(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = write_tokens(tmp_path / "tokens.toml", {"acme": ["acme.example"]})
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    raw_log = logging.getLogger("test.rawclient")
    async with token_stack(certs, tmp_path / "tokens.toml") as s:
        url = f"wss://localhost:{s.server.control_port}"
        wrong = "bh_000000000000_" + "x" * 43
        statuses = []
        for _ in range(11):
            with pytest.raises(InvalidStatus) as info:
                await connect(url, ssl=ctx, additional_headers={"Authorization": f"Bearer {wrong}"}, logger=raw_log)
            statuses.append(info.value.response.status_code)
        assert statuses == [401] * 10 + [429]
        assert int(info.value.response.headers["Retry-After"]) >= 1
        # While limited, even the right token from this source waits.
        with pytest.raises(InvalidStatus) as info:
            await connect(
                url, ssl=ctx, additional_headers={"Authorization": f"Bearer {tokens['acme']}"}, logger=raw_log
            )
        assert info.value.response.status_code == 429
        await asyncio.sleep(1.1)  # the thing under test: one failure's budget comes back each second
        ws = await connect(
            url, ssl=ctx, additional_headers={"Authorization": f"Bearer {tokens['acme']}"}, logger=raw_log
        )
        await ws.close()
    text = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("test."))
    assert wrong not in text and tokens["acme"] not in text


async def test_tokens_replace_the_shared_token(certs: Certs, tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    write_tokens(path, {"acme": ["acme.example"]})
    with pytest.raises(Exception, match="either --tokens or --token-file"):
        server_config(certs, tokens=path, token=TOKEN)
    server = ExitServer(server_config(certs, tokens=path))
    assert server.control.auth is not None
    (tmp_path / "broken.toml").write_text("[clients.x]\nhash = 1\n")
    with pytest.raises(ConfigError, match="--tokens"):
        ExitServer(server_config(certs, tokens=tmp_path / "broken.toml"))


async def test_broken_file_on_reload_keeps_credentials(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.toml"
    tokens = write_tokens(path, {"acme": ["acme.example"]})
    async with upstream(echo_app()) as up, token_stack(certs, path) as s:
        acme = await s.add_client(tokens["acme"], [f"acme.example={up.url}"])
        path.write_text("this is not toml [")
        assert s.server.reload("test") is False
        assert acme.client.connected  # reload() closes revoked sessions synchronously: none here
    assert any("reload failed" in r.getMessage() for r in caplog.records)
