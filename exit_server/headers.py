"""The headers the exit server writes: what an upstream receives (the edge owns Host,
X-Forwarded-*, Forwarded and X-Real-IP) and what a caller receives (hop-by-hop fields gone).
Pure functions over the request's raw header pairs; one implementation each, on the hot path."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from shared.forwarding import TrustedProxies, forwarded_element
from shared.httputil import EDGE_OWNED, HOP_BY_HOP, origin_form_of, strip_hop_by_hop

if TYPE_CHECKING:
    from .h1 import Request

__all__ = [
    "Edge",
    "append_forwarded",
    "has_token",
    "is_websocket",
    "origin_form",
    "reply_headers",
    "routed_authority",
    "upstream_headers",
]

RawHeaders = tuple[tuple[bytes, bytes], ...]

# Request header names (lower case) the fused pass of _upstream_headers acts on: dropped (hop by
# hop, Expect, and every field the edge writes itself), the caller's X-Forwarded-For (extended)
# and X-Forwarded-Proto (believed from a trusted proxy only).
_DROP, _CONNECTION, _XFF, _XF_PROTO = range(4)
_REQUEST_NAMES: dict[str, int | None] = {name: _DROP for name in HOP_BY_HOP | EDGE_OWNED | {"expect"}}
_REQUEST_NAMES.update({"connection": _CONNECTION, "x-forwarded-for": _XFF, "x-forwarded-proto": _XF_PROTO})
_WEBSOCKET_NAMES = dict(_REQUEST_NAMES, upgrade=None)  # Connection and Upgrade pass for a WebSocket
_UPGRADE_NAMES = frozenset({"connection", "upgrade"})


class Edge:
    """What the exit server decided about a request: the fields it writes for the upstream.
    (A plain slotted class: a NamedTuple is built by an interpreted ``__new__``, 0.25 us per
    request in the compiled build.)"""

    __slots__ = ("rid", "peer", "proto", "host", "trusted")

    def __init__(self, rid: str, peer: str, proto: str, host: str, trusted: TrustedProxies | None = None) -> None:
        self.rid = rid  # X-Request-Id
        self.peer = peer  # the address the request came from (a PROXY header's source when trusted)
        self.proto = proto  # the caller's scheme: https on the public TLS listener, else --public-scheme
        self.host = host  # the authority the request was routed and checked on
        self.trusted = trusted  # set when ``peer`` is a trusted proxy


def upstream_headers(raw: RawHeaders, edge: Edge, websocket: bool) -> tuple[tuple[str, str], ...]:
    """The request headers as the upstream gets them, in one pass over the raw ones: hop-by-hop
    headers, Expect, names with ``_``, every field the edge owns and every field a Connection
    header names (RFC 9110 section 7.6.1; never an edge-owned one) dropped, then the edge's own
    Host, X-Request-Id and forwarding fields added."""
    names = _WEBSOCKET_NAMES if websocket else _REQUEST_NAMES
    out: list[tuple[str, str]] = []
    chain: list[str] = []
    proto: list[str] = []
    connection: list[str] | None = None
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1")
        role = names.get(name.lower())
        if role is None:
            if "_" not in name:  # X_Forwarded_For may mean X-Forwarded-For to a CGI-style upstream
                out.append((name, raw_value.decode("latin-1")))
        elif role == _DROP:
            continue
        elif role == _CONNECTION:  # dropped unless websocket, where it passes
            value = raw_value.decode("latin-1")
            connection = [value] if connection is None else [*connection, value]
            if websocket:
                out.append((name, value))
        elif role == _XFF:
            chain.append(raw_value.decode("latin-1").strip())
        else:
            proto.append(raw_value.decode("latin-1"))
    if connection is not None:
        named = _connection_named(connection, websocket)
        if named:  # rare: a second pass over what was kept
            out = [pair for pair in out if pair[0].lower() not in named]
    return _edge_fields(out, chain, proto, edge)


def _edge_fields(
    out: list[tuple[str, str]], chain: list[str], caller_proto: list[str], edge: Edge
) -> tuple[tuple[str, str], ...]:
    """``out`` with the edge's fields: Host first, then X-Request-Id, X-Forwarded-For (the
    caller's chain extended with the peer), X-Forwarded-Proto, -Host, X-Real-IP and Forwarded."""
    client, proto = edge.peer, edge.proto
    if edge.trusted is not None:  # a load balancer in front: believe what it wrote
        client = edge.trusted.client_of(chain, edge.peer)
        said = caller_proto[-1].split(",")[-1].strip().lower() if caller_proto else ""
        if said in ("http", "https"):
            proto = said
    out.insert(0, ("Host", edge.host))
    out.append(("X-Request-Id", edge.rid))
    append_forwarded(out, chain, edge.peer, proto, edge.host)
    out.append(("X-Real-IP", client))
    out.append(("Forwarded", forwarded_element(client, edge.host, proto)))
    return tuple(out)


