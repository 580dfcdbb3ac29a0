"""websockets connection classes for the tunnel's hot path.

websockets does the opening handshake (TLS, the token check before the upgrade, pins), control
frames and the closing handshake. Whole unfragmented binary frames, the tunnel's data phase, are
parsed and written here:

* complete binary messages go to a *sink* (the session's ``receive``) from the protocol
  callback, no reader task; messages that arrive before the sink is attached are replayed;
* reads land in our buffer (``asyncio.BufferedProtocol``, through :class:`_BufferedReader`):
  a process-wide scratch buffer while no frame spans reads, the connection's own while one
  does (dropped once empty for a ticker period);
* the first byte of any other frame (close, ping, text, fragmented, oversized, wrongly masked)
  hands that byte and everything after it to websockets for good, which applies RFC 6455;
* outgoing messages are framed here from their pieces, never joined (the client masks each
  piece with the key rotated to its offset).

Text or fragmented messages are a protocol violation on the tunnel: *on_bad* closes with 1003.
Why each of these, with figures, and the buffer-ownership rules: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import Event, State

from ..sizes import MAX_MESSAGE
from .wsframes import frame_message, mask_key, parse_frames

if TYPE_CHECKING:
    from .wsclient import TunnelClientConnection

__all__ = ["DirectMessages", "TunnelServerConnection", "TunnelWebSocket", "mask_key"]

_OWN_SIZE = 1024 * 1024  # a connection's own buffer: several reads and the largest frame
_SMALL_OWN = 128 * 1024  # ... while the partial frames are small
_MIN_READ = 64 * 1024  # room offered to a read, at least
_SCRATCH_SIZE = MAX_MESSAGE + 4096  # a read that parses completely needs no buffer of its own
_scratch_view: memoryview | None = None


def _scratch() -> memoryview:
    """The buffer every connection reads into while it holds no partial frame. One per process
    is enough: a transport calls ``get_buffer``, fills it and calls ``buffer_updated`` in one go,
    and ``buffer_updated`` leaves nothing in it."""
    global _scratch_view
    if _scratch_view is None:
        _scratch_view = memoryview(bytearray(_SCRATCH_SIZE))
    return _scratch_view


class _BufferedReader(asyncio.BufferedProtocol):
    """What the transport calls once a session is attached. uvloop reads into the protocol's
    buffer only for a protocol that is not an ``asyncio.Protocol``, and a websockets connection
    is one; this stand-in is not, and passes everything on to the connection."""

    __slots__ = ("_conn",)

    def __init__(self, conn: DirectMessages) -> None:
        self._conn: Any = conn

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._conn.get_buffer(sizehint)  # type: ignore[no-any-return]

    def buffer_updated(self, nbytes: int) -> None:
        self._conn.buffer_updated(nbytes)

    def data_received(self, data: bytes) -> None:  # a transport that was reading before the switch
        self._conn.data_received(data)

    def eof_received(self) -> bool | None:
        return self._conn.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        conn, self._conn = self._conn, None
        # uvloop's SSL protocol keeps our bound get_buffer/buffer_updated after the end; without
        # the connection in here, that no longer makes a cycle through it (and its buffers).
        conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self._conn.pause_writing()

    def resume_writing(self) -> None:
        self._conn.resume_writing()


class DirectMessages:
    """Mixin for a websockets ``Connection``: see the module docstring."""

    # Slots: as new keys of websockets' instance dict these made it give up key sharing
    # (about 1.5 KiB per tunnel).
    __slots__ = (
        "_early",
        "_early_waiter",
        "_end",
        "_fast",
        "_need",
        "_on_bad",
        "_parsing",
        "_sink",
        "_spanned",
        "_start",
        "_view",
    )

    _masked = False  # client-to-server frames are masked (RFC 6455 section 5.3)
    _sink: Callable[[bytes], None] | None
    _on_bad: Callable[[str], None] | None
    _early: list[bytes] | None
    _early_waiter: asyncio.Future[None] | None
    _fast: bool  # parse frames here (set at attach, cleared for good on the first odd byte)
    # The connection's own buffer, from the first frame that spans reads until a ticker period
    # passes with no frame spanning reads (release_idle_buffer): bytes [_start:_end] are
    # received and not parsed yet (a partial frame), reads land after _end.
    _view: memoryview | None
    _start: int
    _end: int
    _need: int  # bytes from _start the partial frame needs in all (0: not known yet)
    _spanned: bool  # a frame spanned reads since the last release_idle_buffer
    _parsing: bool  # in _parse (a message that detaches leaves the hand-over to it)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sink = self._on_bad = None
        self._early = None
        self._early_waiter = None
        self._fast = self._spanned = self._parsing = False
        self._view = None
        self._start = self._end = self._need = 0
        super().__init__(*args, **kwargs)
        # websockets only appends to, removes from and iterates its drain waiters: a list (56
        # bytes) serves, where its deque takes about 700 with its first block, per tunnel
        # (tests/unit/test_library_contracts.py pins that use).
        self.drain_waiters = []

    # attributes of the websockets Connection this is mixed into
    protocol: Any
    transport: Any
    paused: bool
    drain_waiters: Any

    def attach(self, sink: Callable[[bytes], None], on_bad: Callable[[str], None]) -> None:
        """Deliver every complete binary message to ``sink`` from now on (after the ones that
        arrived before, in order); anything else to ``on_bad``."""
        early, self._early = self._early, None
        self._sink, self._on_bad = sink, on_bad
        # Parse here only from a frame boundary: websockets' reader must hold nothing.
        self._fast = not self.protocol.reader.buffer and self.protocol.state is State.OPEN
        if self._fast:
            self.transport.set_protocol(_BufferedReader(self))
        for message in early or ():
            sink(message)

    async def first_message(self, timeout: float) -> bytes:
        """The next binary message before :meth:`attach` (an authentication exchange that
        precedes the tunnel protocol), taken off the replay list.

        Raises:
            TimeoutError: none within ``timeout``.
            ConnectionError: the connection closed first.
        """
        async with asyncio.timeout(timeout):
            while not self._early:
                if self.protocol.state is not State.OPEN:
                    raise ConnectionError("the connection closed during authentication")
                self._early_waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._early_waiter
                finally:
                    self._early_waiter = None
        return self._early.pop(0)

    def connection_lost(self, exc: Exception | None) -> None:
        waiter = self._early_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        super().connection_lost(exc)  # type: ignore[misc]

    def detach(self) -> None:
        """Stop delivering (the session is over); drops the callbacks and what they hold."""
        self._sink = self._on_bad = None
        if self._fast and not self._parsing:
            self._fall_back(b"")

    def release_idle_buffer(self) -> None:
        """Drop the own buffer if it holds nothing and no frame spanned reads since the last
        call (the session's ticker calls this about once a second): a tunnel that is idle, or
        carries only small messages such as heartbeats, keeps no megabyte."""
        if self._view is not None and self._start == self._end and not self._spanned:
            self._view = None
            self._start = self._end = self._need = 0
        self._spanned = False

    # ------------------------------------------------------------------ asyncio.BufferedProtocol

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self._view
        if view is None:
            return _scratch()
        want = max(sizehint, _MIN_READ, self._need - (self._end - self._start))
        if len(view) - self._end < want:
            view = self._make_room(want)
        return view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        view = self._view
        if view is None:  # the read went to the shared scratch buffer: nothing may stay there
            scratch = _scratch()
            if not self._fast:
                super().data_received(bytes(scratch[:nbytes]))  # type: ignore[misc]
                return
            pos = self._parse(scratch, 0, nbytes)
            if pos < nbytes and self._fast:  # a partial frame: from now on the own buffer
                held = nbytes - pos
                size = _OWN_SIZE if self._need + _MIN_READ > _SMALL_OWN else _SMALL_OWN
                view = self._view = memoryview(bytearray(size))
                view[:held] = scratch[pos:nbytes]
                self._start, self._end = 0, held
                self._spanned = True
            return
        end = self._end = self._end + nbytes
        start = self._start
        if end - start < self._need:  # the partial frame is still partial
            return
        pos = self._parse(view, start, end)
        if self._view is None:  # handed over to websockets
            return
        if pos == end:
            self._start = self._end = 0
        else:
            self._start = pos
            self._spanned = True

    def data_received(self, data: bytes) -> None:
        """The same path for bytes handed over by a caller rather than read by a transport."""
        with memoryview(data) as src:
            pos, total = 0, len(data)
            while pos < total:
                buf = self.get_buffer(total - pos)
                n = min(len(buf), total - pos)
                buf[:n] = src[pos : pos + n]
                self.buffer_updated(n)
                pos += n

    # ------------------------------------------------------------------ parsing

    def _make_room(self, want: int) -> memoryview:
        """Move the partial frame to the front of the own buffer, or into a larger one, so that
        ``want`` bytes fit after it."""
        view = self._view
        assert view is not None
        held = self._end - self._start
        if held + want <= len(view):
            view[:held] = view[self._start : self._end]  # memmove: the regions may overlap
        else:
            bigger = memoryview(bytearray(max(_OWN_SIZE, held + want)))
            bigger[:held] = view[self._start : self._end]
            view = self._view = bigger
        self._start, self._end = 0, held
        return view

    def _parse(self, view: memoryview, pos: int, end: int) -> int:
        """Deliver the complete frames in ``view[pos:end]``; returns where the first partial one
        starts (``end`` if none, or after handing everything to websockets)."""
        self._parsing = True
        try:
            return self._parse_frames(view, pos, end)
        finally:
            self._parsing = False

    def _parse_frames(self, view: memoryview, pos: int, end: int) -> int:
        # the loop is compiled (shared/aio/wsframes.py); the client receives unmasked frames
        limit = self.protocol.max_message_size or (1 << 62)
        pos, need, odd = parse_frames(self, view, pos, end, not self._masked, limit)
        if not odd:
            self._need = need
            return pos
        # A control, text, fragmented, oversized or wrongly masked frame: websockets parses
        # everything from its first byte on.
        rest = bytes(view[pos:end])
        self._view = None
        self._start = self._end = self._need = 0
        self._fall_back(rest)
        return end

    def _fall_back(self, rest: bytes) -> None:
        """From here on websockets parses everything, starting with ``rest`` (a frame boundary)
        and what is still buffered."""
        self._fast = False
        view, self._view = self._view, None
        if view is not None:
            rest = bytes(view[self._start : self._end]) + rest
            self._start = self._end = self._need = 0
        if rest:
            super().data_received(rest)  # type: ignore[misc]

    @property
    def can_send(self) -> bool:
        return self.protocol.state is State.OPEN

    def send_message(self, pieces: list[bytes | memoryview]) -> None:
        """Write one binary message, given as its pieces in order, now (the caller checked
        :attr:`can_send`; flow control is the caller's: see ``paused``). The pieces are never
        joined: on the client each is masked with the key rotated to its offset, and
        ``writelines`` gives them to TLS in one pass and to the socket in one write."""
        out = frame_message(pieces, self._masked)  # compiled (shared/aio/wsframes.py)
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
                waiter = self._early_waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
                return
        elif event.opcode in (Opcode.TEXT, Opcode.CONT, Opcode.BINARY):
            on_bad = self._on_bad
            if on_bad is not None:
                on_bad("text message on the tunnel" if event.opcode is Opcode.TEXT else "fragmented message")
                return
        super().process_event(event)  # type: ignore[misc]


class TunnelServerConnection(DirectMessages, ServerConnection):
    """Exit-server side of a tunnel WebSocket (``serve(create_connection=...)``)."""

    # what authentication learns (exit_server/control.py), in slots for the same reason
    __slots__ = ("backhaul_challenge", "backhaul_challenge_answer", "backhaul_client_id", "backhaul_principal")


#: What :class:`shared.aio.connection.TunnelConnection` runs on. The client's class lives in
#: wsclient.py, so that the exit server does not import websockets' client (and python-socks
#: with it: 8 ms of its start); a name for annotations.
TunnelWebSocket: TypeAlias = "TunnelClientConnection | TunnelServerConnection"
