"""Who the caller is, as the edge decides it (RFC 7239, the X-Forwarded-* practice).

The exit server owns the forwarding headers an upstream sees: ``X-Forwarded-Proto``,
``X-Forwarded-Host``, ``Forwarded`` and ``X-Real-IP`` are always its own, never the caller's.
Only a peer inside ``--trusted-proxies`` (a load balancer in front of the exit server) is
believed about the caller: its ``X-Forwarded-For`` chain is walked from the right, skipping
trusted addresses, to the first address it did not vouch for (nginx's ``real_ip_recursive``),
and its ``X-Forwarded-Proto`` gives the scheme. Pure functions; no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["TrustedProxies", "forwarded_element", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or single addresses) as networks.

    Raises:
        ValueError: a value is not an address or network (the message quotes it).
    """
    out: list[Network] = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address or CIDR: {value.strip()[:60]!r}") from None
    return tuple(out)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6] or [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedProxies:
    """The networks whose forwarding headers (and PROXY protocol headers) are believed."""

    def __init__(self, networks: Sequence[Network]) -> None:
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def contains(self, address: str) -> bool:
        addr = _address(address)
        return addr is not None and any(addr in net for net in self.networks)

    def client_of(self, chain: Sequence[str], peer: str) -> str:
        """The caller's address behind the trusted ``peer``: the rightmost X-Forwarded-For entry
        that is not itself trusted (all trusted: the leftmost; none parseable: the peer).

        Args:
            chain: the X-Forwarded-For header values, in order.
            peer: the address the connection came from (already known to be trusted).
        """
        entries = [entry.strip() for value in chain for entry in value.split(",") if entry.strip()]
        last_valid = peer
        for entry in reversed(entries):
            addr = _address(entry)
            if addr is None:
                return last_valid  # garbage: stop at what a trusted hop vouched for
            last_valid = str(addr)
            if not any(addr in net for net in self.networks):
                return last_valid
        return last_valid


@functools.lru_cache(maxsize=4096)
def _node(client: str) -> str:
    """The ``for=`` node of an address, remembered: every request carries one, and most come
    from addresses seen a moment ago (parsing one is about 2 % of the exit server's CPU)."""
    addr = _address(client)
    if addr is None:
        return "unknown"
    if isinstance(addr, ipaddress.IPv6Address):
        return f'"[{addr}]"'
    return str(addr)


def forwarded_element(client: str, host: str, proto: str) -> str:
    """One RFC 7239 ``Forwarded`` element: ``for=...;host="...";proto=...`` (IPv6 and anything
    that is not a token quoted; an unknown client is ``for=unknown``)."""
    parts = [f"for={_node(client)}"]
    if host:
        parts.append('host="' + host.replace("\\", "\\\\").replace('"', '\\"') + '"')
    parts.append(f"proto={proto}")
    return ";".join(parts)