def _connection_named(values: list[str], websocket: bool) -> set[str]:
    """The further fields ``Connection`` values name: not the ones dropped anyway, never an
    edge-owned one, and on a WebSocket stream never Connection or Upgrade themselves."""
    named: set[str] = set()
    for value in values:
        for token in value.split(","):
            token = token.strip().lower()
            if not token or (token in _UPGRADE_NAMES if websocket else token in HOP_BY_HOP):
                continue
            if token not in EDGE_OWNED and "_" not in token:
                named.add(token)
    return named


def reply_headers(headers: tuple[tuple[str, str], ...]) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None]:
    """The reply headers for the caller (hop-by-hop ones dropped), and the same without
    Content-Length when there was one (None otherwise)."""
    kept: list[tuple[str, str]] = []
    unsized: list[tuple[str, str]] = []
    sized = False
    for pair in headers:
        lower = pair[0].lower()
        if lower in HOP_BY_HOP:
            if lower == "connection":  # it may name more headers to drop: the general path
                kept = strip_hop_by_hop(headers)
                unsized = [p for p in kept if p[0].lower() != "content-length"]
                return kept, unsized if len(unsized) != len(kept) else None
            continue
        kept.append(pair)
        if lower == "content-length":
            sized = True
        else:
            unsized.append(pair)
    return kept, unsized if sized else None


def append_forwarded(
    out: list[tuple[str, str]], chain: list[str], client_addr: str, proto: str | None, host: str | None
) -> None:
    """Append X-Forwarded-For (``chain``, the caller's values, plus ``client_addr``), then
    X-Forwarded-Proto and -Host unless None or empty."""
    chain.append(client_addr)
    out.append(("X-Forwarded-For", ", ".join(c for c in chain if c)))
    if proto is not None:
        out.append(("X-Forwarded-Proto", proto))
    if host:
        out.append(("X-Forwarded-Host", host))


def origin_form(request: Request) -> str:
    """The request target as path and query: an absolute-form target (``GET http://host/x``,
    RFC 9112 section 3.2.2) is reduced to its path, as the client accepts origin-form only."""
    return origin_form_of(request.raw_path)


def routed_authority(request: Request) -> str:
    """The authority a request is routed, checked, logged and forwarded on: an absolute-form
    target's (RFC 9112 section 3.2.2: the recipient ignores Host then), else the Host header."""
    target = request.raw_path
    if not target.startswith("/") and "://" in target:
        authority = target.partition("://")[2]
        for stop in "/?#":
            authority = authority.partition(stop)[0]
        authority = authority.rpartition("@")[2]  # userinfo is not part of the host
        if authority:
            return authority
    return request.headers.get("Host", "")


def is_websocket(request: Request) -> bool:
    if request.method != "GET" or request.headers.get("Upgrade", "").strip().lower() != "websocket":
        return False
    return has_token(request.headers.getall("Connection", ()), "upgrade")


def has_token(values: Iterable[str], token: str) -> bool:
    """Whether comma-separated header ``values`` hold ``token`` (case-insensitive, RFC 9110 5.6.1)."""
    return any(part.strip().lower() == token for value in values for part in value.split(","))
