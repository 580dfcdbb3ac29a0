"""The tunnel client as a library object: one link per exit server, each reconnecting forever
with full-jitter backoff; streams are served by the :class:`Forwarder`.

    client = TunnelClient(config)
    task = asyncio.create_task(client.run())
    await client.wait_connected()
    ...
    await client.shutdown()     # go-away, drain, close
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from urllib.parse import urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from shared.aio.connection import TunnelConnection, ws_limits
from shared.aio.tls import client_context
from shared.backoff import backoff_delays
from shared.config import read_secret
from shared.frames import GoAwayCode
from shared.messages import SUPPORTED_VERSIONS, Error, Hello, RouteSpec, Routes, TcpSpec, Welcome
from shared.mux import Role, Session

from .config import ClientConfig
from .upstream import Forwarder

__all__ = ["TunnelClient"]

log = logging.getLogger(__name__)

SOFTWARE = "backhaul/0.1.0"


class ServerLink:
    """Keeps one session to one exit server URL alive."""

    def __init__(self, client: TunnelClient, url: str) -> None:
        self.client = client
        self.url = url
        self.conn: TunnelConnection | None = None
        self.session_id = ""
        self.registered = asyncio.Event()
        self.reconnects = 0
        self._draining: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed and self.registered.is_set()

    async def run(self) -> None:
        cfg = self.client.config
        delays = backoff_delays(cfg.backoff_base, cfg.backoff_cap)
        first = True
        while not self.client.stopping:
            if not first:
                self.reconnects += 1
            first = False
            outcome = await self._one_session()
            if self.client.stopping:
                break
            if outcome == "goaway":
                continue  # the old session drains in the background; connect a new one now
            if outcome == "established":
                delays = backoff_delays(cfg.backoff_base, cfg.backoff_cap)
            delay = next(delays)
            log.info("link %s: reconnecting in %.2fs", self.url, delay)
            await self.client.sleep(delay)
        await self.finish()

    async def _one_session(self) -> str:
        cfg = self.client.config
        headers = {"Authorization": f"Bearer {self.client.token}"}
        ssl_ctx = self.client.ssl_context if self.url.startswith("wss:") else None
        try:
            ws = await connect(
                self.url,
                ssl=ssl_ctx,
                additional_headers=headers,
                open_timeout=cfg.connect_timeout,
                user_agent_header=SOFTWARE,
                proxy=None,
                **ws_limits(256 * 1024),
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            what = "token refused (401)" if status == 401 else f"HTTP {status}"
            log.error("link %s: %s", self.url, what)
            return "failed"
        except (OSError, InvalidHandshake, TimeoutError, ssl.SSLError) as exc:
            log.warning("link %s: connect failed: %s", self.url, exc)
            return "failed"
        loop = asyncio.get_running_loop()
        session = Session(
            Role.CLIENT,
            initial_window=256 * 1024,
            connection_window=16 << 20,
            max_streams=cfg.max_streams,
            heartbeat_timeout=cfg.heartbeat_timeout,
            now=loop.time(),
        )
        session.send_hello(
            Hello(
                versions=list(SUPPORTED_VERSIONS),
                instance_id=cfg.instance_id,
                routes=self.client.routes,
                tcp=[TcpSpec(port=t.public_port) for t in self.client.config.tcp_targets],
                labels=self.client.labels,
                max_streams=cfg.max_streams,
                initial_window=256 * 1024,
                software=SOFTWARE,
            )
        )
        went_away = asyncio.Event()

        def on_control(message: Hello | Welcome | Routes | Error) -> None:
            if isinstance(message, Welcome):
                session.heartbeat_interval = message.heartbeat_interval
                self.session_id = message.session_id
                conn.name = message.session_id
                for refusal in message.refused:
                    log.error("link %s: route %s refused: %s", self.url, refusal.route, refusal.reason)
                log.info("link %s: registered as session %s (client %s), routes: %s", self.url,
                         message.session_id, message.client_id,
                         ", ".join([r.host + ("" if r.path_prefix == "/" else r.path_prefix) for r in message.routes]
                                   + [f"tcp:{t.port}" for t in message.tcp]) or "none")
                self.registered.set()
                self.client._changed()
            elif isinstance(message, Error):
                log.error("link %s: server refused the session: %s %s", self.url, message.code, message.message)

        def on_goaway(code: int, reason: str) -> None:
            if code in (GoAwayCode.NO_ERROR, GoAwayCode.SHUTDOWN):
                went_away.set()

        conn = TunnelConnection(ws, session, name="-", on_stream=self.client.forwarder.handle,
                                on_control=on_control, on_goaway=on_goaway)
        self.conn = conn
        run = asyncio.create_task(conn.run(), name=f"link-{self.url}")
        waiter = asyncio.create_task(went_away.wait())
        try:
            await asyncio.wait({run, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        established = self.registered.is_set()
        self.registered.clear()
        self.client._changed()
        if not run.done():
            log.info("link %s: server draining session %s; connecting a new session", self.url, self.session_id)
            self._draining.add(run)
            run.add_done_callback(self._draining.discard)
            return "goaway"
        log.log(logging.INFO if self.client.stopping else logging.WARNING, "link %s: session %s ended: %s",
                self.url, self.session_id or "-", conn.close_reason or "closed")
        return "established" if established else "failed"

    async def drain(self, timeout: float) -> None:
        """Go away on the current session and wait for its streams."""
        conn = self.conn
        if conn is None or conn.closed:
            return
        conn.goaway(GoAwayCode.NO_ERROR, "client shutting down")
        drained = await conn.drain(timeout)
        if not drained:
            log.warning("link %s: drain timeout with %d streams in flight", self.url, conn.streams_in_flight)
        await conn.close(1001, "client shutting down")

    async def finish(self) -> None:
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*self._draining, return_exceptions=True)


class TunnelClient:
    """Connects to every configured exit server and serves the configured upstreams."""

    def __init__(self, config: ClientConfig, token: str | None = None) -> None:
        self.config = config
        self.token = token if token is not None else read_secret(config.token_file, config.token, "token")
        self.ssl_context = client_context(config.ca_file) if any(u.startswith("wss:") for u in config.server) else None
        self.forwarder = Forwarder(config.upstreams, config.upstream_connect_timeout, config.tcp_targets,
                                   config.proxy_protocol)
        self.routes = [RouteSpec(host=u.host, path_prefix=u.path_prefix) for u in config.upstreams]
        self.labels = config.labels
        self.links = [ServerLink(self, url) for url in config.server]
        self.stopping = False
        self._stop = asyncio.Event()
        self._state = asyncio.Condition()

    @property
    def connected(self) -> bool:
        """True when every link has a registered session."""
        return all(link.connected for link in self.links)

    def _changed(self) -> None:
        async def notify() -> None:
            async with self._state:
                self._state.notify_all()
        asyncio.get_running_loop().create_task(notify())

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until every link is registered.

        Raises:
            TimeoutError: not connected in time.
        """
        async with asyncio.timeout(timeout):
            async with self._state:
                await self._state.wait_for(lambda: self.connected)

    async def sleep(self, delay: float) -> None:
        """Sleep that ends early when the client stops."""
        try:
            async with asyncio.timeout(delay):
                await self._stop.wait()
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Run every link until :meth:`shutdown`."""
        await self.forwarder.start()
        try:
            async with asyncio.TaskGroup() as group:
                for link in self.links:
                    group.create_task(link.run(), name=f"link-{link.url}")
        finally:
            await self.forwarder.close()

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Go away on every session, let in-flight streams finish, then stop."""
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        log.info("client: draining (up to %.0fs)", timeout)
        self.stopping = True
        self._stop.set()
        await asyncio.gather(*(link.drain(timeout) for link in self.links))
