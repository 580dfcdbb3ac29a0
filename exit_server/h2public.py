"""Public HTTP/2: h2 by ALPN on the public TLS listener and h2c with prior knowledge on the plain
one (``--h2c``), driven by the sans-I/O ``h2`` library. Each HTTP/2 stream becomes one tunnel
stream carrying the request's semantics (docs/PROTOCOL.md section 14.1): pseudo-headers to the
head, trailers both ways, RST_STREAM both ways.

Limits (docs/SECURITY.md, "HTTP/2"): concurrent streams per connection, header list size and
HPACK table size (advertised in SETTINGS and enforced by h2/hpack from the first frame),
requests per connection (then GOAWAY NO_ERROR), per-second caps on RST_STREAM from the caller
(Rapid Reset, CVE-2023-44487) and on SETTINGS, PING, PRIORITY and empty DATA frames, and
WINDOW_UPDATE frames in proportion to the DATA frames sent and streams opened (after Envoy):
past a cap the connection gets GOAWAY ENHANCE_YOUR_CALM and is closed. A caller that never
opens its flow-control window holds at most one window of each response (reading from the
tunnel stops, so the upstream stops) and is dropped after ``--send-timeout``. Inbound DATA is
acknowledged only when the tunnel took it, so a request body is bounded by the window we
advertise. While the caller does not read what we send, we read nothing from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import typing
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
from hpack import NeverIndexedHeaderTuple
from multidict import CIMultiDict

from shared.aio.connection import TunnelStream
from shared.aio.sockopts import set_nodelay
from shared.errors import SessionClosed, StreamReset, TooManyStreams, TunnelError, UpstreamError
from shared.frames import ResetCode
from shared.h2map import PREFACE, H2Error, grpc_timeout, is_grpc, split_pseudo, to_h2_reset, wants_trailers
from shared.heads import RequestHead, StreamKind
from shared.routing import normalize_host

from . import peers as peers_mod
from .acmeanswers import is_challenge_path
from .headers import Edge, upstream_headers
from .httpguard import SERVER
from .limits import source_key
from .observe import Exchange, request_id
from .routes import Tunnel

if TYPE_CHECKING:
    from .public import PublicHandler

__all__ = ["H2Edge", "H2Limits", "H2PublicConnection", "PREFACE"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Response fields HTTP/2 forbids (RFC 9113 section 8.2.2), dropped from upstream answers.
#: Fields of a peer's relayed answer this server writes itself.
_PEER_OWN = frozenset({"x-request-id", "strict-transport-security"})
_FORBIDDEN_OUT = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"})

#: WINDOW_UPDATE frames a caller may send: this many, plus so many per DATA frame we sent and
#: per stream it opened (gRPC raises each new stream's window at once).
WINDOW_UPDATE_ALLOWANCE = 100
WINDOW_UPDATES_PER_DATA = 10

_TEXT = {
    403: b"forbidden\n",
    413: b"request body too large\n",
    429: b"too many requests from this address\n",
    431: b"request header fields too large\n",
    501: b"not implemented\n",
    502: b"bad gateway\n",
    503: b"no tunnel available for this host\n",
    504: b"gateway timeout\n",
}


@dataclass(frozen=True)
class H2Limits:
    """What one public HTTP/2 connection may do (the defaults are documented in SECURITY.md)."""

    max_concurrent_streams: int = 100
    max_header_list_size: int = 64 * 1024
    header_table_size: int = 4096
    initial_window: int = 256 * 1024
    connection_window: int = 1024 * 1024
    max_requests: int = 10_000  # then GOAWAY NO_ERROR: the caller opens a new connection
    max_resets_per_second: int = 100  # RST_STREAM from the caller (Rapid Reset)
    max_control_per_second: int = 500  # SETTINGS, PING, PRIORITY, empty DATA


class _RateCap:
    """Events in the current one-second bucket against a cap."""

    __slots__ = ("cap", "count", "second")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.count = 0
        self.second = 0

    def hit(self, now: float) -> bool:
        """Count one event; True when the cap is passed."""
        second = int(now)
        if second != self.second:
            self.second = second
            self.count = 0
        self.count += 1
        return self.count > self.cap


class _Inbound:
    """The request body of one stream as it arrives: chunks with their flow-controlled size,
    acknowledged to the caller only once the tunnel took them."""

    __slots__ = ("chunks", "ended", "trailers", "waiter")

    def __init__(self) -> None:
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.ended = False
        self.trailers: list[tuple[str, str]] | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _H2Stream:
    """One public HTTP/2 stream: its task, its inbound body, its outbound window waiter."""

    __slots__ = ("body", "ex", "id", "reset_by_caller", "task", "window")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.body = _Inbound()
        self.task: asyncio.Task[None] | None = None
        self.window: asyncio.Future[None] | None = None
        self.ex: Exchange | None = None
        self.reset_by_caller = False

    def wake_window(self) -> None:
        waiter, self.window = self.window, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class H2Edge:
    """The public HTTP/2 side of one exit server: limits, counters and live connections."""

    def __init__(self, public: PublicHandler, limits: H2Limits | None = None) -> None:
        self.public = public
        self.limits = limits or H2Limits()
        self.connections: set[H2PublicConnection] = set()
        self.goaways: dict[str, int] = {}  # reason -> GOAWAYs sent for abuse
        self.streams = 0

    def protocol(self, scheme: str, peer: str | None) -> H2PublicConnection:
        return H2PublicConnection(self, scheme, peer)

    def goaway_all(self) -> None:
        """Draining: every connection gets GOAWAY NO_ERROR (streams in flight finish)."""
        for conn in list(self.connections):
            conn.goaway(H2Error.NO_ERROR)

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()


class H2PublicConnection(asyncio.Protocol):
    """One public HTTP/2 connection."""

    def __init__(self, edge: H2Edge, scheme: str, peer: str | None) -> None:
        self.edge = edge
        self.public = edge.public
        if not hasattr(self.public, "_loop"):  # set by the first HTTP/1 request otherwise
            self.public._loop = asyncio.get_running_loop()
        self.scheme = scheme
        self.proxied_peer = peer
        self.loop = asyncio.get_running_loop()
        limits = edge.limits
        self.limits = limits
        # Inbound fields are validated by h2 (the caller is untrusted); outbound ones are built
        # here already lower-cased and without connection-specific fields, so h2's second pass
        # over them (a fifth of the CPU per request) is skipped.
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=True,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.streams: dict[int, _H2Stream] = {}
        self.requests = 0
        self.closed = False
        self.going_away = False
        self._paused_write: asyncio.Future[None] | None = None
        self._resets = _RateCap(limits.max_resets_per_second)
        self._control = _RateCap(limits.max_control_per_second)
        self._window_updates = 0
        self._data_sent = 0
        self._idle: asyncio.TimerHandle | None = None
        self._flush_due = False
        #: h2c accepted only for the fleet's relays (--peer-url without --h2c): every stream
        #: must carry a valid relay signature
        self.peers_only = False

    # ----------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peername = transport.get_extra_info("peername")
        self.peer = self.proxied_peer or (str(peername[0]) if peername else "")
        self.edge.connections.add(self)
        set_nodelay(transport.get_extra_info("socket"))
        limits = self.limits
        h = self.h2
        h.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
                h2.settings.SettingCodes.HEADER_TABLE_SIZE: limits.header_table_size,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.initial_window,
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 0,
            },
        )
        h.initiate_connection()
        if limits.connection_window > 65535:
            h.increment_flow_control_window(limits.connection_window - 65535)
        # Enforced from the first frame, before the caller acknowledges our SETTINGS.
        h.decoder.max_header_list_size = limits.max_header_list_size
        h.decoder.max_allowed_table_size = limits.header_table_size
        self._flush()
        if self.public.draining:
            self.goaway(H2Error.NO_ERROR)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.DenialOfServiceError as exc:
            self._abuse("header_list", f"{exc}")
            return
        except h2.exceptions.ProtocolError as exc:
            # A connection error (RFC 9113 section 5.4.1), such as more streams than we
            # advertised: the HPACK state cannot be trusted any more, so GOAWAY and close.
            log.info("public h2 %s: protocol error: %s", self.peer, _printable(str(exc)))
            goaways = self.edge.goaways
            goaways["protocol_error"] = goaways.get("protocol_error", 0) + 1
            code = getattr(exc, "error_code", None) or H2Error.PROTOCOL_ERROR
            try:
                self.h2.close_connection(error_code=code)
            except h2.exceptions.ProtocolError:
                pass
            self._write_now()
            self._close_soon()
            self._shut()
            return
        now = self.loop.time()
        for event in events:
            if self.closed:
                return
            self._event(event, now)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._shut()

    def pause_writing(self) -> None:
        # The caller is not reading what we send (responses, or ACKs to its PINGs/SETTINGS):
        # read nothing more until it does, so a flood cannot grow our output buffer.
        if self._paused_write is None:
            self._paused_write = self.loop.create_future()
            if self.transport is not None:
                self.transport.pause_reading()

    def resume_writing(self) -> None:
        paused, self._paused_write = self._paused_write, None
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        if paused is not None and not paused.done():
            paused.set_result(None)

    # ----------------------------------------------------------------- control
    def goaway(self, code: int, reason: str = "") -> None:
        """A graceful GOAWAY: streams up to the last one received finish, later ones are
        refused (REFUSED_STREAM: the caller retries them elsewhere), then the connection closes.
        The frame is written by hand: h2's ``close_connection`` ends its state machine, and the
        streams in flight could not answer."""
        if self.closed or self.going_away:
            return
        self.going_away = True
        self._write_now()  # what h2 queued goes before the GOAWAY
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id = self.h2.highest_inbound_stream_id
        frame.error_code = code
        frame.additional_data = reason.encode()[:64]
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame.serialize())
        if not self.streams:
            self._close_soon()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._shut()

    def _abuse(self, what: str, detail: str) -> None:
        """A limit passed: GOAWAY ENHANCE_YOUR_CALM and close."""
        goaways = self.edge.goaways
        goaways[what] = goaways.get(what, 0) + 1
        log.warning("public h2 %s: %s (%s): GOAWAY ENHANCE_YOUR_CALM", self.peer, what, _printable(detail))
        try:
            self.h2.close_connection(error_code=H2Error.ENHANCE_YOUR_CALM, additional_data=what.encode())
        except h2.exceptions.ProtocolError:
            pass
        self._write_now()
        if self.transport is not None:
            self.transport.close()
        self._shut()

    def _shut(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.edge.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        for stream in list(self.streams.values()):
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()
            stream.body.wake()
            stream.wake_window()
        self.streams.clear()
        paused, self._paused_write = self._paused_write, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    def _close_soon(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self.loop.call_later(self.public.config.keepalive_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle = None
        if self.streams or self.closed:
            return
        self.goaway(H2Error.NO_ERROR, "idle")
        self._close_soon()

    def _flush(self) -> None:
        """Write what h2 queued, once per loop turn: the frames of every stream that moved in
        this turn go out in one write (one syscall, not one per frame)."""
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._write_now)

    def _write_now(self) -> None:
        self._flush_due = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # ----------------------------------------------------------------- events
    def _event(self, event: h2.events.Event, now: float) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if not event.data and event.stream_ended is None and self._control.hit(now):
                self._abuse("control_flood", "empty DATA frames")
                return
            if stream is None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            stream.body.chunks.append((event.data, event.flow_controlled_length))
            if event.stream_ended is not None:
                stream.body.ended = True
            stream.body.wake()
        elif isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.body.trailers = split_pseudo(event.headers)[1]
                stream.body.ended = True
                stream.body.wake()
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.body.ended = True
                stream.body.wake()
        elif isinstance(event, h2.events.WindowUpdated):
            # Envoy's rule: WINDOW_UPDATE frames in proportion to the DATA frames we sent (a
            # busy gRPC stream acknowledges every message; a flood acknowledges nothing).
            self._window_updates += 1
            earned = WINDOW_UPDATES_PER_DATA * (self._data_sent + self.requests)
            if self._window_updates > WINDOW_UPDATE_ALLOWANCE + earned:
                self._abuse("window_update_flood", f"{self._window_updates} WINDOW_UPDATE for {self._data_sent} DATA")
                return
            if event.stream_id == 0:
                for one in self.streams.values():
                    one.wake_window()
            else:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.wake_window()
        elif isinstance(event, h2.events.StreamReset):
            if self._resets.hit(now):
                self._abuse("rapid_reset", f"more than {self._resets.cap} RST_STREAM in a second")
                return
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream.reset_by_caller = True
                if stream.task is not None and not stream.task.done():
                    stream.task.cancel()  # not started yet: the tunnel stream is never opened
                stream.body.wake()
                stream.wake_window()
                self._stream_gone()
        elif isinstance(event, (h2.events.PingReceived, h2.events.RemoteSettingsChanged, h2.events.PriorityUpdated)):
            if self._control.hit(now):
                self._abuse("control_flood", type(event).__name__)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.going_away = True
            if not self.streams:
                self._close_soon()

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self.going_away:
            self._refuse(stream_id)
            return
        self.requests += 1
        self.edge.streams += 1
        stream = _H2Stream(stream_id)
        if event.stream_ended is not None:
            stream.body.ended = True
        self.streams[stream_id] = stream
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        # A task per stream, started on the next loop turn: a HEADERS and RST_STREAM in one read
        # (Rapid Reset) cancel it before it opens a tunnel stream.
        stream.task = self.loop.create_task(self._serve(stream, event.headers))
        if self.requests >= self.limits.max_requests:
            self.goaway(H2Error.NO_ERROR, "max requests")

    def _refuse(self, stream_id: int) -> None:
        try:
            self.h2.reset_stream(stream_id, H2Error.REFUSED_STREAM)
        except h2.exceptions.ProtocolError:
            pass

    def _stream_gone(self) -> None:
        if not self.streams:
            if self.going_away:
                self._close_soon()
            elif not self.closed:
                self._arm_idle()

    # ----------------------------------------------------------------- one stream
    async def _serve(self, stream: _H2Stream, fields: list[tuple[bytes, bytes]]) -> None:
        public = self.public
        public.in_flight += 1
        public.requests += 1
        pseudo, regular = split_pseudo(fields)
        method = pseudo.get(":method", "")
        path = pseudo.get(":path", "")
        authority = pseudo.get(":authority") or next((v for n, v in regular if n == "host"), "")
        ex = Exchange(
            request_id(next((v for n, v in regular if n == "x-request-id"), None)),
            method,
            authority,
            path.partition("?")[0],
            self.peer,
        )
        ex.scheme = self.scheme
        ex.protocol = "HTTP/2"
        stream.ex = ex
        try:
            await self._handle(stream, ex, method, path, authority, regular)
        except asyncio.CancelledError:
            if ex.status == 0:
                ex.status = 499
            if not stream.reset_by_caller:
                raise
        except Exception:
            log.exception("public h2 %s stream %d: handler failed", self.peer, stream.id)
            ex.status = ex.status or 500
            self._reset(stream, H2Error.INTERNAL_ERROR)
        finally:
            public.in_flight -= 1
            public.metrics.finish(ex)
            for _, flow in stream.body.chunks:  # never taken: the connection window comes back
                self._ack(stream.id, flow)
            stream.body.chunks.clear()
            if not stream.body.ended and not stream.reset_by_caller:
                # Answered before the whole request arrived (RFC 9113 section 8.1): ask the
                # caller to stop sending, without error.
                self._reset_id(stream.id, H2Error.NO_ERROR)
            if self.streams.pop(stream.id, None) is not None:
                self._stream_gone()
            self._flush()

    async def _handle(
        self, stream: _H2Stream, ex: Exchange, method: str, path: str, authority: str, regular: list[tuple[str, str]]
    ) -> None:
        public = self.public
        config = public.config
        if method == "CONNECT" or not path.startswith("/"):
            ex.rejected = "bad_request"
            await self._respond(stream, ex, 501)
            return
        host = normalize_host(authority)
        ex.host = authority
        relayed_client: str | None = None
        if self.peers_only or any(n in peers_mod.FIELDS for n, _ in regular):
            relayed_client = self._relay_origin(ex, method, path, authority, regular)
            if relayed_client is None:  # unsigned or stale relay fields, or a stranger on peers-only h2c
                ex.rejected = "bad_relay"
                log.warning("public h2: unsigned or stale relay fields from %s (403)", self.peer)
                await self._respond(stream, ex, 403)
                return
        if public.acme is not None and (answer := public.acme.http_answer(host, path.partition("?")[0])) is not None:
            ex.route = "acme-challenge"
            await self._respond(stream, ex, 200, answer.encode())
            return
        if ex.scheme == "http" and config.redirect_http and not is_challenge_path(path):
            ex.rejected = "redirected"
            port = "" if public.tls_port in (0, 443) else f":{public.tls_port}"
            await self._respond(stream, ex, 308, b"", (("location", f"https://{host}{port}{path}"),))
            return
        peer = self.peer if relayed_client is None else relayed_client
        trusted = None
        if relayed_client is None and public.trusted and public.trusted.contains(peer):
            trusted = public.trusted
        edge = Edge(ex.request_id, peer, ex.scheme, authority, trusted)
        client = peer if trusted is None else trusted.client_of([v for n, v in regular if n == "x-forwarded-for"], peer)
        if public.access is not None:
            denied = await public.access.check(_HeadersOnly(regular), host, client)  # type: ignore[arg-type]
            if denied is not None:
                ex.rejected = "access_denied"
                extra = tuple(
                    (k.lower(), v)
                    for k, v in denied.headers.items()
                    if k.lower() in ("www-authenticate", "retry-after")
                )
                await self._respond(
                    stream, ex, denied.status, denied.body if isinstance(denied.body, bytes) else b"", extra
                )
                return
        ex.route, tunnel = public.registry.pick_route(host, path.partition("?")[0])
        if tunnel is None:
            ex.route = ex.route or "unrouted"
            peers = public.peers
            # a peer of the fleet with a session for the host (exit_server/peers.py), over
            # HTTP/1.1: not for a request that needs trailers (gRPC), which that cannot carry
            if peers is not None and peers.key is not None and ex.relayed_by is None:
                url = peers.peer_for(host, path.partition("?")[0])
                if url is not None and wants_trailers(regular):  # gRPC: HTTP/2 to the peer
                    await self._relay_h2_to_peer(stream, ex, url, method, path, authority, regular, client)
                    return
                if url is not None:
                    await self._relay_to_peer(stream, ex, url, method, path, authority, regular, client)
                    return
            ex.rejected = "no_tunnel"
            await self._respond(stream, ex, 503, retry_after=1)
            return
        length = next((v for n, v in regular if n == "content-length"), None)
        if config.max_body is not None and length is not None and length.isdigit() and int(length) > config.max_body:
            ex.rejected = "body_too_large"
            await self._respond(stream, ex, 413)
            return
        grpc = is_grpc(regular)
        trailers = wants_trailers(regular)
        if trailers and not tunnel.conn.session.carries_trailers:
            # A version 1 client cannot carry trailers: say so, never a gRPC answer without its status.
            ex.rejected = "no_trailers"
            log.warning(
                "public h2 %s %s: tunnel %s speaks protocol v%s (no trailers): 502",
                peer,
                _printable(host),
                tunnel.id,
                tunnel.conn.session.version,
            )
            await self._respond(stream, ex, 502, b"the tunnel client cannot carry trailers: upgrade it\n")
            return
        headers = upstream_headers(_raw(regular), edge, False)
        if trailers:
            headers = (*headers, ("te", "trailers"))
        head = RequestHead(StreamKind.HTTP, method, path, edge.host, edge.proto, edge.peer, headers)
        if public.access is not None:
            head = public.access.strip(head, host)
        cap = config.max_streams_per_caller
        key = source_key(client)
        if cap:
            held = public._per_caller.get(key, 0)
            if held >= cap:
                ex.rejected = "caller_limit"
                await self._respond(stream, ex, 429, retry_after=1)
                return
            public._per_caller[key] = held + 1
        try:
            timeout: float | None = config.upstream_timeout
            if grpc:  # a streaming call may wait long for its first message: its own deadline rules
                deadline = grpc_timeout(regular)
                timeout = None if deadline is None else deadline + 1.0
            await self._exchange(stream, ex, tunnel, head, host, timeout)
        finally:
            if cap:
                left = public._per_caller[key] - 1
                if left:
                    public._per_caller[key] = left
                else:
                    del public._per_caller[key]

    async def _exchange(
        self, stream: _H2Stream, ex: Exchange, tunnel: Tunnel, head: RequestHead, host: str, timeout: float | None
    ) -> None:
        public = self.public
        has_body = not (stream.body.ended and not stream.body.chunks and stream.body.trailers is None)
        for attempt in (1, 2):
            try:
                tstream = public._open(tunnel, head, has_body)
            except TunnelError as exc:
                ex.rejected = "stream_limit" if isinstance(exc, TooManyStreams) else "tunnel_closed"
                status = _status_of(exc)
                await self._respond(stream, ex, status, retry_after=1 if status == 503 else None)
                return
            tunnel.requests += 1
            ex.tunnel_id = tunnel.id
            pump: asyncio.Task[None] | None = None
            if has_body:
                pump = self.loop.create_task(self._pump_body(stream, tstream, ex))
            try:
                try:
                    reply = await tstream.response(timeout)
                    ex.mark_head()
                except TimeoutError:
                    tstream.reset(ResetCode.UPSTREAM_TIMEOUT, "no response head in time")
                    await self._respond(stream, ex, 504)
                    return
                except (StreamReset, SessionClosed) as exc:
                    if pump is not None:
                        pump.cancel()
                    retry = None
                    if attempt == 1 and not ex.bytes_in:
                        refused = isinstance(exc, StreamReset) and exc.code == ResetCode.REFUSED
                        lost = isinstance(exc, SessionClosed) or (
                            isinstance(exc, StreamReset) and exc.code == ResetCode.INTERNAL_ERROR
                        )
                        if refused or (lost and head.method in ("GET", "HEAD", "OPTIONS")):
                            retry = public.registry.pick(host, head.target.partition("?")[0], exclude=tunnel)
                    if retry is not None:
                        tunnel = retry
                        continue
                    if isinstance(exc, StreamReset) and exc.code >= ResetCode.H2_BASE:
                        ex.status = 0
                        self._reset(stream, to_h2_reset(exc.code))  # the upstream's own RST_STREAM
                        return
                    status = ex.local_status or _status_of(exc)
                    await self._respond(stream, ex, status, retry_after=1 if status == 503 else None)
                    return
                await self._relay(stream, tstream, ex, reply.status, reply.headers)
                return
            except asyncio.CancelledError:
                tstream.reset(ResetCode.CANCEL, "caller reset the stream" if stream.reset_by_caller else "caller gone")
                raise
            finally:
                if pump is not None and not pump.done():
                    pump.cancel()
                tunnel.conn.release(tstream)

    async def _pump_body(self, stream: _H2Stream, tstream: TunnelStream, ex: Exchange) -> None:
        """The request body into the tunnel; each chunk acknowledged to the caller once the
        tunnel took it (so the caller's window is the only buffer)."""
        config = self.public.config
        body = stream.body
        total = 0
        try:
            while True:
                if body.chunks:
                    data, flow = body.chunks.popleft()
                    total += len(data)
                    ex.bytes_in = total
                    if config.max_body is not None and total > config.max_body:
                        ex.rejected = "body_too_large"
                        ex.local_status = 413
                        self._ack(stream.id, flow)
                        tstream.reset(ResetCode.TOO_LARGE, "request body over the limit")
                        return
                    if data:
                        await tstream.write(data)
                    self._ack(stream.id, flow)
                    continue
                if body.ended:
                    break
                if stream.reset_by_caller or self.closed:
                    return
                body.waiter = self.loop.create_future()
                try:
                    await self._within(body.waiter, config.body_timeout)
                except TimeoutError:
                    ex.rejected = "body_timeout"
                    ex.local_status = 408
                    tstream.reset(ResetCode.CANCEL, "request body idle")
                    return
            if body.trailers is not None and tstream.carries_trailers:
                tstream.send_trailers(tuple(body.trailers))
            else:
                tstream.end()
        except TunnelError:
            pass  # the reply side reports it

    def _relay_origin(
        self, ex: Exchange, method: str, path: str, authority: str, regular: list[tuple[str, str]]
    ) -> str | None:
        """The caller's address of a correctly signed relayed stream (its scheme and relaying
        server set on ``ex``), else None."""
        peers = self.public.peers
        if peers is None:
            return None
        fields = {n: v for n, v in regular if n in peers_mod.FIELDS}
        found = peers.verified(lambda name: fields.get(name, ""), method, path, authority)
        if found is None:
            return None
        relayed_by, client, proto = found
        ex.relayed_by = relayed_by
        ex.scheme = proto
        ex.caller = client
        return client

    async def _relay_to_peer(
        self,
        stream: _H2Stream,
        ex: Exchange,
        url: str,
        method: str,
        path: str,
        authority: str,
        regular: list[tuple[str, str]],
        client: str,
    ) -> None:
        """Send the request once to a peer with a session for its host, signed as
        exit_server/public.py's relay is, and stream the answer back; 503 when the peer
        cannot be reached."""
        import aiohttp

        public = self.public
        peers = public.peers
        assert peers is not None and peers.key is not None
        headers = [(n, v) for n, v in regular if not n.startswith("backhaul-") and n != "x-request-id"]
        headers.append(("host", authority))
        headers += peers.relay_fields(method, path, authority, client, ex.scheme, ex.request_id)
        has_body = not (stream.body.ended and not stream.body.chunks)
        ex.tunnel_id = "relay"
        try:
            answer = await public.relay_session().request(
                method,
                url + path,
                headers=headers,
                data=self._body(stream, ex) if has_body else None,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError, TimeoutError, _Gone) as exc:
            peers.relayed["failed"] = peers.relayed.get("failed", 0) + 1
            log.warning("public h2: relaying %s to %s failed: %s (503)", _printable(authority[:100]), url, exc)
            if ex.local_status:
                await self._respond(stream, ex, ex.local_status)
            else:
                ex.rejected = "relay_failed"
                await self._respond(stream, ex, 503, retry_after=1)
            return
        peers.relayed["ok"] = peers.relayed.get("ok", 0) + 1
        try:
            relayed = tuple((n, v) for n, v in answer.headers.items() if n.lower() not in _PEER_OWN)
            fields = self._answer_fields(ex, answer.status, relayed)
            if not self._send_headers(stream.id, fields, end=False):
                return
            async for chunk in answer.content.iter_any():
                await self._send(stream, chunk, ex)
            self._end(stream.id)
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            log.info("public h2 stream %d: relayed answer from %s aborted: %s", stream.id, url, exc)
            self._reset(stream, H2Error.INTERNAL_ERROR)
        except _Gone:
            pass
        finally:
            answer.release()

    async def _relay_h2_to_peer(
        self,
        stream: _H2Stream,
        ex: Exchange,
        url: str,
        method: str,
        path: str,
        authority: str,
        regular: list[tuple[str, str]],
        client: str,
    ) -> None:
        """A request that needs trailers (gRPC), relayed to a peer over HTTP/2 (h2c to its plain
        listener, which takes it from peers only): trailers and resets both ways, the caller's
        reset cancels the peer's stream."""
        from tunnel_client.http2 import UpstreamReset

        public = self.public
        peers = public.peers
        assert peers is not None and peers.key is not None
        scheme, host, port = peers_mod.split_url(url)
        origin = ("https" if scheme == "https" else "h2c", host, port)
        fields = [(b":method", method.encode()), (b":scheme", b"http"), (b":authority", authority.encode("latin-1")),
                  (b":path", path.encode("latin-1"))]  # fmt: skip
        fields += [
            (n.encode("latin-1"), v.encode("latin-1"))
            for n, v in regular
            if not n.startswith("backhaul-") and n not in ("x-request-id", "host")
        ]
        fields += [
            (n.encode(), v.encode("latin-1"))
            for n, v in peers.relay_fields(method, path, authority, client, ex.scheme, ex.request_id)
        ]
        ex.tunnel_id = "relay"
        has_body = not (stream.body.ended and not stream.body.chunks and stream.body.trailers is None)
        try:
            conn = await public.relay_h2_pool().connection(origin)
            upstream = conn.start(fields, end_stream=not has_body)
        except (UpstreamError, OSError) as exc:
            peers.relayed["failed"] = peers.relayed.get("failed", 0) + 1
            log.warning("public h2: relaying %s to %s over HTTP/2 failed: %s (503)", _printable(authority[:100]), url,
                        exc)  # fmt: skip
            ex.rejected = "relay_failed"
            await self._respond(stream, ex, 503, retry_after=1)
            return
        peers.relayed["ok"] = peers.relayed.get("ok", 0) + 1

        async def send_body() -> None:
            with contextlib.suppress(UpstreamError, _Gone, TimeoutError):
                async for chunk in self._body(stream, ex):
                    await upstream.write(chunk)
                trailers = stream.body.trailers
                upstream.finish([(n, v) for n, v in trailers] if trailers else None)

        sending = self.loop.create_task(send_body()) if has_body else None
        try:
            status, headers = await upstream.response()
            answer = tuple((n, v) for n, v in headers if n.lower() not in _PEER_OWN)
            ex.grpc_status = _grpc_status(answer)
            headers_only = upstream.ended and not upstream.chunks and upstream.trailers is None  # Trailers-Only
            if not self._send_headers(stream.id, self._answer_fields(ex, status, answer), end=headers_only):
                return
            if headers_only:
                return
            while chunk := await upstream.read():
                await self._send(stream, chunk, ex)
            trailers = upstream.trailers
            if trailers:
                ex.grpc_status = _grpc_status(trailers) or ex.grpc_status
                self._send_headers(
                    stream.id,
                    [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in trailers if not n.startswith(":")],
                    end=True,
                )
            else:
                self._end(stream.id)
        except UpstreamReset as exc:
            self._reset(stream, exc.error_code)
        except UpstreamError as exc:
            log.info("public h2 stream %d: relayed answer from %s aborted: %s", stream.id, url, exc)
            if ex.status:
                self._reset(stream, H2Error.INTERNAL_ERROR)
            else:
                await self._respond(stream, ex, 502)
        except (_Gone, TimeoutError):
            pass
        finally:
            if sending is not None:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
            upstream.close()  # not complete both ways (the caller reset it): CANCEL to the peer

    async def _body(self, stream: _H2Stream, ex: Exchange) -> typing.AsyncIterator[bytes]:
        """The request body as it arrives, each chunk acknowledged once taken (the relay)."""
        config = self.public.config
        body = stream.body
        while True:
            if body.chunks:
                data, flow = body.chunks.popleft()
                ex.bytes_in += len(data)
                if config.max_body is not None and ex.bytes_in > config.max_body:
                    ex.rejected = "body_too_large"
                    ex.local_status = 413
                    self._ack(stream.id, flow)
                    raise _Gone
                if data:
                    yield data
                self._ack(stream.id, flow)
                continue
            if body.ended:
                return
            if stream.reset_by_caller or self.closed:
                raise _Gone
            body.waiter = self.loop.create_future()
            await self._within(body.waiter, config.body_timeout)

    def _ack(self, stream_id: int, flow: int) -> None:
        if flow and not self.closed:
            self.h2.acknowledge_received_data(flow, stream_id)
            self._flush()

    async def _relay(
        self, stream: _H2Stream, tstream: TunnelStream, ex: Exchange, status: int, headers: tuple[tuple[str, str], ...]
    ) -> None:
        """The response head, body and trailers from the tunnel to the caller."""
        out = self._answer_fields(ex, status, headers)
        ex.grpc_status = _grpc_status(headers)
        first = tstream.take_complete_body() if ex.method != "HEAD" else None
        done = first is not None and tstream.trailers is None and not first
        if not self._send_headers(stream.id, out, end=done and tstream.at_eof):
            return
        if done and tstream.at_eof:
            return
        try:
            if first:
                await self._send(stream, first, ex)
            while True:
                chunk = await tstream.read()
                if not chunk:
                    break
                await self._send(stream, chunk, ex)
        except TunnelError as exc:
            code = to_h2_reset(exc.code) if isinstance(exc, StreamReset) else H2Error.INTERNAL_ERROR
            log.info("public h2 stream %d: response aborted: %s", stream.id, _printable(str(exc)))
            self._reset(stream, code)
            return
        except TimeoutError:
            log.info(
                "public h2 stream %d: caller took nothing for %.0fs: reset", stream.id, self.public.config.send_timeout
            )
            ex.rejected = "send_timeout"
            tstream.reset(ResetCode.CANCEL, "caller not reading")
            self._reset(stream, H2Error.CANCEL)
            return
        except _Gone:
            tstream.reset(ResetCode.CANCEL, "caller reset the stream")
            return
        trailers = tstream.trailers
        if trailers:
            ex.grpc_status = _grpc_status(trailers) or ex.grpc_status
            fields = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in trailers if not n.startswith(":")]
            self._send_headers(stream.id, fields, end=True)
        else:
            self._end(stream.id)

    def _answer_fields(
        self, ex: Exchange, status: int, headers: tuple[tuple[str, str], ...]
    ) -> list[tuple[bytes, bytes]]:
        """An answer's HTTP/2 head: the upstream's fields less those HTTP/2 forbids, ours added."""
        out: list[tuple[bytes, bytes]] = [(b":status", str(status).encode())]
        server = False
        for name, value in headers:
            lower = name.lower()
            if lower in _FORBIDDEN_OUT:
                continue
            server = server or lower == "server"
            out.append((lower.encode("latin-1"), value.encode("latin-1")))
        if not server:
            out.append((b"server", SERVER.encode()))
        # Unique per request: kept out of the HPACK dynamic table, which it would only churn
        # (every later field's table search walks the churned entries).
        out.append(NeverIndexedHeaderTuple(b"x-request-id", ex.request_id.encode()))
        if self.public._hsts is not None and ex.scheme == "https":
            out.append((b"strict-transport-security", self.public._hsts.encode()))
        ex.status = status
        return out

    async def _send(self, stream: _H2Stream, data: bytes | memoryview, ex: Exchange) -> None:
        """Send ``data`` within the caller's window and our socket's room; TimeoutError after
        --send-timeout with nothing taken."""
        view = memoryview(data)
        timeout = self.public.config.send_timeout
        while view:
            if self.closed or stream.id not in self.streams:
                raise _Gone
            try:
                room = min(self.h2.local_flow_control_window(stream.id), self.h2.max_outbound_frame_size)
            except h2.exceptions.StreamClosedError:
                raise _Gone from None
            if room <= 0:
                stream.window = self.loop.create_future()
                await self._within(stream.window, timeout)
                continue
            n = min(room, len(view))
            try:
                self.h2.send_data(stream.id, bytes(view[:n]))
            except h2.exceptions.ProtocolError:
                raise _Gone from None
            self._data_sent += 1
            self._flush()
            ex.bytes_out += n
            view = view[n:]
            if self._paused_write is not None:
                await self._within(asyncio.shield(self._paused_write), timeout)

    def _send_headers(self, stream_id: int, fields: list[tuple[bytes, bytes]], end: bool) -> bool:
        if self.closed or stream_id not in self.streams:
            return False
        try:
            self.h2.send_headers(stream_id, fields, end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            log.info("public h2 stream %d: headers not sent: %s", stream_id, exc)
            self._reset_id(stream_id, H2Error.INTERNAL_ERROR)
            return False
        self._flush()
        return True

    def _end(self, stream_id: int) -> None:
        if self.closed or stream_id not in self.streams:
            return
        try:
            self.h2.end_stream(stream_id)
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    def _reset(self, stream: _H2Stream, code: int) -> None:
        self._reset_id(stream.id, code)

    def _reset_id(self, stream_id: int, code: int) -> None:
        if self.closed:
            return
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    async def _respond(
        self,
        stream: _H2Stream,
        ex: Exchange,
        status: int,
        body: bytes | None = None,
        extra: tuple[tuple[str, str], ...] = (),
        retry_after: int | None = None,
    ) -> None:
        """A response of the edge's own (errors, redirects, ACME answers)."""
        ex.status = status
        payload = _TEXT.get(status, b"error\n") if body is None else body
        fields = [
            (b":status", str(status).encode()),
            (b"server", SERVER.encode()),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(payload)).encode()),
        ]
        fields += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra]
        if retry_after is not None:
            fields.append((b"retry-after", str(retry_after).encode()))
        if not self._send_headers(stream.id, fields, end=not payload):
            return
        if payload:
            try:
                await self._send(stream, payload, ex)
            except (TimeoutError, _Gone):
                return
            self._end(stream.id)

    async def _within(self, awaitable: Awaitable[_T], timeout: float) -> _T:
        return await self.public._within(awaitable, timeout)


class _Gone(Exception):
    """The caller reset the stream or the connection closed."""


class _HeadersOnly:
    """What the access rules read of a request: its headers."""

    def __init__(self, regular: list[tuple[str, str]]) -> None:
        self.headers = CIMultiDict(regular)


def _raw(regular: list[tuple[str, str]]) -> tuple[tuple[bytes, bytes], ...]:
    """Regular fields as raw pairs for the edge's header pass, with HTTP/2's split Cookie fields
    joined into one (RFC 9113 section 8.2.3: HTTP/1.1 upstreams expect one)."""
    cookies = [v for n, v in regular if n == "cookie"]
    out = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in regular if n != "cookie"]
    if cookies:
        out.append((b"cookie", "; ".join(cookies).encode("latin-1")))
    return tuple(out)


def _status_of(error: TunnelError) -> int:
    from .public import status_of

    return status_of(error)


def _grpc_status(fields: typing.Iterable[tuple[str, str]]) -> str | None:
    for name, value in fields:
        if name.lower() == "grpc-status":
            return value[:8]
    return None


def _printable(text: str) -> str:
    """Control characters escaped for a log line."""
    return text.encode("unicode_escape").decode("ascii")[:300]
