"""The control endpoint: TLS WebSocket listener where tunnel clients authenticate (HTTP 401
before the upgrade), say hello, and then carry streams."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from shared import awsiam, challenge
from shared.aio.connection import TunnelConnection
from shared.aio.wsfast import TunnelServerConnection
from shared.errors import ConfigError
from shared.frames import GoAwayCode
from shared.messages import PROTOCOL_VERSION, Error, Hello, Routes, Welcome
from shared.mux import Role, Session, SessionState
from shared.sizes import DEFAULT_MAX_FRAME

from .config import ServerConfig
from .iamauth import IamVerifier, StsUnavailable
from .limits import FailureLimiter, SourceGate
from .observe import Metrics
from .routes import Registry, Tunnel
from .tcp import TcpListeners
from .tokens import Principal

__all__ = ["Authenticator", "ControlEndpoint", "SharedTokenAuth", "load_signing_key"]

log = logging.getLogger(__name__)

Authenticator = Callable[[str], "str | Principal | None | Awaitable[str | Principal | None]"]
"""Maps a presented bearer token to a client id or a :class:`Principal` (a client id plus what
it may register), or None when it is not valid; may be a coroutine function."""


class SharedTokenAuth:
    """One shared token for every client (client id ``default``), compared in constant time."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("empty token")
        self._token = token.encode()

    def __call__(self, presented: str) -> str | None:
        return "default" if hmac.compare_digest(presented.encode(), self._token) else None

    def challenge_keys(self, token_id: str) -> tuple[bytes, bytes, Principal] | None:
        """StoredKey, ServerKey and the principal for challenge authentication (shared/challenge.py);
        a shared token's id is ``-``."""
        if token_id != challenge.SHARED_ID:
            return None
        keys = challenge.derive_keys(self._token.decode())
        return keys.stored_key, keys.server_key, Principal("default")


