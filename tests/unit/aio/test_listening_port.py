"""shared.aio.sockopts.listening_port: the port of a server that listens, EADDRINUSE for one
whose listen failed after its bind (uvloop returns it with ``None`` for a socket)."""

from __future__ import annotations

import errno
import socket

import pytest

from shared.aio.sockopts import listening_port


def test_the_port_of_a_listening_socket() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert listening_port([sock]) == sock.getsockname()[1]


@pytest.mark.parametrize("sockets", [[None], [], None], ids=["listen-failed", "none", "no-list"])
def test_a_server_without_a_listening_socket_is_address_in_use(sockets: list[socket.socket | None] | None) -> None:
    with pytest.raises(OSError) as raised:
        listening_port(sockets)
    assert raised.value.errno == errno.EADDRINUSE
