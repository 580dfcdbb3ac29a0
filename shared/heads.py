"""Request and response heads carried by OPEN and REPLY frames (docs/PROTOCOL.md section 4).

Heads are binary, not JSON: they travel once per stream on the hot path. Every string is a
length-prefixed byte string (u16 big-endian length), decoded as ISO-8859-1 like HTTP/1.1 octets::

    OPEN  payload = kind (u8) | count (u16) | count x (len u16 | bytes)
                    fields: method, target, authority, scheme, client address,
                            then header name, header value, ...
    REPLY payload = status (u16) | count (u16) | count x (len u16 | bytes)
                    fields: header name, header value, ...
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "Headers",
    "RequestHead",
    "ResponseHead",
    "StreamKind",
    "decode_request_head",
    "decode_response_head",
    "encode_request_head",
    "encode_response_head",
]

Headers = tuple[tuple[str, str], ...]

_U16 = struct.Struct(">H")
_KIND_COUNT = struct.Struct(">BH")
_STATUS_COUNT = struct.Struct(">HH")
_FIXED_FIELDS = 5
MAX_FIELDS = 1024


class StreamKind(enum.IntEnum):
    """What a stream carries."""

    HTTP = 1
    WEBSOCKET = 2
    TCP = 3


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the exit server tells the client about a new public request or connection.

    For TCP streams ``target`` is the public port and ``method`` is empty.
    """

    kind: StreamKind
    method: str
    target: str
    authority: str
    scheme: str = "https"
    client_addr: str = ""
    headers: Headers = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """The upstream's status and headers, sent back by the client."""

    status: int
    headers: Headers = field(default_factory=tuple)


def _pack_fields(parts: list[bytes], values: list[str]) -> None:
    for value in values:
        raw = value.encode("latin-1")
        if len(raw) > 0xFFFF:
            raise LocalProtocolError("head field longer than 65535 bytes")
        parts.append(_U16.pack(len(raw)))
        parts.append(raw)


def _unpack_fields(payload: memoryview, offset: int, count: int) -> list[str]:
    out: list[str] = []
    end = len(payload)
    for _ in range(count):
        if end - offset < 2:
            raise RemoteProtocolError("truncated head field length")
        (length,) = _U16.unpack_from(payload, offset)
        offset += 2
        if end - offset < length:
            raise RemoteProtocolError("truncated head field")
        out.append(str(payload[offset : offset + length], "latin-1"))
        offset += length
    if offset != end:
        raise RemoteProtocolError("trailing bytes after head")
    return out


def _flatten(headers: Headers) -> list[str]:
    flat: list[str] = []
    for name, value in headers:
        flat.append(name)
        flat.append(value)
    return flat


def _pairs(flat: list[str]) -> Headers:
    return tuple(zip(flat[0::2], flat[1::2], strict=True))


def encode_request_head(head: RequestHead) -> bytes:
    """Encode an OPEN payload.

    Raises:
        LocalProtocolError: a field is over 65535 bytes, too many headers, or not ISO-8859-1.
    """
    values = [head.method, head.target, head.authority, head.scheme, head.client_addr]
    values += _flatten(head.headers)
    if len(values) > MAX_FIELDS:
        raise LocalProtocolError("too many header fields")
    parts = [_KIND_COUNT.pack(head.kind, len(values))]
    try:
        _pack_fields(parts, values)
    except UnicodeEncodeError as exc:
        raise LocalProtocolError("head field is not ISO-8859-1") from exc
    return b"".join(parts)


def decode_request_head(payload: memoryview | bytes) -> RequestHead:
    """Decode an OPEN payload.

    Raises:
        RemoteProtocolError: malformed payload, unknown kind, or an odd header count.
    """
    view = memoryview(payload)
    if len(view) < _KIND_COUNT.size:
        raise RemoteProtocolError("OPEN payload too short")
    kind, count = _KIND_COUNT.unpack_from(view)
    try:
        stream_kind = StreamKind(kind)
    except ValueError:
        raise RemoteProtocolError(f"unknown stream kind {kind}") from None
    if count < _FIXED_FIELDS or (count - _FIXED_FIELDS) % 2 or count > MAX_FIELDS:
        raise RemoteProtocolError(f"bad OPEN field count {count}")
    fields = _unpack_fields(view, _KIND_COUNT.size, count)
    return RequestHead(
        stream_kind, fields[0], fields[1], fields[2], fields[3], fields[4], _pairs(fields[5:])
    )


def encode_response_head(head: ResponseHead) -> bytes:
    """Encode a REPLY payload."""
    if not 100 <= head.status <= 999:
        raise LocalProtocolError(f"status {head.status} out of range")
    values = _flatten(head.headers)
    if len(values) > MAX_FIELDS:
        raise LocalProtocolError("too many header fields")
    parts = [_STATUS_COUNT.pack(head.status, len(values))]
    try:
        _pack_fields(parts, values)
    except UnicodeEncodeError as exc:
        raise LocalProtocolError("head field is not ISO-8859-1") from exc
    return b"".join(parts)


def decode_response_head(payload: memoryview | bytes) -> ResponseHead:
    """Decode a REPLY payload.

    Raises:
        RemoteProtocolError: malformed payload, status out of range, or an odd header count.
    """
    view = memoryview(payload)
    if len(view) < _STATUS_COUNT.size:
        raise RemoteProtocolError("REPLY payload too short")
    status, count = _STATUS_COUNT.unpack_from(view)
    if not 100 <= status <= 999:
        raise RemoteProtocolError(f"status {status} out of range")
    if count % 2 or count > MAX_FIELDS:
        raise RemoteProtocolError(f"bad REPLY field count {count}")
    return ResponseHead(status, _pairs(_unpack_fields(view, _STATUS_COUNT.size, count)))
