"""The names a TLS ClientHello asks for, read from its first bytes (sans-I/O).

The public TLS port routes a connection before any handshake: by SNI name (RFC 6066 section 3)
to the public listener or the control endpoint, and refuses an unknown name with the
``unrecognized_name`` alert. The bytes are only peeked: the TLS stack reads them again.

RFC 8446 section 4.1.2 (the ClientHello), section 5.1 (records; a handshake message may span
several), RFC 7301 (ALPN).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["MAX_HELLO", "ClientHello", "alert", "parse_client_hello"]

#: The most bytes read while waiting for a complete ClientHello (post-quantum key shares make
#: them about 1.8 KB; anything past 16 KiB is refused).
MAX_HELLO = 16 * 1024

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_ALPN = 16
_RECORD = struct.Struct("!BHH")
_U16 = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None  # lower case, no trailing dot; None without SNI
    alpn: tuple[str, ...]  # the protocols offered, in the client's order


def alert(description: int) -> bytes:
    """A fatal TLS alert record (legacy record version TLS 1.0, as before a handshake)."""
    return bytes((21, 3, 1, 0, 2, 2, description))


def parse_client_hello(data: bytes) -> ClientHello | None:
    """The ClientHello at the start of ``data``; None while more bytes are needed.

    Raises:
        ValueError: not a TLS handshake, not a ClientHello, malformed, or over ``MAX_HELLO``.
    """
    message = bytearray()
    pos = 0
    need: int | None = None
    while need is None or len(message) < need:
        if len(data) - pos < _RECORD.size:
            break
        kind, version, length = _RECORD.unpack_from(data, pos)
        if kind != _HANDSHAKE or version >> 8 != 3:
            raise ValueError("not a TLS handshake record")
        if length == 0 or length > MAX_HELLO:
            raise ValueError("bad record length")
        if len(data) - pos - _RECORD.size < length:
            break
        message += data[pos + _RECORD.size : pos + _RECORD.size + length]
        pos += _RECORD.size + length
        if need is None and len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                raise ValueError("the first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(message[1:4], "big")
            if need > MAX_HELLO:
                raise ValueError("ClientHello too large")
    if need is None or len(message) < need:
        if len(data) > 2 * MAX_HELLO:  # tiny records: still bounded
            raise ValueError("ClientHello too large")
        return None
    return _parse_body(bytes(message[4:need]))


def _parse_body(body: bytes) -> ClientHello:
    try:
        pos = 2 + 32  # legacy_version, random
        pos += 1 + body[pos]  # legacy_session_id
        pos += 2 + _U16.unpack_from(body, pos)[0]  # cipher_suites
        pos += 1 + body[pos]  # legacy_compression_methods
        if pos == len(body):
            return ClientHello(None, ())  # no extensions at all
        end = pos + 2 + _U16.unpack_from(body, pos)[0]
        if end > len(body):
            raise ValueError("extensions past the end of the ClientHello")
        pos += 2
        name: str | None = None
        alpn: tuple[str, ...] = ()
        while pos + 4 <= end:
            ext_type, ext_len = struct.unpack_from("!HH", body, pos)
            pos += 4
            ext = body[pos : pos + ext_len]
            if len(ext) != ext_len or pos + ext_len > end:
                raise ValueError("extension past the end")
            pos += ext_len
            if ext_type == _SERVER_NAME:
                name = _server_name(ext)
            elif ext_type == _ALPN:
                alpn = _protocols(ext)
        return ClientHello(name, alpn)
    except (IndexError, struct.error):
        raise ValueError("truncated ClientHello") from None


def _server_name(ext: bytes) -> str | None:
    """The host_name entry of a server_name extension (RFC 6066 section 3)."""
    (total,) = _U16.unpack_from(ext, 0)
    pos, end = 2, min(2 + total, len(ext))
    while pos + 3 <= end:
        kind = ext[pos]
        (length,) = _U16.unpack_from(ext, pos + 1)
        value = ext[pos + 3 : pos + 3 + length]
        pos += 3 + length
        if kind == 0:
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError:
                raise ValueError("server name is not ASCII") from None
            if not text or any(c in text for c in "\x00/\\ ") or len(text) > 253:
                raise ValueError("bad server name")
            return text.lower().rstrip(".")
    return None


def _protocols(ext: bytes) -> tuple[str, ...]:
    (total,) = _U16.unpack_from(ext, 0)
    pos, end = 2, min(2 + total, len(ext))
    out = []
    while pos < end:
        length = ext[pos]
        out.append(ext[pos + 1 : pos + 1 + length].decode("latin-1"))
        pos += 1 + length
    return tuple(out)
