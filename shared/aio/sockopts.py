"""Socket options for long-lived relayed connections, listening sockets, and the port of a
listening server."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable, Sequence

__all__ = ["create_servers", "listen_sockets", "listening_port", "set_keepalive", "set_nodelay"]


def listen_sockets(host: str, port: int, backlog: int = 1024) -> list[socket.socket]:
    """Non-blocking listening sockets on every address ``host`` resolves to, as asyncio's
    ``create_server`` binds (``localhost`` is 127.0.0.1 and ::1 where the hosts file says so;
    SO_REUSEADDR; IPv6 sockets IPv6-only, so ``::`` and ``0.0.0.0`` can be bound side by
    side), all on one port: with port 0 the first bind picks it and the others take the same
    (asyncio would give each its own). The name is resolved synchronously: listen addresses
    are numeric or in the hosts file, and this runs at start.

    Raises:
        OSError: the name does not resolve (``socket.gaierror``) or an address cannot be
            bound; no socket is left open.
    """
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    addresses = dict.fromkeys(
        (family, sockaddr) for family, _type, _proto, _name, sockaddr in infos if family in _FAMILIES
    )
    sockets: list[socket.socket] = []
    try:
        for family, sockaddr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((sockaddr[0], port, *sockaddr[2:]))
            if port == 0:
                port = int(sock.getsockname()[1])
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(errno.EADDRNOTAVAIL, f"{host} has no IPv4 or IPv6 address")
    return sockets


_FAMILIES = (socket.AF_INET, socket.AF_INET6)


async def create_servers(
    factory: Callable[[], asyncio.BaseProtocol], host: str, port: int, backlog: int = 1024
) -> list[asyncio.Server]:
    """``loop.create_server`` on each socket of :func:`listen_sockets`: every address of
    ``host``, one port for all (the first server's).

    Raises:
        OSError: as :func:`listen_sockets`; nothing is left listening.
    """
    loop = asyncio.get_running_loop()
    sockets = listen_sockets(host, port, backlog)
    servers: list[asyncio.Server] = []
    try:
        for sock in sockets:
            servers.append(await loop.create_server(factory, sock=sock, backlog=backlog))
    except BaseException:
        for server in servers:
            server.close()
        for sock in sockets[len(servers) :]:
            sock.close()
        raise
    return servers


def listening_port(sockets: Sequence[socket.socket | None] | None) -> int:
    """The port a server returned by ``loop.create_server(host=..., port=...)`` listens on.

    Two processes binding one free port at the same moment with SO_REUSEADDR both bind; the
    second ``listen()`` then fails with EADDRINUSE, and uvloop closes that listener without
    raising: ``create_server`` returns a server whose socket list holds ``None`` (10 of 25
    simultaneous starts here). Several tunnel clients of one ECS instance in host network mode,
    started together with the default admin address, meet exactly this.

    Raises:
        OSError: EADDRINUSE, for such a server (the caller closes it).
    """
    if not sockets or sockets[0] is None:
        raise OSError(errno.EADDRINUSE, "address already in use (another process took it while this one bound it)")
    return int(sockets[0].getsockname()[1])


def set_keepalive(sock: socket.socket | None, idle: int = 60, interval: int = 15, count: int = 4) -> None:
    """TCP keepalive on a long-lived relayed connection: a peer that vanished without a FIN
    (power loss, a NAT that forgot the flow) is found after about ``idle + interval * count``
    seconds of silence (2 minutes by default, against the kernel's 2 h 11 min), so its stream,
    its socket and the upstream connection behind it are not held for ever."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
            option = getattr(socket, name, None)  # Linux names; other systems keep their defaults
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


def set_nodelay(sock: socket.socket | None) -> None:
    """TCP_NODELAY: small frames (HTTP/2 HEADERS, WINDOW_UPDATE) go out at once instead of
    waiting for the peer's delayed ACK (Nagle)."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
