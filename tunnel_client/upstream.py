"""The local forwarder: turns each tunnel stream into a request to a configured upstream and
streams the answer back. It only ever talks to upstreams in its own configuration: the server
sends a Host and a path, never an address (customer guardrail)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from multidict import CIMultiDict

from shared.aio.connection import TunnelStream
from shared.aio.pump import pump, stream_endpoint
from shared.errors import TunnelError
from shared.frames import ResetCode
from shared.heads import ResponseHead, StreamKind
from shared.httputil import strip_hop_by_hop
from shared.proxyproto import proxy_v2_header
from shared.routing import RouteTable, normalize_host

from .config import TcpTarget, Upstream

__all__ = ["Forwarder"]

log = logging.getLogger(__name__)

_SKIP_AUTO = frozenset({"User-Agent", "Accept-Encoding", "Accept", "Content-Type"})


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
    ) -> None:
        self.table: RouteTable[Upstream] = RouteTable()
        for up in upstreams:
            self.table.add(up.host, up.path_prefix, up)
        self.tcp = {t.public_port: t for t in tcp}
        self.proxy_protocol = proxy_protocol
        self.connect_timeout = connect_timeout
        self._http: aiohttp.ClientSession | None = None
        self.requests = 0

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=60)
        self._http = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout),
            skip_auto_headers=_SKIP_AUTO,
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def match(self, authority: str, path: str) -> Upstream | None:
        found = self.table.lookup(normalize_host(authority), path)
        return found[0] if found else None

    async def handle(self, stream: TunnelStream) -> None:
        """Serve one stream (runs in its own task; cancelled when the server resets it)."""
        head = stream.head
        assert head is not None
        if head.kind is StreamKind.TCP:
            await self._tcp(stream)
            return
        path = head.target.split("?", 1)[0]
        upstream = self.match(head.authority, path)
        if upstream is None:
            log.warning("stream %d: no upstream for %s%s", stream.id, head.authority, path)
            stream.reset(ResetCode.NO_UPSTREAM, "no upstream for this host")
            return
        self.requests += 1
        if head.kind is StreamKind.WEBSOCKET:
            await self._websocket(stream, upstream)
        else:
            await self._proxy(stream, upstream)

    async def _connect(self, stream: TunnelStream, host: str, port: int, tls: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await asyncio.open_connection(host, port, ssl=tls or None, limit=1 << 20)
        except (OSError, TimeoutError) as exc:
            log.warning("stream %d: upstream %s:%d unreachable: %s", stream.id, host, port, exc)
            stream.reset(ResetCode.UPSTREAM_CONNECT, "upstream unreachable")
            return None

    async def _tcp(self, stream: TunnelStream) -> None:
        head = stream.head
        assert head is not None
        target = self.tcp.get(int(head.target)) if head.target.isdigit() else None
        if target is None:  # only ever our own configuration decides where to connect
            stream.reset(ResetCode.NO_UPSTREAM, "no TCP upstream for this port")
            return
        conn = await self._connect(stream, target.host, target.port, False)
        if conn is None:
            return
        reader, writer = conn
        try:
            if self.proxy_protocol:
                try:
                    writer.write(proxy_v2_header(head.client_addr, head.authority))
                except ValueError:
                    log.warning("stream %d: no PROXY header: unusable addresses", stream.id)
            stream.send_reply(ResponseHead(200))
            await pump(stream, stream_endpoint(reader, writer))
        finally:
            writer.transport.abort() if stream.error else writer.close()

    async def _websocket(self, stream: TunnelStream, upstream: Upstream) -> None:
        """Relay a WebSocket upgrade byte for byte: the upstream's own handshake and frames
        reach the caller unchanged (fragments, pings, close codes, extensions)."""
        head = stream.head
        assert head is not None
        host, _, port = upstream.netloc.rpartition(":")
        tls = upstream.scheme == "https"
        if not host:
            host, port = upstream.netloc, ("443" if tls else "80")
        conn = await self._connect(stream, host.strip("[]"), int(port), tls)
        if conn is None:
            return
        reader, writer = conn
        try:
            lines = [f"{head.method} {upstream.base_path}{head.target} HTTP/1.1"]
            lines += [f"{name}: {value}" for name, value in strip_hop_by_hop(head.headers, keep_upgrade=True)]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            try:
                async with asyncio.timeout(self.connect_timeout * 6):
                    raw = await reader.readuntil(b"\r\n\r\n")
                status, headers = _parse_response_head(raw)
            except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
                stream.reset(ResetCode.UPSTREAM_CONNECT, "bad upgrade response")
                return
            upgraded = status == 101
            kept = strip_hop_by_hop(headers, keep_upgrade=upgraded)
            stream.send_reply(ResponseHead(status, tuple(kept)))
            if not upgraded:  # refused upgrade: relay its body and finish
                length = next((int(v) for k, v in headers if k.lower() == "content-length" and v.isdigit()), None)
                body = await (reader.readexactly(length) if length is not None else reader.read(1 << 20))
                await stream.write(body, end=True)
                return
            await pump(stream, stream_endpoint(reader, writer))
        finally:
            writer.transport.abort() if stream.error else writer.close()

    async def _proxy(self, stream: TunnelStream, upstream: Upstream) -> None:
        assert self._http is not None and stream.head is not None
        head = stream.head
        url = upstream.origin + upstream.base_path + head.target
        headers = CIMultiDict(strip_hop_by_hop(head.headers))
        body = None if stream.at_eof else _body(stream)
        replied = False
        try:
            async with self._http.request(
                head.method, url, headers=headers, data=body, allow_redirects=False, compress=False
            ) as resp:
                raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
                stream.send_reply(ResponseHead(resp.status, tuple(strip_hop_by_hop(raw))))
                replied = True
                content = resp.content
                while True:
                    chunk = await content.readany()
                    if not chunk:
                        break
                    await stream.write(chunk)
                stream.end()
        except TunnelError:
            return  # the server side is gone or reset the stream
        except aiohttp.ClientConnectorError as exc:
            log.warning("stream %d: upstream %s refused: %s", stream.id, upstream.origin, exc.os_error)
            stream.reset(ResetCode.UPSTREAM_CONNECT, "upstream unreachable")
        except (TimeoutError, asyncio.TimeoutError):
            stream.reset(ResetCode.UPSTREAM_TIMEOUT, "upstream timeout")
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("stream %d: upstream %s failed %s: %s", stream.id, upstream.origin,
                        "mid-body" if replied else "before reply", type(exc).__name__)
            stream.reset(ResetCode.UPSTREAM_RESET if replied else ResetCode.UPSTREAM_CONNECT, "upstream failed")


def _parse_response_head(raw: bytes) -> tuple[int, list[tuple[str, str]]]:
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise ValueError("not an HTTP/1.1 response")
    headers = []
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError("bad header line")
            headers.append((name.strip(), value.strip()))
    return int(rest[:3]), headers


async def _body(stream: TunnelStream) -> AsyncIterator[bytes]:
    while True:
        chunk = await stream.read()
        if not chunk:
            return
        yield chunk
