"""The exit server as a library object: start, serve, drain, stop.

server = ExitServer(config, auth=SharedTokenAuth(token))
await server.start()
...   # server.public_port, server.control_port
await server.shutdown()          # go-away, drain in-flight, close
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import resource
import secrets
import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

from websockets.asyncio.server import Server, serve
from websockets.server import ServerProtocol

from shared.aio.connection import WS_LOG, ws_limits
from shared.aio.sockopts import create_servers, listening_port
from shared.aio.tls import server_context
from shared.aio.wsfast import TunnelServerConnection
from shared.errors import ConfigError
from shared.forwarding import TrustedProxies, parse_networks
from shared.frames import GoAwayCode
from shared.runtime.config import parse_addr, read_secret
from shared.runtime.fdlimit import public_connection_limit
from shared.runtime.procmetrics import register_process_metrics
from shared.sizes import DEFAULT_MAX_FRAME

from .access import AccessRules
from .acmeanswers import ACME_TLS_ALPN
from .admin import AdminApp
from .clienthello import ClientHello
from .config import ServerConfig
from .control import Authenticator, ControlEndpoint, SharedTokenAuth
from .frontdoor import DoorServer, FrontDoor, Route
from .h1 import H1Listener
from .iamauth import IamVerifier
from .observe import Metrics
from .public import PublicHandler
from .reload import Reloadable, Reloader
from .routes import Registry, Tunnel
from .tcp import TcpListeners
from .tokens import TokenRegistry, host_allowed

if TYPE_CHECKING:
    from .acme import AcmeIssuer
    from .certstore import CertStore
    from .h2public import H2Edge
    from .peers import PeerDirectory
    from .state import StateFollower

__all__ = ["ExitServer"]

log = logging.getLogger(__name__)


class ExitServer:
    """Public listener + control listener around one registry.

    Args:
        config: validated settings.
        auth: maps a bearer token to a client id; defaults to the configured shared token.
    """

    def __init__(self, config: ServerConfig, auth: Authenticator | None = None) -> None:
        self.config = config
        self.registry = Registry(config.tcp_ports, config.max_routes_per_client)
        #: --state: the credentials follow the fleet's store (exit_server/state.py)
        self.state: StateFollower | None = None
        self.peers: PeerDirectory | None = None  # with --state: relaying to peers (exit_server/peers.py)
        self.server_id = secrets.token_hex(6)  # this process among the fleet's (peers, ACME locks)
        self._state_password: str | None = None
        if auth is None and config.state is not None:
            shared = None  # a shared token beside the store's clients (client "default")
            if config.token_file is not None or config.token is not None:
                shared = read_secret(config.token_file, config.token, "token")
            auth = TokenRegistry(None, shared=shared)  # no clients until the store is read at start
        elif auth is None and config.tokens is not None:
            auth = TokenRegistry(config.tokens)  # per-client credentials replace the shared token
        elif auth is None:
            auth = SharedTokenAuth(read_secret(config.token_file, config.token, "token"))
        self.metrics = Metrics(self.registry)
        if config.state is not None and isinstance(auth, TokenRegistry):
            try:
                import redis  # noqa: F401
            except ImportError:
                raise ConfigError("--state needs redis: pip install 'backhaul[fleet]'") from None
            from .state import StateFollower

            password = None
            if config.state_password_file is not None or config.state_password is not None:
                password = read_secret(config.state_password_file, config.state_password, "state-password")
            store_up = self.metrics.state_store_up
            from .peers import PeerDirectory, RelayCollector

            self.peers = PeerDirectory(
                config.state, password, self.server_id, config.peer_url, self.registry, config.state_ca_file
            )
            relays = RelayCollector(self.peers)
            self.metrics.extra.append(lambda registry: registry.register(relays))
            self._state_password = password
            self.state = StateFollower(
                config.state,
                password,
                auth,
                on_change=self._credentials_changed,
                on_up=lambda up: store_up.set(1 if up else 0),
                resync=config.state_resync,
                ca_file=config.state_ca_file,
            )
        self.metrics.extra.append(
            lambda registry: register_process_metrics(registry, "exit-server", {"control": config.tls_cert})
        )
        self.tcp = TcpListeners(config, self.registry, parse_addr(config.public_addr)[0], self.metrics)
        self.control = ControlEndpoint(config, self.registry, auth, self.tcp, self.metrics)
        if not config.insecure_plaintext and config.tls_key is not None:
            self.control.signer_file = config.tls_key  # read at the first challenge
        if config.aws_server_id is not None:
            self.control.iam = IamVerifier(
                config.aws_server_id, tuple(config.aws_sts_endpoint) or None, max_age=config.aws_max_age
            )
        self.public = PublicHandler(config, self.registry, self.metrics)
        self.public.peers = self.peers
        #: the public HTTP/2 side, made (and h2 imported) when a listener offers HTTP/2
        self.h2: H2Edge | None = None
        self.access = AccessRules(config.access) if config.access is not None else None
        if self.state is not None:  # the fleet's access rules, from the store (exit-server access push)
            self.access = self.state.access = AccessRules(None)
        self.public.access = self.access
        #: certificates of the public HTTPS listener (None: no --public-tls-addr)
        self.certs: CertStore | None = None
        if config.public_tls_addr:
            from .certstore import CertStore, PublicCertCollector  # cryptography only with public TLS

            self.certs = CertStore(config.public_cert_dir, http2=not config.no_http2)
            expiry = PublicCertCollector(self.certs)
            self.metrics.extra.append(lambda registry: registry.register(expiry))
        #: certificates from ACME (None: no --acme-dir)
        self.acme: AcmeIssuer | None = None
        if self.certs is not None and config.acme_dir is not None:
            from .acme import AcmeFiles, AcmeIssuer  # the ACME client only with --acme-dir

            orders = self.metrics.acme_orders
            files: AcmeFiles = AcmeFiles(config.acme_dir)
            if self.state is not None and config.state is not None:
                # the fleet orders once per name and every server serves it (exit_server/acmefleet.py)
                from .acmefleet import FleetAcmeFiles

                files = FleetAcmeFiles(
                    config.acme_dir, config.state, self._state_password, self.server_id, config.state_ca_file
                )
            self.acme = AcmeIssuer(
                config.acme_directory,
                files,
                self.certs,
                email=config.acme_email,
                challenge=config.acme_challenge,
                ca_file=config.acme_ca_file,
                on_result=lambda result: orders.labels(result).inc(),
            )
            self.public.acme = self.acme.challenges
            self.control.on_routes = self._routes_registered
        if config.trusted_proxies:
            self.public.trusted = TrustedProxies(parse_networks(config.trusted_proxies))
        watched = self.certs if config.public_cert_dir is not None else None
        reloadable: list[Reloadable] = [x for x in (auth, self.access) if isinstance(x, TokenRegistry | AccessRules)]
        if watched is not None:
            reloadable.append(watched)
        self.reloader = Reloader(reloadable, self._credentials_changed)
        self._reload_task: asyncio.Task[None] | None = None
        self._state_task: asyncio.Task[None] | None = None
        self._peers_task: asyncio.Task[None] | None = None
        self._state_stop = asyncio.Event()
        admin_token = None
        if config.admin_token_file is not None or config.admin_token is not None:
            admin_token = read_secret(config.admin_token_file, config.admin_token, "admin-token")
        self.admin = AdminApp(self, admin_token)
        self._admin_listener: H1Listener | None = None
        self._admin_sites: list[asyncio.Server] = []  # one per address of --admin-addr's host
        self.admin_port = 0
        self._ws_server: Server | None = None
        self._listener: H1Listener | None = None  # the public HTTP listener's connections
        self._sites: list[asyncio.Server] = []  # one per address of --public-addr's host
        self._tls_listener: H1Listener | None = None  # the public HTTPS listener's
        self._front: FrontDoor | None = None
        self._tls_public: Route | None = None
        self._tls_control: Route | None = None
        self.public_port = 0
        self.public_tls_port = 0
        self.control_port = 0
        self.stopping = False
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Bind the listeners (port 0 picks free ports, see ``public_port``/``control_port``).

        Raises:
            ConfigError: a listen address cannot be bound (what was started is closed again:
                listeners, the fleet store's connection and its tasks, ACME).
            StateUnavailable: --state unreachable within its start timeout.
        """
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    def _control_connection(self) -> TunnelServerConnection:
        """A control connection made by a front door: the control port's (with TLS) and the
        public TLS port's for --control-hostname. What websockets' own factory makes, on the
        same websockets server (its handshake, token check and handler)."""
        assert self._ws_server is not None
        limits = ws_limits(DEFAULT_MAX_FRAME)
        return TunnelServerConnection(
            ServerProtocol(max_size=limits["max_size"], logger=WS_LOG),
            self._ws_server,
            ping_interval=None,
            ping_timeout=None,
            close_timeout=limits["close_timeout"],
            max_queue=limits["max_queue"],
            write_limit=limits["write_limit"],
        )

    def _routes_registered(self, tunnel: Tunnel) -> None:
        """A session registered routes: ask ACME for the names it may issue. A name qualifies
        when it matches --acme-domain, or when the client's token grant (--tokens) names it
        by a pattern other than "*". A shared token or an any-host grant is no statement
        about names, so it orders nothing by itself."""
        assert self.acme is not None
        grant = tunnel.policy.hosts if tunnel.policy is not None else None
        patterns = [*self.config.acme_domain, *(p for p in grant or () if p != "*")]
        for route in tunnel.routes:
            if any(host_allowed(pattern, route.host) for pattern in patterns):
                self.acme.want(route.host)

    def _tls_route(self, hello: ClientHello) -> Route | None:
        """Where a ClientHello on the public TLS port goes: an ACME TLS-ALPN-01 validation,
        the control endpoint for --control-hostname, the public listener for a name with a
        certificate, else nowhere."""
        if hello.alpn == (ACME_TLS_ALPN,):  # RFC 8737 section 3: offered alone
            ctx = self.acme.challenges.alpn.get(hello.server_name or "") if self.acme is not None else None
            return Route(_Validated, ctx, "acme") if ctx is not None else None
        if hello.server_name == self.config.control_hostname:
            return self._tls_control
        if self.certs is not None and self.certs.lookup(hello.server_name) is not None:
            return self._tls_public
        return None

    def _h2_edge(self) -> H2Edge:
        if self.h2 is None:
            from .h2public import H2Edge, H2Limits

            cfg = self.config
            self.h2 = H2Edge(
                self.public,
                H2Limits(
                    max_concurrent_streams=cfg.h2_max_streams,
                    max_header_list_size=cfg.h2_max_header_list,
                    max_requests=cfg.h2_max_requests,
                    max_resets_per_second=cfg.h2_max_resets,
                    max_control_per_second=cfg.h2_max_control_frames,
                ),
            )
        return self.h2

    def _public_server(self, scheme: str | None) -> H1Listener:
        """The connections of a public listener (plain, or HTTPS with ``scheme="https"``):
        414/431/408, generic error bodies, PROXY v2 from --trusted-proxies (exit_server/h1.py)."""
        cfg = self.config
        handler = self.public if scheme is None else functools.partial(self.public.__call__, scheme=scheme)
        return H1Listener(
            handler,
            header_timeout=cfg.header_timeout,
            keepalive_timeout=cfg.keepalive_timeout,
            trusted=self.public.trusted,
            max_connections=public_connection_limit(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
            on_refused=self.metrics.descriptors.labels("reserve").inc,
            # on the plain listener: h2c for callers with --h2c, else for the fleet's gRPC relays only
            h2=self._h2_edge()
            if scheme is not None and not cfg.no_http2 or scheme is None and (cfg.h2c or cfg.peer_url)
            else None,
            h2c_peers_only=scheme is None and not cfg.h2c and cfg.peer_url is not None,
            scheme=scheme or cfg.public_scheme,
        )

    async def _start(self) -> None:
        cfg = self.config
        if self.state is not None:
            await self.state.start()  # the credentials before the first client
        ssl_ctx = None if cfg.insecure_plaintext else server_context(cfg.tls_cert, cfg.tls_key, cfg.client_ca)  # type: ignore[arg-type]
        host, port = parse_addr(cfg.control_addr)
        limits = ws_limits(DEFAULT_MAX_FRAME)
        ws = serve(
            self.control.handle,
            host,
            port,
            process_request=self.control.process_request,
            process_response=self.control.process_response,
            server_header="backhaul",
            create_connection=TunnelServerConnection,
            **limits,
        )
        if ssl_ctx is not None:
            # TLS through a FrontDoor, not asyncio's listener: close() then reaches a connection
            # still in its TLS handshake (DoorServer), and a silent caller is dropped after
            # --handshake-timeout, at most 1,024 waiting. Connections are made as the public TLS
            # port makes them for --control-hostname (_control_connection).
            control = Route(self._control_connection, ssl_ctx, "control")
            handshakes = self.metrics.control_tls_handshakes
            door = FrontDoor(
                lambda hello: control,
                hello_timeout=cfg.handshake_timeout,
                handshake_timeout=cfg.handshake_timeout,
                shutdown_timeout=limits["close_timeout"],  # as websockets sets for its own TLS listener
                name="control",
                require_sni=False,
                on_result=lambda result: handshakes.labels(result).inc(),
            )

            async def listen() -> asyncio.Server:
                await door.start(host, port)
                return cast("asyncio.Server", DoorServer(door, asyncio.get_running_loop()))

            ws.create_server = listen
        with _listen_errors("--control-addr", cfg.control_addr):
            self._ws_server = await ws  # (assigned once listening: close() would wait for it)
            self.control_port = listening_port(ws.sockets)
        self._listener = self._public_server(None)
        phost, pport = parse_addr(cfg.public_addr)
        with _listen_errors("--public-addr", cfg.public_addr):
            self._sites = await create_servers(self._listener, phost, pport)
            self.public_port = listening_port(self._sites[0].sockets)
        if self.certs is not None and cfg.public_tls_addr:
            await self._start_public_tls(cfg.public_tls_addr, ssl_ctx)
        if self.reloader.items:
            self._reload_task = asyncio.create_task(self.reloader.run(), name="reload-credentials")
        if self.state is not None:
            self._state_task = asyncio.create_task(self.state.run(self._state_stop), name="fleet-state")
        if self.peers is not None:
            self._peers_task = asyncio.create_task(self.peers.run(self._state_stop), name="fleet-peers")
        if cfg.admin_addr:
            self._admin_listener = H1Listener(self.admin, header_timeout=10.0, keepalive_timeout=75.0)
            ahost, aport = parse_addr(cfg.admin_addr)
            with _listen_errors("--admin-addr", cfg.admin_addr):
                self._admin_sites = await create_servers(self._admin_listener, ahost, aport, backlog=100)
                self.admin_port = listening_port(self._admin_sites[0].sockets)
        log.info(
            "exit server: public http://%s:%d%s, control %s://%s:%d, admin %s",
            phost,
            self.public_port,
            f" and https://{cfg.public_tls_addr.rpartition(':')[0]}:{self.public_tls_port}"
            if cfg.public_tls_addr
            else "",
            "ws" if ssl_ctx is None else "wss",
            host,
            self.control_port,
            f"http://{cfg.admin_addr.rpartition(':')[0]}:{self.admin_port}" if cfg.admin_addr else "off",
        )

    async def _start_public_tls(self, addr: str, control_ctx: ssl.SSLContext | None) -> None:
        """The public TLS port: a front door that routes each ClientHello by SNI name."""
        assert self.certs is not None
        cfg = self.config
        self.certs.reload(strict=True)
        if self.acme is not None:
            self.acme.start()
        if not self.certs.all():
            log.warning("public HTTPS: no certificate yet: handshakes are refused until one is loaded or issued")
        self._tls_listener = self._public_server("https")
        self._tls_public = Route(self._tls_listener, self.certs.listener_context(), "public")
        if cfg.control_hostname is not None and control_ctx is not None:
            self._tls_control = Route(self._control_connection, control_ctx, "control")
        handshakes = self.metrics.tls_handshakes
        self._front = FrontDoor(
            self._tls_route,
            hello_timeout=cfg.header_timeout,
            handshake_timeout=cfg.header_timeout,
            on_result=lambda result: handshakes.labels(result).inc(),
        )
        host, port = parse_addr(addr)
        with _listen_errors("--public-tls-addr", addr):
            self.public_tls_port = await self._front.start(host, port)
        self.public.tls_port = self.public_tls_port

    def reload(self, why: str = "SIGHUP") -> bool:
        """Re-read ``--tokens`` and ``--access`` now; sessions whose credentials were revoked or
        changed are closed. Returns True when something changed."""
        return self.reloader.reload_now(why)

    def _credentials_changed(self) -> None:
        auth = self.control.auth
        if isinstance(auth, TokenRegistry):
            self.control.revoke(auth.current)

    @property
    def ready(self) -> bool:
        """Listening, not draining, and serving at least ``--min-ready-tunnels`` sessions
        (``/readyz``): a server with no tunnel would answer 503 to everything it is sent."""
        return (
            bool(self._sites)
            and self._ws_server is not None
            and not self.public.draining
            and not self.stopping
            and len(self.registry.tunnels) >= self.config.min_ready_tunnels
        )

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Drain and stop (docs/SCALING.md, "Rolling restarts"):

        1. report not ready (``/readyz`` 503) and keep serving for ``--shutdown-delay`` so a
           load balancer's health check takes this server out of rotation;
        2. stop accepting connections; requests on open connections are still served, with
           ``Connection: close``;
        3. wait for in-flight requests (``drain_timeout``);
        4. close the public connections (idle keep-alive ones at once, others after the request
           that arrived meanwhile) while the tunnels are still up, all within ``drain_timeout``;
        5. send go-away to every tunnel client and close.

        Args:
            drain_timeout: seconds to wait for in-flight requests (default from config).
        """
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        self.stopping = True
        if self.config.shutdown_delay:
            log.info("exit server: not ready; serving %.1fs more before draining", self.config.shutdown_delay)
            await asyncio.sleep(self.config.shutdown_delay)
        log.info("exit server: draining (%d requests in flight, up to %.0fs)", self.public.in_flight, timeout)
        self.public.draining = True
        self.control.draining = True
        if self.h2 is not None:
            self.h2.goaway_all()  # HTTP/2 callers: streams in flight finish, new ones go elsewhere
        for site in self._sites:
            site.close()  # stop accepting public connections
        if self._front is not None:
            self._front.stop_accepting()
        self.tcp.stop_accepting()
        deadline = asyncio.get_running_loop().time() + timeout
        drained = await self._wait_drained(deadline)
        if drained and self._listener is not None:
            # The public side before the tunnels: idle keep-alive connections close now, and a
            # request that came on one meanwhile is answered while the tunnels are still up.
            # (Closing the tunnels first answered such a request 503 "no tunnel": behind HAProxy
            # in TCP mode a caller's keep-alive connection stays with this server; the
            # rolling-restart test saw it.) Still within ``timeout``; what is left then is cut
            # by close(), as when the drain itself timed out.
            listeners = [x for x in (self._listener, self._tls_listener) if x is not None]
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.gather(*(x.shutdown(left) for x in listeners))
            if any(x.connections for x in listeners):
                log.warning("exit server: drain timeout while closing public connections")
            self._listener = self._tls_listener = None
        self._stop_accepting_tunnels()
        for conn in list(self.control.connections):
            conn.goaway(GoAwayCode.SHUTDOWN, "exit server shutting down")
        await self.close(deadline)

    def _stop_accepting_tunnels(self) -> None:
        """Close the control listener, keeping the sessions: a client told to go (go-away, or
        the WebSocket close) reconnects at once, and must not reach this server again. Accepted
        then, its connection could still be in its TLS handshake when close() returned: not yet
        a WebSocket connection, so nothing would close it (CI saw such a transport collected
        unclosed). A connection between TLS and its upgrade is answered 503 by websockets."""
        if self._ws_server is not None:
            self._ws_server.server.close()
        if self._front is not None and self.config.control_hostname:
            self._front.stop_accepting()  # the public TLS port takes tunnels too

    async def _close_sessions(self, deadline: float | None) -> None:
        """Close every tunnel session at once, not one after another (issue 24 item 6: five
        frozen clients made a 5 s drain take 11 s, each close waiting out its own timeout)."""
        conns = list(self.control.connections)
        if not conns:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        budget = SESSION_CLOSE_TIMEOUT if deadline is None else deadline - now
        budget = min(SESSION_CLOSE_TIMEOUT, max(MIN_SESSION_CLOSE, budget))
        closing = [loop.create_task(conn.close(1001, "server shutting down")) for conn in conns]
        _, pending = await asyncio.wait(closing, timeout=budget)
        if pending:
            log.warning("exit server: %d tunnel sessions did not close in time; aborting them", len(pending))
            for conn in conns:
                conn.abort()
            for task in pending:
                task.cancel()
        await asyncio.gather(*closing, return_exceptions=True)

    async def _wait_drained(self, deadline: float) -> bool:
        """Wait until no request or TCP connection is in flight, or until ``deadline`` (loop
        time). Returns whether it drained."""
        try:
            async with asyncio.timeout_at(deadline):
                while self.public.in_flight or self.tcp.connections:
                    await asyncio.sleep(0.05)
            return True
        except TimeoutError:
            log.warning("exit server: drain timeout with %d requests in flight", self.public.in_flight)
            return False

    async def close(self, deadline: float | None = None) -> None:
        """Close everything now (in-flight requests are cut).

        Args:
            deadline: loop time by which every tunnel session must be closed (default: now
                plus the WebSocket close timeout); sessions whose peers do not complete the
                close handshake by then (a frozen client, full buffers) are aborted.
        """
        if self._reload_task is not None:
            self._reload_task.cancel()
            self._reload_task = None
        if self._state_task is not None:
            self._state_stop.set()
            self._state_task.cancel()
            await asyncio.gather(self._state_task, return_exceptions=True)
            self._state_task = None
        if self.state is not None:
            await self.state.close()
        if self._peers_task is not None:
            self._state_stop.set()
            await asyncio.gather(self._peers_task, return_exceptions=True)
            self._peers_task = None
        if self.peers is not None:
            await self.peers.close()
        await self.public.close_relays()
        self._stop_accepting_tunnels()
        await self._close_sessions(deadline)
        if self.h2 is not None:
            self.h2.close_all()
        if self.control.iam is not None:
            await self.control.iam.close()
        await self.tcp.close()
        if self.acme is not None:
            await self.acme.close()
        if self._front is not None:  # first: a hand-over it cancels cannot reach the WebSocket server
            await self._front.close()
            self._front = None
        if self._ws_server is not None:
            self._ws_server.close()
            await self._ws_server.wait_closed()
            self._ws_server = None
        for site in self._sites:
            site.close()
        for listener in (self._listener, self._tls_listener):
            if listener is not None:
                await listener.shutdown(0)
        self._listener = self._tls_listener = None
        for site in self._admin_sites:
            site.close()
        self._admin_sites = []
        if self._admin_listener is not None:
            await self._admin_listener.shutdown(0)
            self._admin_listener = None
        self._sites = []
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


class _Validated(asyncio.Protocol):
    """A TLS-ALPN-01 validation connection: the handshake was the whole point."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


#: Longest wait for tunnel peers to complete the WebSocket close handshake at shutdown.
SESSION_CLOSE_TIMEOUT = 2.0
#: Shortest: even past the drain deadline, a live peer gets this long to receive the close.
MIN_SESSION_CLOSE = 0.2


@contextlib.contextmanager
def _listen_errors(flag: str, addr: str) -> Iterator[None]:
    """A listen address that cannot be bound (in use, not local, no permission) is a
    configuration error naming the flag: one line and status 2, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(f"{flag} {addr}: cannot listen: {exc.strerror or exc}") from None
