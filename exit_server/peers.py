"""Relaying to a peer instead of answering 503 (``--state`` with ``--peer-url``): when this exit
server has no session for a request's hostname but another server of the fleet has, the request
is sent once to that server's public listener, signed, and answered from there.

* **Directory** (in Redis, never in the request path): every server writes
  ``backhaul:peer:{server id}`` = its ``--peer-url`` and the route patterns it serves, with a
  TTL, every second; every server reads all entries every second into an in-memory route table,
  which the request path consults.
* **Authentication**: a fleet key (``backhaul:peer-key``, 32 random bytes made by the first
  server) signs each relayed request: ``Backhaul-Peer-Auth: TIME:HMAC-SHA256(key, TIME | relaying
  server | method | target | authority | caller | scheme)``, checked within 30 s. Only a signed
  request's ``Backhaul-Peer-Client`` (the caller's address) and ``Backhaul-Peer-Proto`` are
  believed; an unsigned or badly signed one with these headers gets 403.
* **Once**: a relayed request (``Backhaul-Relayed``) is never relayed again (no loops).

Peers should reach each other over a private network: the signature makes a relayed request
authentic, not secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.routing import RouteTable

from .routes import Registry
from .state import PREFIX, connect, redact

__all__ = ["AUTH", "CLIENT", "PROTO", "RELAYED", "PeerDirectory", "sign", "verify"]

log = logging.getLogger(__name__)

RELAYED = "Backhaul-Relayed"
AUTH = "Backhaul-Peer-Auth"
CLIENT = "Backhaul-Peer-Client"
PROTO = "Backhaul-Peer-Proto"
KEY = PREFIX + "peer-key"
ENTRY = PREFIX + "peer:"
MAX_SKEW = 30.0


def _mac(key: bytes, when: int, *parts: str) -> str:
    message = "\n".join((str(when), *parts)).encode("utf-8", "surrogateescape")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(key: bytes, server_id: str, method: str, target: str, authority: str, client: str, proto: str) -> str:
    when = int(time.time())
    return f"{when}:{_mac(key, when, server_id, method, target, authority, client, proto)}"


def verify(
    key: bytes | None,
    value: str,
    server_id: str,
    method: str,
    target: str,
    authority: str,
    client: str,
    proto: str,
    now: float | None = None,
) -> bool:
    """A relayed request's signature is the fleet's and fresh."""
    if key is None:
        return False
    when, _, mac = value.partition(":")
    if not when.isdigit() or abs((now if now is not None else time.time()) - int(when)) > MAX_SKEW:
        return False
    expected = _mac(key, int(when), server_id, method, target, authority, client, proto)
    return hmac.compare_digest(expected, mac)


#: The relay's own fields (lower case, as HTTP/2 names them; HTTP/1.1 compares without case).
FIELDS = frozenset(name.lower() for name in (RELAYED, AUTH, CLIENT, PROTO))


def split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a ``--peer-url``."""
    scheme, _, rest = url.partition("://")
    host, _, port = rest.rstrip("/").partition(":")
    return scheme, host, int(port or (443 if scheme == "https" else 80))


