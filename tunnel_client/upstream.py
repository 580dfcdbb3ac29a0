"""The local forwarder: turns each tunnel stream into a request to a configured upstream and
streams the answer back. It only ever talks to upstreams in its own configuration: the server
sends a Host and a path, never an address (customer guardrail). Every head first passes the
checks of :mod:`tunnel_client.guard`; the upstream URL is built from the configured origin and
the canonical origin-form path, so no target can name another host. Each stream served may be
recorded in the audit log (:mod:`tunnel_client.audit`)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from shared.aio.connection import TunnelStream
from shared.aio.pump import Endpoint, pump, stream_endpoint
from shared.aio.splice import Splice
from shared.errors import LocalProtocolError, StreamReset, TunnelError, UpstreamError
from shared.frames import ResetCode
from shared.h2map import CONNECTION_SPECIFIC, from_h2_reset, grpc_status_headers, is_grpc
from shared.heads import KIND_NAMES, ResponseHead, StreamKind
from shared.httputil import strip_hop_by_hop
from shared.proxyproto import proxy_v2_header
from shared.routing import RouteTable, normalize_host
from shared.runtime.plainmetrics import StreamTally

from .audit import AuditLog, AuditRecord
from .config import TcpTarget, Upstream
from .guard import Guard, Refused, check_tcp_target
from .http1 import (
    MAX_RESPONSE_FIELDS,
    MAX_RESPONSE_HEAD,
    UpstreamConnection,
    UpstreamPool,
    is_replayable,
    parse_response_head,
    request_bytes,
    send_request,
)
from .killswitch import KillSwitch

if TYPE_CHECKING:  # h2 is imported on first use of an HTTP/2 upstream (36 ms of start time)
    from .http2 import H2Pool, H2Stream

__all__ = ["Forwarder", "reset_for"]

_T = TypeVar("_T")

log = logging.getLogger(__name__)


class Forwarder:
    """Serves tunnel streams from a table of upstreams.

    Args:
        upstreams: the configured routes.
        connect_timeout: seconds to connect to an upstream (then 502).
    """

    def __init__(
        self,
        upstreams: list[Upstream],
        connect_timeout: float = 10.0,
        tcp: list[TcpTarget] = [],  # noqa: B006 (never mutated)
        proxy_protocol: bool = False,
        max_response_head: int = MAX_RESPONSE_HEAD,
        max_response_fields: int = MAX_RESPONSE_FIELDS,
        upstream_ca: Path | None = None,
    ) -> None:
        self.table: RouteTable[Upstream] = RouteTable()
        for up in upstreams:
            self.table.add(up.host, up.path_prefix, up)
        self.tcp = {t.public_port: t for t in tcp}
        self.proxy_protocol = proxy_protocol
        self.connect_timeout = connect_timeout
        self._pool = UpstreamPool(connect_timeout, max_head=max_response_head, max_fields=max_response_fields)
        if upstream_ca is not None:  # one context each: the HTTP/2 pool's offers ALPN h2
            self._pool._tls = ssl.create_default_context(cafile=str(upstream_ca))
        self._upstream_ca = upstream_ca
        self._h2_pool: H2Pool | None = None  # made (and h2 imported) on first use
        self.requests = 0
        self.guard = Guard()
        self.audit: AuditLog | None = None
        self.killswitch: KillSwitch | None = None

    async def start(self) -> None:
        self._pool.start()
        if self.audit is not None:
            self.audit.start()

    async def close(self) -> None:
        await self._pool.close()
        if self._h2_pool is not None:
            await self._h2_pool.close()
        if self.audit is not None:
            await self.audit.close()

    def add_upstream(self, upstream: Upstream) -> None:
        """Serve one more route (ECS discovery adds its routes before the first session)."""
        self.table.add(upstream.host, upstream.path_prefix, upstream)

    @property
    def _h2(self) -> H2Pool:
        """The HTTP/2 upstream pool, made on first use (h2 is not imported before)."""
        if self._h2_pool is None:
            from .http2 import H2Pool

            ca = self._upstream_ca
            self._h2_pool = H2Pool(
                self.connect_timeout, ssl.create_default_context(cafile=str(ca)) if ca is not None else None
            )
        return self._h2_pool

    def remove_upstream(self, upstream: Upstream) -> None:
        """Stop serving one route (daemon mode, after its drain); streams under way keep it."""
        self.table.remove(upstream.host, upstream.path_prefix, upstream)

    def match(self, authority: str, path: str) -> Upstream | None:
        found = self.table.lookup(normalize_host(authority), path)
        return found[0] if found else None

    async def serve(self, stream: TunnelStream, tally: StreamTally) -> None:
        """:meth:`handle`, counting the stream's outcome and duration in ``tally`` (the
        client's metrics). Here, not in the interpreted client.py: one coroutine per stream."""
        kind = KIND_NAMES[stream.head.kind] if stream.head is not None else "unknown"
        started = time.perf_counter()
        try:
            await self.handle(stream)
        finally:
            error = stream.error
            outcome = "ok" if error is None else ("reset" if isinstance(error, StreamReset) else "closed")
            tally.done(kind, outcome, time.perf_counter() - started)

    async def handle(self, stream: TunnelStream) -> None:
        """Serve one stream (runs in its own task; cancelled when the server resets it)."""
        head = stream.head
        assert head is not None
        record = AuditRecord(
            time.time(),
            stream.session_name,
            stream.id,
            KIND_NAMES[head.kind],
            head.method,
            head.authority,
            head.target.partition("?")[0],
            head.client_addr,
        )
        del head  # the stream holds it until the request is sent upstream (_proxy drops it)
        start = time.monotonic()
        try:
            await self._serve(stream, record)
        finally:
            record.duration_ms = (time.monotonic() - start) * 1000
            if record.reset is None and stream.error is not None:  # reset by the server, a pump, or the session
                error = stream.error
                if isinstance(error, StreamReset) and error.code in _CODES:
                    record.reset = ResetCode(error.code).name
                else:
                    record.reset = type(error).__name__
            if self.audit is not None:
                self.audit.write(record)

    async def _serve(self, stream: TunnelStream, record: AuditRecord) -> None:
        head = stream.head
        assert head is not None
        if self.killswitch is not None and self.killswitch.engaged:
            _reset(stream, record, ResetCode.REFUSED, "tunnel withdrawn (kill switch)")
            return
        if self.audit is not None and self.audit.refusing:  # --audit-failure closed: no unaudited stream
            _reset(stream, record, ResetCode.REFUSED, "audit log cannot be written")
            return
        if head.kind is StreamKind.TCP:
            await self._tcp(stream, record)
            return
        try:
            path, query = self.guard.check_request(head)
        except Refused as exc:
            log.warning(
                "session %s stream %d: refused by the guardrails: %s", stream.session_name, stream.id, exc.reason
            )
            _reset(stream, record, exc.code, exc.reason)
            return
        record.path = path
        upstream = self.match(head.authority, path)
        if upstream is None:
            log.warning(
                "session %s stream %d: no upstream for %r", stream.session_name, stream.id, head.authority[:100]
            )
            _reset(stream, record, ResetCode.NO_UPSTREAM, "no upstream for this host")
            return
        record.upstream = upstream.host + ("" if upstream.path_prefix == "/" else upstream.path_prefix)
        try:
            self.guard.check_route(upstream.host, upstream.path_prefix, path)
        except Refused as exc:
            log.warning("session %s stream %d: %s: %s", stream.session_name, stream.id, record.upstream, exc.reason)
            _reset(stream, record, exc.code, exc.reason)
            return
        self.requests += 1
        target = upstream.base_path + path + ("" if query is None else "?" + query)
        if upstream.scheme == "h2c" or upstream.scheme == "https" and head.kind is StreamKind.HTTP:
            try:
                h2 = upstream.scheme == "h2c" or await self._h2.speaks_h2(upstream.address)
            except UpstreamError as exc:
                log.warning("stream %d: upstream %s unreachable: %s", stream.id, upstream.origin, exc.reason)
                _reset(stream, record, *reset_for(exc))
                return
            if h2 and head.kind is StreamKind.HTTP:
                await self._proxy_h2(stream, record, upstream, target)
                return
            if h2:  # RFC 8441 WebSocket over HTTP/2 is not offered
                log.warning("stream %d: WebSocket upgrade to an HTTP/2 upstream %s: 502", stream.id, upstream.origin)
                _reset(stream, record, ResetCode.UPSTREAM_CONNECT, "WebSocket to an HTTP/2 upstream")
                return
        if head.kind is StreamKind.WEBSOCKET:
            await self._websocket(stream, record, upstream, target)
        elif is_grpc(head.headers):
            # gRPC needs HTTP/2 to the upstream (trailers, full duplex): a clear status, not a
            # request an HTTP/1.1 server would misread.
            log.warning("stream %d: gRPC request for HTTP/1.1 upstream %s: UNAVAILABLE", stream.id, upstream.origin)
            message = (
                f"backhaul: upstream {upstream.origin} is HTTP/1.1; gRPC needs an h2c:// or https:// (h2) upstream"
            )
            _reply(stream, record, ResponseHead(200, grpc_status_headers(14, message)), end=True)
        else:
            del head  # dropped once the request is sent (_proxy): nothing here may hold it
            await self._proxy(stream, record, upstream, target)

    async def _connect(
        self, stream: TunnelStream, record: AuditRecord, host: str, port: int, opener: Callable[[], Awaitable[_T]]
    ) -> _T | None:
        """``opener()`` within the connect timeout; None (the stream reset) when it fails."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await opener()
        except (OSError, TimeoutError) as exc:
            log.warning("stream %d: upstream %s:%d unreachable: %s", stream.id, host, port, exc or "timeout")
            _reset(stream, record, *reset_for(UpstreamError(str(exc), connect=True)))
            return None

    async def _tcp(self, stream: TunnelStream, record: AuditRecord) -> None:
        head = stream.head
        assert head is not None
        try:
            target = self.tcp.get(check_tcp_target(head.target))
        except Refused:
            target = None
        if target is None:  # only ever our own configuration decides where to connect
            log.warning(
                "session %s stream %d: no TCP upstream for port %r", stream.session_name, stream.id, head.target[:20]
            )
            _reset(stream, record, ResetCode.NO_UPSTREAM, "no TCP upstream for this port")
            return
        record.upstream = f"tcp:{target.public_port}"
        self.requests += 1
        loop = asyncio.get_running_loop()
        opened = await self._connect(
            stream,
            record,
            target.host,
            target.port,
            lambda: loop.create_connection(Splice, target.host, target.port),
        )
        if opened is None:
            return
        conn = opened[1]  # bytes go between socket and stream in callbacks (shared/aio/splice.py)
        try:
            if self.proxy_protocol:
                try:
                    assert conn.transport is not None
                    conn.transport.write(proxy_v2_header(head.client_addr, head.authority))
                except ValueError:
                    log.warning("stream %d: no PROXY header: unusable addresses", stream.id)
            _reply(stream, record, ResponseHead(200))
            await conn.join(stream)  # done when both ways ended; a reset by the server cancels this task
        finally:
            if stream.error is None and not conn.finished:  # cancelled with the splice under way
                stream.reset(ResetCode.CANCEL, "cancelled")  # (which ends the splice)
            record.bytes_in += conn.to_socket
            record.bytes_out += conn.from_socket
            conn.abort() if stream.error else conn.close()

    async def _websocket(self, stream: TunnelStream, record: AuditRecord, upstream: Upstream, target: str) -> None:
        """Relay a WebSocket upgrade byte for byte: the upstream's own handshake and frames
        reach the caller unchanged (fragments, pings, close codes, extensions)."""
        head = stream.head
        assert head is not None
        scheme, host, port = upstream.address
        conn = await self._connect(
            stream,
            record,
            host,
            port,
            lambda: asyncio.open_connection(host, port, ssl=scheme == "https" or None, limit=1 << 20),
        )
        if conn is None:
            return
        reader, writer = conn
        try:
            lines = [f"{head.method} {target} HTTP/1.1"]  # every part checked by the guard
            headers = _routed(strip_hop_by_hop(head.headers, keep_upgrade=True), head.authority)
            lines += [f"{name}: {value}" for name, value in headers]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            try:
                async with asyncio.timeout(self.connect_timeout * 6):
                    raw = await reader.readuntil(b"\r\n\r\n")
                status, headers = parse_response_head(raw)
            except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
                _reset(stream, record, ResetCode.UPSTREAM_CONNECT, "bad upgrade response")
                return
            upgraded = status == 101
            kept = strip_hop_by_hop(headers, keep_upgrade=upgraded)
            _reply(stream, record, ResponseHead(status, tuple(kept)))
            if not upgraded:  # refused upgrade: relay its body and finish
                length = next((int(v) for k, v in headers if k.lower() == "content-length" and v.isdigit()), None)
                body = await (reader.readexactly(length) if length is not None else reader.read(1 << 20))
                record.bytes_out += len(body)
                await stream.write(body, end=True)
                return
            await pump(stream, _counted(record, stream_endpoint(reader, writer)))
        finally:
            writer.transport.abort() if stream.error else writer.close()

    async def _proxy(self, stream: TunnelStream, record: AuditRecord, upstream: Upstream, target: str) -> None:
        head = stream.head
        assert head is not None
        headers = _routed(strip_hop_by_hop(head.headers), head.authority)
        body: bytes | None = None
        body_stream: AsyncIterator[bytes | memoryview] | None = None
        if not stream.at_eof:
            body = stream.take_complete_body()  # small bodies usually arrive with the head
            if body is None:
                body_stream = _Body(stream, record)
            else:
                record.bytes_in += len(body)
        # a streamed body keeps the caller's Content-Length framing when it has one
        framed = body_stream is not None and any(name.lower() == "content-length" for name, _ in headers)
        pool = self._pool
        conn: UpstreamConnection | None = None
        upload: asyncio.Task[None] | None = None
        method = head.method
        data = request_bytes(method, target, headers, head.authority, body, body_stream is not None, framed)
        replayable = body_stream is None and is_replayable(method, headers)
        # The request is bytes now: its decoded head (2 KiB or so of strings) is not kept for
        # as long as the upstream takes to answer (10,000 long polls: 20 MiB).
        stream.head = None
        del head, headers, body
        sending = send_request(pool, upstream.address, data, method == "HEAD", replayable, body_stream, framed)
        del data  # send_request drops its copy once written (unless it may send it again)
        try:
            conn, upload = await sending
            try:
                _reply(stream, record, ResponseHead(conn.status, tuple(strip_hop_by_hop(conn.headers()))))
            except LocalProtocolError as exc:  # a head the tunnel cannot carry (shared/heads.py)
                log.warning(
                    "stream %d: upstream %s sent a response head the tunnel cannot carry (%s): 502",
                    stream.id,
                    upstream.origin,
                    exc,
                )
                _reset(stream, record, ResetCode.UPSTREAM_RESET, "bad upstream response head")
                return  # finally: the connection is discarded
            while True:
                chunks = await conn.read()
                if not chunks:
                    stream.end()
                    break
                last = len(chunks) - 1
                ended = False
                for i, chunk in enumerate(chunks):
                    record.bytes_out += len(chunk)
                    ended = i == last and conn.drained  # the body's last bytes: END_STREAM rides on them
                    await stream.write(chunk, end=ended)
                if ended:
                    break
            if upload is not None and not upload.done():  # answered before taking the whole body
                upload.cancel()
                pool.discard(conn)
            else:
                pool.release(conn)
            conn = upload = None
        except UpstreamError as exc:  # (before TunnelError: it is one)
            exc.__traceback__ = None  # its frames hold this one (and the stream): no cycle
            if exc.head_too_large:
                why = f"response head too large: {exc.reason} (--max-response-head, --max-response-fields)"
            elif exc.connect:
                why = f"unreachable: {exc.reason}"
            else:
                why = f"failed {'before reply' if exc.before_head else 'mid-body'}: {exc.reason}"
            log.warning("stream %d: upstream %s %s", stream.id, upstream.origin, why)
            _reset(stream, record, *reset_for(exc))
        except TunnelError:
            return  # the server side is gone or reset the stream
        finally:
            if upload is not None:
                upload.cancel()
            if conn is not None:
                pool.discard(conn)

    async def _proxy_h2(self, stream: TunnelStream, record: AuditRecord, upstream: Upstream, target: str) -> None:
        """One request on a multiplexed HTTP/2 upstream connection: trailers both ways, resets
        both ways (a tunnel reset cancels this task, which resets the upstream stream)."""
        from .http2 import UpstreamReset  # loaded with the pool

        head = stream.head
        assert head is not None
        scheme = "http" if upstream.scheme == "h2c" else "https"
        fields = h2_request_fields(head.method, scheme, head.authority, target, head.headers)
        body_now = stream.take_complete_body() if not stream.at_eof else None  # small bodies ride with the head
        no_body = stream.at_eof and not body_now and stream.trailers is None
        up: H2Stream | None = None
        upload: asyncio.Task[None] | None = None
        try:
            conn = await self._h2.connection(upstream.address)
            up = conn.start(fields, end_stream=no_body)
            if not no_body:
                upload = asyncio.get_running_loop().create_task(self._upload_h2(stream, up, record, body_now))
            status, headers = await up.response()
            try:
                _reply(stream, record, ResponseHead(status, tuple(headers)))
            except LocalProtocolError as exc:
                log.warning(
                    "stream %d: upstream %s sent a head the tunnel cannot carry (%s)", stream.id, upstream.origin, exc
                )
                _reset(stream, record, ResetCode.UPSTREAM_RESET, "bad upstream response head")
                return
            while True:
                chunk = await up.read()
                if not chunk:
                    break
                record.bytes_out += len(chunk)
                await stream.write(chunk)
            if up.trailers is not None and stream.carries_trailers:
                stream.send_trailers(tuple(up.trailers))
            else:
                stream.end()
        except UpstreamReset as exc:
            code = from_h2_reset(exc.error_code, stream.carries_trailers)
            log.info(
                "stream %d: upstream %s reset the stream (HTTP/2 error %d)", stream.id, upstream.origin, exc.error_code
            )
            _reset(stream, record, code, exc.reason)
        except UpstreamError as exc:
            exc.__traceback__ = None
            log.warning("stream %d: upstream %s failed: %s", stream.id, upstream.origin, exc.reason)
            _reset(stream, record, *reset_for(exc))
        except TunnelError:
            return
        finally:
            if upload is not None and not upload.done():
                upload.cancel()
            if up is not None:
                up.close()

    async def _upload_h2(self, stream: TunnelStream, up: H2Stream, record: AuditRecord, first: bytes | None) -> None:
        """The request body (then its trailers) from the tunnel to the upstream stream."""
        try:
            if first:
                record.bytes_in += len(first)
                await up.write(first)
            while True:
                chunk = await stream.read()
                if not chunk:
                    break
                record.bytes_in += len(chunk)
                await up.write(chunk)
            up.finish(list(stream.trailers) if stream.trailers else None)
        except (TunnelError, UpstreamError):
            return  # the response side reports it


def h2_request_fields(
    method: str, scheme: str, authority: str, target: str, headers: tuple[tuple[str, str], ...]
) -> list[tuple[bytes, bytes]]:
    """An HTTP/2 request's header block: pseudo-headers from the routed head (never the
    caller's Host), then the fields in order with names lower-cased and the ones HTTP/2 forbids
    left out (``te`` only as ``trailers``, which gRPC servers require)."""
    out = [
        (b":method", method.encode("latin-1")),
        (b":scheme", scheme.encode("latin-1")),
        (b":authority", authority.encode("latin-1")),
        (b":path", target.encode("latin-1")),
    ]
    for name, value in headers:
        lower = name.lower()
        if lower in CONNECTION_SPECIFIC:
            if lower == "te" and value.strip().lower() == "trailers":
                out.append((b"te", b"trailers"))
            continue
        if lower in _UNIQUE:  # different on every request: never into the HPACK dynamic table
            from hpack import NeverIndexedHeaderTuple

            out.append(NeverIndexedHeaderTuple(lower.encode("latin-1"), value.encode("latin-1")))
        else:
            out.append((lower.encode("latin-1"), value.encode("latin-1")))
    return out


#: Request fields the edge makes unique per request.
_UNIQUE = frozenset({"x-request-id"})


class _Body:
    """The caller's request body as it arrives, counted in the audit record (an iterator
    object, not an async generator: nothing to close when the upload stops early, and mypyc
    can compile it)."""

    __slots__ = ("_record", "_stream")

    def __init__(self, stream: TunnelStream, record: AuditRecord) -> None:
        self._stream = stream
        self._record = record

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes | memoryview:
        chunk = await self._stream.read()
        if not chunk:
            raise StopAsyncIteration
        self._record.bytes_in += len(chunk)
        return chunk


_CODES = frozenset(int(code) for code in ResetCode)


def reset_for(error: UpstreamError) -> tuple[ResetCode, str]:
    """The reset code and reason a stream gets for an upstream failure: the one place the
    client maps its errors onto the wire (the exit server then maps codes to statuses,
    exit_server/public.py ``RESET_STATUS``)."""
    if error.connect:
        if error.timeout:
            return ResetCode.UPSTREAM_TIMEOUT, "upstream connect timeout"
        return ResetCode.UPSTREAM_CONNECT, "upstream unreachable"
    if error.head_too_large:
        return ResetCode.UPSTREAM_RESET, "upstream response head too large"
    if error.before_head:
        return ResetCode.UPSTREAM_CONNECT, "upstream failed"
    return ResetCode.UPSTREAM_RESET, "upstream failed"


def _reset(stream: TunnelStream, record: AuditRecord, code: int, reason: str) -> None:
    """Reset a stream and note the code for the audit record (an HTTP/2 code carried through,
    0x100 + code, is noted as ``H2_<code>``)."""
    if record.reset is None:
        record.reset = ResetCode(code).name if code in _CODES else f"H2_{code - ResetCode.H2_BASE}"
    stream.reset(code, reason)


def _reply(stream: TunnelStream, record: AuditRecord, head: ResponseHead, end: bool = False) -> None:
    """Send the response head and note the status for the audit record."""
    record.status = head.status
    stream.send_reply(head, end)


def _counted(record: AuditRecord, endpoint: Endpoint) -> Endpoint:
    """Wrap a pump endpoint to count bytes both ways into the stream's audit record."""

    async def recv() -> bytes:
        data = await endpoint.recv()
        record.bytes_out += len(data)
        return data

    async def send(data: bytes | memoryview) -> None:
        record.bytes_in += len(data)
        await endpoint.send(data)

    return Endpoint(recv, send, endpoint.close_send, endpoint.abort)


def _routed(headers: list[tuple[str, str]], authority: str) -> list[tuple[str, str]]:
    """``headers`` with Host set to the authority the stream was routed on (issue 15 items 1-2:
    never a Host the caller wrote beside another target, never the upstream's own address)."""
    out = [("Host", authority)]
    out.extend(pair for pair in headers if pair[0].lower() != "host")
    return out
