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
import base64
import collections
import contextlib
import enum
import hashlib
import hmac
import ipaddress
import logging
import os
import random
import secrets
import socket
import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidProxyStatus, InvalidStatus, ProxyError

from shared import awsiam, challenge
from shared.aio.connection import TunnelConnection, TunnelStream, ws_limits
from shared.aio.tls import client_context
from shared.aio.wsclient import TunnelClientConnection
from shared.errors import AuthError, ConfigError, TunnelError
from shared.frames import GoAwayCode
from shared.messages import SUPPORTED_VERSIONS, Error, Hello, Routes, RouteSpec, TcpSpec, Welcome
from shared.mux import Role, Session
from shared.runtime.backoff import backoff_delays
from shared.runtime.config import parse_addr, read_secret
from shared.runtime.procmetrics import register_process_metrics
from shared.runtime.version import version
from shared.sizes import DEFAULT_MAX_FRAME, DEFAULT_STREAM_WINDOW

from .admin import AdminServer, ClientMetrics
from .adminaddr import remove_run_file, write_run_file
from .audit import AuditLog
from .awsiam import AwsSigner, require_botocore
from .config import ClientConfig, Upstream, parse_upstream
from .daemon import HostDiscovery
from .ecs import METADATA_ENV, discover_routes, fetch_metadata, labels_from_task
from .guard import Guard
from .health import HealthChecker, parse_health_path
from .killswitch import KillSwitch
from .pinning import parse_pin, pinned_connection, spki_digest
from .proxy import ProxyChoice, choose_proxy, credentials, with_credentials
from .proxyconnect import ConnectRefused, open_tunnel, spnego_available
from .upstream import Forwarder

__all__ = ["TunnelClient"]

log = logging.getLogger(__name__)

SOFTWARE = f"backhaul/{version()}"


def proxy_failure(exc: ProxyError | ConnectRefused, proxy: ProxyChoice, server: str) -> str:
    """One line for a proxy that would not carry the tunnel, with what to check."""
    where = f"proxy {proxy.shown} (from {proxy.why})"
    if isinstance(exc, InvalidProxyStatus | ConnectRefused):
        if isinstance(exc, ConnectRefused):
            status, reason, offered = exc.status, exc.reason, exc.offered
        else:
            status, reason, offered = exc.response.status_code, exc.response.reason_phrase, []
        if status == 407:
            hint = "the proxy wants a login, or refused the one given: --proxy-auth-file (user:password)"
            if offered:
                hint += f"; it offers {', '.join(offered)}"
                if any(o in ("NTLM", "Negotiate") for o in offered) and not spnego_available():
                    hint += " (NTLM and Negotiate need the ntlm extra: pip install 'backhaul[ntlm]')"
        elif status == 403:
            hint = f"the proxy's rules deny CONNECT to {server} (squid: http_access, SSL_ports)"
        elif status in (502, 503, 504):
            hint = f"the proxy could not reach {server} (DNS or firewall on the proxy's side)"
        else:
            hint = "see the proxy's own log"
        return f"{where} answered CONNECT with {status} {reason}; hint: {hint}"
    cause = exc.__cause__ or exc
    return f"{where} failed: {cause}; hint: is it a proxy of the scheme given (http://, socks5://)?"


def connect_hint(exc: BaseException, ca_file: Path | None) -> str:
    """A hint for the two commonest connection mistakes, appended to OpenSSL's own text: a CA
    that did not sign the exit server's certificate, and a URL that points at a plain-HTTP port
    (the public listener) instead of the control listener."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "unable to get local issuer certificate" in text:
        source = f"--ca-file {ca_file}" if ca_file is not None else "the system CA store (no --ca-file)"
        return (
            f"; hint: the exit server's certificate is not signed by a CA in {source}: give --ca-file the "
            "exit server's CA (ca.pem from `exit-server gen-certs`, or your PKI's chain), or --pin its key"
        )
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text or "http request" in text.lower():
        return (
            "; hint: this address answered without TLS (plain HTTP?): is it the exit server's public port? "
            "--server must name the control listener (--control-addr on the exit server, 8443 in the examples)"
        )
    return ""


async def resolve(host: str) -> list[str]:
    """The distinct addresses of a host name, in resolver order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


