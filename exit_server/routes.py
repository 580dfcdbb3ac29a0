"""The live tunnel registry: which session serves which host (pure bookkeeping, no I/O).

Routes belong to live sessions only (LESSONS 3): a session's routes vanish with it, a client
instance that reconnects replaces its old session at once, and a hostname registered by one
client id can never be taken by another.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared.messages import RouteRefusal, RouteSpec, TcpSpec
from shared.routing import RouteTable

if TYPE_CHECKING:  # for the types only: this module stays pure bookkeeping
    from shared.aio.connection import TunnelConnection

    from .tokens import Principal

__all__ = ["Registry", "Tunnel"]


@dataclass(eq=False, slots=True)  # one per connected session: no instance dict
class Tunnel:
    """One connected client session as the exit server sees it."""

    id: str
    client_id: str
    instance_id: str
    remote: str
    conn: TunnelConnection
    labels: dict[str, str] = field(default_factory=dict)
    routes: list[RouteSpec] = field(default_factory=list)
    tcp_ports: list[int] = field(default_factory=list)
    connected_at: float = field(default_factory=time.time)
    routable: bool = True
    requests: int = 0
    policy: Principal | None = None  # what the client may register (None: anything)

    @property
    def in_flight(self) -> int:
        return self.conn.streams_in_flight


class Registry:
    """Sessions by id and by client instance, and the route table over them."""

    def __init__(self, tcp_ports: range = range(0), max_routes_per_client: int = 1000) -> None:
        self.max_routes_per_client = max_routes_per_client
        self.table: RouteTable[Tunnel] = RouteTable()
        self.tunnels: dict[str, Tunnel] = {}
        self.tcp: dict[int, list[Tunnel]] = {}
        self.tcp_allowed = tcp_ports
        self._instances: dict[tuple[str, str], Tunnel] = {}

    def add(
        self,
        tunnel: Tunnel,
        wanted: list[RouteSpec],
        ports: list[TcpSpec] = [],  # noqa: B006 (never mutated)
        bind: Callable[[int], str | None] = lambda port: None,
    ) -> tuple[list[RouteSpec], list[TcpSpec], list[RouteRefusal], Tunnel | None]:
        """Register a session, the routes and the public TCP ports it may serve.

        Args:
            bind: called for a port that has no listener yet; returns an error text when the
                port cannot be opened.

        Returns:
            (granted routes, granted ports, refusals, the session this one replaces or None)
        """
        replaced = self._instances.get((tunnel.client_id, tunnel.instance_id))
        if replaced is not None:
            self.remove(replaced)
        granted, refused = self._grantable(tunnel, wanted)
        tunnel.routes = granted
        granted_ports: list[TcpSpec] = []
        for spec in ports:
            reason = self._port_refusal(tunnel.client_id, spec.port, bind, tunnel.policy)
            if reason:
                refused.append(RouteRefusal(route=f"tcp:{spec.port}", reason=reason))
            else:
                granted_ports.append(spec)
                tunnel.tcp_ports.append(spec.port)
                self.tcp.setdefault(spec.port, []).append(tunnel)
        self.tunnels[tunnel.id] = tunnel
        self._instances[(tunnel.client_id, tunnel.instance_id)] = tunnel
        for route in granted:
            self.table.add(route.host, route.path_prefix, tunnel)
        return granted, granted_ports, refused, replaced

    def _port_refusal(
        self, client_id: str, port: int, bind: Callable[[int], str | None], policy: Principal | None = None
    ) -> str | None:
        if policy is not None and (reason := policy.port_refusal(port)):
            return str(reason)
        if port not in self.tcp_allowed:
            return "port outside the server's --tcp-port-range" if self.tcp_allowed else "TCP tunnels are off"
        holders = self.tcp.get(port)
        if holders:
            if any(h.client_id != client_id for h in holders):
                return "port is served by another client"
            return None
        return bind(port)

    def _grantable(self, tunnel: Tunnel, wanted: list[RouteSpec]) -> tuple[list[RouteSpec], list[RouteRefusal]]:
        client_id, policy = tunnel.client_id, tunnel.policy
        granted: list[RouteSpec] = []
        refused: list[RouteRefusal] = []
        # Distinct routes the client id serves on its other sessions: a tenant granted
        # *.x.test cannot register names without end (issue 15 item 8).
        held = {
            (r.host, r.path_prefix)
            for t in self.tunnels.values()
            if t.client_id == client_id and t is not tunnel
            for r in t.routes
        }
        for route in wanted:
            if (route.host, route.path_prefix) not in held and len(held) >= self.max_routes_per_client:
                refused.append(
                    RouteRefusal(
                        route=f"{route.host}{route.path_prefix}",
                        reason=f"client serves {len(held)} routes already (--max-routes-per-client)",
                    )
                )
                continue
            # A hostname belongs to the client id holding it under any path prefix: another
            # tenant can take neither the host nor a path below it.
            holders = self.table.host_holders(route.host)
            if policy is not None and (reason := policy.route_refusal(route.host)):
                refused.append(RouteRefusal(route=f"{route.host}{route.path_prefix}", reason=str(reason)))
            elif any(h.client_id != client_id for h in holders):
                refused.append(
                    RouteRefusal(
                        route=f"{route.host}{route.path_prefix}", reason="hostname is served by another client"
                    )
                )
            elif route not in granted:
                granted.append(route)
                held.add((route.host, route.path_prefix))
        return granted, refused

    def set_routes(self, tunnel: Tunnel, wanted: list[RouteSpec]) -> list[RouteRefusal]:
        """Replace a session's routes (health changes on the client)."""
        self._unroute(tunnel)
        granted, refused = self._grantable(tunnel, wanted)
        tunnel.routes = granted
        if tunnel.routable:
            for route in granted:
                self.table.add(route.host, route.path_prefix, tunnel)
        return refused

    def withdraw(self, tunnel: Tunnel) -> None:
        """Stop routing new requests to a draining session (it stays listed until closed)."""
        if tunnel.routable:
            tunnel.routable = False
            self._unroute(tunnel)

    def _unroute(self, tunnel: Tunnel) -> None:
        for route in tunnel.routes:
            self.table.remove(route.host, route.path_prefix, tunnel)

    def remove(self, tunnel: Tunnel) -> list[int]:
        """Forget a session and its routes (idempotent). Returns the TCP ports nobody serves
        any more (their listeners should close)."""
        self._unroute(tunnel)
        orphaned: list[int] = []
        for port in tunnel.tcp_ports:
            holders = self.tcp.get(port, [])
            if tunnel in holders:
                holders.remove(tunnel)
            if not holders and port in self.tcp:
                del self.tcp[port]
                orphaned.append(port)
        tunnel.tcp_ports = []
        tunnel.routable = False
        if self.tunnels.get(tunnel.id) is tunnel:
            del self.tunnels[tunnel.id]
        key = (tunnel.client_id, tunnel.instance_id)
        if self._instances.get(key) is tunnel:
            del self._instances[key]
        return orphaned

    def pick_tcp(self, port: int) -> Tunnel | None:
        """The routable session serving a public TCP port with the fewest streams in flight."""
        return _least_loaded(self.tcp.get(port, ()), None)

    def pick(self, host: str, path: str, exclude: Tunnel | None = None) -> Tunnel | None:
        """The routable session for (host, path) with the fewest streams in flight."""
        return self.pick_route(host, path, exclude)[1]

    def pick_route(self, host: str, path: str, exclude: Tunnel | None = None) -> tuple[str, Tunnel | None]:
        """Like :meth:`pick`, also naming the matched host pattern (a bounded metric label)."""
        pattern, candidates = self.table.match(host, path)
        return pattern, _least_loaded(candidates, exclude)


def _least_loaded(candidates: Iterable[Tunnel], exclude: Tunnel | None) -> Tunnel | None:
    best: Tunnel | None = None
    for tunnel in candidates:
        if tunnel is exclude or not tunnel.routable or not tunnel.conn.session.accepting_streams:
            continue
        if best is None or tunnel.in_flight < best.in_flight:
            best = tunnel
    return best