def load_signing_key(path: Path) -> challenge.SigningKey | None:
    """The control TLS key, to sign challenge authentication (None: a key type it cannot use,
    so challenge authentication is not offered).

    Raises:
        ConfigError: the key file cannot be read.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"--tls-key: cannot read {path}: {exc}") from None
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        return key
    log.warning("control: --tls-key is a %s key: challenge authentication is not offered", type(key).__name__)
    return None


def _bearer(request: Request) -> str:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class ControlEndpoint:
    """Accepts tunnel sessions and keeps the registry in step with them."""

    def __init__(
        self, config: ServerConfig, registry: Registry, auth: Authenticator, tcp: TcpListeners, metrics: Metrics
    ) -> None:
        self.config = config
        self.registry = registry
        self.tcp = tcp
        self.metrics = metrics
        self.auth = auth
        self.draining = False
        self.connections: set[TunnelConnection] = set()
        self.auth_failures = 0
        self.limiter = FailureLimiter()  # failed tokens per source: 10, then 1/s (429 beyond)
        self.gate = SourceGate()
        self.principals: dict[TunnelConnection, Principal] = {}
        #: called after a session registered or changed its routes (ACME orders certificates)
        self.on_routes: Callable[[Tunnel], None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        #: the control TLS key, which signs challenge authentication (None: not offered)
        self.signer: challenge.SigningKey | None = None
        #: where ``signer`` is read from at the first challenge (cryptography is not loaded by
        #: a server whose clients never ask for one)
        self.signer_file: Path | None = None
        #: AWS IAM authentication (--aws-server-id; None: not offered)
        self.iam: IamVerifier | None = None

    async def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Authenticate before the upgrade: 401 for a missing or wrong token (never logged),
        429 with Retry-After for a source that failed too often."""
        remote = _peer(connection)
        if self.draining:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
        retry = self.limiter.attempt(remote)  # charged now, refunded on success
        if retry is not None:
            log.debug("control: too many failed authentications from %s (429)", remote)  # no log flood
            response = connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many requests\n")
            response.headers["Retry-After"] = str(retry)
            return response
        offered = request.headers.get(challenge.HEADER)
        if offered is not None:
            return self._challenge(connection, remote, offered)
        signed = request.headers.get(awsiam.ENVELOPE_HEADER)
        if signed is not None:
            return await self._aws_iam(connection, remote, signed)
        token = _bearer(request)
        result = self.auth(token) if token else None
        if inspect.isawaitable(result):
            async with self.gate.hold(remote):  # one verification per source at a time
                result = await result
        principal = Principal(result) if isinstance(result, str) else result
        client_id = principal.client_id if principal is not None else None
        if client_id is not None:
            self.limiter.success(remote)
        else:
            self.auth_failures += 1
            self.metrics.auth_failures.inc()
            log.warning(
                "control: authentication failed from %s (%s)", remote, "no token" if not token else "invalid token"
            )
            return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
        connection.backhaul_client_id = client_id  # type: ignore[attr-defined]
        connection.backhaul_principal = principal  # type: ignore[attr-defined]
        return None

    async def _aws_iam(self, connection: ServerConnection, remote: str, signed: str) -> Response | None:
        """AWS IAM authentication (shared/awsiam.py): check the signed GetCallerIdentity,
        have STS name the caller, and map its role to a client of the tokens file."""
        lookup = getattr(self.auth, "for_role", None)
        if self.iam is None or lookup is None:
            self.metrics.auth_failures.inc()
            log.warning("control: AWS IAM authentication from %s, which this server does not offer", remote)
            return connection.respond(HTTPStatus.UNAUTHORIZED, "aws-iam authentication not offered\n")
        try:
            async with self.gate.hold(remote):
                arn = await self.iam.verify(signed)
        except StsUnavailable as exc:
            self.limiter.success(remote)  # not the caller's fault: no penalty
            log.error("control: AWS IAM authentication from %s not possible now: %s (503)", remote, exc)
            response = connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "identity service unavailable\n")
            response.headers["Retry-After"] = "5"
            return response
        except awsiam.IamRefused as exc:
            self.auth_failures += 1
            self.metrics.auth_failures.inc()
            log.warning("control: AWS IAM authentication refused from %s: %s", remote, exc)
            return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
        principal = lookup(arn)
        if principal is None:
            self.auth_failures += 1
            self.metrics.auth_failures.inc()
            log.warning("control: %s (from %s) is not a client in --tokens (no aws_roles match)", arn, remote)
            return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
        self.limiter.success(remote)
        log.info("control: %s authenticated as client %s by AWS IAM", arn, principal.client_id)
        connection.backhaul_client_id = principal.client_id  # type: ignore[attr-defined]
        connection.backhaul_principal = principal  # type: ignore[attr-defined]
        return None

    def _challenge(self, connection: ServerConnection, remote: str, offered: str) -> Response | None:
        """Step 2 of challenge authentication (shared/challenge.py): sign the transcript and
        upgrade; the proof is checked on the first message (:meth:`_check_proof`)."""
        lookup = getattr(self.auth, "challenge_keys", None)
        try:
            fields = challenge.parse_header(offered)
            token_id, cnonce = fields.get("id"), fields.get("cnonce")
            if not isinstance(token_id, str) or not isinstance(cnonce, bytes) or len(cnonce) != challenge.NONCE_BYTES:
                raise ValueError("id and a 32-byte cnonce are required")
        except ValueError as exc:
            log.warning("control: malformed challenge authentication from %s: %s", remote, exc)
            return connection.respond(HTTPStatus.BAD_REQUEST, "malformed Backhaul-Auth\n")
        if self.signer is None and self.signer_file is not None:
            path, self.signer_file = self.signer_file, None
            try:
                self.signer = load_signing_key(path)
            except ConfigError as exc:  # readable at start (the TLS context loaded it), gone since
                log.warning("control: challenge authentication is not offered: %s", exc)
        if self.signer is None or lookup is None:
            self.metrics.auth_failures.inc()
            log.warning("control: challenge authentication from %s, which this server does not offer", remote)
            return connection.respond(HTTPStatus.UNAUTHORIZED, "challenge authentication not offered\n")
        keys = lookup(token_id)  # None: unknown, revoked or without a verifier; fails at the proof
        snonce = secrets.token_bytes(challenge.NONCE_BYTES)
        spki = challenge.spki_of(self.signer)
        t = challenge.transcript(token_id, cnonce, snonce, spki)
        connection.backhaul_challenge = (t, keys)  # type: ignore[attr-defined]
        connection.backhaul_challenge_answer = challenge.format_header(  # type: ignore[attr-defined]
            snonce=snonce, key=spki, sig=challenge.sign(self.signer, t)
        )
        return None

    def process_response(self, connection: ServerConnection, request: Request, response: Response) -> None:
        """The 101 of a challenge authentication carries the server's signed answer."""
        answer = getattr(connection, "backhaul_challenge_answer", None)
        if answer is not None and response.status_code == HTTPStatus.SWITCHING_PROTOCOLS:
            response.headers[challenge.HEADER] = answer

    async def _check_proof(self, ws: ServerConnection, remote: str) -> bool:
        """Steps 3 and 4: the client's proof as its first message; OK with the server's own
        proof, or close 4401."""
        t, keys = ws.backhaul_challenge  # type: ignore[attr-defined]
        assert isinstance(ws, TunnelServerConnection)
        try:
            message = await ws.first_message(self.config.handshake_timeout)
        except (TimeoutError, ConnectionError):
            log.warning("control: no challenge proof from %s in time", remote)
            await ws.close(4408, "no authentication in time")
            return False
        proof = message[len(challenge.PROOF_PREFIX) :] if message.startswith(challenge.PROOF_PREFIX) else b""
        stored = keys[0] if keys is not None else secrets.token_bytes(32)
        if not challenge.check_proof(stored, t, proof) or keys is None:
            self.auth_failures += 1
            self.metrics.auth_failures.inc()
            log.warning("control: challenge authentication failed from %s", remote)
            await ws.close(4401, "authentication failed")
            return False
        self.limiter.success(remote)
        ws.send_message([challenge.OK_PREFIX + challenge.server_signature(keys[1], t)])
        ws.backhaul_client_id = keys[2].client_id  # type: ignore[attr-defined]
        ws.backhaul_principal = keys[2]  # type: ignore[attr-defined]
        return True

    async def handle(self, ws: ServerConnection) -> None:
        """Run one tunnel session from hello to close."""
        cfg = self.config
        if hasattr(ws, "backhaul_challenge") and not await self._check_proof(ws, _peer(ws)):
            return
        # websockets keeps the opening handshake's request and response for the connection's
        # lifetime (its parser's generator frame holds the request too); nothing reads their
        # headers past process_request and process_response, and they are about 4 KiB of every
        # idle tunnel (docs/BENCHMARKS.md, round 10). The objects stay: websockets takes
        # ``request is None`` to mean the handshake has not arrived yet.
        for message in (ws.request, ws.response):
            if message is not None:
                message.headers.clear()
        with contextlib.suppress(AttributeError):
            del ws.backhaul_challenge, ws.backhaul_challenge_answer  # type: ignore[attr-defined]
        client_id: str = getattr(ws, "backhaul_client_id", "default")
        session_id = secrets.token_hex(6)
        remote = _peer(ws)
        loop = asyncio.get_running_loop()
        session = Session(
            Role.SERVER,
            max_frame=DEFAULT_MAX_FRAME,
            initial_window=cfg.stream_window,
            connection_window=cfg.connection_window,
            max_streams=cfg.max_streams,
            heartbeat_interval=cfg.heartbeat_interval,
            heartbeat_timeout=cfg.heartbeat_timeout,
            now=loop.time(),
        )
        tunnel: Tunnel | None = None
        watchdog: asyncio.TimerHandle | None = None  # ends a session with no hello in time

        def on_control(message: Hello | Welcome | Routes | Error) -> None:
            nonlocal tunnel, watchdog
            if isinstance(message, Hello):
                if watchdog is not None:  # its work is done: its timer is not kept for the session
                    watchdog.cancel()
                    watchdog = None
                tunnel = self._register(conn, session_id, client_id, remote, message)
            elif isinstance(message, Routes) and tunnel is not None:
                for refusal in self.registry.set_routes(tunnel, list(message.routes)):
                    log.warning("session %s: route %s refused: %s", session_id, refusal.route, refusal.reason)
                log.info("session %s: routes now %s", session_id, _route_names(tunnel))
            else:
                return
            if self.on_routes is not None and tunnel is not None:
                self.on_routes(tunnel)

        def on_goaway(code: int, reason: str) -> None:
            if tunnel is not None:
                self.registry.withdraw(tunnel)
                log.info("session %s: client draining, %d streams in flight", session_id, conn.streams_in_flight)

        assert isinstance(ws, TunnelServerConnection)  # serve(create_connection=...) in server.py
        conn = TunnelConnection(ws, session, name=session_id, on_control=on_control, on_goaway=on_goaway)
        self.connections.add(conn)
        self.principals[conn] = getattr(ws, "backhaul_principal", None) or Principal(client_id)
        watchdog = loop.call_later(cfg.handshake_timeout, self._handshake_expired, conn)
        try:
            await conn.run()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            self.connections.discard(conn)
            self.principals.pop(conn, None)
            if tunnel is not None:
                self.registry.remove(tunnel)
                self.tcp.sync()
                log.info(
                    "session %s: closed (client %s, instance %s): %s",
                    session_id,
                    client_id,
                    tunnel.instance_id,
                    conn.close_reason or "normal",
                )

    def _handshake_expired(self, conn: TunnelConnection) -> None:
        if conn.session.state is SessionState.HANDSHAKE:
            log.warning("session %s: no hello within %.0fs", conn.name, self.config.handshake_timeout)
            conn.close_reason = "handshake timeout"
            conn.session.refuse("handshake_timeout", "no hello in time")
            conn.flush()
            conn.abort()

    def revoke(self, current: Callable[[Principal], Principal | None]) -> int:
        """Close every session whose credentials are no longer in force (``current`` returns
        None for them): GOAWAY AUTH_REVOKED, then close. Returns how many were closed."""
        stale = [(conn, p) for conn, p in self.principals.items() if current(p) is None]
        for conn, principal in stale:
            log.warning(
                "session %s: credentials of client %s revoked or changed: closing", conn.name, principal.client_id
            )
            del self.principals[conn]
            conn.close_reason = "credentials revoked"
            conn.goaway(GoAwayCode.AUTH_REVOKED, "credentials revoked")
            task = asyncio.get_running_loop().create_task(conn.close(1008, "credentials revoked"))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return len(stale)

    def _register(self, conn: TunnelConnection, session_id: str, client_id: str, remote: str, hello: Hello) -> Tunnel:
        tunnel = Tunnel(session_id, client_id, hello.instance_id, remote, conn, dict(hello.labels))
        tunnel.policy = self.principals.get(conn)
        self.metrics.registered(client_id, hello.instance_id)
        granted, ports, refused, replaced = self.registry.add(
            tunnel, list(hello.routes), list(hello.tcp), self.tcp.bind
        )
        self.tcp.sync()
        if replaced is not None:
            log.info("session %s replaces session %s of instance %s", session_id, replaced.id, hello.instance_id)
            replaced.conn.goaway(GoAwayCode.REPLACED, "replaced by a new session")
            replaced.conn.abort()
        for refusal in refused:
            log.warning("session %s: route %s refused: %s", session_id, refusal.route, refusal.reason)
        conn.session.accept(
            Welcome(
                version=conn.session.version or PROTOCOL_VERSION,
                session_id=session_id,
                client_id=client_id,
                routes=granted,
                tcp=ports,
                refused=refused,
                max_streams=self.config.max_streams,
                initial_window=self.config.stream_window,
                max_frame=DEFAULT_MAX_FRAME,
                heartbeat_interval=self.config.heartbeat_interval,
            )
        )
        conn.flush()
        log.info(
            "session %s: registered client %s instance %s from %s, routes %s",
            session_id,
            client_id,
            hello.instance_id,
            remote,
            _route_names(tunnel),
        )
        return tunnel


def _route_names(tunnel: Tunnel) -> str:
    names = [f"{r.host}{'' if r.path_prefix == '/' else r.path_prefix}" for r in tunnel.routes]
    names += [f"tcp:{port}" for port in tunnel.tcp_ports]
    return ", ".join(names) or "none"


def _peer(connection: ServerConnection) -> str:
    addr = connection.remote_address
    return str(addr[0]) if addr else "-"
