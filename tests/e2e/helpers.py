"""Real parts for end-to-end tests: an exit server, tunnel clients and aiohttp upstreams on
127.0.0.1 port 0, TLS from a trustme CA."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from exit_server import ExitServer, ServerConfig
from tunnel_client import ClientConfig, TunnelClient

TOKEN = "test-token-0123456789"
#: The virtualenv's bin directory: the console scripts under test.
BIN = Path(sys.executable).parent


def retrying_client_args(certs: Certs, *extra: str) -> list[str]:
    """``tunnel-client run`` against a server nobody listens on: the client keeps retrying until
    stopped (for what a client does before and besides its session)."""
    return [
        str(BIN / "tunnel-client"),
        "run",
        "--server",
        "wss://127.0.0.1:9/tunnel",
        "--ca-file",
        str(certs.ca),
        "--upstream",
        "default=http://127.0.0.1:9",
        "--log-level",
        "warning",
        *extra,
    ]


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    app_cert: Path = Path()  # app.localhost, from the same CA (a public HTTPS name)
    app_key: Path = Path()


@dataclass
class Upstream:
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def upstream(app: web.Application) -> AsyncIterator[Upstream]:
    """Serve ``app`` on 127.0.0.1:0; handlers are cancelled when their caller disconnects."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Upstream(runner, port)
    finally:
        await runner.cleanup()


def server_config(certs: Certs, **overrides: Any) -> ServerConfig:
    values: dict[str, Any] = {
        "public_addr": "127.0.0.1:0",
        "control_addr": "127.0.0.1:0",
        "admin_addr": "127.0.0.1:0",
        "tls_cert": certs.cert,
        "tls_key": certs.key,
        "drain_timeout": 5,
    }
    values.update(overrides)
    return ServerConfig(**values)


def client_config(
    certs: Certs, target: ExitServer | list[ExitServer], upstreams: list[str], **overrides: Any
) -> ClientConfig:
    servers = target if isinstance(target, list) else [target]
    values: dict[str, Any] = {
        "server": [f"wss://localhost:{s.control_port}" for s in servers],
        "ca_file": certs.ca,
        "upstream": upstreams,
        "backoff_base": 0.2,
        "backoff_cap": 1.0,
        "admin_addr": "127.0.0.1:0",
        "drain_timeout": 5,
    }
    values.update(overrides)
    return ClientConfig(**values)


@dataclass
class RunningClient:
    client: TunnelClient
    task: asyncio.Task[None]

    async def stop(self) -> None:
        if not self.task.done():
            await self.client.shutdown(drain_timeout=2)
            await asyncio.wait_for(self.task, 10)


@dataclass
class Stack:
    server: ExitServer
    certs: Certs
    clients: list[RunningClient] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.public_port}"

    async def add_client(self, upstreams: list[str], *, wait: bool = True, **overrides: Any) -> RunningClient:
        config = client_config(self.certs, self.server, upstreams, **overrides)
        client = TunnelClient(config, token=TOKEN)
        running = RunningClient(client, asyncio.create_task(client.run()))
        self.clients.append(running)
        if wait:
            await client.wait_connected(10)
        return running


@contextlib.asynccontextmanager
async def stack(certs: Certs, **server_overrides: Any) -> AsyncIterator[Stack]:
    """An exit server (shared token) with TLS on the control port; clients are added by the test."""
    server = ExitServer(
        server_config(certs, **server_overrides), auth=None if "token" in server_overrides else _token_auth()
    )
    await server.start()
    s = Stack(server, certs)
    try:
        yield s
    finally:
        for running in s.clients:
            with contextlib.suppress(Exception):
                await running.stop()
        await server.close()


def _token_auth() -> Any:
    from exit_server.control import SharedTokenAuth

    return SharedTokenAuth(TOKEN)


class BlackholeProxy:
    """A TCP proxy on 127.0.0.1:0 that can silently stop forwarding (no FIN, no RST): the
    half-open link users of other tunnels complain about."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blackhole = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blackhole:  # while the link is down, new connections hang too
            self._writers.add(writer)
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update({writer, up_writer})
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if self.blackhole:
                    continue  # swallow silently
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not self.blackhole:
                dst.close()

    def heal(self) -> None:
        """Forget the dead connections (as a NAT would) and forward new ones again."""
        self.blackhole = False
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