#: Sessions of about the same age, cut in a row, that reveal a connection-age limit in the path.
CUT_SAMPLES = 3
#: Sessions shorter than this are ordinary failures, not an age limit.
CUT_MIN_AGE = 1.0


async def prove_token(
    ws: TunnelClientConnection, token: str, token_id: str, cnonce: bytes, pins: frozenset[bytes], timeout: float
) -> tuple[str | None, bytes]:
    """Challenge authentication, client side (shared/challenge.py, steps 2-4): the server's
    signature by a pinned key first; only then the proof. Returns (None, the pinned key's
    digest) on success, else (why, ...) with nothing derived from the token sent unless the
    server's key checked out."""
    assert ws.response is not None
    answer = ws.response.headers.get(challenge.HEADER)
    if answer is None:
        return (
            "the upgrade was answered without challenge authentication: the exit server predates it, or "
            "something in between rewrote the upgrade; nothing derived from the token was sent",
            b"",
        )
    try:
        fields = challenge.parse_header(answer)
        snonce, spki, sig = fields["snonce"], fields["key"], fields["sig"]
        assert isinstance(snonce, bytes) and isinstance(spki, bytes) and isinstance(sig, bytes)
    except (ValueError, KeyError, AssertionError):
        return "a malformed challenge answer; nothing derived from the token was sent", b""
    digest = hashlib.sha256(spki).digest()
    t = challenge.transcript(token_id, cnonce, snonce, spki)
    if digest not in pins or not challenge.verify(spki, t, sig):
        return (
            f"the key that answered (sha256:{base64.b64encode(digest).decode()}) is not a --pin key, or its "
            "signature is wrong: a substituted server (TLS interception?); nothing derived from the token was sent",
            digest,
        )
    keys = challenge.derive_keys(token)
    ws.send_message([challenge.PROOF_PREFIX + challenge.client_proof(keys, t)])
    try:
        message = await ws.first_message(timeout)
    except (TimeoutError, ConnectionError):
        return f"challenge authentication refused ({ws.close_code} {ws.close_reason or ''})".rstrip(), digest
    if not hmac.compare_digest(message, challenge.OK_PREFIX + challenge.server_signature(keys.server_key, t)):
        return "the exit server's proof is wrong: it does not hold this token's verifier", digest
    return None, digest


class LinkOutcome(enum.Enum):
    """How one session attempt of a link ended; decides the next attempt's delay."""

    ESTABLISHED = "established"  # registered, then ended: reconnect after a fresh backoff
    FAILED = "failed"  # never registered (refused, unreachable): back off further
    GOAWAY = "goaway"  # the server drains this session: connect a new one at once
    ROLLOVER = "rollover"  # --max-connection-age: a new session first, then the old one drains
    KILLED = "killed"  # the kill switch withdrew the tunnel: wait until it is lifted
    STOPPED = "stopped"  # the client is stopping


