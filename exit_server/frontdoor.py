"""A TLS port: accept, peek at the ClientHello, route by SNI name, then TLS. The public TLS
port routes by name; the control port (``--control-addr``) has one route, and uses the door
so that close() reaches a connection still in its TLS handshake.

Each accepted connection is read with ``MSG_PEEK`` only, so the TLS stack later reads the same
bytes: no byte is consumed before the route is chosen. The route callback picks the protocol
factory and TLS context (the public HTTPS listener, or the control endpoint for
``--control-hostname``), or None: then the caller gets the ``unrecognized_name`` alert and the
connection is closed, never a certificate for another name.

A caller that sends no complete ClientHello within ``hello_timeout`` is closed; at most
``max_pending`` connections wait for theirs, so a flood of silent callers cannot hold every
descriptor; none of this runs in the accept loop, which never waits for a caller.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from collections.abc import Callable
from typing import NamedTuple

from shared.aio.sockopts import listen_sockets

from .clienthello import MAX_HELLO, ClientHello, alert, parse_client_hello

__all__ = ["FrontDoor", "Route"]

log = logging.getLogger(__name__)

_UNRECOGNIZED_NAME = 112
#: A ClientHello split over TCP segments is looked at again after this long (the socket stays
#: readable while peeked bytes wait, so it cannot simply wait for readability again).
_REPEEK = 0.005


_HTTP_REQUEST = re.compile(rb"[A-Z]{3,10} ")
_PLAIN_HTTP_400 = (
    b"HTTP/1.1 400 Bad Request\r\nServer: backhaul\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 35\r\nConnection: close\r\n\r\nplain HTTP sent to the HTTPS port\r\n"
)


class Route(NamedTuple):
    """Where a connection goes after its ClientHello."""

    factory: Callable[[], asyncio.BaseProtocol]
    context: ssl.SSLContext
    name: str  # for metrics and logs: "public" or "control"


class _Pending:
    __slots__ = ("handle", "sock", "timer")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.timer: asyncio.TimerHandle | None = None
        self.handle: asyncio.TimerHandle | None = None


class FrontDoor:
    """Accepts on a port (every address of its host) and hands each connection on by its ClientHello.

    Args:
        route: picks the route for a ClientHello (None: refused with unrecognized_name).
        hello_timeout: seconds for a caller to send its whole ClientHello.
        handshake_timeout: seconds for the TLS handshake after that.
        on_result: called with one word per connection (``ok``, ``unknown_name``, ``no_sni``,
            ``not_tls``, ``timeout``, ``handshake_failed``, ``busy``): the handshake metric.
        max_pending: connections that may wait for their ClientHello at once.
        shutdown_timeout: seconds a closing connection waits for the caller's TLS close_notify
            (None: the event loop's default, 30).
        name: the port in log lines.
        require_sni: refuse a ClientHello without a server name (``no_sni``); when False,
            ``route`` decides (a tunnel client given an IP address sends none).
    """

    def __init__(
        self,
        route: Callable[[ClientHello], Route | None],
        *,
        hello_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        on_result: Callable[[str], None] = lambda result: None,
        max_pending: int = 1024,
        shutdown_timeout: float | None = None,
        name: str = "public TLS",
        require_sni: bool = True,
    ) -> None:
        self._route = route
        self.name = name
        self._tls_args = {} if shutdown_timeout is None else {"ssl_shutdown_timeout": shutdown_timeout}
        self.require_sni = require_sni
        self.hello_timeout = hello_timeout
        self.handshake_timeout = handshake_timeout
        self._on_result = on_result
        self.max_pending = max_pending
        self._listeners: list[socket.socket] = []
        self._pending: dict[int, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

    async def start(self, host: str, port: int, backlog: int = 1024) -> int:
        """Listen on every address of ``host`` (as asyncio's listener would), all on one port
        (0: any free port); returns the bound port.

        Raises:
            OSError: the name does not resolve or an address cannot be bound.
        """
        loop = self._loop = asyncio.get_running_loop()
        self._listeners = listen_sockets(host, port, backlog)
        for sock in self._listeners:
            loop.add_reader(sock.fileno(), self._accept, sock)
        self.port = int(self._listeners[0].getsockname()[1])
        return self.port

    def stop_accepting(self) -> None:
        """Close the listening sockets (connections already handed on are not touched)."""
        listeners, self._listeners = self._listeners, []
        for sock in listeners:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()

    async def close(self) -> None:
        """Stop accepting, drop connections still waiting for their ClientHello, and wait for
        the hand-overs in progress."""
        self.stop_accepting()
        for pending in list(self._pending.values()):
            self._drop(pending)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def listeners(self) -> tuple[socket.socket, ...]:
        """The listening sockets, one per address (none once it stopped accepting, or before
        start)."""
        return tuple(self._listeners)

    @property
    def waiting(self) -> int:
        """Connections waiting for their ClientHello now."""
        return len(self._pending)

    # ------------------------------------------------------------------ internals

    def _accept(self, listener: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(64):  # a burst at a time; the loop comes back for more
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the next readiness tries again
                log.error("%s: accept failed: %s", self.name, exc)
                return
            if len(self._pending) >= self.max_pending:
                self._on_result("busy")
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pending = _Pending(sock)
            self._pending[sock.fileno()] = pending
            pending.timer = loop.call_later(self.hello_timeout, self._expire, pending)
            loop.add_reader(sock.fileno(), self._peek, pending)

    def _expire(self, pending: _Pending) -> None:
        pending.timer = None
        self._on_result("timeout")
        self._drop(pending)

    def _drop(self, pending: _Pending) -> None:
        self._forget(pending)
        pending.sock.close()

    def _forget(self, pending: _Pending) -> None:
        fd = pending.sock.fileno()
        if self._pending.pop(fd, None) is not None and self._loop is not None:
            self._loop.remove_reader(fd)
        for handle in (pending.timer, pending.handle):
            if handle is not None:
                handle.cancel()
        pending.timer = pending.handle = None

    def _repeek(self, pending: _Pending) -> None:
        pending.handle = None
        if pending.sock.fileno() in self._pending and self._loop is not None:
            self._loop.add_reader(pending.sock.fileno(), self._peek, pending)

    def _peek(self, pending: _Pending) -> None:
        sock = pending.sock
        try:
            data = sock.recv(2 * MAX_HELLO + 1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(pending)
            return
        if not data:
            self._drop(pending)  # closed before a ClientHello
            return
        try:
            hello = parse_client_hello(data)
        except ValueError as exc:
            log.debug("%s: not a ClientHello from a caller: %s", self.name, exc)
            self._not_tls(pending, data)
            return
        if hello is None:  # split over segments: look again shortly
            assert self._loop is not None
            self._loop.remove_reader(sock.fileno())
            pending.handle = self._loop.call_later(_REPEEK, self._repeek, pending)
            return
        route = self._route(hello) if hello.server_name or not self.require_sni else None
        if route is None:
            self._refuse(pending, len(data), "unknown_name" if hello.server_name else "no_sni")
            return
        self._forget(pending)
        assert self._loop is not None
        task = self._loop.create_task(self._hand_over(sock, route))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _not_tls(self, pending: _Pending, data: bytes) -> None:
        """Plain HTTP on the TLS port gets a 400 that says so (as nginx does); anything else is
        closed. The peeked bytes are read first: a FIN, not a reset, ends the connection."""
        self._on_result("not_tls")
        self._forget(pending)
        sock = pending.sock
        try:
            sock.recv(len(data))
            if _HTTP_REQUEST.match(data):
                sock.send(_PLAIN_HTTP_400)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()

    def _refuse(self, pending: _Pending, peeked: int, why: str) -> None:
        """The unrecognized_name alert, then close (the peeked bytes are read first, so the
        close is a FIN after the alert, not a reset that could discard it)."""
        self._on_result(why)
        self._forget(pending)
        sock = pending.sock
        try:
            sock.recv(peeked)
            sock.send(alert(_UNRECOGNIZED_NAME))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()

    async def _hand_over(self, sock: socket.socket, route: Route) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(
                route.factory, sock, ssl=route.context, ssl_handshake_timeout=self.handshake_timeout, **self._tls_args
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.debug("%s: %s handshake failed: %s", self.name, route.name, exc)
            self._on_result("handshake_failed")
            sock.close()
            return
        self._on_result("ok")


class DoorServer:
    """A :class:`FrontDoor` with the face of the ``asyncio.Server`` that websockets' ``Server``
    wraps (``serve()``'s ``create_server`` replaced by one returning this): the members it
    calls, pinned by tests/unit/test_library_contracts.py. ``close()`` stops accepting;
    ``wait_closed()`` drops callers still before their ClientHello and cancels handshakes in
    progress, so when websockets' ``close()`` has waited for its connection handlers, no
    connection of this port is left, TLS handshake or not. (An ``asyncio.Server`` of Python
    3.11 forgets a connection still in its handshake: nothing closed one after ``close()``.)"""

    def __init__(self, door: FrontDoor, loop: asyncio.AbstractEventLoop) -> None:
        self.door = door
        self._loop = loop

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return bool(self.door.listeners)

    async def start_serving(self) -> None:
        """Accepting since :meth:`FrontDoor.start`."""

    def close(self) -> None:
        self.door.stop_accepting()

    async def wait_closed(self) -> None:
        await self.door.close()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return self.door.listeners
