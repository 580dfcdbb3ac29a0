"""PROXY protocol version 2 header (haproxy's proxy-protocol.txt, section 2.2), so a TCP
upstream behind the tunnel can learn the public caller's address."""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["SIGNATURE", "proxy_v2_header", "split_hostport"]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21  # version 2, command PROXY
_TCP4 = 0x11
_TCP6 = 0x21


def split_hostport(value: str) -> tuple[str, int]:
    """Split ``1.2.3.4:5``, ``[::1]:5`` or ``::1:5`` style "address:port" strings.

    Raises:
        ValueError: no port, or not an IP address.
    """
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ValueError(f"no port in {value!r}")
    host = host.strip("[]")
    ipaddress.ip_address(host)
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, number


def proxy_v2_header(source: str, destination: str) -> bytes:
    """Build a PROXY v2 header for a TCP connection from ``source`` to ``destination``
    (both "address:port"). Mixed families are sent as IPv6 (IPv4-mapped)."""
    src_host, src_port = split_hostport(source)
    dst_host, dst_port = split_hostport(destination)
    src = ipaddress.ip_address(src_host)
    dst = ipaddress.ip_address(dst_host)
    if src.version == 4 and dst.version == 4:
        body = src.packed + dst.packed + struct.pack(">HH", src_port, dst_port)
        family = _TCP4
    else:
        s6 = src if src.version == 6 else ipaddress.IPv6Address(f"::ffff:{src}")
        d6 = dst if dst.version == 6 else ipaddress.IPv6Address(f"::ffff:{dst}")
        body = s6.packed + d6.packed + struct.pack(">HH", src_port, dst_port)
        family = _TCP6
    return SIGNATURE + struct.pack(">BBH", _V2_PROXY, family, len(body)) + body