class ServerLink:
    """Keeps one session to one exit server URL alive."""

    def __init__(self, client: TunnelClient, url: str, address: str | None = None) -> None:
        self.client = client
        self.url = url
        self.address = address  # a resolved address of the URL's host, when it has several
        self.name = f"{url} ({address})" if address else url
        self.proxy = client.proxy_for(url)
        self.conn: TunnelConnection | None = None
        self.session_id = ""
        self.registered = asyncio.Event()
        self.ever_registered = False  # --exit-on-auth-failure applies only before the first
        self.reconnects = 0
        self._draining: set[asyncio.Task[None]] = set()
        #: --max-connection-age: sessions to drain once the next one registers
        self._retiring: list[tuple[TunnelConnection, asyncio.Task[None]]] = []
        self._generation = 0  # bumped per rollover: the old and new sessions overlap
        self._cut_ages: collections.deque[float] = collections.deque(maxlen=CUT_SAMPLES)
        self._cut_warned = False

    @property
    def instance_id(self) -> str:
        """The id the exit server knows this link's sessions by. A reconnect keeps it (the
        server then replaces a stale session at once); a rollover takes the next one, so that
        the new session serves beside the old until the old has drained."""
        base = self.client.config.instance_id
        return base if self._generation == 0 else f"{base}.r{self._generation}"

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed and self.registered.is_set()

    async def run(self) -> None:
        cfg = self.client.config
        delays = backoff_delays(cfg.backoff_base, cfg.backoff_cap)
        first = True
        if self.address is None:
            log.info(
                "link %s: %s (%s)", self.url, "via " + self.proxy.shown if self.proxy.url else "direct", self.proxy.why
            )
        while not self.client.stopping:
            if not first:
                self.reconnects += 1
                self.client.metrics.reconnected(self.url)
            first = False
            await self.client.killswitch.wait_lifted(self.client._stop)  # returns at once when not engaged
            if self.client.stopping:
                break
            outcome = await self._one_session()
            if self.client.stopping:
                break
            if outcome is LinkOutcome.KILLED:
                delays = backoff_delays(cfg.backoff_base, cfg.backoff_cap)
                continue  # wait above until the kill switch is lifted, then connect at once
            if outcome in (LinkOutcome.GOAWAY, LinkOutcome.ROLLOVER):
                continue  # the old session drains in the background; connect a new one now
            if outcome is LinkOutcome.ESTABLISHED:
                delays = backoff_delays(cfg.backoff_base, cfg.backoff_cap)
            delay = next(delays)
            log.info("link %s: reconnecting in %.2fs", self.url, delay)
            await self.client.sleep(delay)
        await self.finish()

    async def _one_session(self) -> LinkOutcome:
        cfg = self.client.config
        challenged = cfg.auth == "challenge"
        cnonce = secrets.token_bytes(challenge.NONCE_BYTES)
        if challenged:  # the token never leaves this host (shared/challenge.py)
            headers = {challenge.HEADER: challenge.format_header(id=self.client.token_id, cnonce=cnonce)}
        elif self.client.aws is not None:  # no token at all: the AWS identity (shared/awsiam.py)
            server_id = cfg.aws_server_id or urlsplit(self.url).hostname or ""
            try:
                headers = {awsiam.ENVELOPE_HEADER: await self.client.aws.envelope(server_id)}
            except Exception as exc:  # botocore's credential chain raises many kinds
                log.error("link %s: cannot sign the AWS identity request: %s", self.url, exc)
                return LinkOutcome.FAILED
        else:
            headers = {"Authorization": f"Bearer {self.client.token}"}
        ssl_ctx = self.client.ssl_context if self.url.startswith("wss:") else None
        options = ws_limits(DEFAULT_MAX_FRAME)
        proxy = self.proxy.url
        if proxy is not None:
            proxy = self.client.with_proxy_login(proxy)
            if proxy.startswith("http://"):  # CONNECT with any login rounds (proxyconnect.py)
                try:
                    options["sock"] = await self._open_proxy_tunnel(proxy)
                except ConnectRefused as exc:
                    log.error("link %s: %s", self.url, proxy_failure(exc, self.proxy, urlsplit(self.url).netloc))
                    return LinkOutcome.FAILED
                except (OSError, ValueError, TimeoutError) as exc:
                    log.warning("link %s: proxy %s: %s", self.url, self.proxy.shown, exc)
                    return LinkOutcome.FAILED
                proxy = None
        elif self.address:  # connect to this resolved address; TLS still checks the URL's name
            options["host"] = self.address
        try:
            ws = await self._connect_unless_stopped(
                self.url,
                ssl=ssl_ctx,
                additional_headers=headers,
                open_timeout=cfg.connect_timeout,
                user_agent_header=SOFTWARE,
                proxy=proxy,
                create_connection=(
                    self.client.pinned
                    if ssl_ctx is not None and self.client.pinned is not None and not challenged
                    else TunnelClientConnection  # with --auth challenge the pin is checked inside
                ),
                **options,
            )
            if ws is None:
                return LinkOutcome.STOPPED  # a stop arrived while connecting: never register after it
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                what = "AWS identity refused (401)" if self.client.aws is not None else "token refused (401)"
            elif status == 503:
                what = "the exit server cannot take sessions now (503: draining, or its identity service is down)"
            else:
                between = f"proxy {self.proxy.shown} or " if self.proxy.url else ""
                what = (
                    f"the WebSocket upgrade was answered HTTP {status} instead of 101: {between}something else "
                    "between this client and the exit server does not pass WebSocket upgrades (a TLS-inspecting "
                    "proxy?), or --server is not the exit server's control endpoint"
                )
            log.error("link %s: %s", self.url, what)
            if status == 401 and cfg.exit_on_auth_failure and not self.ever_registered:
                raise AuthError(f"link {self.url}: {what} at start; exiting (--exit-on-auth-failure)") from None
            return LinkOutcome.FAILED
        except ProxyError as exc:
            log.error("link %s: %s", self.url, proxy_failure(exc, self.proxy, urlsplit(self.url).netloc))
            return LinkOutcome.FAILED
        except (OSError, InvalidHandshake, TimeoutError, ssl.SSLError) as exc:
            via = f" (through proxy {self.proxy.shown})" if self.proxy.url else ""
            log.warning("link %s: connect failed%s: %s%s", self.url, via, exc, connect_hint(exc, cfg.ca_file))
            return LinkOutcome.FAILED
        assert isinstance(ws, TunnelClientConnection)
        if challenged and not await self._prove_token(ws, cnonce):
            with contextlib.suppress(Exception):
                await ws.close(1000, "authentication failed")
            return LinkOutcome.FAILED
        loop = asyncio.get_running_loop()
        session = Session(
            Role.CLIENT,
            initial_window=DEFAULT_STREAM_WINDOW,
            connection_window=16 << 20,
            max_streams=cfg.max_streams,
            heartbeat_timeout=cfg.heartbeat_timeout,
            now=loop.time(),
        )
        session.send_hello(
            Hello(
                versions=list(SUPPORTED_VERSIONS),
                instance_id=self.instance_id,
                routes=self.client.routes,
                tcp=[TcpSpec(port=t.public_port) for t in self.client.config.tcp_targets],
                labels=self.client.labels,
                max_streams=cfg.max_streams,
                initial_window=DEFAULT_STREAM_WINDOW,
                software=SOFTWARE,
            )
        )
        went_away = asyncio.Event()

        def on_control(message: Hello | Welcome | Routes | Error) -> None:
            if isinstance(message, Welcome):  # the session adopted its heartbeat interval
                self.session_id = message.session_id
                conn.name = message.session_id
                if session.heartbeat_timeout > cfg.heartbeat_timeout:
                    log.info(
                        "link %s: heartbeat deadline %gs, not --heartbeat-timeout %gs: three of the server's "
                        "%gs intervals",
                        self.url,
                        session.heartbeat_timeout,
                        cfg.heartbeat_timeout,
                        session.heartbeat_interval,
                    )
                for refusal in message.refused:
                    log.error("link %s: route %s refused: %s", self.url, refusal.route, refusal.reason)
                log.info(
                    "link %s: registered as session %s (client %s), routes: %s",
                    self.url,
                    message.session_id,
                    message.client_id,
                    ", ".join(
                        [r.host + ("" if r.path_prefix == "/" else r.path_prefix) for r in message.routes]
                        + [f"tcp:{t.port}" for t in message.tcp]
                    )
                    or "none",
                )
                self.registered.set()
                self.ever_registered = True
                self.client._changed()
                self._retire_old()
            elif isinstance(message, Error):
                log.error("link %s: server refused the session: %s %s", self.url, message.code, message.message)

        def on_goaway(code: int, reason: str) -> None:
            if code in (GoAwayCode.NO_ERROR, GoAwayCode.SHUTDOWN):
                went_away.set()

        conn = TunnelConnection(
            ws, session, name="-", on_stream=self.client.serve_stream, on_control=on_control, on_goaway=on_goaway
        )
        self.conn = conn
        run = asyncio.create_task(conn.run(), name=f"link-{self.url}")
        waiter = asyncio.create_task(went_away.wait())
        killed = asyncio.create_task(self.client.killswitch.wait_engaged())
        aged = asyncio.create_task(self._age_limit())
        started = loop.time()
        try:
            await asyncio.wait({run, waiter, killed, aged}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            killed.cancel()
            aged.cancel()
        if aged.done() and not aged.cancelled() and not run.done() and not self.client.stopping:
            # keep serving on this session until the next one registers (_retire_old)
            log.info(
                "link %s: session %s reached --max-connection-age (%.0fs): opening its successor",
                self.url,
                self.session_id,
                loop.time() - started,
            )
            self._retiring.append((conn, run))
            self._generation += 1
            return LinkOutcome.ROLLOVER
        established = self.registered.is_set()
        self.registered.clear()
        self.client._changed()
        if established and run.done() and not self.client.stopping and not went_away.is_set():
            self._note_cut(loop.time() - started)
        if self.client.killswitch.engaged and not self.client.stopping:
            await self.withdraw(conn, run)
            return LinkOutcome.KILLED
        if not run.done():
            log.info("link %s: server draining session %s; connecting a new session", self.url, self.session_id)
            self._draining.add(run)
            run.add_done_callback(self._draining.discard)
            return LinkOutcome.GOAWAY
        log.log(
            logging.INFO if self.client.stopping else logging.WARNING,
            "link %s: session %s ended: %s",
            self.url,
            self.session_id or "-",
            conn.close_reason or "closed",
        )
        return LinkOutcome.ESTABLISHED if established else LinkOutcome.FAILED

    async def _prove_token(self, ws: TunnelClientConnection, cnonce: bytes) -> bool:
        """Challenge authentication (:func:`prove_token`), logged for this link."""
        client = self.client
        failure, pinned = await prove_token(
            ws, client.token, client.token_id, cnonce, client.pins, client.config.connect_timeout
        )
        if failure is not None:
            log.error("link %s: %s", self.url, failure)
            return False
        self._note_interception(ws, pinned)
        return True

    def _note_interception(self, ws: TunnelClientConnection, pinned: bytes) -> None:
        """Say so when the TLS certificate seen is not the exit server's (the key was proven
        inside the WebSocket instead)."""
        ssl_object = ws.transport.get_extra_info("ssl_object") if ws.transport is not None else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der and spki_digest(der) != pinned:
            from cryptography import x509

            cert = x509.load_der_x509_certificate(der)
            log.warning(
                "link %s: TLS interception: the certificate seen is %s issued by %s; the exit server's key was "
                "verified inside the WebSocket and the token was not sent",
                self.url,
                cert.subject.rfc4514_string(),
                cert.issuer.rfc4514_string(),
            )

    async def _open_proxy_tunnel(self, proxy: str) -> socket.socket:
        parts = urlsplit(proxy)
        server = urlsplit(self.url)
        target = f"{server.hostname}:{server.port or 443}"
        async with asyncio.timeout(self.client.config.connect_timeout):
            return await open_tunnel(parts.hostname or "", parts.port or 1080, target, credentials(proxy), SOFTWARE)

    async def _age_limit(self) -> None:
        """Returns when this session should give way (--max-connection-age, less up to 10 %
        so that a fleet's sessions do not all renew at once); never without the flag."""
        age = self.client.config.max_connection_age
        if not age:
            await asyncio.Event().wait()
        await self.registered.wait()
        await asyncio.sleep(age * random.uniform(0.9, 1.0))

    def _retire_old(self) -> None:
        """The new session registered: the ones it succeeds go away (no new streams) and
        close once their streams are done (at most --drain-timeout)."""
        retiring, self._retiring = self._retiring, []
        for conn, run in retiring:
            if conn.closed:
                continue
            conn.goaway(GoAwayCode.NO_ERROR, "max connection age")
            task = asyncio.get_running_loop().create_task(self._drain_retired(conn, run))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def _drain_retired(self, conn: TunnelConnection, run: asyncio.Task[None]) -> None:
        if not await conn.drain(self.client.config.drain_timeout):
            log.warning("link %s: retired session cut with %d streams in flight", self.url, conn.streams_in_flight)
        await conn.close(1000, "max connection age")
        await asyncio.gather(run, return_exceptions=True)

    def _note_cut(self, age: float) -> None:
        """A registered session ended without a go-away: when the last few all lasted about
        as long, something in the path cuts connections at a fixed age; say so once."""
        self._cut_ages.append(age)
        if len(self._cut_ages) < CUT_SAMPLES or self._cut_warned:
            return
        low, high = min(self._cut_ages), max(self._cut_ages)
        if low < CUT_MIN_AGE or high > low * 1.1 + 1.0:
            return
        self._cut_warned = True
        suggest = max(1, int(low * 0.8))
        where = f"proxy {self.proxy.shown}" if self.proxy.url else "a firewall or NAT"
        log.warning(
            "link %s: the last %d sessions were each cut after %.1f-%.1f s: %s in the path limits connection age; "
            "--max-connection-age %d renews sessions before that without losing a request",
            self.url,
            CUT_SAMPLES,
            low,
            high,
            where,
            suggest,
        )

    async def _connect_unless_stopped(self, url: str, **kwargs: Any) -> ClientConnection | None:
        """``connect()``, raced against the client's stop: a stop (SIGTERM) while the TCP, TLS or
        WebSocket handshake is in flight cancels it, and a connection that completes as the stop
        arrives is closed unused. None when stopped (issue 24 item 5: a client stopped while
        connecting registered after the drain had begun and never exited)."""
        stop = self.client._stop
        if stop.is_set():
            return None
        dial = asyncio.ensure_future(connect(url, **kwargs))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({dial, stopped}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            dial.cancel()  # the session task itself was cancelled: no orphan handshake
            raise
        finally:
            stopped.cancel()
        if not stop.is_set():
            return dial.result()  # raises what connect() raised
        if not dial.done():
            dial.cancel()
            with contextlib.suppress(BaseException):
                await dial
            return None
        if dial.exception() is None:
            await dial.result().close(1001, "client shutting down")
        return None

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

    async def withdraw(self, conn: TunnelConnection, run: asyncio.Task[None]) -> None:
        """Kill switch: go away and close at once; in-flight streams are cut, not drained
        (an emergency stop; see tunnel_client/killswitch.py)."""
        log.warning(
            "link %s: kill switch: closing session %s (%d streams in flight are cut)",
            self.url,
            self.session_id or "-",
            conn.streams_in_flight,
        )
        if not conn.closed:
            conn.goaway(GoAwayCode.NO_ERROR, "kill switch")
            await conn.close(1001, "kill switch")
        await asyncio.gather(run, return_exceptions=True)
        await self.finish()  # sessions still draining after a server go-away are cut too

    async def finish(self) -> None:
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*self._draining, return_exceptions=True)


class TunnelClient:
    """Connects to every configured exit server and serves the configured upstreams."""

    def __init__(self, config: ClientConfig, token: str | None = None) -> None:
        self.config = config
        #: --auth aws-iam: signs the AWS identity request (None: a token authenticates)
        self.aws: AwsSigner | None = None
        if config.auth == "aws-iam":
            require_botocore()
            self.aws = AwsSigner(config.aws_sts_endpoint, config.aws_region)
            self.token = token or ""
        else:
            self.token = token if token is not None else read_secret(config.token_file, config.token, "token")
        self._proxy_login: tuple[str, str] | None = None
        if config.proxy_auth_file is not None:
            try:
                line = config.proxy_auth_file.read_text().strip().partition("\n")[0].strip()
            except OSError as exc:
                raise ConfigError(f"--proxy-auth-file: cannot read {config.proxy_auth_file}: {exc.strerror}") from None
            user, sep, password = line.partition(":")
            if not sep or not user:
                raise ConfigError(f"--proxy-auth-file: {config.proxy_auth_file} must hold user:password")
            self._proxy_login = (user, password)
        self.ssl_context = (
            client_context(config.ca_file, config.client_cert, config.client_key)
            if any(u.startswith("wss:") for u in config.server)
            else None
        )
        # --pin: checked after TLS, before the upgrade request carrying the token (pinning.py);
        # with --auth challenge, inside the WebSocket (shared/challenge.py).
        self.pins = frozenset(parse_pin(p) for p in config.pin)
        self.pinned = pinned_connection(self.pins) if config.pin else None
        self.token_id = challenge.token_id_of(self.token)
        self.forwarder = Forwarder(
            config.upstreams,
            config.upstream_connect_timeout,
            config.tcp_targets,
            config.proxy_protocol,
            max_response_head=config.max_response_head,
            max_response_fields=config.max_response_fields,
            upstream_ca=config.upstream_ca,
        )
        self.killswitch = KillSwitch(config.kill_switch_file)
        self.forwarder.guard = Guard(config.allow_paths)
        self.forwarder.killswitch = self.killswitch
        self.forwarder.audit = (
            AuditLog(config.audit_log, fail_closed=config.audit_failure == "closed") if config.audit_log else None
        )
        self.upstreams = list(config.upstreams)
        #: daemon mode (--upstream-from-host): routes of every labelled task on this host
        self.discovery: HostDiscovery | None = None
        if config.upstream_from_host:
            self.discovery = HostDiscovery(
                config.ecs_agent_uri,
                config.docker_host,
                add=self._daemon_add,
                withdraw=self._daemon_withdraw,
                remove=self.forwarder.remove_upstream,
                announce=self._routes_changed,
                interval=config.discovery_interval,
                drain=config.discovery_drain,
            )
        self.health = HealthChecker(
            self.upstreams,
            dict(parse_health_path(p) for p in config.health_path),
            config.health_interval,
            config.health_timeout,
            config.health_rise,
            config.health_fall,
            self._routes_changed,
        )
        self.labels = config.labels
        self.links = [ServerLink(self, url) for url in config.server]
        self.metrics = ClientMetrics(self)
        self.metrics.extra.append(
            lambda registry: register_process_metrics(registry, "tunnel-client", {"client": config.client_cert})
        )
        self.admin_port = 0
        self.stopping = False
        self._stop = asyncio.Event()
        self._state = asyncio.Condition()

    def proxy_for(self, url: str) -> ProxyChoice:
        """The proxy for one server URL (tunnel_client/proxy.py), read from the environment
        when the link is made.

        Raises:
            ConfigError: a malformed proxy URL in the environment (--proxy is checked earlier).
        """
        try:
            return choose_proxy(url, self.config.proxy, os.environ)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def with_proxy_login(self, proxy: str) -> str:
        """``proxy`` carrying the --proxy-auth-file login, which wins over one in the URL."""
        if self._proxy_login is None:
            return proxy
        return with_credentials(proxy, *self._proxy_login)

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

    @property
    def routes(self) -> list[RouteSpec]:
        """The routes to announce: every configured upstream that is not unhealthy."""
        out: list[RouteSpec] = []
        for upstream in self.upstreams:
            spec = RouteSpec(host=upstream.host, path_prefix=upstream.path_prefix)
            if self.health.healthy(upstream) and spec not in out:
                out.append(spec)
        return out

    def _routes_changed(self) -> None:
        routes = self.routes
        for link in self.links:
            if link.connected and link.conn is not None:
                try:
                    link.conn.send_control(Routes(routes=routes))
                except TunnelError as exc:
                    log.warning("link %s: could not update routes: %s", link.name, exc)

    async def _expand_links(self) -> None:
        """A server name that resolves to several addresses counts as several servers: one
        link per address (the certificate is still checked against the name)."""
        links: list[ServerLink] = []
        for link in self.links:
            host = urlsplit(link.url).hostname or ""
            if link.proxy.url is not None:  # the proxy resolves the name (it may not resolve here)
                links.append(link)
                continue
            try:
                ipaddress.ip_address(host)
                links.append(link)
                continue
            except ValueError:
                pass
            try:
                addresses = await resolve(host)
            except OSError as exc:
                log.warning("link %s: cannot resolve %s yet (%s); will keep trying", link.url, host, exc)
                links.append(link)
                continue
            if len(addresses) <= 1:
                links.append(link)
                continue
            log.info("link %s: %s resolves to %s: one session each", link.url, host, ", ".join(addresses))
            links.extend(ServerLink(self, link.url, address) for address in addresses)
        self.links = links

    def serve_stream(self, stream: TunnelStream) -> Coroutine[Any, Any, None]:
        """Serve one stream through the forwarder, counting its outcome (the coroutine is the
        compiled forwarder's: no interpreted frame per stream)."""
        return self.forwarder.serve(stream, self.metrics.tally)

    def _daemon_add(self, upstream: Upstream) -> None:
        self.forwarder.remove_upstream(upstream)  # the same route back while draining: one copy
        self.forwarder.add_upstream(upstream)
        self.upstreams.append(upstream)

    def _daemon_withdraw(self, upstream: Upstream) -> None:
        """No longer announced; still served for the drain, unless another upstream now has
        the same route (a task replaced): then new requests go there at once."""
        if upstream in self.upstreams:
            self.upstreams.remove(upstream)
        if any(u.host == upstream.host and u.path_prefix == upstream.path_prefix for u in self.upstreams):
            self.forwarder.remove_upstream(upstream)

    async def _discover_ecs(self) -> None:
        """Labels (and with --upstream-from-ecs, routes) from the ECS task metadata."""
        if not os.environ.get(METADATA_ENV):
            if self.config.upstream_from_ecs:
                log.error("ecs: --upstream-from-ecs set but %s is not", METADATA_ENV)
            return
        import aiohttp  # only under ECS

        try:
            found = await fetch_metadata()
        except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
            log.warning("ecs: task metadata unavailable: %s", exc)
            return
        if found is None:
            if self.config.upstream_from_ecs:
                log.error("ecs: --upstream-from-ecs set but %s is not", METADATA_ENV)
            return
        own, task = found
        self.labels = {**labels_from_task(task), **self.labels}
        log.info(
            "ecs: task %s (cluster %s, family %s:%s, service %s)",
            self.labels.get("ecs.task_arn", "?"),
            self.labels.get("ecs.cluster", "?"),
            self.labels.get("ecs.family", "?"),
            self.labels.get("ecs.revision", "?"),
            self.labels.get("ecs.service", "-"),
        )
        if self.config.upstream_from_ecs:
            for spec in discover_routes(own, task):
                upstream = parse_upstream(spec)
                self.forwarder.add_upstream(upstream)
                self.upstreams.append(upstream)
                log.info("ecs: route %s", spec)

    async def run(self) -> None:
        """Run every link until :meth:`shutdown`."""
        await self._discover_ecs()
        await self._expand_links()
        await self.health.initial()
        await self.forwarder.start()
        admin: AdminServer | None = None
        try:
            if self.config.admin_addr:
                admin = AdminServer(self)
                self.admin_port = await self._start_admin(admin, self.config.admin_addr)
            async with asyncio.TaskGroup() as group:
                if self.discovery is not None:
                    group.create_task(self.discovery.run(self._stop), name="daemon-discovery")
                group.create_task(self.killswitch.run(self._stop), name="kill-switch")
                group.create_task(self.health.run(self._stop), name="health-checks")
                for link in self.links:
                    group.create_task(link.run(), name=f"link-{link.url}")
        finally:
            await self.forwarder.close()
            if admin is not None:
                remove_run_file()
                await admin.close()

    async def _start_admin(self, admin: AdminServer, addr: str) -> int:
        """Bind the admin listener and record where it is (tunnel_client/adminaddr.py). A busy
        *default* address falls back to a free port on the same host, since several clients with
        default settings share one network namespace in ECS host network mode; a busy explicit
        ``--admin-addr`` is a configuration error."""
        host, port = parse_addr(addr)
        try:
            bound = await admin.start(host, port)
        except OSError as exc:
            if "admin_addr" in self.config.model_fields_set:
                raise ConfigError(
                    f"--admin-addr {addr}: cannot listen: {exc.strerror}; give each client its own admin address"
                ) from None
            bound = await admin.start(host, 0)
            log.warning(
                "admin listener: the default %s is taken (%s); listening on a free port instead (%s)",
                addr,
                exc.strerror,
                "see the run file for tunnel-client healthcheck",
            )
        actual = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        run_file = write_run_file(actual)
        log.info("admin listener on http://%s (run file %s)", actual, run_file or "not written")
        return bound

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Go away on every session, let in-flight streams finish, then stop."""
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        log.info("client: draining (up to %.0fs)", timeout)
        self.stopping = True
        self._stop.set()
        await asyncio.gather(*(link.drain(timeout) for link in self.links))
