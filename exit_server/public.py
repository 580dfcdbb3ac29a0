"""The public HTTP listener: route by Host, open a stream, relay the exchange.

Status mapping (docs/PROTOCOL.md section 12): no tunnel 503, stream limit 503 + Retry-After,
tunnel lost or upstream refused 502, no response head in time 504. A body that breaks after the
head was sent is aborted (connection closed without the final chunk), never presented as whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from shared.aio.connection import TunnelStream
from shared.aio.pump import Endpoint, pump
from shared.aio.sockopts import set_keepalive
from shared.errors import (
    LocalProtocolError,
    NoTunnel,
    SessionClosed,
    StreamReset,
    TooManyStreams,
    TunnelError,
    TunnelTimeout,
)
from shared.forwarding import TrustedProxies
from shared.frames import ResetCode
from shared.heads import RequestHead, StreamKind
from shared.httputil import HOP_BY_HOP, strip_hop_by_hop
from shared.routing import normalize_host

from . import peers as peers_mod
from .access import AccessRules
from .acmeanswers import Challenges, is_challenge_path
from .config import ServerConfig
from .h1 import HttpVersion11, Request, Response, StreamResponse
from .headers import Edge, has_token, is_websocket, origin_form, reply_headers, routed_authority, upstream_headers
from .httpguard import SERVER, generic_response, head_problem
from .limits import source_key
from .observe import Exchange, LogThrottle, Metrics, request_id
from .routes import Registry, Tunnel

if TYPE_CHECKING:
    from .peers import PeerDirectory

__all__ = ["ERROR_STATUS", "RESET_STATUS", "PublicHandler", "status_of"]

#: The fields of a relayed request (exit_server/peers.py), as the request's header keys.
_PEER_FIELDS = frozenset({"Backhaul-Relayed", "Backhaul-Peer-Auth", "Backhaul-Peer-Client", "Backhaul-Peer-Proto"})

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Public status for a stream reset before the response head.
RESET_STATUS: dict[int, int] = {
    ResetCode.CANCEL: 502,
    ResetCode.REFUSED: 503,
    ResetCode.UPSTREAM_CONNECT: 502,
    ResetCode.UPSTREAM_TIMEOUT: 504,
    ResetCode.UPSTREAM_RESET: 502,
    ResetCode.NO_UPSTREAM: 502,
    ResetCode.FORBIDDEN: 403,
    ResetCode.TOO_LARGE: 413,
}

#: The public status of each error that ends an exchange before its response head
#: (docs/PROTOCOL.md section 12): the one place tunnel errors become HTTP statuses. A
#: StreamReset's status comes from its code (RESET_STATUS); 503s carry Retry-After.
ERROR_STATUS: dict[type[TunnelError], int] = {
    NoTunnel: 503,  # nothing routed here, or the session picked closed before the stream opened
    TooManyStreams: 503,  # the session's stream limit
    LocalProtocolError: 431,  # a request head the tunnel cannot carry (over one frame)
    SessionClosed: 502,  # the tunnel was lost before the response head
    TunnelTimeout: 504,  # no response head within --upstream-timeout
}


def status_of(error: TunnelError) -> int:
    """The public status for ``error`` (502 for anything the tables do not name)."""
    if isinstance(error, StreamReset):
        return RESET_STATUS.get(error.code, 502)
    for kind in type(error).__mro__:
        status = ERROR_STATUS.get(kind)
        if status is not None:
            return status
    return 502


#: Below this many bytes waiting in the caller's socket buffer a write cannot stall, so the
#: caller-not-reading deadline (--send-timeout) is only armed above it.
SEND_BUFFER_LOW = 64 * 1024

#: Methods repeated on another session when a tunnel is lost before the response head.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_TEXT = {
    403: "forbidden",
    408: "request timeout",
    413: "request body too large",
    429: "too many requests from this address",
    502: "bad gateway",
    503: "no tunnel available for this host",
    504: "gateway timeout",
}


def error_response(status: int, retry_after: int | None = None) -> Response:
    """A short generic error body that never echoes the caller's bytes."""
    headers = {"Server": SERVER}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return Response(status=status, text=_TEXT.get(status, "error") + "\n", headers=headers)


