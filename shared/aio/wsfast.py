"""websockets connection classes for the tunnel's hot path.

websockets stays the transport: it does the opening handshake (TLS, the token check before the
upgrade, pins), parses and unmasks every incoming frame, answers pings and runs the closing
handshake. Two things change for tunnel connections, both measured (docs/BENCHMARKS.md):

* **Incoming messages are delivered in the protocol callback.** The stock connection puts each
  message into a queue that a reader task awaits: one task wake-up (a loop iteration) per
  message. Here a complete binary message goes straight to a *sink* (the session's
  ``receive``) from ``data_received``; the session's own flow control (stream and connection
  windows) bounds what is buffered, so websockets' receive queue has nothing left to bound.
  Messages that arrive before the sink is attached are kept in order and replayed to it.
* **Complete unfragmented binary frames are parsed here** (:meth:`DirectMessages.data_received`):
  header, length and mask in a few slices of the received bytes, the payload unmasked straight
  out of them (one copy) instead of websockets' generator-based reader (a buffer append, a slice
  copy, an unmask copy, a Frame object per message). The first byte that is anything else
  (a control frame such as close, a text or fragmented frame, an oversized or wrongly masked
  frame) hands that byte and everything after it to websockets for good, which then applies
  every rule of RFC 6455 as before; so does a connection whose websockets reader still held a
  partial frame when the sink was attached.
* **Outgoing binary messages are framed here** (:meth:`DirectMessages.send_message`):
  the header and the (masked, on the client) payload are joined once and written, instead of
  websockets' ``Frame.serialize`` (a BytesIO, a mask copy and a ``getvalue`` copy) and the
  ``send()`` coroutine per message. Masking keys still come from ``os.urandom``, drawn 4 KiB at
  a time rather than one ``getrandom`` syscall per message.

Anything else the peer sends (text, fragmented messages) is a protocol violation on the tunnel:
the *on_bad* callback closes with 1003.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import Event, State

try:
    from websockets.speedups import apply_mask  # type: ignore[attr-defined,import-not-found,unused-ignore]
except ImportError:  # pragma: no cover (the C extension ships in websockets' wheels)
    from websockets.utils import apply_mask

__all__ = ["DirectMessages", "TunnelClientConnection", "TunnelServerConnection", "TunnelWebSocket", "mask_key"]

_B2 = struct.Struct("!BB")
_B2H = struct.Struct("!BBH")
_B2Q = struct.Struct("!BBQ")
_FIN_BINARY = 0x80 | Opcode.BINARY
_U16 = struct.Struct("!H")
_JOIN_BELOW = 16 * 1024  # a TLS record's largest payload
_U64 = struct.Struct("!Q")


class _MaskKeys:
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


mask_key = _MaskKeys()


class DirectMessages:
    """Mixin for a websockets ``Connection``: see the module docstring."""

    _sink: Callable[[bytes], None] | None = None
    _on_bad: Callable[[str], None] | None = None
    _early: list[bytes] | None = None
    _masked = False  # client-to-server frames are masked (RFC 6455 section 5.3)
    _fast = False  # parse frames here (set at attach, cleared for good on the first odd byte)
    _parts: list[bytes | memoryview] | None = None  # a partial frame, as received
    _have = 0  # bytes in _parts
    _need = 0  # bytes _parts must reach before parsing is worth trying again

    # attributes of the websockets Connection this is mixed into
    protocol: Any
    transport: Any
    paused: bool

    def attach(self, sink: Callable[[bytes], None], on_bad: Callable[[str], None]) -> None:
        """Deliver every complete binary message to ``sink`` from now on (after the ones that
        arrived before, in order); anything else to ``on_bad``."""
        early, self._early = self._early, None
        self._sink, self._on_bad = sink, on_bad
        # Parse here only from a frame boundary: websockets' reader must hold nothing.
        self._fast = not self.protocol.reader.buffer and self.protocol.state is State.OPEN
        for message in early or ():
            sink(message)

    def detach(self) -> None:
        """Stop delivering (the session is over); drops the callbacks and what they hold."""
        self._sink = self._on_bad = None
        if self._fast:
            self._fall_back(b"")

    def data_received(self, data: bytes) -> None:
        if not self._fast:
            super().data_received(data)  # type: ignore[misc]
            return
        parts = self._parts
        if parts is not None:  # a partial frame: collect until it is whole, then join once
            parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return
            self._parts = None
            pending = b"".join(parts)
        else:
            pending = data
        end = len(pending)
        pos = 0
        need = 0  # bytes from pos on that the frame being parsed needs (when incomplete)
        odd = False  # a byte websockets must parse from here on
        want = 0x00 if self._masked else 0x80  # the client receives unmasked frames, the server masked
        limit = self.protocol.max_message_size or (1 << 62)
        with memoryview(pending) as view:
            while end - pos >= 2:
                b1 = view[pos + 1]
                if view[pos] != _FIN_BINARY or b1 & 0x80 != want or self._sink is None:
                    odd = True
                    break
                length = b1 & 0x7F
                head = pos + 2
                if length == 126:
                    if end - head < 2:
                        break
                    length = _U16.unpack_from(view, head)[0]
                    head += 2
                elif length == 127:
                    if end - head < 8:
                        break
                    length = _U64.unpack_from(view, head)[0]
                    head += 8
                if length > limit:
                    odd = True  # websockets closes with 1009
                    break
                if want:
                    if end - head < 4 + length:
                        need = head + 4 + length - pos
                        break
                    key = bytes(view[head : head + 4])
                    head += 4
                    payload = apply_mask(view[head : head + length], key)
                else:
                    if end - head < length:
                        need = head + length - pos
                        break
                    payload = bytes(view[head : head + length])
                pos = head + length
                self._sink(payload)
            rest = bytes(view[pos:]) if odd else None
        if rest is not None:
            self._fall_back(rest)
        elif pos < end:  # a partial frame: kept (not copied) until the rest arrives
            self._parts = [memoryview(pending)[pos:] if pos else pending]
            self._have = end - pos
            self._need = need or self._have + 1

    def _fall_back(self, rest: bytes) -> None:
        """From here on websockets parses everything, starting with ``rest`` (a frame boundary)
        and what is still buffered."""
        self._fast = False
        held, self._parts = self._parts, None
        data = b"".join([*(held or ()), rest])
        if data:
            super().data_received(data)  # type: ignore[misc]

    @property
    def can_send(self) -> bool:
        return self.protocol.state is State.OPEN

    def send_message(self, pieces: list[bytes | memoryview]) -> None:
        """Write one binary message, given as its pieces in order, now (the caller checked
        :attr:`can_send`; flow control is the caller's: see ``paused``). The pieces are never
        joined: on the client each is masked with the key rotated to its offset, and
        ``writelines`` gives them to TLS in one pass and to the socket in one write."""
        length = 0
        for piece in pieces:
            length += len(piece)
        masked = self._masked
        bit = 0x80 if masked else 0
        if length < 126:
            header = _B2.pack(_FIN_BINARY, bit | length)
        elif length < 65536:
            header = _B2H.pack(_FIN_BINARY, bit | 126, length)
        else:
            header = _B2Q.pack(_FIN_BINARY, bit | 127, length)
        if masked:
            key = mask_key()
            if len(pieces) > 1 and length <= _JOIN_BELOW:  # one join and one mask beat many
                pieces = [b"".join(pieces)]
            masked_pieces: list[bytes | memoryview] = []
            offset = 0
            for piece in pieces:
                shift = offset & 3
                masked_pieces.append(apply_mask(piece, key[shift:] + key[:shift] if shift else key))
                offset += len(piece)
            pieces = masked_pieces
            header += key
        # Each piece given to the TLS transport becomes its own TLS record: small pieces are
        # joined (with the header) into one, large ones go as they are (no copy).
        out: list[bytes | memoryview] = []
        small: list[bytes | memoryview] = [header]
        for piece in pieces:
            if len(piece) < _JOIN_BELOW:
                small.append(piece)
                continue
            if small:
                out.append(b"".join(small) if len(small) > 1 else small[0])
                small = []
            out.append(piece)
        if small:
            out.append(b"".join(small) if len(small) > 1 else small[0])
        self.transport.writelines(out)

    def process_event(self, event: Event) -> None:
        if not isinstance(event, Frame):  # the handshake's Request/Response
            super().process_event(event)  # type: ignore[misc]
            return
        if event.opcode is Opcode.BINARY and event.fin:
            sink = self._sink
            if sink is not None:
                sink(event.data)  # type: ignore[arg-type]
                return
            if self._on_bad is None:  # not attached yet
                if self._early is None:
                    self._early = []
                self._early.append(event.data)  # type: ignore[arg-type]
                return
        elif event.opcode in (Opcode.TEXT, Opcode.CONT, Opcode.BINARY):
            on_bad = self._on_bad
            if on_bad is not None:
                on_bad("text message on the tunnel" if event.opcode is Opcode.TEXT else "fragmented message")
                return
        super().process_event(event)  # type: ignore[misc]


class TunnelClientConnection(DirectMessages, ClientConnection):
    """Client side of a tunnel WebSocket (``connect(create_connection=...)``)."""

    _masked = True


class TunnelServerConnection(DirectMessages, ServerConnection):
    """Exit-server side of a tunnel WebSocket (``serve(create_connection=...)``)."""


#: What :class:`shared.aio.connection.TunnelConnection` runs on.
TunnelWebSocket = TunnelClientConnection | TunnelServerConnection
