"""Helpers for the security tests: a tokens file, an exit server using it, raw HTTP over a socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from exit_server import ExitServer
from exit_server.tokens import TokenEntry, load_entries, new_entry, save_entries
from tunnel_client import TunnelClient

from .helpers import Certs, RunningClient, client_config, server_config


def write_tokens(
    path: Path, clients: dict[str, list[str]], ports: dict[str, list[int]] | None = None
) -> dict[str, str]:
    """Create a tokens file with one entry per client (allowed host patterns); returns the tokens."""
    entries: dict[str, TokenEntry] = load_entries(path) if path.exists() else {}
    tokens: dict[str, str] = {}
    for client_id, hosts in clients.items():
        entry, token = new_entry(client_id, hosts, (ports or {}).get(client_id, []))
        entries[client_id] = entry
        tokens[client_id] = token
    save_entries(path, entries)
    return tokens


def revoke(path: Path, client_id: str) -> None:
    entries = load_entries(path)
    entries[client_id].revoked = True
    save_entries(path, entries)


@dataclass
class TokenStack:
    server: ExitServer
    certs: Certs
    clients: list[RunningClient]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.public_port}"

    async def add_client(
        self, token: str, upstreams: list[str], *, wait: bool = True, **overrides: Any
    ) -> RunningClient:
        client = TunnelClient(client_config(self.certs, self.server, upstreams, **overrides), token=token)
        running = RunningClient(client, asyncio.create_task(client.run()))
        self.clients.append(running)
        if wait:
            await client.wait_connected(10)
        return running


@contextlib.asynccontextmanager
async def token_stack(certs: Certs, tokens: Path, **overrides: Any) -> AsyncIterator[TokenStack]:
    """An exit server authenticating clients with ``--tokens``."""
    server = ExitServer(server_config(certs, tokens=tokens, **overrides))
    await server.start()
    s = TokenStack(server, certs, [])
    try:
        yield s
    finally:
        for running in s.clients:
            with contextlib.suppress(Exception):
                await running.stop()
        await server.close()


def echo_app(seen: list[web.Request] | None = None) -> web.Application:
    """An upstream answering ``ok <path>``; records each request it served."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if seen is not None:
            seen.append(request)
        body = await request.read()
        return web.Response(text=f"ok {request.path} {len(body)}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@dataclass
class RawResponse:
    status: int
    head: bytes
    body: bytes
    closed: bool

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode("latin-1")
        return None


async def raw_exchange(
    port: int, data: bytes, *, timeout: float = 5.0, chunks: list[bytes] | None = None, pause: float = 0.0
) -> RawResponse:
    """Write raw bytes to 127.0.0.1:port, read one response and tell whether the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        for chunk in chunks or []:
            await asyncio.sleep(pause)
            writer.write(chunk)
            await writer.drain()
        return await read_response(reader, timeout)
    finally:
        writer.transport.abort()


async def read_response(reader: asyncio.StreamReader, timeout: float = 5.0) -> RawResponse:
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    resp = RawResponse(status, head, b"", False)
    length = resp.header("Content-Length")
    async with asyncio.timeout(timeout):
        if length is not None:
            resp.body = await reader.readexactly(int(length))
        try:
            async with asyncio.timeout(1.0):
                rest = await reader.read(1)
            resp.closed = rest == b""
        except TimeoutError:
            resp.closed = False
        except ConnectionError:
            resp.closed = True
    return resp
