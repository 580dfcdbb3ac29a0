"""Sans-I/O tunnel session: handshake, streams, flow control, heartbeat, go-away.

Bytes in (:meth:`Session.receive`), events out (:meth:`Session.events`), bytes to send out
(:meth:`Session.data_to_send`). No clock is read here: callers pass ``now``. The rules are those
of docs/PROTOCOL.md; section numbers in comments refer to it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .errors import (
    FlowControlError,
    InvalidState,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SessionClosed,
    TooManyStreams,
    TunnelError,
    TunnelTimeout,
)
from .events import (
    ConnectionFailed,
    ControlReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    ReplyReceived,
    ResetReceived,
    StreamOpened,
    TrailersReceived,
    WindowUpdated,
)
from .frames import (
    HEADER,
    HEADER_SIZE,
    Flags,
    FrameType,
    GoAwayCode,
    ResetCode,
    decode_goaway,
    decode_reset,
    decode_window,
    encode_goaway,
    encode_reset,
    encode_window,
    read_header,
)
from .heads import (
    Headers,
    RequestHead,
    ResponseHead,
    decode_request_head,
    decode_response_head,
    decode_trailers,
    encode_request_head,
    encode_response_head,
    encode_trailers,
)
from .messages import (
    SUPPORTED_VERSIONS,
    TRAILERS_VERSION,
    Error,
    Hello,
    Routes,
    Welcome,
    decode_control,
    encode_control,
)
from .sizes import DEFAULT_MAX_FRAME, DEFAULT_STREAM_WINDOW, MAX_MESSAGE

__all__ = [
    "CLIENT_PING_SILENCE",
    "HEARTBEAT_TIMEOUT_RATIO",
    "INITIAL_CONNECTION_WINDOW",
    "Role",
    "Session",
    "SessionEvent",
    "SessionState",
    "StreamEvent",
    "StreamState",
    "session_transition",
    "transition",
]

#: Both connection windows start here; a WINDOW on stream 0 right after the handshake raises
#: them to the configured size (section 6).
INITIAL_CONNECTION_WINDOW = 1 << 20
#: Section 9: the client's silence limit is at least this many of the server's intervals, and
#: it pings only after this many intervals without hearing from the server.
HEARTBEAT_TIMEOUT_RATIO = 3.0
CLIENT_PING_SILENCE = 1.5
_PING = struct.Struct(">d")
# Plain ints for the flag tests of the receive path: ``int & IntFlag`` runs IntFlag's Python
# ``__rand__`` and builds a new member per frame.
_END_STREAM = int(Flags.END_STREAM)
_ACK = int(Flags.ACK)


class Role(enum.Enum):
    """SERVER is the exit server (opens streams); CLIENT is the tunnel client."""

    SERVER = "server"
    CLIENT = "client"


class SessionState(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    DRAINING = "draining"
    CLOSED = "closed"


class SessionEvent(enum.Enum):
    ACCEPT = "accept"  # the server sent Welcome / the client received it (section 5)
    GOAWAY = "goaway"  # GOAWAY sent, or a graceful one received (section 8)
    CLOSE = "close"  # a fatal error, a refusal, an abrupt GOAWAY, or the transport gone


class StreamState(enum.Enum):
    # Identity hashing in C (members are singletons and compare by identity): Enum's own
    # __hash__ is a Python function, run for every transition and window check.
    __hash__ = object.__hash__

    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed-local"  # we sent END_STREAM
    HALF_CLOSED_REMOTE = "half-closed-remote"  # the peer sent END_STREAM
    CLOSED = "closed"


class StreamEvent(enum.Enum):
    __hash__ = object.__hash__  # see StreamState

    SEND_END = "send-end"
    RECV_END = "recv-end"
    SEND_RESET = "send-reset"
    RECV_RESET = "recv-reset"


_S = StreamState
_E = StreamEvent
#: Every legal stream transition (section 7); anything else raises InvalidState.
_TRANSITIONS: dict[tuple[StreamState, StreamEvent], StreamState] = {
    (_S.OPEN, _E.SEND_END): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _E.RECV_END): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_LOCAL, _E.RECV_END): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _E.SEND_END): _S.CLOSED,
    (_S.OPEN, _E.SEND_RESET): _S.CLOSED,
    (_S.OPEN, _E.RECV_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _E.SEND_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _E.RECV_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _E.SEND_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _E.RECV_RESET): _S.CLOSED,
}
#: Every legal session transition (sections 5, 8 and 10); anything else raises InvalidState.
_SESSION_TRANSITIONS: dict[tuple[SessionState, SessionEvent], SessionState] = {
    (SessionState.HANDSHAKE, SessionEvent.ACCEPT): SessionState.OPEN,
    (SessionState.HANDSHAKE, SessionEvent.GOAWAY): SessionState.CLOSED,  # nothing to drain yet
    (SessionState.OPEN, SessionEvent.GOAWAY): SessionState.DRAINING,
    (SessionState.DRAINING, SessionEvent.GOAWAY): SessionState.DRAINING,
    (SessionState.CLOSED, SessionEvent.GOAWAY): SessionState.CLOSED,
    **{(state, SessionEvent.CLOSE): SessionState.CLOSED for state in SessionState},
}
_CAN_SEND = frozenset({_S.OPEN, _S.HALF_CLOSED_REMOTE})
_CAN_RECV = frozenset({_S.OPEN, _S.HALF_CLOSED_LOCAL})


def session_transition(state: SessionState, event: SessionEvent) -> SessionState:
    """Return the session state after ``event``.

    Raises:
        InvalidState: the transition is not in the table.
    """
    try:
        return _SESSION_TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidState("session", state, event) from None


def transition(state: StreamState, event: StreamEvent) -> StreamState:
    """Return the stream state after ``event``.

    Raises:
        InvalidState: the transition is not in the table.
    """
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidState("stream", state, event) from None


@dataclass(slots=True, init=False)
class _Stream:
    state: StreamState
    send_window: int
    recv_window: int
    replied: bool = False
    buffered: int = 0
    consumed: int = 0

    def __init__(
        self,
        state: StreamState,
        send_window: int,
        recv_window: int,
        replied: bool = False,
        buffered: int = 0,
        consumed: int = 0,
    ) -> None:
        self.state = state
        self.send_window = send_window
        self.recv_window = recv_window
        self.replied = replied
        self.buffered = buffered
        self.consumed = consumed


class Session:
    """One tunnel session, seen from one side.

    Args:
        role: SERVER for the exit server, CLIENT for the tunnel client.
        max_frame: the largest frame payload we accept.
        initial_window: the per-stream credit we grant the peer.
        connection_window: the connection credit we grant the peer.
        max_streams: the most concurrent streams we accept (client) or open (server).
        buffer_budget: received-but-unconsumed bytes above which a stream whose reader is
            behind (a quarter of ``initial_window`` or more unconsumed) gets no new stream
            credit until it catches up or the total drops: slow readers stop growing the
            buffers, readers that keep up are not held back (section 6.2).
        buffer_limit: received-but-unconsumed bytes above which connection credit is withheld
            too (the hard memory bound: at most about ``connection_window + buffer_limit``
            bytes buffered per session). Default: four times ``buffer_budget``.
        heartbeat_interval: seconds between our PINGs.
        heartbeat_timeout: seconds without any received byte after which the peer is dead.
        now: the current time, for the heartbeat clock.
    """

    # Slots: every idle tunnel holds one Session; as an instance dict its 35 attributes took
    # about 1.6 KiB (docs/BENCHMARKS.md, round 12).
    __slots__ = (
        "_behind",
        "_buffered",
        "_conn_credit_pending",
        "_conn_credit_withheld",
        "_events",
        "_highest_remote",
        "_last_ping",
        "_last_received",
        "_next_stream_id",
        "_out",
        "_recv_conn_window",
        "_send_conn_window",
        "_share_min",
        "_streams",
        "buffer_budget",
        "buffer_limit",
        "bytes_in",
        "bytes_out",
        "connection_window",
        "error",
        "heartbeat_interval",
        "heartbeat_timeout",
        "initial_window",
        "local_goaway",
        "max_frame",
        "max_streams",
        "peer_goaway",
        "peer_initial_window",
        "peer_max_frame",
        "peer_max_streams",
        "role",
        "rtt",
        "state",
        "version",
    )

    def __init__(
        self,
        role: Role,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        initial_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = 16 << 20,
        max_streams: int = 10_000,
        buffer_budget: int = 64 << 20,
        buffer_limit: int | None = None,
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 15.0,
        now: float = 0.0,
    ) -> None:
        if not INITIAL_CONNECTION_WINDOW <= connection_window < (1 << 31):
            raise LocalProtocolError("connection window outside 1 MiB .. 2**31-1")
        self.role = role
        self.state = SessionState.HANDSHAKE
        self.max_frame = max_frame
        self.initial_window = initial_window
        self.connection_window = connection_window
        self.max_streams = max_streams
        self.buffer_limit = 4 * buffer_budget if buffer_limit is None else buffer_limit
        self.buffer_budget = min(buffer_budget, self.buffer_limit)
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.error: TunnelError | None = None
        self.version: int | None = None
        self.rtt: float | None = None
        # What the peer allows us (learnt in the handshake).
        self.peer_max_frame = 16 * 1024
        self.peer_initial_window = 64 * 1024
        self.peer_max_streams = 1
        self.peer_goaway: tuple[int, int, str] | None = None
        self.local_goaway: tuple[int, int, str] | None = None
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 1
        self._highest_remote = 0
        self._send_conn_window = INITIAL_CONNECTION_WINDOW
        self._recv_conn_window = INITIAL_CONNECTION_WINDOW
        self._conn_credit_pending = 0
        self._conn_credit_withheld = 0
        self._buffered = 0
        # Streams owed stream credit, deferred over the budget. A dict used as a set: empty, it
        # is 64 bytes where a set is 216 (one per idle tunnel).
        self._behind: dict[int, None] = {}
        self._out: list[tuple[bytes, bytes | memoryview]] = []  # (frame header, payload)
        self._share_min = 1 << 62  # see receive()
        self._events: list[Event] = []
        self._last_received = now
        self._last_ping = now
        self.bytes_in = 0
        self.bytes_out = 0

    # ------------------------------------------------------------------ properties

    @property
    def open_streams(self) -> int:
        """How many streams are not yet closed."""
        return len(self._streams)

    @property
    def accepting_streams(self) -> bool:
        """True while new streams may be opened on this session (server side)."""
        return self.state is SessionState.OPEN

    def stream_ids(self) -> list[int]:
        """The ids of the streams that are not yet closed."""
        return list(self._streams)

    def stream_state(self, stream_id: int) -> StreamState:
        """The state of a stream; a stream we no longer track is CLOSED."""
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else StreamState.CLOSED

    def send_window(self, stream_id: int) -> int:
        """Bytes of DATA that may be sent on ``stream_id`` now (0 when it cannot send)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in _CAN_SEND:
            return 0
        return max(0, min(stream.send_window, self._send_conn_window))

    # ------------------------------------------------------------------ output

    def data_to_send(self, max_message: int = MAX_MESSAGE) -> list[bytes]:
        """Return queued frames grouped into WebSocket messages of at most ``max_message``
        bytes (a single frame larger than that forms its own message)."""
        return [b"".join(pieces) for pieces in self.messages_to_send(max_message)]

    def messages_to_send(self, max_message: int = MAX_MESSAGE) -> list[list[bytes | memoryview]]:
        """Like :meth:`data_to_send`, each message as its pieces (frame headers and payloads)
        in order, not joined: the writer masks or encrypts them in place of a copy."""
        if not self._out:
            return []
        out = self._out
        self._out = []
        messages: list[list[bytes | memoryview]] = []
        group: list[bytes | memoryview] = []
        size = 0
        for header, payload in out:
            n = HEADER_SIZE + len(payload)
            if size and size + n > max_message:
                messages.append(group)
                self.bytes_out += size
                group, size = [], 0
            group.append(header)
            if payload:
                group.append(payload)
            size += n
        messages.append(group)
        self.bytes_out += size
        return messages

    def _queue(self, ftype: int, flags: int, stream_id: int, payload: bytes | memoryview = b"") -> None:
        n = len(payload)
        self._out.append((HEADER.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id), payload))

    def events(self) -> list[Event]:
        """Return and clear the events produced so far."""
        events = self._events
        self._events = []
        return events

    # ------------------------------------------------------------------ handshake

    def send_hello(self, hello: Hello) -> None:
        """Client: send the first message (section 5.1)."""
        self._require_role(Role.CLIENT, "send_hello")
        if self.state is not SessionState.HANDSHAKE:
            raise InvalidState("session", self.state, "send_hello")
        self._queue(FrameType.CONTROL, 0, 0, encode_control(hello))

    def accept(self, welcome: Welcome) -> None:
        """Server: accept the client's Hello with ``welcome``."""
        self._require_role(Role.SERVER, "accept")
        if self.state is not SessionState.HANDSHAKE or self.version is None:
            raise InvalidState("session", self.state, "accept")
        self._queue(FrameType.CONTROL, 0, 0, encode_control(welcome))
        self._enter_open()

    def refuse(self, code: str, message: str = "") -> None:
        """Server: refuse the session with an Error message; the session is then closed."""
        self._queue(FrameType.CONTROL, 0, 0, encode_control(Error(code=code, message=message)))
        self._enter(SessionEvent.CLOSE)

    def send_control(self, message: Routes | Error) -> None:
        """Send a control message after the handshake (a Routes update, or a fatal Error)."""
        if self.state not in (SessionState.OPEN, SessionState.DRAINING):
            raise InvalidState("session", self.state, f"send {message.type}")
        self._queue(FrameType.CONTROL, 0, 0, encode_control(message))
        if isinstance(message, Error):
            self._enter(SessionEvent.CLOSE)

    def _enter(self, event: SessionEvent) -> None:
        self.state = session_transition(self.state, event)

    def _enter_open(self) -> None:
        self._enter(SessionEvent.ACCEPT)
        extra = self.connection_window - INITIAL_CONNECTION_WINDOW
        if extra:
            self._recv_conn_window += extra
            self._queue(FrameType.WINDOW, 0, 0, encode_window(extra))

    def _handle_hello(self, hello: Hello) -> None:
        common = sorted(set(hello.versions) & set(SUPPORTED_VERSIONS))
        if not common:
            self.refuse("unsupported_version", f"server speaks versions {list(SUPPORTED_VERSIONS)}")
            self._fail(RemoteProtocolError(f"no common protocol version in {hello.versions}"))
            return
        self.version = common[-1]
        self.peer_max_frame = hello.max_frame
        self.peer_initial_window = hello.initial_window
        self.peer_max_streams = hello.max_streams
        self._events.append(ControlReceived(hello))

    def _handle_welcome(self, welcome: Welcome) -> None:
        if welcome.version not in SUPPORTED_VERSIONS:
            raise RemoteProtocolError(f"server chose unsupported version {welcome.version}")
        self.version = welcome.version
        self.peer_max_frame = welcome.max_frame
        self.peer_initial_window = welcome.initial_window
        self.peer_max_streams = welcome.max_streams
        self.adopt_heartbeat(welcome.heartbeat_interval)
        self._enter_open()
        self._events.append(ControlReceived(welcome))

    # ------------------------------------------------------------------ streams (send side)

    def open_stream(self, head: RequestHead, end_stream: bool = False) -> int:
        """Server: open a stream carrying ``head``; returns its id.

        Raises:
            SessionClosed: the session is draining or closed.
            TooManyStreams: the peer's or our own stream limit is reached.
        """
        self._require_role(Role.SERVER, "open_stream")
        if self.state is not SessionState.OPEN:
            raise SessionClosed(f"session is {self.state.value}")
        if len(self._streams) >= min(self.max_streams, self.peer_max_streams):
            raise TooManyStreams(f"{len(self._streams)} streams open")
        stream_id = self._next_stream_id
        if stream_id >= (1 << 31):
            raise SessionClosed("stream ids exhausted")
        # Encode first: a head that cannot be sent must not leave a stream behind.
        payload = self._head_payload(encode_request_head(head), "OPEN")
        self._next_stream_id += 2
        stream = _Stream(StreamState.OPEN, self.peer_initial_window, self.initial_window)
        self._streams[stream_id] = stream
        self._queue(FrameType.OPEN, Flags.END_STREAM if end_stream else 0, stream_id, payload)
        if end_stream:
            stream.state = transition(stream.state, StreamEvent.SEND_END)
        return stream_id

    def send_reply(self, stream_id: int, head: ResponseHead, end_stream: bool = False) -> None:
        """Client: answer a stream with a response head (exactly once, before any DATA)."""
        self._require_role(Role.CLIENT, "send_reply")
        stream = self._sendable(stream_id, "send_reply")
        if stream.replied:
            raise LocalProtocolError(f"stream {stream_id} already replied")
        payload = self._head_payload(encode_response_head(head), "REPLY")
        stream.replied = True
        self._queue(FrameType.REPLY, Flags.END_STREAM if end_stream else 0, stream_id, payload)
        if end_stream:
            self._local_transition(stream_id, stream, StreamEvent.SEND_END)

    def _head_payload(self, payload: bytes, what: str) -> bytes:
        # Sections 4.1 and 13: a head must fit in one frame of the peer's size. Sending a larger one
        # would make the peer fail the whole session (every stream), so refuse it here.
        if len(payload) > self.peer_max_frame:
            raise LocalProtocolError(f"{what} head of {len(payload)} bytes exceeds the peer's frame limit")
        return payload

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        """Queue DATA within the available credit, split to the peer's frame limit.

        Raises:
            FlowControlError: ``data`` is longer than :meth:`send_window`.
            InvalidState: the stream cannot send.
        """
        stream = self._sendable(stream_id, "send_data")
        if self.role is Role.CLIENT and not stream.replied:
            raise LocalProtocolError(f"stream {stream_id}: DATA before REPLY")
        n = len(data)
        if n > stream.send_window or n > self._send_conn_window:
            raise FlowControlError(f"stream {stream_id}: {n} bytes exceed the send window")
        stream.send_window -= n
        self._send_conn_window -= n
        step = self.peer_max_frame
        if n <= step:
            self._queue(FrameType.DATA, Flags.END_STREAM if end_stream else 0, stream_id, data)
        else:
            view = memoryview(data)
            for offset in range(0, n, step):
                last = offset + step >= n
                flags = Flags.END_STREAM if (end_stream and last) else 0
                self._queue(FrameType.DATA, flags, stream_id, view[offset : offset + step])  # joined once later
        if end_stream:
            self._local_transition(stream_id, stream, StreamEvent.SEND_END)

    @property
    def carries_trailers(self) -> bool:
        """True when the negotiated version has TRAILERS frames (section 14.1)."""
        return self.version is not None and self.version >= TRAILERS_VERSION

    def send_trailers(self, stream_id: int, headers: Headers) -> None:
        """Send trailer fields; they end our half of the stream (section 3.2, version 2).

        Raises:
            LocalProtocolError: a version 1 session, no REPLY yet (client), or trailers the
                peer's frame limit cannot carry.
            InvalidState: the stream cannot send.
        """
        if not self.carries_trailers:
            raise LocalProtocolError(f"protocol version {self.version} carries no trailers")
        stream = self._sendable(stream_id, "send_trailers")
        if self.role is Role.CLIENT and not stream.replied:
            raise LocalProtocolError(f"stream {stream_id}: TRAILERS before REPLY")
        payload = self._head_payload(encode_trailers(headers), "TRAILERS")
        self._queue(FrameType.TRAILERS, 0, stream_id, payload)
        self._local_transition(stream_id, stream, StreamEvent.SEND_END)

    def reset_stream(self, stream_id: int, code: int, reason: str = "") -> None:
        """Reset a stream; a no-op when it is already closed (section 7.3)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._queue(FrameType.RESET, 0, stream_id, encode_reset(code, reason))
        self._local_transition(stream_id, stream, StreamEvent.SEND_RESET)

    @property
    def has_output(self) -> bool:
        """True when frames are queued for :meth:`data_to_send`."""
        return bool(self._out)

    def consume(self, stream_id: int, n: int) -> bool:
        """Tell the session that ``n`` received bytes of ``stream_id`` were processed, so
        credit can be returned to the peer (section 6). Returns True when a WINDOW frame was
        queued (the caller should flush)."""
        if n <= 0:
            return False
        stream = self._streams.get(stream_id)
        if stream is None:
            return False
        before = len(self._out)
        n = min(n, stream.buffered)
        stream.buffered -= n
        self._buffered -= n
        stream.consumed += n
        if stream.consumed >= self.initial_window // 2 and stream.state in _CAN_RECV:
            if self._buffered > self.buffer_budget and stream.buffered >= self.initial_window // 4:
                self._behind[stream_id] = None  # a slow reader over the budget: no more credit yet
            else:
                self._behind.pop(stream_id, None)
                self._grant(stream_id, stream)
        if self._behind and self._buffered <= self.buffer_budget:
            self._grant_behind()
        self._release_withheld()
        return len(self._out) != before

    def _grant(self, stream_id: int, stream: _Stream) -> None:
        self._queue(FrameType.WINDOW, 0, stream_id, encode_window(stream.consumed))
        stream.recv_window += stream.consumed
        stream.consumed = 0

    def _grant_behind(self) -> None:
        """Below the budget again: the credit deferred for slow readers goes out."""
        behind, self._behind = self._behind, {}
        for stream_id in sorted(behind):
            stream = self._streams.get(stream_id)
            if stream is not None and stream.consumed and stream.state in _CAN_RECV:
                self._grant(stream_id, stream)

    def _release_withheld(self) -> None:
        # Section 6.2: only the credit of bytes buffered beyond the budget stays withheld.
        # (Releasing just "budget - buffered" could strand credit for good once the withheld
        # amount exceeded the budget: every byte consumed, and the peer still blocked.)
        if self._conn_credit_withheld:
            excess = max(0, self._buffered - self.buffer_limit)
            if self._conn_credit_withheld > excess:
                self._conn_credit_pending += self._conn_credit_withheld - excess
                self._conn_credit_withheld = excess
        if self._conn_credit_pending >= self.connection_window // 4:
            self._queue(FrameType.WINDOW, 0, 0, encode_window(self._conn_credit_pending))
            self._recv_conn_window += self._conn_credit_pending
            self._conn_credit_pending = 0

    def _sendable(self, stream_id: int, what: str) -> _Stream:
        if self.state is SessionState.CLOSED:
            raise SessionClosed("session is closed")
        stream = self._streams.get(stream_id)
        if stream is None:
            raise InvalidState(f"stream {stream_id}", StreamState.CLOSED, what)
        if stream.state not in _CAN_SEND:
            raise InvalidState(f"stream {stream_id}", stream.state, what)
        return stream

    def _local_transition(self, stream_id: int, stream: _Stream, event: StreamEvent) -> None:
        stream.state = transition(stream.state, event)
        if stream.state is StreamState.CLOSED:
            self._forget(stream_id, stream)

    def _forget(self, stream_id: int, stream: _Stream) -> None:
        del self._streams[stream_id]
        self._behind.pop(stream_id, None)
        if stream.buffered:
            # Section 6.2: connection credit for these bytes was returned on receipt, or
            # withheld; dropping them only frees budget, so withheld credit may flow again.
            self._buffered -= stream.buffered
            stream.buffered = 0
            if self._behind and self._buffered <= self.buffer_budget:
                self._grant_behind()
            self._release_withheld()

    # ------------------------------------------------------------------ go-away, heartbeat

    def send_goaway(self, code: int = GoAwayCode.NO_ERROR, reason: str = "") -> None:
        """Start draining: no new streams (section 8). Idempotent."""
        if self.state in (SessionState.CLOSED, SessionState.HANDSHAKE):
            self._enter(SessionEvent.GOAWAY)
            return
        if self.local_goaway is not None:
            return
        last = self._next_stream_id - 2 if self.role is Role.SERVER else self._highest_remote
        self.local_goaway = (max(last, 0), int(code), reason)
        self._queue(FrameType.GOAWAY, 0, 0, encode_goaway(max(last, 0), code, reason))
        self._enter(SessionEvent.GOAWAY)

    def adopt_heartbeat(self, interval: float) -> None:
        """Client: take the server's heartbeat interval (Welcome, section 9). Our silence limit
        stays above what the server's PINGs leave between them: at least three intervals, the
        ratio of the defaults (4 s and 12 s). A client kept at 12 s behind a server pinging
        every 20 s would otherwise call each quiet session dead and reconnect, forever."""
        self.heartbeat_interval = interval
        self.heartbeat_timeout = max(self.heartbeat_timeout, HEARTBEAT_TIMEOUT_RATIO * interval)

    def send_ping(self, now: float) -> None:
        """Queue a heartbeat PING stamped with ``now``."""
        self._last_ping = now
        self._queue(FrameType.PING, 0, 0, _PING.pack(now))

    def tick(self, now: float) -> None:
        """Heartbeat clock (section 9): ping when due, fail when the peer has been silent
        longer than ``heartbeat_timeout``."""
        if self.state is SessionState.CLOSED:
            return
        if now - self._last_received > self.heartbeat_timeout:
            self._fail(
                TunnelTimeout(f"no data from peer for {now - self._last_received:.1f}s"), GoAwayCode.HEARTBEAT_TIMEOUT
            )
            return
        if self.state is SessionState.HANDSHAKE or now - self._last_ping < self.heartbeat_interval:
            return
        # The server pings every interval (its PINGs measure the round trip its admin listener
        # shows); the client pings only when it has heard nothing for CLIENT_PING_SILENCE
        # intervals, so an idle tunnel carries one PING and one answer per interval, not two
        # of each. The server's PINGs and our answers keep both silence clocks and any
        # middlebox's idle timer fed either way.
        if self.role is Role.CLIENT and now - self._last_received < CLIENT_PING_SILENCE * self.heartbeat_interval:
            return
        self.send_ping(now)

    @property
    def closed(self) -> bool:
        """True once the session is over (for callers that state checks would not narrow)."""
        return self.state is SessionState.CLOSED

    @property
    def is_idle(self) -> bool:
        """True when a draining session has no streams left (it may be closed)."""
        return self.state is SessionState.DRAINING and not self._streams

    def close(self, error: TunnelError | None = None) -> None:
        """Mark the session closed (transport gone); open streams are reported as reset."""
        if self.state is SessionState.CLOSED:
            return
        self._enter(SessionEvent.CLOSE)
        self.error = error
        self._drop_streams(ResetCode.INTERNAL_ERROR, "session closed")

    def _drop_streams(self, code: int, reason: str) -> None:
        for stream_id in list(self._streams):
            self._events.append(ResetReceived(stream_id, code, reason))
        self._streams.clear()
        self._buffered = 0
        self._behind.clear()

    def _fail(self, error: TunnelError, code: int = GoAwayCode.PROTOCOL_ERROR) -> None:
        if self.state is not SessionState.CLOSED:
            last = self._highest_remote if self.role is Role.CLIENT else max(self._next_stream_id - 2, 0)
            self._queue(FrameType.GOAWAY, 0, 0, encode_goaway(last, code, str(error)[:200]))
        self._enter(SessionEvent.CLOSE)
        self.error = error
        self._drop_streams(ResetCode.INTERNAL_ERROR, "session failed")
        self._events.append(ConnectionFailed(error))

    def _require_role(self, role: Role, what: str) -> None:
        if self.role is not role:
            raise LocalProtocolError(f"{what} is for the {role.value} side")

    # ------------------------------------------------------------------ receive side

    def receive(self, data: bytes | memoryview, now: float) -> None:
        """Feed one received WebSocket message. Protocol errors never escape: the session
        moves to CLOSED, queues a GOAWAY naming the cause, and emits ConnectionFailed."""
        self._last_received = now
        if self.state is SessionState.CLOSED:
            return
        self.bytes_in += len(data)
        # A DATA payload at least half of an immutable message is handed on as a view of it
        # (no copy: the 1 MiB path); a smaller one is copied so that it never pins a message
        # many times its size (slow consumers, many streams per message).
        self._share_min = (len(data) + 1) // 2 if type(data) is bytes else 1 << 62
        try:
            # decode_frames's loop, inline: one header read and acted on at a time, as its
            # frames are yielded (no generator and no Frame per frame on the hot path)
            view = memoryview(data)
            end = len(view)
            if end == 0:
                raise RemoteProtocolError("empty message")
            offset = 0
            max_frame = self.max_frame
            while offset < end:
                ftype, flags, stream_id, length = read_header(view, offset, end, max_frame)
                offset += HEADER_SIZE
                payload = view[offset : offset + length]
                offset += length
                if ftype == FrameType.DATA:
                    self._recv_data(stream_id, payload, flags & _END_STREAM != 0)
                elif self.state is SessionState.HANDSHAKE and ftype != FrameType.CONTROL:
                    raise RemoteProtocolError(f"frame type {ftype:#x} before the handshake")
                else:
                    self._dispatch(ftype, flags, stream_id, payload, now)
                # The handlers above may close the session; mypy cannot see that.
                if self.state is SessionState.CLOSED:  # type: ignore[comparison-overlap]
                    break
        except ProtocolError as exc:
            self._fail(exc)

    def _dispatch(self, ftype: int, flags: int, stream_id: int, payload: memoryview, now: float) -> None:
        if ftype == FrameType.WINDOW:
            self._recv_window(stream_id, decode_window(payload))
        elif ftype == FrameType.OPEN:
            self._recv_open(stream_id, payload, flags & _END_STREAM != 0)
        elif ftype == FrameType.REPLY:
            self._recv_reply(stream_id, payload, flags & _END_STREAM != 0)
        elif ftype == FrameType.RESET:
            self._recv_reset(stream_id, payload)
        elif ftype == FrameType.PING:
            self._recv_ping(flags, payload, now)
        elif ftype == FrameType.GOAWAY:
            self._recv_goaway(payload)
        elif ftype == FrameType.TRAILERS:
            self._recv_trailers(stream_id, payload)
        else:  # CONTROL; read_header has rejected unknown types
            self._recv_control(payload)

    def _recv_data(self, stream_id: int, payload: memoryview, end: bool) -> None:
        if self.state is SessionState.HANDSHAKE:
            raise RemoteProtocolError("DATA before the handshake")
        n = len(payload)
        if n > self._recv_conn_window:
            raise FlowControlError(f"connection window exceeded by {n - self._recv_conn_window}")
        self._recv_conn_window -= n
        stream = self._streams.get(stream_id)
        if stream is None:
            self._unknown_stream(stream_id, "DATA")
            self._conn_credit_pending += n  # section 6.3: credit of dropped data comes back
            self._release_withheld()
            return
        if stream.state not in _CAN_RECV:
            raise InvalidState(f"stream {stream_id}", stream.state, "DATA")
        if self.role is Role.SERVER and not stream.replied:
            raise RemoteProtocolError(f"stream {stream_id}: DATA before REPLY")
        if n > stream.recv_window:
            raise FlowControlError(f"stream {stream_id} window exceeded")
        stream.recv_window -= n
        if n:
            stream.buffered += n
            self._buffered += n
            if self._buffered <= self.buffer_limit:
                self._conn_credit_pending += n
            else:
                self._conn_credit_withheld += n
            self._release_withheld()
        self._events.append(DataReceived(stream_id, payload if n >= self._share_min else bytes(payload), end))
        if end:
            self._remote_transition(stream_id, stream, StreamEvent.RECV_END)

    def _recv_open(self, stream_id: int, payload: memoryview, end: bool) -> None:
        if self.role is not Role.CLIENT:
            raise RemoteProtocolError("only the exit server opens streams")
        if stream_id % 2 == 0 or stream_id <= self._highest_remote:
            raise RemoteProtocolError(f"stream id {stream_id} is not new and odd")
        self._highest_remote = stream_id
        head = decode_request_head(payload)
        if self.state is not SessionState.OPEN or len(self._streams) >= self.max_streams:
            # Section 8: refused streams were not processed and are safe to retry.
            self._queue(FrameType.RESET, 0, stream_id, encode_reset(ResetCode.REFUSED, "not accepting streams"))
            return
        stream = _Stream(StreamState.OPEN, self.peer_initial_window, self.initial_window)
        self._streams[stream_id] = stream
        self._events.append(StreamOpened(stream_id, head, end))
        if end:
            stream.state = transition(stream.state, StreamEvent.RECV_END)

    def _recv_reply(self, stream_id: int, payload: memoryview, end: bool) -> None:
        if self.role is not Role.SERVER:
            raise RemoteProtocolError("REPLY sent to the client")
        head = decode_response_head(payload)
        stream = self._streams.get(stream_id)
        if stream is None:
            self._unknown_stream(stream_id, "REPLY")
            return
        if stream.replied or stream.state not in _CAN_RECV:
            raise RemoteProtocolError(f"stream {stream_id}: unexpected REPLY")
        stream.replied = True
        self._events.append(ReplyReceived(stream_id, head, end))
        if end:
            self._remote_transition(stream_id, stream, StreamEvent.RECV_END)

    def _recv_trailers(self, stream_id: int, payload: memoryview) -> None:
        if not self.carries_trailers:
            raise RemoteProtocolError(f"TRAILERS in a version {self.version} session")
        headers = decode_trailers(payload)
        stream = self._streams.get(stream_id)
        if stream is None:
            self._unknown_stream(stream_id, "TRAILERS")
            return
        if stream.state not in _CAN_RECV:
            raise InvalidState(f"stream {stream_id}", stream.state, "TRAILERS")
        if self.role is Role.SERVER and not stream.replied:
            raise RemoteProtocolError(f"stream {stream_id}: TRAILERS before REPLY")
        self._events.append(TrailersReceived(stream_id, headers))
        self._remote_transition(stream_id, stream, StreamEvent.RECV_END)

    def _recv_reset(self, stream_id: int, payload: memoryview) -> None:
        code, reason = decode_reset(payload)
        stream = self._streams.get(stream_id)
        if stream is None:
            self._unknown_stream(stream_id, "RESET")
            return
        self._events.append(ResetReceived(stream_id, code, reason))
        self._remote_transition(stream_id, stream, StreamEvent.RECV_RESET)

    def _recv_window(self, stream_id: int, increment: int) -> None:
        if stream_id == 0:
            self._send_conn_window += increment
            if self._send_conn_window >= 1 << 31:
                raise FlowControlError("connection window above 2**31-1")
            self._events.append(WindowUpdated(0))
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            self._unknown_stream(stream_id, "WINDOW")
            return
        stream.send_window += increment
        if stream.send_window >= 1 << 31:
            raise FlowControlError(f"stream {stream_id} window above 2**31-1")
        self._events.append(WindowUpdated(stream_id))

    def _recv_ping(self, flags: int, payload: memoryview, now: float) -> None:
        if len(payload) != 8:
            raise RemoteProtocolError("PING payload must be 8 bytes")
        if flags & _ACK:
            (sent,) = _PING.unpack_from(payload)
            if 0 <= now - sent < 3600:
                self.rtt = now - sent
        else:
            self._queue(FrameType.PING, Flags.ACK, 0, bytes(payload))

    def _recv_goaway(self, payload: memoryview) -> None:
        last, code, reason = decode_goaway(payload)
        self.peer_goaway = (last, code, reason)
        if self.state is SessionState.OPEN:
            self._enter(SessionEvent.GOAWAY)
        if self.role is Role.SERVER:
            # Streams the client never saw were not processed: report them refused (retryable).
            for stream_id in [s for s in self._streams if s > last]:
                self._forget(stream_id, self._streams[stream_id])
                self._events.append(ResetReceived(stream_id, ResetCode.REFUSED, "peer going away"))
        self._events.append(GoAwayReceived(last, code, reason))
        if code not in (GoAwayCode.NO_ERROR, GoAwayCode.SHUTDOWN, GoAwayCode.REPLACED):
            self._enter(SessionEvent.CLOSE)
            self.error = SessionClosed(f"peer went away (code {code}): {reason}")
            self._drop_streams(ResetCode.INTERNAL_ERROR, "peer went away")

    def _recv_control(self, payload: memoryview) -> None:
        message = decode_control(payload)
        if isinstance(message, Error):
            self._enter(SessionEvent.CLOSE)
            self.error = SessionClosed(f"peer error {message.code}: {message.message}")
            self._drop_streams(ResetCode.INTERNAL_ERROR, "peer error")
            self._events.append(ControlReceived(message))
            self._events.append(ConnectionFailed(self.error))
            return
        if self.state is SessionState.HANDSHAKE:
            if self.role is Role.SERVER and isinstance(message, Hello) and self.version is None:
                self._handle_hello(message)
                return
            if self.role is Role.CLIENT and isinstance(message, Welcome):
                self._handle_welcome(message)
                return
            raise RemoteProtocolError(f"unexpected {message.type} during the handshake")
        if self.role is Role.SERVER and isinstance(message, Routes):
            self._events.append(ControlReceived(message))
            return
        raise RemoteProtocolError(f"unexpected {message.type} after the handshake")

    def _remote_transition(self, stream_id: int, stream: _Stream, event: StreamEvent) -> None:
        stream.state = transition(stream.state, event)
        if stream.state is StreamState.CLOSED:
            self._forget(stream_id, stream)

    def _unknown_stream(self, stream_id: int, what: str) -> None:
        # Section 7.3: frames for a stream we closed (a race with our RESET) are ignored;
        # frames for a stream that never existed are a protocol error.
        opened = self._next_stream_id - 2 if self.role is Role.SERVER else self._highest_remote
        if stream_id > opened or stream_id % 2 == 0:
            raise RemoteProtocolError(f"{what} on stream {stream_id} that was never opened")
