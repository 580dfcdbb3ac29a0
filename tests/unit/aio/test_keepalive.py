"""shared.aio.sockopts.set_keepalive: relayed long-lived connections find a vanished peer in
minutes (the kernel default is 2 h 11 min)."""

from __future__ import annotations

import socket

from shared.aio.sockopts import set_keepalive


def test_keepalive_probes_a_vanished_peer_within_minutes() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
            set_keepalive(sock)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            if hasattr(socket, "TCP_KEEPIDLE"):  # Linux
                idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
                interval = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
                count = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
                assert (idle, interval, count) == (60, 15, 4)


def test_no_socket_is_a_no_op() -> None:
    set_keepalive(None)  # a transport without a socket (e.g. a test double): nothing to do
