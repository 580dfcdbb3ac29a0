"""Socket options for long-lived relayed connections, and the port of a listening server."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Sequence

__all__ = ["listening_port", "set_keepalive", "set_nodelay"]


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
