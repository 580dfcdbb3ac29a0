"""Request and response heads carried by OPEN and REPLY frames (docs/PROTOCOL.md section 4).

Heads are binary, not JSON: they travel once per stream on the hot path. Every string is a
length-prefixed byte string (u16 big-endian length), decoded as ISO-8859-1 like HTTP/1.1 octets::

    OPEN  payload = kind (u8) | count (u16) | count x (len u16 | bytes)
                    fields: method, target, authority, scheme, client address,
                            then header name, header value, ...
    REPLY payload = status (u16) | count (u16) | count x (len u16 | bytes)
                    fields: header name, header value, ...
    TRAILERS payload = count (u16) | count x (len u16 | bytes)   (protocol version 2)
                    fields: trailer name, trailer value, ...

Heads are values: their fields are ``Final``. Each class writes its own ``__init__``
(``init=False``): mypyc, which compiles this module (README, "Compiled build"), compiles that
one, where a dataclass-made ``__init__`` stays interpreted (five times slower to build) and
cannot set a native ``Final`` field.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, NoReturn

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "KIND_NAMES",
    "Headers",
    "RequestHead",
    "ResponseHead",
    "StreamKind",
    "decode_request_head",
    "decode_response_head",
    "decode_trailers",
    "encode_request_head",
    "encode_response_head",
    "encode_trailers",
]

Headers = tuple[tuple[str, str], ...]

_U16 = struct.Struct(">H")
_KIND_COUNT = struct.Struct(">BH")
_STATUS_COUNT = struct.Struct(">HH")
_FIXED_FIELDS = 5
MAX_FIELDS = 1024

#: The u16 length prefix of a short field as two ISO-8859-1 characters: a head is assembled as
#: one str and encoded once (one char per octet), not packed field by field. Longer fields
#: (rare) take the field-by-field path.
_PREFIX = tuple(chr(n >> 8) + chr(n & 0xFF) for n in range(1024))


class StreamKind(enum.IntEnum):
    """What a stream carries."""

    HTTP = 1
    WEBSOCKET = 2
    TCP = 3


_KINDS = {kind.value: kind for kind in StreamKind}
#: Lower-case kind names for logs and metric labels (an enum's ``.name`` is a Python property).
KIND_NAMES: dict[int, str] = {kind: kind.name.lower() for kind in StreamKind}


@dataclass(slots=True, init=False)
class RequestHead:
    """What the exit server tells the client about a new public request or connection.

    For TCP streams ``target`` is the public port and ``method`` is empty.
    """

    kind: Final[StreamKind]
    method: Final[str]
    target: Final[str]
    authority: Final[str]
    scheme: Final[str]
    client_addr: Final[str]
    headers: Final[Headers]

    def __init__(
        self,
        kind: StreamKind,
        method: str,
        target: str,
        authority: str,
        scheme: str = "https",
        client_addr: str = "",
        headers: Headers = (),
    ) -> None:
        self.kind = kind
        self.method = method
        self.target = target
        self.authority = authority
        self.scheme = scheme
        self.client_addr = client_addr
        self.headers = headers


@dataclass(slots=True, init=False)
class ResponseHead:
    """The upstream's status and headers, sent back by the client."""

    status: Final[int]
    headers: Final[Headers]

    def __init__(self, status: int, headers: Headers = ()) -> None:
        self.status = status
        self.headers = headers


def _pack_fields(parts: list[bytes], values: list[str]) -> None:
    for value in values:
        raw = value.encode("latin-1")
        if len(raw) > 0xFFFF:
            raise LocalProtocolError("head field longer than 65535 bytes")
        parts.append(_U16.pack(len(raw)))
        parts.append(raw)


def _encode(prefix: bytes, values: list[str]) -> bytes:
    """``prefix`` then every value as a length-prefixed ISO-8859-1 string."""
    try:
        # Fast path: one str, one encode (an ISO-8859-1 str has exactly one octet per char).
        parts: list[str] = []
        for value in values:
            parts += (_PREFIX[len(value)], value)
        return prefix + "".join(parts).encode("latin-1")
    except (IndexError, UnicodeEncodeError, TypeError):
        pass  # a long field, or one the slow path refuses with the precise error
    out = [prefix]
    try:
        _pack_fields(out, values)
    except UnicodeEncodeError as exc:
        raise LocalProtocolError("head field is not ISO-8859-1") from exc
    return b"".join(out)


