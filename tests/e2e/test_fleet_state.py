"""--state on a real redis-server (Debian's, started per test on a free port, no persistence):
three exit servers share their credentials. A token added through the CLI works on all three,
a revoke closes the client's sessions on all three within a second, and while Redis is stopped
the servers keep serving with the credentials they have (changes are refused, clearly), then
converge when it is back."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from exit_server.server import ExitServer
from exit_server.state import StateUnavailable, read_state, update
from exit_server.tokens import TokenEntry, new_entry
from shared.errors import ConfigError
from tests.ports import free_port
from tests.waiting import wait_until, wait_until_sync
from tunnel_client.client import TunnelClient

from .helpers import Certs, RunningClient, client_config, server_config, upstream
from .sec_helpers import echo_app

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed (scripts/ci-deps.sh)"),
]


@dataclass
class Redis:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            # append-only file, fsync on every write: what a production store is configured for
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def answers() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
            return False

        wait_until_sync(answers, timeout=10, what="redis-server answers")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # SIGKILL: no chance to save anything more
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def add_client(url: str, client: str, hosts: list[str]) -> str:
    made: dict[str, str] = {}

    def change(entries: dict[str, TokenEntry]) -> dict[str, TokenEntry]:
        entry, token = new_entry(client, hosts, [])
        entries[client] = entry
        made["token"] = token
        return entries

    update(url, None, change)
    return made["token"]


def revoke(url: str, client: str) -> None:
    def change(entries: dict[str, TokenEntry]) -> dict[str, TokenEntry]:
        entries[client].revoked = True
        return entries

    update(url, None, change)


@dataclass
class Fleet:
    servers: list[ExitServer]
    certs: Certs
    clients: list[RunningClient]

    async def add_client(self, token: str, upstreams: list[str], **overrides: Any) -> RunningClient:
        client = TunnelClient(client_config(self.certs, self.servers, upstreams, **overrides), token=token)
        running = RunningClient(client, asyncio.create_task(client.run()))
        self.clients.append(running)
        return running


@pytest_asyncio.fixture
async def fleet(certs: Certs, redis_server: Redis) -> AsyncIterator[Fleet]:
    add_client(redis_server.url, "seed", ["seed.test"])  # the store exists before the servers
    servers = [ExitServer(server_config(certs, state=redis_server.url, state_resync=1.0)) for _ in range(3)]
    f = Fleet(servers, certs, [])
    try:  # a server that fails to start closes itself; the finally closes the ones before it
        for server in servers:
            await server.start()
        yield f
    finally:
        for running in f.clients:
            with contextlib.suppress(Exception):
                await running.stop()
        for server in servers:
            await server.close()


async def status(server: ExitServer, host: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.public_port}/", headers={"Host": host}) as resp:
            return resp.status


def registered(server: ExitServer, client_id: str) -> bool:
    return any(t.client_id == client_id for t in server.registry.tunnels.values())


async def test_a_token_added_through_the_store_works_on_every_server(fleet: Fleet, redis_server: Redis) -> None:
    token = add_client(redis_server.url, "acme", ["app.test"])
    await wait_until(lambda: all(s.state is not None and s.state.version == 2 for s in fleet.servers), timeout=1.0,
                     interval=0.02, what="every server at version 2 within a second")  # fmt: skip
    async with upstream(echo_app()) as up:
        await fleet.add_client(token, [f"app.test={up.url}"])
        await wait_until(lambda: all(registered(s, "acme") for s in fleet.servers), what="a session on each server")
        for server in fleet.servers:
            assert await status(server, "app.test") == 200


async def test_a_revoke_closes_sessions_on_every_server_within_a_second(fleet: Fleet, redis_server: Redis) -> None:
    token = add_client(redis_server.url, "acme", ["app.test"])
    other = add_client(redis_server.url, "other", ["other.test"])
    await wait_until(lambda: all(s.state is not None and s.state.version == 3 for s in fleet.servers), what="synced")
    async with upstream(echo_app()) as up:
        await fleet.add_client(token, [f"app.test={up.url}"])
        await fleet.add_client(other, [f"other.test={up.url}"])
        await wait_until(
            lambda: all(registered(s, "acme") and registered(s, "other") for s in fleet.servers), what="registered"
        )
        started = time.monotonic()
        revoke(redis_server.url, "acme")
        await wait_until(lambda: not any(registered(s, "acme") for s in fleet.servers), timeout=1.0, interval=0.01,
                         what="acme's sessions closed on all three within a second")  # fmt: skip
        assert time.monotonic() - started < 1.0
        assert all(registered(s, "other") for s in fleet.servers)  # only the revoked client


@pytest.mark.one_loop  # 20 s of load: the servers' loop kind is covered by the other tests
async def test_redis_down_keeps_serving_refuses_changes_then_converges(fleet: Fleet, redis_server: Redis) -> None:
    token = add_client(redis_server.url, "acme", ["app.test"])
    await wait_until(lambda: all(s.state is not None and s.state.version == 2 for s in fleet.servers), what="synced")
    async with upstream(echo_app()) as up:
        await fleet.add_client(token, [f"app.test={up.url}"])
        await wait_until(lambda: all(registered(s, "acme") for s in fleet.servers), what="registered")
        redis_server.stop()
        await wait_until(lambda: not any(s.state is not None and s.state.up for s in fleet.servers), timeout=10,
                         what="every server noticed")  # fmt: skip
        # 20 s of requests, served from memory: bounded in time and count, none may fail.
        failures = 0
        deadline = time.monotonic() + 20.0
        count = 0
        while time.monotonic() < deadline and count < 20_000:
            for server in fleet.servers:
                failures += await status(server, "app.test") != 200
                count += 1
        assert failures == 0 and count >= 300
        for server in fleet.servers:  # still ready: Redis is not in the request path
            assert server.ready
        with pytest.raises(StateUnavailable, match="unreachable"):
            add_client(redis_server.url, "late", ["late.test"])  # refused, and says so
        redis_server.start()  # killed, restarted: every acknowledged change is still there
        late = add_client(redis_server.url, "late", ["late.test"])
        entries, version = read_state(redis_server.url, None)
        assert {"seed", "acme", "late"} <= set(entries) and version == 3
        await wait_until(lambda: all(s.state is not None and s.state.up for s in fleet.servers), timeout=15,
                         what="every server reconnected")  # fmt: skip
        await wait_until(lambda: all(s.state is not None and s.state.version == 3 for s in fleet.servers),
                         timeout=5, what="converged on the store's version")  # fmt: skip
        assert all(registered(s, "acme") for s in fleet.servers)  # nobody lost a session
        await fleet.add_client(late, [f"late.test={up.url}"])
        await wait_until(lambda: all(registered(s, "late") for s in fleet.servers), what="the new client everywhere")


async def test_a_store_that_went_back_is_not_applied(fleet: Fleet, redis_server: Redis) -> None:
    """A store restarted empty (no persistence) or a failover that lost writes: applying it
    would revoke everyone added since. The servers keep their version and say so."""
    token = add_client(redis_server.url, "acme", ["app.test"])
    await wait_until(lambda: all(s.state is not None and s.state.version == 2 for s in fleet.servers), what="synced")
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    add_client(redis_server.url, "other", ["other.test"])  # version 1 in the wiped store
    await wait_until(lambda: all(s.state is not None and s.state._behind == 1 for s in fleet.servers),
                     what="every server saw the store behind")  # fmt: skip
    assert all(s.state is not None and s.state.version == 2 for s in fleet.servers)
    async with upstream(echo_app()) as up:
        await fleet.add_client(token, [f"app.test={up.url}"])
        await wait_until(lambda: all(registered(s, "acme") for s in fleet.servers), what="acme still admitted")


async def test_token_cli_against_the_store(redis_server: Redis, capsys: pytest.CaptureFixture[str]) -> None:
    from exit_server.__main__ import main

    url = redis_server.url
    assert main(["token", "add", "--state", url, "--client", "acme", "--host", "app.test"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("bh_") and "state version 1" in out.err
    assert main(["token", "list", "--state", url]) == 0
    assert "acme\tactive" in capsys.readouterr().out
    assert main(["token", "revoke", "--state", url, "--client", "acme"]) == 0
    assert read_state(url, None)[0]["acme"].revoked
    capsys.readouterr()
    redis_server.stop()
    with pytest.raises(SystemExit) as exited:
        main(["token", "add", "--state", url, "--client", "late", "--host", "late.test"])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "unreachable" in err and "nothing changed" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exited:
        main(["token", "add", "--state", "redis://user:pw@127.0.0.1:1/0", "--client", "x", "--host", "x.test"])
    assert exited.value.code == 2


async def test_access_rules_pushed_to_the_store_apply_on_every_server(
    fleet: Fleet, redis_server: Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``exit-server access push --state``: validated, then enforced by all three within a
    second; a broken file changes nothing; ``--access`` beside ``--state`` is refused."""
    from exit_server.__main__ import main
    from exit_server.config import ServerConfig

    token = add_client(redis_server.url, "acme", ["app.test"])
    async with upstream(echo_app()) as up:
        await fleet.add_client(token, [f"app.test={up.url}"])
        await wait_until(lambda: all(registered(s, "acme") for s in fleet.servers), what="registered")
        for server in fleet.servers:
            assert await status(server, "app.test") == 200
        rules = tmp_path / "access.toml"
        rules.write_text('[[site]]\nhosts = ["app.test"]\nallow_ips = ["192.0.2.0/24"]\n')
        started = time.monotonic()
        assert main(["access", "push", "--state", redis_server.url, str(rules)]) == 0
        assert "access rules version 1" in capsys.readouterr().err

        async def all_forbidden() -> bool:
            return all([await status(s, "app.test") == 403 for s in fleet.servers])

        await wait_until(all_forbidden, timeout=1.0, interval=0.01, what="403 on all three within a second")
        assert time.monotonic() - started < 1.0
        broken = tmp_path / "broken.toml"
        broken.write_text('[[site]]\nhosts = ["app.test"]\nallow_ips = ["not-a-network"]\n')
        with pytest.raises(SystemExit) as refused:
            main(["access", "push", "--state", redis_server.url, str(broken)])
        assert refused.value.code == 2
        assert "allow_ips" in capsys.readouterr().err
        assert main(["access", "show", "--state", redis_server.url]) == 0
        assert "192.0.2.0/24" in capsys.readouterr().out  # the broken push changed nothing
        rules.write_text('[[site]]\nhosts = ["app.test"]\nallow_ips = ["127.0.0.0/8"]\n')
        assert main(["access", "push", "--state", redis_server.url, str(rules)]) == 0

        async def all_open() -> bool:
            return all([await status(s, "app.test") == 200 for s in fleet.servers])

        await wait_until(all_open, timeout=1.0, interval=0.01, what="200 again on all three")
    with pytest.raises(ValueError, match="--state holds the access rules"):
        ServerConfig(state=redis_server.url, access=rules, tls_cert=fleet.certs.cert, tls_key=fleet.certs.key)


