"""Binary frame codec (docs/PROTOCOL.md section 3).

Every WebSocket binary message on the tunnel carries one or more whole frames. A frame is a
9-byte header followed by its payload::

    +-----------------------+--------+--------+-------------------------------+
    | length (u24, BE)      | type u8| flags  | R | stream id (u31, BE)       |
    +-----------------------+--------+--------+-------------------------------+
    | payload (length bytes)                                                  |
    +-------------------------------------------------------------------------+

The reserved bit R must be zero, and so must every flag bit that a frame type does not define.
The declared length is checked against the limit before the payload is touched.
"""

from __future__ import annotations

import builtins
import enum
import struct
from collections.abc import Iterator
from typing import NamedTuple

from .errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

__all__ = [
    "ABSOLUTE_MAX_PAYLOAD",
    "HEADER",
    "HEADER_SIZE",
    "Flags",
    "Frame",
    "FrameType",
    "GoAwayCode",
    "ResetCode",
    "decode_frames",
    "decode_goaway",
    "decode_reset",
    "decode_window",
    "encode_frame",
    "encode_goaway",
    "encode_header",
    "encode_reset",
    "encode_window",
    "read_header",
]

HEADER = struct.Struct(">BHBBI")  # length high byte, length low 16 bits, type, flags, stream id
HEADER_SIZE = 9
ABSOLUTE_MAX_PAYLOAD = (1 << 24) - 1
MAX_REASON = 256
_U32 = struct.Struct(">I")
_RESET = struct.Struct(">H")
_GOAWAY = struct.Struct(">IH")


class FrameType(enum.IntEnum):
    """Frame types; the numbers are wire values and never change meaning."""

    DATA = 0x0
    OPEN = 0x1
    REPLY = 0x2
    RESET = 0x3
    WINDOW = 0x4
    PING = 0x5
    GOAWAY = 0x6
    CONTROL = 0x7
    TRAILERS = 0x8  # protocol version 2: trailing header fields, ends the sender's half


class Flags(enum.IntFlag):
    """Flag bits. END_STREAM is legal on DATA, OPEN and REPLY; ACK only on PING."""

    NONE = 0x0
    END_STREAM = 0x1
    ACK = 0x1


#: Flags each frame type allows; any other bit set is a protocol error.
ALLOWED_FLAGS: dict[int, int] = {
    FrameType.DATA: Flags.END_STREAM,
    FrameType.OPEN: Flags.END_STREAM,
    FrameType.REPLY: Flags.END_STREAM,
    FrameType.RESET: 0,
    FrameType.WINDOW: 0,
    FrameType.PING: Flags.ACK,
    FrameType.GOAWAY: 0,
    FrameType.CONTROL: 0,
    FrameType.TRAILERS: 0,
}

#: Frame types that must travel on stream 0 (the connection), and those that must not.
CONNECTION_TYPES = frozenset({FrameType.PING, FrameType.GOAWAY, FrameType.CONTROL})
STREAM_TYPES = frozenset({FrameType.DATA, FrameType.OPEN, FrameType.REPLY, FrameType.RESET, FrameType.TRAILERS})


class ResetCode(enum.IntEnum):
    """Why a stream was reset; the exit server maps each to a public status."""

    CANCEL = 1  # the caller went away or gave up
    REFUSED = 2  # not processed at all: safe to retry elsewhere
    UPSTREAM_CONNECT = 3  # the upstream could not be reached (502)
    UPSTREAM_TIMEOUT = 4  # the upstream did not answer in time (504)
    UPSTREAM_RESET = 5  # the upstream broke the connection mid-way (aborted body)
    NO_UPSTREAM = 6  # the client has no upstream for this host (502)
    PROTOCOL_ERROR = 7
    FLOW_CONTROL_ERROR = 8
    INTERNAL_ERROR = 9
    FORBIDDEN = 10  # refused by the client's guardrails (403)
    TOO_LARGE = 11  # a body over a limit (413)
    NO_TRAILERS = 12  # the request needs trailers or HTTP/2 the path cannot carry (502)
    #: 0x100 + an HTTP/2 error code (RFC 9113 section 7): an HTTP/2 peer's RST_STREAM carried
    #: through unchanged (protocol version 2). Only the base is named; 0x100..0x1FF are all valid.
    H2_BASE = 0x100


class GoAwayCode(enum.IntEnum):
    """Why a session is going away."""

    NO_ERROR = 0  # graceful drain: finish in-flight streams, open no new ones
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    AUTH_REVOKED = 3
    REPLACED = 4  # the same client instance connected again
    SHUTDOWN = 5  # the process is stopping
    HEARTBEAT_TIMEOUT = 6


class Frame(NamedTuple):
    """A decoded frame. ``payload`` is a read-only view into the received message."""

    type: int
    flags: int
    stream_id: int
    payload: builtins.memoryview  # so spelled, mypyc can build the NamedTuple (docs/BENCHMARKS.md, round 16)


def encode_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    """Encode a 9-byte frame header.

    Raises:
        LocalProtocolError: a field is out of range.
    """
    if not 0 <= length <= ABSOLUTE_MAX_PAYLOAD:
        raise LocalProtocolError(f"frame length {length} out of range")
    if not 0 <= stream_id < (1 << 31):
        raise LocalProtocolError(f"stream id {stream_id} out of range")
    return HEADER.pack(length >> 16, length & 0xFFFF, frame_type, flags, stream_id)


