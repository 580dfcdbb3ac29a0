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
from shared.errors import TunnelError
from shared.frames import ResetCode
from shared.heads import ResponseHead, StreamKind
from shared.httputil import strip_hop_by_hop
from shared.routing import RouteTable, normalize_host

from .config import Upstream

__all__ = ["Forwarder"]

log = logging.getLogger(__name__)

_SKIP_AUTO = frozenset({"User-Agent", "Accept-Encoding", "Accept", "Content-Type"})


class Forwarder:
    """Serves tunnel streams from a table of upstreams.

    Args:
        upstreams: the configured routes.
        connect_timeout: seconds to connect to an upstream (then 502).
    """

    def __init__(self, upstreams: list[Upstream], connect_timeout: float = 10.0) -> None:
        self.table: RouteTable[Upstream] = RouteTable()
        for up in upstreams:
            self.table.add(up.host, up.path_prefix, up)
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
        if head.kind is not StreamKind.HTTP:
            stream.reset(ResetCode.REFUSED, "stream kind not supported")
            return
        path = head.target.split("?", 1)[0]
        upstream = self.match(head.authority, path)
        if upstream is None:
            log.warning("stream %d: no upstream for %s%s", stream.id, head.authority, path)
            stream.reset(ResetCode.NO_UPSTREAM, "no upstream for this host")
            return
        self.requests += 1
        await self._proxy(stream, upstream)

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


async def _body(stream: TunnelStream) -> AsyncIterator[bytes]:
    while True:
        chunk = await stream.read()
        if not chunk:
            return
        yield chunk
