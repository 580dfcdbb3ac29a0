"""The tunnel's WebSocket frame loops, for :mod:`shared.aio.wsfast` (compiled build: compiled).

wsfast's classes are mixed into websockets' connection classes, so they stay interpreted; the
two loops every message runs through live here as plain functions, which mypyc compiles:

* :func:`parse_frames` hands each whole unfragmented binary frame of a buffer to the
  connection's sink and stops at the first partial or odd frame;
* :func:`frame_message` turns a message's pieces into what the transport's ``writelines``
  takes: the header, the pieces masked on the client (each with the key rotated to its offset),
  small ones joined into one TLS record.

The rules, and why: wsfast's docstrings and docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import os
import struct
from typing import Any

try:
    from websockets.speedups import apply_mask  # type: ignore[attr-defined,import-not-found,unused-ignore]
except ImportError:  # pragma: no cover (the C extension ships in websockets' wheels)
    from websockets.utils import apply_mask

__all__ = ["FIN_BINARY", "JOIN_BELOW", "MaskKeys", "frame_message", "parse_frames"]

FIN_BINARY = 0x82  # FIN | Opcode.BINARY
JOIN_BELOW = 16 * 1024  # a TLS record's largest payload

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_B2 = struct.Struct("!BB")
_B2H = struct.Struct("!BBH")
_B2Q = struct.Struct("!BBQ")


class MaskKeys:
    """Masking keys from ``os.urandom``, fetched in 4 KiB blocks (1,024 keys per syscall)."""

    __slots__ = ("_block", "_pos")

    def __init__(self) -> None:
        self._block = b""
        self._pos = 0

    def __call__(self) -> bytes:
        pos = self._pos
        if pos + 4 > len(self._block):
            self._block = os.urandom(4096)
            pos = 0
        self._pos = pos + 4
        return self._block[pos : pos + 4]


mask_key = MaskKeys()


def parse_frames(conn: Any, view: memoryview, pos: int, end: int, masked: bool, limit: int) -> tuple[int, int, bool]:
    """Deliver the whole binary frames in ``view[pos:end]`` to ``conn._sink`` (read before each
    frame: a message may detach the session). ``masked``: the frames must be masked (the server
    receives from the client). Returns ``(pos, need, odd)``: where the first frame not delivered
    starts; the bytes from there on that frame needs, when it is partial and its length known
    (else 0); and whether it is one websockets must parse (a control, text, fragmented,
    oversized or wrongly masked frame, or no sink)."""
    want = 0x80 if masked else 0x00
    while end - pos >= 2:
        b1: int = view[pos + 1]
        sink = conn._sink
        if view[pos] != FIN_BINARY or b1 & 0x80 != want or sink is None:
            return pos, 0, True
        length = b1 & 0x7F
        head = pos + 2
        if length == 126:
            if end - head < 2:
                return pos, 0, False
            length = _U16.unpack_from(view, head)[0]
            head += 2
        elif length == 127:
            if end - head < 8:
                return pos, 0, False
            length = _U64.unpack_from(view, head)[0]
            head += 8
        if length > limit:
            return pos, 0, True  # websockets closes with 1009
        if masked:
            if end - head < 4 + length:
                return pos, head + 4 + length - pos, False
            key = bytes(view[head : head + 4])
            head += 4
            payload = apply_mask(view[head : head + length], key)
        else:
            if end - head < length:
                return pos, head + length - pos, False
            payload = bytes(view[head : head + length])
        pos = head + length
        sink(payload)
    return pos, 0, False


def frame_message(pieces: list[bytes | memoryview], masked: bool) -> list[bytes | memoryview]:
    """One binary message, given as its pieces in order, framed for ``writelines``. The pieces
    are never joined above :data:`JOIN_BELOW`: each piece given to the TLS transport becomes
    its own TLS record, so small ones are joined (with the header) into one, and large ones go
    as they are (no copy)."""
    length = 0
    for piece in pieces:
        length += len(piece)
    bit = 0x80 if masked else 0
    if length < 126:
        header = _B2.pack(FIN_BINARY, bit | length)
    elif length < 65536:
        header = _B2H.pack(FIN_BINARY, bit | 126, length)
    else:
        header = _B2Q.pack(FIN_BINARY, bit | 127, length)
    if masked:
        key = mask_key()
        if len(pieces) > 1 and length <= JOIN_BELOW:  # one join and one mask beat many
            pieces = [b"".join(pieces)]
        masked_pieces: list[bytes | memoryview] = []
        offset = 0
        for piece in pieces:
            shift = offset & 3
            masked_pieces.append(apply_mask(piece, key[shift:] + key[:shift] if shift else key))
            offset += len(piece)
        pieces = masked_pieces
        header += key
    out: list[bytes | memoryview] = []
    small: list[bytes | memoryview] = [header]
    for piece in pieces:
        if len(piece) < JOIN_BELOW:
            small.append(piece)
            continue
        if small:
            out.append(b"".join(small) if len(small) > 1 else small[0])
            small = []
        out.append(piece)
    if small:
        out.append(b"".join(small) if len(small) > 1 else small[0])
    return out
