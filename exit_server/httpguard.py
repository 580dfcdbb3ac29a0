"""Hygiene of the public HTTP listener, around aiohttp's parser (llhttp, or the pure-Python
parser with the same limits).

What aiohttp 3.14 does by itself, and what this module adds:

- A request target longer than ``max_line_size`` raises ``LineTooLong`` (limit = the line
  limit); a header whose name plus value exceeds ``max_field_size`` raises ``LineTooLong``
  (limit = the field limit); more than ``max_headers`` headers raise ``BadHttpMessage("Too
  many headers received")``. aiohttp answers all of them ``400`` with the exception text as
  the body, which echoes the caller's bytes. :class:`GuardedRequestHandler.handle_error` maps
  them to ``414`` and ``431`` (the two limits differ by design so the mapping can tell them
  apart) and answers every parse error with a short generic body, closing the connection.
- Content-Length together with Transfer-Encoding, a duplicate or non-numeric Content-Length,
  a Transfer-Encoding other than ``chunked`` as the final coding, and malformed chunk sizes are
  parse errors in llhttp (400, connection closed). :func:`head_problem` adds the checks the
  parser does not make: the total size of the headers (431), a transfer coding other than
  plain ``chunked`` (501: we could not forward it faithfully) and Transfer-Encoding on
  HTTP/1.0 (400, RFC 9112 section 6.1).
- Slow headers: a request head must be complete within ``header_timeout`` of its first byte
  (or of the connection opening); otherwise 408 and close (idle keep-alive connections are
  governed by aiohttp's keep-alive timeout instead).
"""

from __future__ import annotations

import asyncio
import logging
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from shared.forwarding import TrustedProxies
from shared.h2map import PREFACE

if TYPE_CHECKING:
    from .h2public import H2Edge
from shared.proxyproto import parse_proxy_v2

__all__ = [
    "FIELD_LIMIT",
    "HEADERS_LIMIT",
    "MAX_HEADERS",
    "SERVER",
    "REQUEST_LINE_LIMIT",
    "GuardedRequestHandler",
    "GuardedServer",
    "head_problem",
    "send_and_close",
]

log = logging.getLogger(__name__)

#: Longest request target (llhttp counts the target; the pure-Python parser the whole line): 414.
REQUEST_LINE_LIMIT = 8192
#: Longest header, name plus value: 431. Kept different from REQUEST_LINE_LIMIT on purpose.
FIELD_LIMIT = 8190
#: Most headers in a request: 431 beyond.
MAX_HEADERS = 100
#: Largest total of all header lines: 431 beyond.
HEADERS_LIMIT = 16 * 1024

_TEXT = {
    400: "bad request",
    408: "request timeout",
    414: "uri too long",
    431: "request header fields too large",
    500: "internal server error",
    501: "not implemented",
    504: "gateway timeout",
    505: "http version not supported",
}

_VERSIONS = frozenset({(1, 0), (1, 1)})

_BUSY_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 12\r\nRetry-After: 1\r\nConnection: close\r\nServer: backhaul\r\n\r\nserver busy\n"
)

_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 16\r\nConnection: close\r\n\r\nrequest timeout\n"
)


#: ``Server`` on the exit server's own public responses: no software or version to fingerprint
#: (aiohttp would send ``Python/3.11 aiohttp/3.x``). An upstream's own Server header passes.
SERVER = "backhaul"


def generic_response(status: int) -> web.Response:
    """A closing response with a fixed body that never echoes the caller's bytes."""
    resp = web.Response(status=status, text=_TEXT.get(status, "error") + "\n", headers={"Server": SERVER})
    resp.force_close()
    return resp


def parse_error_status(exc: BaseException | None) -> int:
    """The status for an aiohttp parse error."""
    if isinstance(exc, LineTooLong):
        return 414 if exc.args[1] == REQUEST_LINE_LIMIT else 431
    if isinstance(exc, BadHttpMessage) and exc.message.startswith("Too many headers"):
        return 431
    return 400


