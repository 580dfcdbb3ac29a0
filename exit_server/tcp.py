"""Public TCP listeners for raw TCP tunnels: one listener per granted port, open while at least
one live session serves it; each accepted connection becomes a TCP stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from shared.aio.sockopts import listen_sockets, set_keepalive
from shared.aio.splice import Splice
from shared.errors import SessionClosed, StreamReset, TooManyStreams, TunnelError
from shared.frames import ResetCode
from shared.heads import RequestHead, StreamKind

from .config import ServerConfig
from .observe import LogThrottle, Metrics
from .routes import Registry

__all__ = ["TcpListeners"]

log = logging.getLogger(__name__)


class TcpListeners:
    """Opens and closes public TCP listeners as sessions come and go."""

    def __init__(self, config: ServerConfig, registry: Registry, host: str, metrics: Metrics) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.host = host
        self._servers: dict[int, list[asyncio.Server]] = {}  # one per address of the host
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0
        self._limit_log = LogThrottle()

    def bind(self, port: int) -> str | None:
        """Open a listener on ``port`` now (synchronously, so a busy port is refused in the
        welcome), on every address of the public host (as the public HTTP listener binds);
        returns an error text or None."""
        if port in self._servers:
            return None
        try:
            sockets = listen_sockets(self.host, port)
        except OSError as exc:
            log.warning("tcp: cannot listen on %s:%d: %s", self.host, port, exc.strerror or exc)
            return "the exit server cannot listen on this port"
        servers: list[asyncio.Server] = []
        self._servers[port] = servers  # now: a second bind of the port before it serves is a no-op
        task = asyncio.get_running_loop().create_task(self._serve(port, sockets, servers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def close_unserved(_: object) -> None:  # also when cancelled before it ran
            for sock in sockets[len(servers) :]:
                sock.close()

        task.add_done_callback(close_unserved)
        return None

    async def _serve(self, port: int, sockets: list[socket.socket], servers: list[asyncio.Server]) -> None:
        loop = asyncio.get_running_loop()

        def accepted(conn: Splice) -> None:
            task = loop.create_task(self._accept(port, conn))
            self._tasks.add(task)  # owned here, so close() can cancel it
            task.add_done_callback(self._tasks.discard)

        for sock in sockets:
            if self._servers.get(port) is not servers:
                return  # no session serves the port any more (sync() closed it)
            # each connection a splice: bytes go between socket and stream in callbacks (shared/aio/splice.py)
            server = await loop.create_server(lambda: Splice(accepted), sock=sock)
            servers.append(server)
            if self._servers.get(port) is not servers:
                server.close()
                return
        log.info("tcp: listening on %s:%d", self.host, port)

    def sync(self) -> None:
        """Close the listeners of ports no session serves any more."""
        for port in [p for p in self._servers if p not in self.registry.tcp]:
            for server in self._servers.pop(port):
                server.close()
            log.info("tcp: closed port %d (no session serves it)", port)

    def stop_accepting(self) -> None:
        """Close every listener; connections already open carry on (drain)."""
        for servers in self._servers.values():
            for server in servers:
                server.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.stop_accepting()
        for servers in self._servers.values():
            for server in servers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), 1)
        self._servers.clear()

    async def _accept(self, port: int, conn: Splice) -> None:
        transport = conn.transport
        assert transport is not None
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", port)
        tunnel = self.registry.pick_tcp(port)
        if tunnel is None:
            log.info("tcp %d: no session serves this port; closing connection from %s", port, peer[0])
            conn.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_keepalive(sock)  # a caller that vanished is found in minutes, not hours
        head = RequestHead(
            StreamKind.TCP, "", str(port), _hostport(local[0], local[1]), "tcp", _hostport(peer[0], peer[1])
        )
        try:
            stream = tunnel.conn.open_stream(head)
        except (TooManyStreams, SessionClosed) as exc:
            held = self._limit_log.allow(f"{port}/{type(exc).__name__}", asyncio.get_running_loop().time())
            if held is not None:
                log.warning(
                    "tcp %d: %s; closing connection%s",
                    port,
                    exc,
                    f" ({held} more since the last such line)" if held else "",
                )
            conn.abort()
            return
        self.connections += 1
        self.metrics.tcp_connections.labels(str(port)).inc()
        try:
            try:
                await stream.response(self.config.upstream_timeout)
            except (TimeoutError, StreamReset, TunnelError) as exc:
                log.info("tcp %d stream %d: %s", port, stream.id, exc)
                stream.reset(ResetCode.UPSTREAM_CONNECT, "no upstream connection")
                conn.abort()
                return
            await conn.join(stream, self.config.stream_idle_timeout)  # done when both ways ended
        except asyncio.CancelledError:
            stream.reset(ResetCode.CANCEL, "server closing")  # (which ends the splice)
            conn.abort()
            raise
        finally:
            tunnel.conn.release(stream)
            self.connections -= 1
            conn.close()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
