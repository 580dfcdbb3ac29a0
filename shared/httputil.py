"""HTTP proxy rules shared by both sides: hop-by-hop removal (RFC 9110 section 7.6.1) and
the fields the edge owns (written in exit_server/headers.py)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["EDGE_OWNED", "HOP_BY_HOP", "is_grpc", "origin_form_of", "strip_hop_by_hop"]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Request fields the exit server writes itself (issue 15 items 1-3): whatever the caller sent
#: under these names is dropped, and a ``Connection`` header naming them removes nothing.
EDGE_OWNED = frozenset(
    {
        "host",
        "x-request-id",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-forwarded-ssl",
        "front-end-https",
        "x-url-scheme",
        "x-real-ip",
        "forwarded",
        # a relayed request's signed fields (exit_server/peers.py): read by the edge, never forwarded
        "backhaul-relayed",
        "backhaul-peer-auth",
        "backhaul-peer-client",
        "backhaul-peer-proto",
    }
)
_UPGRADE = frozenset({"upgrade", "connection"})
_HOP_BY_HOP_KEEP_UPGRADE = HOP_BY_HOP - _UPGRADE


def strip_hop_by_hop(headers: Iterable[tuple[str, str]], keep_upgrade: bool = False) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers and any header named in ``Connection``.

    Args:
        headers: (name, value) pairs in order; repeated names are kept.
        keep_upgrade: keep ``Connection: upgrade`` and ``Upgrade`` (WebSocket streams).
    """
    drop = _HOP_BY_HOP_KEEP_UPGRADE if keep_upgrade else HOP_BY_HOP
    out: list[tuple[str, str]] = []
    connection: list[str] | None = None
    for pair in headers:  # one pass, one lower() per name; a second only for Connection-named headers
        lower = pair[0].lower()
        if lower == "connection":
            connection = [pair[1]] if connection is None else [*connection, pair[1]]
        if lower not in drop:
            out.append(pair)
    if connection is None:
        return out
    named = {token.strip().lower() for value in connection for token in value.split(",") if token.strip()}
    named -= drop
    named -= EDGE_OWNED  # Connection never removes Host or the forwarding fields (RFC 9110 7.6.1)
    if keep_upgrade:
        named -= _UPGRADE
    if not named:
        return out
    return [pair for pair in out if pair[0].lower() not in named]


def is_grpc(headers: Iterable[tuple[str, str]]) -> bool:
    """True for a gRPC request or response (``content-type: application/grpc[+proto|;...]``)."""
    for name, value in headers:
        if name.lower() == "content-type":
            return value.lower().startswith("application/grpc")
    return False


def origin_form_of(target: str) -> str:
    """A request target as path and query: an absolute-form target (``http://host/x?y``, RFC
    9112 section 3.2.2) is reduced to ``/x?y`` (its fragment dropped, ``/`` for no path); any
    other target is returned as it is."""
    if target.startswith("/") or "://" not in target:
        return target
    rest = target.partition("://")[2].partition("#")[0]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    path = rest[cut:]
    return path if path.startswith("/") else "/" + path