def head_problem(request: web.BaseRequest) -> int | None:
    """Checks on a parsed head the parser does not make; the status to answer, or None."""
    total = 0
    for name, value in request.raw_headers:
        total += len(name) + len(value) + 4
    if total > HEADERS_LIMIT:
        return 431
    if request.version not in _VERSIONS:  # HTTP/2.0 or 0.9 on an HTTP/1 request line
        return 505
    te = request.headers.get("Transfer-Encoding")
    if te is not None:
        if request.version < (1, 1):
            return 400
        if te.strip().lower() != "chunked":
            return 501
    return None


async def send_and_close(request: web.BaseRequest, resp: web.StreamResponse) -> web.StreamResponse:
    """Send ``resp`` now and close the connection without reading the rest of the request body
    (aiohttp would otherwise linger up to 10 s draining it: pointless for an idle caller)."""
    resp.force_close()
    await resp.prepare(request)
    await resp.write_eof()
    request.protocol.force_close()
    return resp


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler with generic error bodies, 414/431 and a header deadline."""

    #: The caller's address from a trusted proxy's PROXY v2 header (None: the socket peer).
    proxied_peer: str | None = None

    def __init__(
        self,
        manager: web.Server,
        *,
        header_timeout: float,
        trusted: TrustedProxies | None = None,
        h2: H2Edge | None = None,
        scheme: str = "http",
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._h2 = h2  # HTTP/2 on this listener: by ALPN (TLS) or by the h2c preface (plain)
        self._scheme = scheme
        self._sniff: bytes | None = None  # the first bytes, while they may be the h2c preface
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False
        self._trusted = trusted
        self._proxy_bytes: bytes | None = None  # collecting a possible PROXY v2 header

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._h2 is not None:
            sslobj = transport.get_extra_info("ssl_object")
            if sslobj is not None and sslobj.selected_alpn_protocol() == "h2":
                protocol = self._h2.protocol(self._scheme, None)
                typing.cast(asyncio.Transport, transport).set_protocol(protocol)
                protocol.connection_made(transport)
                return
            if sslobj is None:
                self._sniff = b""
        super().connection_made(transport)
        manager = self._manager
        if isinstance(manager, GuardedServer) and manager.open_connections > manager.max_connections:
            # Past the descriptors left for callers: answer at once and free the descriptor,
            # so the admin port and tunnel reconnects keep theirs (shared/runtime/fdlimit.py).
            manager.refused()
            typing.cast(asyncio.WriteTransport, transport).write(_BUSY_503)  # uvloop's are not subclasses
            self.force_close()
            return
        if self._trusted:
            peer = transport.get_extra_info("peername")
            if peer and self._trusted.contains(str(peer[0])):
                self._proxy_bytes = b""  # a trusted proxy may start with a PROXY v2 header
        self._arm_head_timer(started=False)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._proxy_bytes is not None:
            data = self._proxy_header(data)
            if not data:
                return
        if self._sniff is not None:
            data = self._sniff + data
            if len(data) < len(PREFACE) and PREFACE.startswith(data):
                self._sniff = data  # maybe the h2c preface: wait for more
                return
            self._sniff = None
            if data.startswith(PREFACE):
                self._switch_to_h2(data)
                return
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            self._cancel_head_timer()
        elif self._head_timer is not None:
            self._head_started = self._head_started or bool(data)
        elif (
            data
            and self._head_timer is None
            and not self._request_in_progress
            and not self._messages
            and self._payload_parser is None
            and not self._upgraded
            and not self._force_close
        ):
            self._arm_head_timer(started=True)  # the first bytes of a new request head

    def _switch_to_h2(self, data: bytes) -> None:
        """The caller sent the HTTP/2 preface (h2c with prior knowledge): hand the connection to
        the HTTP/2 protocol and leave aiohttp's bookkeeping without closing the transport."""
        assert self._h2 is not None
        transport = self.transport
        assert transport is not None
        self._cancel_head_timer()
        protocol = self._h2.protocol(self._scheme, self.proxied_peer)
        manager = self._manager
        protocol.peers_only = isinstance(manager, GuardedServer) and manager.h2c_peers_only
        self.transport = None  # aiohttp's connection_lost closes the transport it still holds
        super().connection_lost(None)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)

    def _proxy_header(self, data: bytes) -> bytes:
        """Take a PROXY v2 header off the first bytes from a trusted peer; what follows (or
        everything, when the peer sent plain HTTP) is returned for the HTTP parser."""
        assert self._proxy_bytes is not None
        data = self._proxy_bytes + data
        try:
            parsed = parse_proxy_v2(data)
        except ValueError:
            self._proxy_bytes = None  # plain HTTP from the proxy (or garbage: the parser says 400)
            return data
        if parsed is None:
            self._proxy_bytes = data
            return b""
        consumed, source = parsed
        self._proxy_bytes = None
        self.proxied_peer = source
        return data[consumed:]

    def _arm_head_timer(self, started: bool) -> None:
        self._head_started = started
        self._head_timer = self._loop.call_later(self._header_timeout, self._head_expired)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._request_in_progress or self._messages or self.transport is None:
            return
        peer = self.transport.get_extra_info("peername")
        log.debug(
            "public: request head not complete within %.0fs from %s: closed",
            self._header_timeout,
            peer[0] if peer else "-",
        )
        if self._head_started:
            self.transport.write(_TIMEOUT_408)
        self.force_close()

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """Generic body, 414/431 for the parser's size limits, and a log line without the
        caller's bytes (aiohttp's own logs the exception text, which quotes them)."""
        if status == 400:
            status = parse_error_status(exc)
            log.debug(
                "public: %d for a malformed request from %s (%s)", status, request.remote or "-", type(exc).__name__
            )
        elif status == 500:
            log.error("public: internal error while handling a request from %s", request.remote or "-", exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        return generic_response(status)


class GuardedServer(web.Server):
    """``web.Server`` whose connections are :class:`GuardedRequestHandler` objects."""

    def __init__(
        self,
        handler: Any,
        *,
        header_timeout: float = 10.0,
        trusted: TrustedProxies | None = None,
        max_connections: int = 1 << 30,
        on_refused: Callable[[], None] | None = None,
        h2: H2Edge | None = None,
        scheme: str = "http",
        h2c_peers_only: bool = False,
        **kwargs: Any,
    ) -> None:
        """``h2c_peers_only``: h2c is accepted on this listener only for the fleet's relays
        (--peer-url without --h2c): each stream must carry a valid relay signature."""
        kwargs.setdefault("max_line_size", REQUEST_LINE_LIMIT)
        kwargs.setdefault("max_field_size", FIELD_LIMIT)
        kwargs.setdefault("max_headers", MAX_HEADERS)
        super().__init__(handler, **kwargs)
        self._header_timeout = header_timeout
        self._trusted = trusted
        self._h2 = h2
        self._scheme = scheme
        self.h2c_peers_only = h2c_peers_only
        self.max_connections = max_connections
        self._on_refused = on_refused
        self._refusal_log = 0.0

    @property
    def open_connections(self) -> int:
        """Connections open now (``connections`` would copy the whole list for each new one)."""
        return len(self._connections)

    def refused(self) -> None:
        """A connection over ``max_connections`` was answered 503: count it, log now and then."""
        if self._on_refused is not None:
            self._on_refused()
        now = self._loop.time()
        if now - self._refusal_log >= 10.0:
            self._refusal_log = now
            log.error(
                "public: %d connections open, the limit left by the open-file limit: new callers get 503",
                self.max_connections,
            )

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(
            self,
            loop=self._loop,
            header_timeout=self._header_timeout,
            trusted=self._trusted,
            h2=self._h2,
            scheme=self._scheme,
            **self._kwargs,
        )