class PublicHandler:
    """The handler of every public HTTP/1.1 request (exit_server/h1.py)."""

    access: AccessRules | None = None  # --access rules, checked before a stream opens
    peers: PeerDirectory | None = None  # --state: relaying to the fleet's other exit servers
    acme: Challenges | None = None  # pending ACME HTTP-01 answers (--acme-dir)
    trusted: TrustedProxies | None = None  # --trusted-proxies

    def __init__(self, config: ServerConfig, registry: Registry, metrics: Metrics | None = None) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics if metrics is not None else Metrics(registry)
        self.draining = False
        self.in_flight = 0
        self.requests = 0
        self._limit_log = LogThrottle()  # one stream-limit line per tunnel per 10 s
        self._per_caller: dict[str, int] = {}  # requests in flight per caller (source_key)
        #: the public HTTPS port (set by the server; 0: none), for --redirect-http's Location
        self.tls_port = 0
        self._hsts = f"max-age={config.hsts}" if config.hsts else None
        self._relay_session: Any = None
        self._relay_h2: Any = None  # tunnel_client.http2.H2Pool to peers, for gRPC (made at first use)

    _loop: asyncio.AbstractEventLoop

    async def __call__(self, request: Request, scheme: str | None = None) -> StreamResponse:
        """Serve one request; ``scheme`` is "https" on the public TLS listener, else the
        configured ``--public-scheme``."""
        if not hasattr(self, "_loop"):
            self._loop = asyncio.get_running_loop()  # kept: each call is a getpid() on 3.11
        self.in_flight += 1
        self.requests += 1
        peer = self.peer_of(request)
        relayed_by = None
        if request.headers.keys() & _PEER_FIELDS:  # rare: a request relayed by a peer (peers.py)
            relayed_by, peer, scheme = self._peer_fields(request, peer, scheme)
        ex = Exchange(request_id(request.headers.get("X-Request-Id")), request.method, "", request.path, peer)
        ex.scheme = scheme if scheme is not None else self.config.public_scheme
        ex.relayed_by = relayed_by
        version = request.version
        if version != HttpVersion11:
            ex.protocol = f"HTTP/{version.major}.{version.minor}"
        try:
            resp = await self._handle(request, ex, peer)
            ex.status = resp.status
            if not resp.prepared:
                if self.draining or ex.close_connection:
                    resp.force_close()
                if self._hsts is not None and ex.scheme == "https":
                    resp.headers["Strict-Transport-Security"] = self._hsts
            return resp
        except asyncio.CancelledError:
            ex.status = 499  # the caller went away (nginx's convention)
            raise
        finally:
            self.in_flight -= 1
            self.metrics.finish(ex)

    def _peer_fields(self, request: Request, peer: str, scheme: str | None) -> tuple[str | None, str, str | None]:
        """(relaying server, caller, scheme) of a correctly signed relayed request; for any
        other request carrying these fields, ("-", the socket peer, scheme): refused by _handle."""
        if self.peers is not None:
            headers = request.headers
            found = self.peers.verified(
                lambda name: headers.get(name, ""), request.method, origin_form(request), routed_authority(request)
            )
            if found is not None:
                return found
        return "-", peer, scheme

    def _redirect(self, request: Request, ex: Exchange, host: str) -> Response:
        """308 to the same target over HTTPS (--redirect-http): method and body are kept."""
        ex.rejected = "redirected"
        port = "" if self.tls_port in (0, 443) else f":{self.tls_port}"
        location = f"https://{host}{port}{origin_form(request)}"
        resp = Response(status=308, headers={"Server": SERVER, "Location": location})
        if request.body_exists:  # the body is not read: the connection cannot be reused
            resp.force_close()
        return resp

    def _reject(self, ex: Exchange, reason: str, status: int, retry_after: int | None = None) -> Response:
        ex.rejected = reason
        return error_response(status, retry_after)

    def peer_of(self, request: Request) -> str:
        """The address a request came from: the socket peer, or the source a trusted proxy's
        PROXY protocol header named (exit_server/h1.py)."""
        named = getattr(request.protocol, "proxied_peer", None)
        return named if named is not None else request.remote or ""

    async def _handle(self, request: Request, ex: Exchange, peer: str) -> StreamResponse:
        authority = routed_authority(request)
        ex.host = authority
        if ex.relayed_by == "-":  # relay fields without the fleet's signature
            log.warning("public: unsigned or stale relay fields from %s (403)", peer)
            return self._reject(ex, "bad_relay", 403)
        problem = head_problem(request)  # version, header size, transfer codings (exit_server/httpguard.py)
        if problem is not None:
            ex.rejected = "bad_request"
            return generic_response(problem)
        host = normalize_host(authority)
        if self.acme is not None and (answer := self.acme.http_answer(host, request.path)) is not None:
            ex.route = "acme-challenge"
            return Response(text=answer, headers={"Server": SERVER})
        if ex.scheme == "http" and self.config.redirect_http and not is_challenge_path(request.path):
            return self._redirect(request, ex, host)
        trusted = self.trusted if self.trusted and self.trusted.contains(peer) else None
        edge = Edge(ex.request_id, peer, ex.scheme, authority, trusted)
        client = peer if trusted is None else trusted.client_of(request.headers.getall("X-Forwarded-For", ()), peer)
        if self.access is not None and (denied := await self.access.check(request, host, client)) is not None:
            ex.rejected = "access_denied"
            return denied
        ex.route, tunnel = self.registry.pick_route(host, request.path)
        if tunnel is None:
            ex.route = ex.route or "unrouted"
            if self.peers is not None and self.peers.key is not None and ex.relayed_by is None:  # relayed once only
                url = self.peers.peer_for(host, request.path)
                if url is not None:
                    return await self._relay(request, ex, url, client)
            return self._reject(ex, "no_tunnel", ERROR_STATUS[NoTunnel])
        max_body = self.config.max_body
        length = request.content_length
        if max_body is not None and length is not None and length > max_body:
            return self._reject(ex, "body_too_large", 413)
        cap = self.config.max_streams_per_caller
        if not cap:
            return await self._routed(request, ex, tunnel, edge, host)
        key = source_key(client)
        held = self._per_caller.get(key, 0)
        if held >= cap:
            held_log = self._limit_log.allow(f"caller {key}", self._loop.time())
            if held_log is not None:
                log.warning("public: caller %s has %d requests in flight (429)", key, held)
            return self._reject(ex, "caller_limit", 429, retry_after=1)
        self._per_caller[key] = held + 1
        try:
            return await self._routed(request, ex, tunnel, edge, host)
        finally:
            left = self._per_caller[key] - 1
            if left:
                self._per_caller[key] = left
            else:
                del self._per_caller[key]

    async def _routed(self, request: Request, ex: Exchange, tunnel: Tunnel, edge: Edge, host: str) -> StreamResponse:
        """Open a stream for a request that passed every check and relay the exchange."""
        websocket = is_websocket(request)
        if not websocket and has_token(request.headers.getall("Connection", ()), "upgrade"):
            # An upgrade we do not relay (h2c, ...): the listener hands every later byte on this
            # connection to the upgrade, so a request pipelined behind it would be lost. Answer
            # this one and close: the caller sees the close and sends the rest again.
            ex.close_connection = True
        if websocket and request.body_exists:  # an upgrade has no body: the upstream would wait for it
            ex.rejected = "bad_request"
            return generic_response(400)
        head = self._head(request, edge, websocket)
        if self.access is not None:
            head = self.access.strip(head, host)  # credentials consumed here never go upstream
        has_body = request.body_exists and not websocket
        for attempt in (1, 2):
            result = await self._exchange(request, ex, tunnel, head, host, has_body, websocket, final=attempt == 2)
            if not isinstance(result, Tunnel):
                return result
            log.info(
                "%s %s %s: retrying on session %s (%s)",
                ex.request_id,
                request.method,
                host,
                result.id,
                "tunnel lost before the response head",
            )
            tunnel = result
        raise AssertionError("unreachable")

    def relay_session(self) -> Any:
        """The HTTP client that relays requests to peers (made at first use)."""
        import aiohttp

        if self._relay_session is None:
            self._relay_session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=self.config.upstream_timeout),
                auto_decompress=False,
            )
        return self._relay_session

    def relay_h2_pool(self) -> Any:
        """HTTP/2 connections to peers (h2c, one multiplexed per peer): relayed requests that
        need trailers (gRPC), which HTTP/1.1 cannot carry."""
        if self._relay_h2 is None:
            from tunnel_client.http2 import H2Pool

            self._relay_h2 = H2Pool(connect_timeout=5.0)
        return self._relay_h2

    async def close_relays(self) -> None:
        if self._relay_session is not None:
            await self._relay_session.close()
            self._relay_session = None
        if self._relay_h2 is not None:
            await self._relay_h2.close()
            self._relay_h2 = None

    async def _relay(self, request: Request, ex: Exchange, url: str, client: str) -> StreamResponse:
        """Send the request once to a peer that has a session for its host (peers.py) and
        stream the answer back; 503 when the peer cannot be reached."""
        import aiohttp

        peers = self.peers
        assert peers is not None and peers.key is not None
        if is_websocket(request):
            return await self._relay_websocket_to_peer(request, ex, url, client)
        session = self.relay_session()
        target = origin_form(request)
        authority = routed_authority(request)
        headers = [
            (k, v)
            for k, v in request.headers.items()
            if k.lower() not in HOP_BY_HOP and not k.lower().startswith("backhaul-") and k.lower() != "x-request-id"
        ]
        headers += self._relay_fields(request, ex, client)
        ex.tunnel_id = "relay"
        try:
            upstream = await session.request(
                request.method,
                url + target,
                headers=headers,
                data=request.content.iter_any() if request.body_exists else None,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            peers.relayed["failed"] = peers.relayed.get("failed", 0) + 1
            log.warning("public: relaying %s to %s failed: %s (503)", authority[:100], url, exc)
            return self._reject(ex, "relay_failed", 503, retry_after=1)
        peers.relayed["ok"] = peers.relayed.get("ok", 0) + 1
        try:
            resp = StreamResponse(status=upstream.status)
            resp.headers.extend(strip_hop_by_hop(upstream.headers.items()))
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                ex.bytes_out += len(chunk)
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        except (aiohttp.ClientError, ConnectionError) as exc:
            log.info("public: relayed answer from %s aborted: %s", url, exc)
            _abort(request)
            return resp
        finally:
            upstream.release()

    def _relay_fields(self, request: Request, ex: Exchange, client: str) -> list[tuple[str, str]]:
        assert self.peers is not None
        return self.peers.relay_fields(
            request.method, origin_form(request), routed_authority(request), client, ex.scheme, ex.request_id
        )

    async def _relay_websocket_to_peer(self, request: Request, ex: Exchange, url: str, client: str) -> StreamResponse:
        """A WebSocket upgrade relayed to a peer: the signed request head on a connection of
        its own, the peer's answer back, and after a 101 the raw bytes both ways."""
        peers = self.peers
        assert peers is not None
        scheme, host, port = peers_mod.split_url(url)
        headers = [
            (k, v)
            for k, v in strip_hop_by_hop(request.headers.items(), keep_upgrade=True)
            if not k.lower().startswith("backhaul-") and k.lower() != "x-request-id"
        ]
        headers += self._relay_fields(request, ex, client)
        head = f"{request.method} {origin_form(request)} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        ex.tunnel_id = "relay"
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection(host, port, ssl=scheme == "https" or None)
            writer.write(head.encode("latin-1") + b"\r\n")
            async with asyncio.timeout(self.config.upstream_timeout):
                raw = await reader.readuntil(b"\r\n\r\n")
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            if writer is not None:
                writer.close()
            peers.relayed["failed"] = peers.relayed.get("failed", 0) + 1
            log.warning("public: relaying a WebSocket for %s to %s failed: %r (503)", ex.host[:100], url, exc)
            return self._reject(ex, "relay_failed", 503, retry_after=1)
        except BaseException:
            if writer is not None:
                writer.close()
            raise
        peers.relayed["ok"] = peers.relayed.get("ok", 0) + 1
        try:
            return await self._websocket_from_peer(request, ex, raw, reader, writer)
        finally:
            writer.close()

    async def _websocket_from_peer(
        self,
        request: Request,
        ex: Exchange,
        raw: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> StreamResponse:
        """The peer's answer to a relayed upgrade (``raw``: its head), then after a 101 the
        bytes both ways until either side ends."""
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 502
        answer = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines if line)]
        if status != 101:  # declined: pass the answer on (a short body) and close
            body = b""
            length = next((v for n, v in answer if n.lower() == "content-length"), "0")
            if length.isdigit() and int(length) <= 65536:
                with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
                    async with asyncio.timeout(self.config.upstream_timeout):
                        body = await reader.readexactly(int(length))
            ex.close_connection = True
            declined = Response(status=status, body=body)
            declined.headers.extend(strip_hop_by_hop(answer))
            return declined
        resp = StreamResponse(status=101)
        resp.headers.extend(
            (n, v) for n, v in strip_hop_by_hop(answer, keep_upgrade=True) if n.lower() != "x-request-id"
        )
        await resp.prepare(request)
        transport = request.transport
        assert transport is not None
        set_keepalive(transport.get_extra_info("socket"))
        queue = request.protocol.take_raw()
        caller = request.writer

        async def up() -> None:  # the caller's bytes to the peer
            with contextlib.suppress(OSError):
                while data := await queue.get():
                    ex.bytes_in += len(data)
                    writer.write(data)
                    await writer.drain()
                writer.write_eof()

        async def down() -> None:  # the peer's bytes to the caller
            with contextlib.suppress(OSError, ConnectionError):
                while data := await reader.read(65536):
                    ex.bytes_out += len(data)
                    await caller.write(data)

        sending = asyncio.ensure_future(up())
        try:
            await down()
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            if not transport.is_closing():
                transport.close()
        return resp

    def _retry_target(
        self, request: Request, ex: Exchange, tunnel: Tunnel, host: str, error: TunnelError
    ) -> Tunnel | None:
        """Another session for a request that failed before its response head, when repeating
        it is safe (section 12.1): the client refused it unprocessed, or it is a safe method
        whose body (if any) was not yet sent."""
        refused = isinstance(error, StreamReset) and error.code == ResetCode.REFUSED
        lost = isinstance(error, SessionClosed) or (
            isinstance(error, StreamReset) and error.code == ResetCode.INTERNAL_ERROR
        )
        if ex.bytes_in or not (refused or (lost and request.method in SAFE_METHODS)):
            return None
        return self.registry.pick(host, request.path, exclude=tunnel)

    async def _exchange(
        self,
        request: Request,
        ex: Exchange,
        tunnel: Tunnel,
        head: RequestHead,
        host: str,
        has_body: bool,
        websocket: bool,
        final: bool,
    ) -> StreamResponse | Tunnel:
        """One attempt over one session; returns the response, or the session to retry on."""
        try:
            stream = self._open(tunnel, head, has_body or websocket)
        except TunnelError as exc:
            ex.rejected = "stream_limit" if isinstance(exc, TooManyStreams) else "tunnel_closed"
            status = status_of(exc)
            return error_response(status, retry_after=1 if status == 503 else None)
        tunnel.requests += 1
        ex.tunnel_id = tunnel.id
        conn = tunnel.conn
        pump: asyncio.Task[None] | None = None
        if has_body:
            pump = self._loop.create_task(self._pump_body(request, stream, ex))
        try:
            try:
                reply = await stream.response(self.config.upstream_timeout)
                ex.mark_head()
            except TimeoutError:
                stream.reset(ResetCode.UPSTREAM_TIMEOUT, "no response head in time")
                status = status_of(TunnelTimeout())
                log.warning(
                    "%s %s %s: no response head within %.0fs (%d)",
                    tunnel.id,
                    host,
                    request.method,
                    self.config.upstream_timeout,
                    status,
                )
                return error_response(status)
            except (StreamReset, SessionClosed) as exc:
                if pump is not None:
                    pump.cancel()
                retry = None if final else self._retry_target(request, ex, tunnel, host, exc)
                if retry is not None:
                    return retry
                status = ex.local_status or status_of(exc)
                if isinstance(exc, SessionClosed):
                    log.warning("%s stream %d %s: tunnel lost before reply (%d)", tunnel.id, stream.id, host, status)
                    return error_response(status)
                log.info(
                    "%s stream %d %s: reset before reply (code %d, %s) -> %d",
                    tunnel.id,
                    stream.id,
                    host,
                    exc.code,
                    exc.reason,
                    status,
                )
                if status == 408:  # the caller's body went idle: answer and close (exit_server/h1.py
                    resp = error_response(408)  # drops what it may still send for a few seconds)
                    resp.force_close()
                    return resp
                return error_response(status, retry_after=1 if status == 503 else None)
            headers = reply.headers + (("X-Request-Id", ex.request_id),)
            if websocket:
                return await self._relay_websocket(request, stream, reply.status, headers, ex)
            return await self._relay_response(request, stream, reply.status, headers, ex)
        except asyncio.CancelledError:
            # The caller went away: cancel the stream so the client cancels the upstream call.
            stream.reset(ResetCode.CANCEL, "caller disconnected")
            raise
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
            conn.release(stream)

    def _open(self, tunnel: Tunnel, head: RequestHead, has_body: bool) -> TunnelStream:
        """Open the stream for one attempt.

        Raises:
            TooManyStreams: the session's stream limit (logged, throttled).
            NoTunnel: the session picked closed meanwhile.
            LocalProtocolError: a head the tunnel cannot carry (too large for one frame).
        """
        try:
            return tunnel.conn.open_stream(head, end_stream=not has_body)
        except TooManyStreams:
            held = self._limit_log.allow(tunnel.id, self._loop.time())
            if held is not None:
                log.warning(
                    "%s: stream limit reached (503)%s",
                    tunnel.id,
                    f"; {held} more since the last such line" if held else "",
                )
            raise
        except SessionClosed as exc:
            raise NoTunnel(f"session {tunnel.id} closed") from exc
        except LocalProtocolError as exc:
            log.info("%s: request head refused: %s (431)", tunnel.id, exc)
            raise

    def _head(self, request: Request, edge: Edge, websocket: bool = False) -> RequestHead:
        return RequestHead(
            StreamKind.WEBSOCKET if websocket else StreamKind.HTTP,
            request.method,
            origin_form(request),
            edge.host,
            edge.proto,
            edge.peer,
            upstream_headers(request.raw_headers, edge, websocket),
        )

    async def _pump_body(self, request: Request, stream: TunnelStream, ex: Exchange) -> None:
        if not ex.continue_sent and request.headers.get("Expect", "").lower() == "100-continue":
            ex.continue_sent = True
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        max_body = self.config.max_body
        idle = self.config.body_timeout
        rate = self.config.body_min_rate
        total = 0
        content = request.content
        started = self._loop.time()
        try:
            while True:
                # Idle at most --body-timeout, and on average at least --body-min-rate after the
                # first --body-timeout seconds: a byte every few seconds cannot hold a stream.
                wait = idle if not rate else min(idle, started + idle + total / rate - self._loop.time())
                try:
                    if wait <= 0:
                        raise TimeoutError
                    chunk = await self._within(content.readany(), wait)
                except TimeoutError:
                    log.info(
                        "stream %d: request body %s (408)",
                        stream.id,
                        f"idle for {idle:.0f}s" if wait == idle else f"below {rate:.0f} bytes/s ({total} bytes)",
                    )
                    ex.rejected = "body_timeout"
                    ex.local_status = 408
                    stream.reset(ResetCode.CANCEL, "request body idle")
                    return
                if not chunk:
                    break
                total += len(chunk)
                ex.bytes_in = total
                if max_body is not None and total > max_body:
                    ex.rejected = "body_too_large"
                    stream.reset(ResetCode.TOO_LARGE, "request body over the limit")
                    return
                await stream.write(chunk)
            stream.end()
        except TunnelError:
            pass  # the reply side reports it
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            log.info("stream %d: request body aborted by caller: %s", stream.id, exc)
            stream.reset(ResetCode.CANCEL, "request body aborted")

    async def _relay_response(
        self,
        request: Request,
        stream: TunnelStream,
        status: int,
        headers: tuple[tuple[str, str], ...],
        ex: Exchange,
    ) -> StreamResponse:
        kept, unsized = reply_headers(headers)
        if unsized is not None and request.method != "HEAD" and status not in (204, 304):
            body = stream.take_complete_body()
            if body is not None:  # all there already: head and body in one write
                one = Response(status=status, body=body, headers=unsized)  # the listener sets the length
                one.set_default("Server", SERVER)  # as the listener would (exit_server/h1.py)
                if self.draining or ex.close_connection:
                    one.force_close()
                ex.bytes_out += len(body)
                return one
        resp = StreamResponse(status=status, headers=kept)  # keeps order and repeats (Set-Cookie)
        resp.set_default("Server", SERVER)
        if self._hsts is not None and ex.scheme == "https":
            resp.headers["Strict-Transport-Security"] = self._hsts
        if self.draining or ex.close_connection:
            resp.force_close()  # the server is going away: the caller reconnects elsewhere
        transport = request.transport
        try:
            await resp.prepare(request)
            while True:
                chunk = await stream.read()
                if not chunk:
                    break
                ex.bytes_out += len(chunk)
                if transport is not None and transport.get_write_buffer_size() + len(chunk) < SEND_BUFFER_LOW:
                    await resp.write(chunk)  # cannot block for long: no timer on the hot path
                    continue
                await self._write_within(resp, chunk)
        except TunnelError as exc:
            log.warning("stream %d: response body aborted: %s", stream.id, exc)
            _abort(request)
            return resp
        except TimeoutError:
            log.info("stream %d: caller took nothing for %.0fs: dropped", stream.id, self.config.send_timeout)
            stream.reset(ResetCode.CANCEL, "caller not reading")
            _abort(request)
            return resp
        except ConnectionError:
            stream.reset(ResetCode.CANCEL, "caller disconnected")
            _abort(request)
            return resp
        return resp

    async def _write_within(self, resp: StreamResponse, chunk: bytes | memoryview) -> None:
        """``resp.write(chunk)``, or TimeoutError after --send-timeout without the caller taking it."""
        await self._within(resp.write(chunk), self.config.send_timeout)

    async def _within(self, awaitable: Awaitable[_T], timeout: float) -> _T:
        """``await awaitable``, or TimeoutError after ``timeout`` seconds. A timer handle, not
        ``asyncio.timeout()``, which costs a ``getpid()`` syscall per call on Python 3.11 and
        runs for every chunk of a large body."""
        loop = self._loop
        task = asyncio.current_task(loop)
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        handle = loop.call_later(timeout, expire)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if expired and task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            handle.cancel()

    async def _relay_websocket(
        self,
        request: Request,
        stream: TunnelStream,
        status: int,
        headers: tuple[tuple[str, str], ...],
        ex: Exchange,
    ) -> StreamResponse:
        """After the upstream's 101, hand the raw connection to a byte pump (section 4.2)."""
        if status != 101:  # the upstream declined the upgrade: an ordinary response
            return await self._relay_response(request, stream, status, headers, ex)
        resp = StreamResponse(status=101)
        resp.headers.extend(strip_hop_by_hop(headers, keep_upgrade=True))
        if "Server" not in resp.headers:
            resp.headers["Server"] = SERVER
        await resp.prepare(request)
        transport = request.transport
        assert transport is not None
        set_keepalive(transport.get_extra_info("socket"))  # long-lived now: find a vanished caller in minutes
        raw = request.protocol.take_raw()
        writer = request.writer

        async def send(data: bytes | memoryview) -> None:
            await writer.write(data)

        def close_send() -> None:
            transport.close()

        ex.bytes_out = await pump(
            stream, Endpoint(raw.get, send, close_send, transport.abort), self.config.stream_idle_timeout
        )
        if not transport.is_closing():
            transport.close()
        return resp


def _abort(request: Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
