"""shared.aio.sockopts.listen_sockets and create_servers: every address of a name, one port
for all, nothing left open when one address cannot be bound or served (the name with two
addresses: tests/names.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared.aio.sockopts import create_servers, listen_sockets
from tests.names import dual_name, needs_ipv6
from tests.waiting import wait_until


@pytest.fixture
def opened() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def _accepts(family: socket.AddressFamily, address: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as caller:
        caller.settimeout(5)
        caller.connect((address, port))
        return True


@needs_ipv6
def test_every_address_of_a_name_on_one_port(monkeypatch: pytest.MonkeyPatch, opened: list[socket.socket]) -> None:
    opened += listen_sockets(dual_name(monkeypatch), 0)
    assert sorted(sock.family for sock in opened) == [socket.AF_INET, socket.AF_INET6]
    ports = {sock.getsockname()[1] for sock in opened}
    assert len(ports) == 1 and 0 not in ports
    port = ports.pop()
    assert _accepts(socket.AF_INET, "127.0.0.1", port) and _accepts(socket.AF_INET6, "::1", port)
    for sock in opened:
        assert not sock.getblocking()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    six = next(sock for sock in opened if sock.family == socket.AF_INET6)
    assert six.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


def test_a_numeric_address_is_one_socket(opened: list[socket.socket]) -> None:
    opened += listen_sockets("127.0.0.1", 0, backlog=8)
    assert len(opened) == 1 and opened[0].getsockname()[0] == "127.0.0.1"


@needs_ipv6
def test_one_address_taken_leaves_nothing_open(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET6) as taken:
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        made: list[socket.socket] = []
        real_socket: Callable[..., socket.socket] = socket.socket

        def recording(*args: Any, **kwargs: Any) -> socket.socket:
            sock = real_socket(*args, **kwargs)
            made.append(sock)
            return sock

        monkeypatch.setattr(socket, "socket", recording)
        with pytest.raises(OSError):
            listen_sockets(dual_name(monkeypatch), port)
    assert made and all(sock.fileno() == -1 for sock in made)  # the IPv4 one it bound, closed


def test_a_name_without_an_ip_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [])  # only other families
    with pytest.raises(OSError, match="no IPv4 or IPv6 address"):
        listen_sockets("elsewhere.test", 0)


@pytest.mark.asyncio
@needs_ipv6
async def test_a_server_on_every_address(monkeypatch: pytest.MonkeyPatch) -> None:
    accepted: list[str] = []

    class Note(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport.get_extra_info("sockname")[0])
            transport.close()

    servers = await create_servers(Note, dual_name(monkeypatch), 0, backlog=8)
    try:
        port = servers[0].sockets[0].getsockname()[1]
        assert [s.sockets[0].getsockname()[1] for s in servers] == [port, port]
        for address in ("127.0.0.1", "::1"):
            _, writer = await asyncio.open_connection(address, port)
            writer.close()
        await wait_until(lambda: len(accepted) == 2, timeout=5, what="both connections accepted")
        assert sorted(accepted) == ["127.0.0.1", "::1"]
    finally:
        for server in servers:
            server.close()


@pytest.mark.asyncio
@needs_ipv6
async def test_a_server_that_cannot_start_leaves_nothing_listening(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    real = loop.create_server
    made: list[asyncio.Server] = []
    given: list[socket.socket] = []

    async def second_fails(*args: Any, **kwargs: Any) -> asyncio.Server:
        given.append(kwargs["sock"])
        if len(given) == 2:
            raise OSError("refused by the test")
        server = await real(*args, **kwargs)
        made.append(server)
        return server

    monkeypatch.setattr(loop, "create_server", second_fails)
    with pytest.raises(OSError, match="refused by the test"):
        await create_servers(asyncio.Protocol, dual_name(monkeypatch), 0)
    assert len(made) == 1 and not made[0].is_serving()
    assert all(sock.fileno() == -1 for sock in given)