@pytest.mark.parametrize("auth", ["bearer", "challenge"])
async def test_a_shared_token_beside_the_store(certs: Certs, redis_server: Redis, auth: str) -> None:
    """The fleet's quick start (deploy/cloudformation): --state with a shared BACKHAUL_TOKEN.
    The shared token serves as client ``default`` on every server, beside the store's clients;
    a store change never closes its session."""
    from pydantic import SecretStr

    from tunnel_client.pinning import spki_pin

    from .helpers import TOKEN

    token = add_client(redis_server.url, "acme", ["app.test"])
    servers = [
        ExitServer(server_config(certs, state=redis_server.url, state_resync=1.0, token=SecretStr(TOKEN)))
        for _ in range(2)
    ]
    fleet = Fleet(servers, certs, [])
    try:
        for server in servers:
            await server.start()
        extra: dict[str, Any] = {}
        if auth == "challenge":
            from .test_tls import _leaf_der

            extra = {"auth": "challenge", "pin": [spki_pin(_leaf_der(certs.cert))]}
        async with upstream(echo_app()) as up:
            await fleet.add_client(TOKEN, [f"shared.test={up.url}"], **extra)
            await fleet.add_client(token, [f"app.test={up.url}"], **extra)
            await wait_until(
                lambda: all(registered(s, "default") and registered(s, "acme") for s in servers),
                what="the shared-token client and the store's client on both",
            )
            revoke(redis_server.url, "acme")
            await wait_until(lambda: not any(registered(s, "acme") for s in servers), what="acme revoked")
            for server in servers:
                assert registered(server, "default")
                assert await status(server, "shared.test") == 200
    finally:
        for running in fleet.clients:
            with contextlib.suppress(Exception):
                await running.stop()
        for server in servers:
            await server.close()


