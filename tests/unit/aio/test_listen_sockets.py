"""shared.aio.sockopts.listen_sockets: every address of a name, one port for all, nothing left
open when one address cannot be bound (the name with two addresses: tests/names.py)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared.aio.sockopts import listen_sockets
from tests.names import dual_name, needs_ipv6


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