def _unpack_fields(payload: memoryview | bytes, offset: int, fixed: int, pairs: int) -> tuple[list[str], Headers]:
    """``fixed`` fields then ``pairs`` header (name, value) pairs from ``offset`` to the end."""
    data = bytes(payload)
    text = data.decode("latin-1")  # one char per octet: every field is a slice of it
    first = offset
    values: list[str] = []
    headers: list[tuple[str, str]] = []
    # No bounds check per field: a length prefix past the end raises IndexError, a field past
    # the end leaves the next prefix past it or ``offset`` beyond the end; then the checking
    # walk below names the fault.
    try:
        for _ in range(fixed):
            start = offset + 2
            offset = start + ((data[offset] << 8) | data[offset + 1])
            values.append(text[start:offset])
        for _ in range(pairs):
            start = offset + 2
            offset = start + ((data[offset] << 8) | data[offset + 1])
            name = text[start:offset]
            start = offset + 2
            offset = start + ((data[offset] << 8) | data[offset + 1])
            headers.append((name, text[start:offset]))
    except IndexError:
        offset = -1
    if offset != len(data):
        _malformed(data, first, fixed + 2 * pairs)
    return values, tuple(headers)


def _malformed(data: bytes, offset: int, count: int) -> NoReturn:
    """Raise the error for fields that do not fill ``data`` exactly from ``offset``."""
    end = len(data)
    for _ in range(count):
        if end - offset < 2:
            raise RemoteProtocolError("truncated head field length")
        offset += 2 + ((data[offset] << 8) | data[offset + 1])
        if offset > end:
            raise RemoteProtocolError("truncated head field")
    raise RemoteProtocolError("trailing bytes after head")


def _flatten(values: list[str], headers: Headers) -> list[str]:
    for name, value in headers:
        values.append(name)
        values.append(value)
    return values


def encode_request_head(head: RequestHead) -> bytes:
    """Encode an OPEN payload.

    Raises:
        LocalProtocolError: a field is over 65535 bytes, too many headers, or not ISO-8859-1.
    """
    values = _flatten([head.method, head.target, head.authority, head.scheme, head.client_addr], head.headers)
    if len(values) > MAX_FIELDS:
        raise LocalProtocolError("too many header fields")
    return _encode(_KIND_COUNT.pack(head.kind, len(values)), values)


def decode_request_head(payload: memoryview | bytes) -> RequestHead:
    """Decode an OPEN payload.

    Raises:
        RemoteProtocolError: malformed payload, unknown kind, or an odd header count.
    """
    if len(payload) < _KIND_COUNT.size:
        raise RemoteProtocolError("OPEN payload too short")
    kind, count = _KIND_COUNT.unpack_from(payload)
    stream_kind = _KINDS.get(kind)
    if stream_kind is None:
        raise RemoteProtocolError(f"unknown stream kind {kind}")
    if count < _FIXED_FIELDS or (count - _FIXED_FIELDS) % 2 or count > MAX_FIELDS:
        raise RemoteProtocolError(f"bad OPEN field count {count}")
    fields, headers = _unpack_fields(payload, _KIND_COUNT.size, _FIXED_FIELDS, (count - _FIXED_FIELDS) >> 1)
    return RequestHead(stream_kind, fields[0], fields[1], fields[2], fields[3], fields[4], headers)


def encode_response_head(head: ResponseHead) -> bytes:
    """Encode a REPLY payload."""
    if not 100 <= head.status <= 999:
        raise LocalProtocolError(f"status {head.status} out of range")
    values = _flatten([], head.headers)
    if len(values) > MAX_FIELDS:
        raise LocalProtocolError("too many header fields")
    return _encode(_STATUS_COUNT.pack(head.status, len(values)), values)


def decode_response_head(payload: memoryview | bytes) -> ResponseHead:
    """Decode a REPLY payload.

    Raises:
        RemoteProtocolError: malformed payload, status out of range, or an odd header count.
    """
    if len(payload) < _STATUS_COUNT.size:
        raise RemoteProtocolError("REPLY payload too short")
    status, count = _STATUS_COUNT.unpack_from(payload)
    if not 100 <= status <= 999:
        raise RemoteProtocolError(f"status {status} out of range")
    if count % 2 or count > MAX_FIELDS:
        raise RemoteProtocolError(f"bad REPLY field count {count}")
    return ResponseHead(status, _unpack_fields(payload, _STATUS_COUNT.size, 0, count >> 1)[1])


_COUNT = struct.Struct(">H")


def encode_trailers(headers: Headers) -> bytes:
    """Encode a TRAILERS payload (protocol version 2): the trailer fields, in order."""
    values = _flatten([], headers)
    if len(values) > MAX_FIELDS:
        raise LocalProtocolError("too many trailer fields")
    return _encode(_COUNT.pack(len(values)), values)


def decode_trailers(payload: memoryview | bytes) -> Headers:
    """Decode a TRAILERS payload.

    Raises:
        RemoteProtocolError: malformed payload or an odd field count.
    """
    if len(payload) < _COUNT.size:
        raise RemoteProtocolError("TRAILERS payload too short")
    (count,) = _COUNT.unpack_from(payload)
    if count % 2 or count > MAX_FIELDS:
        raise RemoteProtocolError(f"bad TRAILERS field count {count}")
    return _unpack_fields(payload, _COUNT.size, 0, count >> 1)[1]
