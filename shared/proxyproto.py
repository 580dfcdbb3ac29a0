"""PROXY protocol version 2 headers (haproxy's proxy-protocol.txt, section 2.2): built, so a
TCP upstream behind the tunnel can learn the public caller's address, and parsed, so the exit
server behind a trusted load balancer (AWS NLB, HAProxy ``send-proxy-v2``) learns it too."""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["MAX_V2_HEADER", "SIGNATURE", "parse_proxy_v2", "proxy_v2_header", "split_hostport"]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21  # version 2, command PROXY
_TCP4 = 0x11
_TCP6 = 0x21
_V2_LOCAL = 0x20  # version 2, command LOCAL (health checks: no address)
#: Largest header accepted: 16 bytes plus addresses and TLVs (NLB adds a few; AWS documents
#: well under 1 KiB). A longer one is refused.
MAX_V2_HEADER = 16 + 2048


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


def parse_proxy_v2(data: bytes) -> tuple[int, str | None] | None:
    """Parse a PROXY v2 header at the start of ``data``.

    Returns:
        None while more bytes are needed; else (bytes consumed, source address or None for a
        LOCAL command or an address family other than TCP over IPv4/IPv6).

    Raises:
        ValueError: ``data`` does not start with a valid v2 header.
    """
    if len(data) < 16:
        if not SIGNATURE.startswith(data[:12]):
            raise ValueError("no PROXY v2 signature")
        return None
    if not data.startswith(SIGNATURE):
        raise ValueError("no PROXY v2 signature")
    command, family, length = struct.unpack_from(">BBH", data, 12)
    if command not in (_V2_PROXY, _V2_LOCAL):
        raise ValueError(f"PROXY v2: unknown version/command 0x{command:02x}")
    if 16 + length > MAX_V2_HEADER:
        raise ValueError("PROXY v2: header too long")
    if len(data) < 16 + length:
        return None
    consumed = 16 + length
    if command == _V2_LOCAL:
        return consumed, None
    if family == _TCP4 and length >= 12:
        return consumed, str(ipaddress.IPv4Address(data[16:20]))
    if family == _TCP6 and length >= 36:
        addr = ipaddress.IPv6Address(data[16:32])
        return consumed, str(addr.ipv4_mapped or addr)
    return consumed, None  # UDP, UNIX or unspecified: no caller address to use