def encode_frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """Encode a whole frame (header and payload)."""
    return encode_header(frame_type, flags, stream_id, len(payload)) + payload


def decode_frames(message: bytes | memoryview, max_payload: int) -> Iterator[Frame]:
    """Split one WebSocket message into frames, validating each header (lazily: the frames
    before a bad one are yielded first).

    Args:
        message: the message; it must hold whole frames only.
        max_payload: the negotiated maximum payload length.

    Raises:
        RemoteProtocolError: truncated frame, unknown type, reserved bits set, or a frame on the
            wrong kind of stream.
        FrameTooLarge: a declared length above ``max_payload``.
    """
    view = memoryview(message)
    end = len(view)
    if end == 0:
        raise RemoteProtocolError("empty message")
    offset = 0
    while offset < end:
        ftype, flags, stream_id, length = read_header(view, offset, end, max_payload)
        offset += HEADER_SIZE
        yield Frame(ftype, flags, stream_id, view[offset : offset + length])
        offset += length


def read_header(view: memoryview, offset: int, end: int, max_payload: int) -> tuple[int, int, int, int]:
    """The frame header at ``view[offset:]``, validated against the message's ``end``:
    ``(type, flags, stream id, payload length)``. :func:`decode_frames` runs this per frame,
    and so does the session's receive loop (no generator or tuple object per frame there).

    Raises:
        RemoteProtocolError, FrameTooLarge: as :func:`decode_frames`.
    """
    if end - offset < HEADER_SIZE:
        raise RemoteProtocolError("truncated frame header")
    hi, lo, ftype, flags, stream_id = HEADER.unpack_from(view, offset)
    length: int = (hi << 16) | lo
    if length > max_payload:
        raise FrameTooLarge(f"frame payload {length} exceeds limit {max_payload}")
    if end - offset - HEADER_SIZE < length:
        raise RemoteProtocolError("truncated frame payload")
    allowed = ALLOWED_FLAGS.get(ftype)
    if allowed is None:
        raise RemoteProtocolError(f"unknown frame type {ftype:#x}")
    # int(): the complement of an IntFlag member stays within the defined bits
    # (~Flags.END_STREAM == Flags.NONE), which would let every reserved bit through.
    if flags & ~int(allowed):
        raise RemoteProtocolError(f"reserved flag bits {flags:#x} set on frame type {ftype:#x}")
    if stream_id & 0x80000000:
        raise RemoteProtocolError("reserved stream id bit set")
    if stream_id == 0 and ftype in STREAM_TYPES:
        raise RemoteProtocolError(f"frame type {ftype:#x} on stream 0")
    if stream_id != 0 and ftype in CONNECTION_TYPES:
        raise RemoteProtocolError(f"frame type {ftype:#x} on stream {stream_id}")
    return ftype, flags, stream_id, length


def _reason_bytes(reason: str) -> bytes:
    return reason.encode("utf-8", "replace")[:MAX_REASON]


def _decode_reason(data: memoryview) -> str:
    if len(data) > MAX_REASON:
        raise RemoteProtocolError("reason too long")
    return bytes(data).decode("utf-8", "replace")


def encode_reset(code: int, reason: str = "") -> bytes:
    """RESET payload: code (u16) then a UTF-8 reason of at most 256 bytes."""
    return _RESET.pack(code) + _reason_bytes(reason)


def decode_reset(payload: memoryview) -> tuple[int, str]:
    """Decode a RESET payload into (code, reason)."""
    if len(payload) < _RESET.size:
        raise RemoteProtocolError("RESET payload too short")
    (code,) = _RESET.unpack_from(payload)
    return code, _decode_reason(payload[_RESET.size :])


def encode_window(increment: int) -> bytes:
    """WINDOW payload: a credit increment (u32, 1 .. 2**31-1)."""
    if not 0 < increment < (1 << 31):
        raise LocalProtocolError(f"window increment {increment} out of range")
    return _U32.pack(increment)


def decode_window(payload: memoryview) -> int:
    """Decode a WINDOW payload into its increment."""
    if len(payload) != _U32.size:
        raise RemoteProtocolError("WINDOW payload must be 4 bytes")
    (increment,) = _U32.unpack_from(payload)
    if not 0 < increment < (1 << 31):
        raise RemoteProtocolError(f"window increment {increment} out of range")
    return int(increment)


def encode_goaway(last_stream_id: int, code: int, reason: str = "") -> bytes:
    """GOAWAY payload: last stream id (u32), code (u16), UTF-8 reason."""
    return _GOAWAY.pack(last_stream_id, code) + _reason_bytes(reason)


def decode_goaway(payload: memoryview) -> tuple[int, int, str]:
    """Decode a GOAWAY payload into (last_stream_id, code, reason)."""
    if len(payload) < _GOAWAY.size:
        raise RemoteProtocolError("GOAWAY payload too short")
    last, code = _GOAWAY.unpack_from(payload)
    return last, code, _decode_reason(payload[_GOAWAY.size :])