async def test_a_tls_store_with_a_password(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rediss://`` with AUTH, as ElastiCache runs it: a real redis-server on its TLS port only,
    verified against --state-ca-file, the password from BACKHAUL_STATE_PASSWORD (CLI) and
    --state-password (server). Without the CA, or with a wrong password: a clear refusal, exit 1."""
    from pydantic import SecretStr

    from exit_server.__main__ import main

    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--tls-cert-file", str(certs.cert), "--tls-key-file", str(certs.key), "--tls-ca-cert-file", str(certs.ca),
         "--tls-auth-clients", "no", "--requirepass", "s3cret-store-password", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://localhost:{port}/0"
    servers: list[ExitServer] = []
    fleet = Fleet(servers, certs, [])
    try:
        wait_until_sync(lambda: _listening(port), timeout=10, what="redis-server on its TLS port")
        monkeypatch.setenv("BACKHAUL_STATE_PASSWORD", "s3cret-store-password")
        assert main(["token", "add", "--state", url, "--state-ca-file", str(certs.ca), "--client", "acme",
                     "--host", "app.test"]) == 0  # fmt: skip
        token = capsys.readouterr().out.strip()
        for _ in range(2):
            config = server_config(
                certs,
                state=url,
                state_password=SecretStr("s3cret-store-password"),
                state_ca_file=certs.ca,
                state_resync=1.0,
            )
            servers.append(ExitServer(config))
            await servers[-1].start()
        async with upstream(echo_app()) as up:
            await fleet.add_client(token, [f"app.test={up.url}"])
            await wait_until(lambda: all(registered(s, "acme") for s in servers), what="registered on both")
            assert main(["token", "revoke", "--state", url, "--state-ca-file", str(certs.ca), "--client", "acme"]) == 0
            await wait_until(lambda: not any(registered(s, "acme") for s in servers), timeout=1.0, interval=0.01,
                             what="revoked on both within a second")  # fmt: skip
        capsys.readouterr()
        with pytest.raises(SystemExit) as unverified:  # the system's CAs do not know this store
            main(["token", "list", "--state", url])
        assert unverified.value.code == 1
        err = capsys.readouterr().err
        assert "unreachable" in err and "certificate verify failed" in err and "s3cret" not in err
        monkeypatch.setenv("BACKHAUL_STATE_PASSWORD", "wrong-password")
        with pytest.raises(SystemExit) as refused:
            main(["token", "list", "--state", url, "--state-ca-file", str(certs.ca)])
        assert refused.value.code == 1
        err = capsys.readouterr().err
        assert "refused the password" in err and "wrong-password" not in err and err.count("\n") == 1
    finally:
        for running in fleet.clients:
            with contextlib.suppress(Exception):
                await running.stop()
        for server in servers:
            await server.close()
        proc.kill()
        proc.wait(10)


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def store_clients(redis: Redis) -> int:
    """Connections open on the store, not counting the one asking."""
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as s:
        s.sendall(b"CLIENT LIST\r\n")
        reply = b""
        while not reply.startswith(b"$") or reply.count(b"\r\n") < 2:
            chunk = s.recv(65536)
            assert chunk, "redis closed the connection"
            reply += chunk
    return reply.count(b"id=") - 1


@pytest.mark.parametrize("flag", ["public_addr", "admin_addr"])
async def test_a_start_that_cannot_listen_leaves_nothing_open(certs: Certs, redis_server: Redis, flag: str) -> None:
    """The public listener fails before the store's tasks start, the admin listener after them:
    either way start() raises the one-line error naming the flag and closes what it had
    opened: the store's connections and the fleet tasks (they leaked before: an exit server
    embedded in a process, or a test, kept a Redis connection that nothing would close)."""
    add_client(redis_server.url, "seed", ["seed.test"])
    assert store_clients(redis_server) == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        server = ExitServer(server_config(certs, state=redis_server.url, **{flag: addr}))
        with pytest.raises(ConfigError, match=f"^--{flag.replace('_', '-')} {addr}: cannot listen"):
            await server.start()
    assert server.state is not None and server.state.version == 1  # it had loaded the store first
    names = {"fleet-state", "fleet-peers", "reload-credentials"}
    assert not [t for t in asyncio.all_tasks() if t.get_name() in names and not t.done()]
    await wait_until(lambda: store_clients(redis_server) == 0, timeout=5, what="no connection left on the store")