class PeerDirectory:
    """This server's view of which peers serve which hostnames, refreshed from Redis."""

    def __init__(
        self,
        url: str,
        password: str | None,
        server_id: str,
        peer_url: str | None,
        registry: Registry,
        ca_file: Path | None = None,
    ) -> None:
        self.url = url
        self.ca_file = ca_file
        self.password = password
        self.server_id = server_id
        self.peer_url = peer_url.rstrip("/") if peer_url else None
        self.registry = registry
        self.interval = 1.0
        self.ttl = 10.0
        self.key: bytes | None = None
        self._table: RouteTable[str] = RouteTable()
        self._client: Any = None
        self.relayed: dict[str, int] = {}  # result -> requests relayed by this server

    def relay_fields(
        self, method: str, target: str, authority: str, client: str, scheme: str, request_id: str
    ) -> list[tuple[str, str]]:
        """The fields a request relayed from this server carries: its request id (one id in
        both servers' logs) and the signed relay fields."""
        assert self.key is not None
        signature = sign(self.key, self.server_id, method, target, authority, client, scheme)
        return [
            ("x-request-id", request_id),
            (RELAYED.lower(), self.server_id),
            (CLIENT.lower(), client),
            (PROTO.lower(), scheme),
            (AUTH.lower(), signature),
        ]

    def verified(
        self, field: Callable[[str], str], method: str, target: str, authority: str
    ) -> tuple[str, str, str] | None:
        """(relaying server, caller, scheme) of a correctly signed relayed request, whose
        fields ``field`` looks up by lower-case name (empty when absent); None otherwise."""
        relayed_by, client, proto = field(RELAYED.lower()), field(CLIENT.lower()), field(PROTO.lower())
        if relayed_by and proto in ("http", "https"):
            if verify(self.key, field(AUTH.lower()), relayed_by, method, target, authority, client, proto):
                return relayed_by, client, proto
        return None

    def peer_for(self, host: str, path: str) -> str | None:
        """A peer URL serving (host, path), or None (from memory)."""
        found = self._table.lookup(host, path)
        return found[0] if found else None

    def _own_routes(self) -> list[str]:
        out: set[str] = set()
        for tunnel in self.registry.tunnels.values():
            if tunnel.routable:
                out.update(f"{r.host}\t{r.path_prefix}" for r in tunnel.routes)
        return sorted(out)

    async def tick(self) -> None:
        """Publish our routes, read everyone's (one round trip each way)."""
        if self._client is None:
            self._client = connect(self.url, self.password, self.ca_file, aio=True, read_timeout=3, connect_timeout=3)
        client = self._client
        if self.key is None:
            await client.set(KEY, secrets.token_bytes(32), nx=True)
            self.key = await client.get(KEY)
        if self.peer_url is not None:
            entry = json.dumps({"url": self.peer_url, "routes": self._own_routes()})
            await client.set(ENTRY + self.server_id, entry, ex=int(self.ttl))
        table: RouteTable[str] = RouteTable()
        async for name in client.scan_iter(match=ENTRY + "*", count=200):
            peer = name.decode()[len(ENTRY) :]
            if peer == self.server_id:
                continue
            raw = await client.get(name)
            if raw is None:
                continue
            try:
                entry_data = json.loads(raw)
                for route in entry_data["routes"]:
                    host, _, prefix = str(route).partition("\t")
                    table.add(host, prefix or "/", str(entry_data["url"]))
            except (ValueError, KeyError, TypeError):
                continue
        self._table = table

    async def run(self, stop: asyncio.Event) -> None:
        import redis

        failing = False
        while not stop.is_set():
            try:
                await self.tick()
                if failing:
                    log.info("peers: directory %s reachable again", redact(self.url))
                failing = False
            except (redis.RedisError, OSError) as exc:
                if not failing:
                    log.warning(
                        "peers: directory %s unreachable (%s): relaying with the last view", redact(self.url), exc
                    )
                failing = True
            try:
                async with asyncio.timeout(self.interval):
                    await stop.wait()
            except TimeoutError:
                pass
        if self._client is not None and self.peer_url is not None:
            try:
                await self._client.delete(ENTRY + self.server_id)  # leave the directory at once
            except (redis.RedisError, OSError):
                pass

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._client.aclose()
            except Exception:  # noqa: BLE001
                pass
            self._client = None


class RelayCollector:
    """``backhaul_relayed_requests_total{result}``: requests this server relayed to a peer."""

    def __init__(self, directory: PeerDirectory) -> None:
        self.directory = directory

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "backhaul_relayed_requests",
            "Requests relayed to a peer that has a session for their host",
            labels=["result"],
        )
        for result, n in sorted(self.directory.relayed.items()):
            family.add_metric([result], n)
        yield family
