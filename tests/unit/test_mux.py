"""shared.mux: the session state machine, two sessions back to back (docs/PROTOCOL.md 5-9)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shared.mux
from shared.errors import (
    FlowControlError,
    FrameTooLarge,
    InvalidState,
    LocalProtocolError,
    RemoteProtocolError,
    SessionClosed,
    TooManyStreams,
    TunnelTimeout,
)
from shared.events import (
    ConnectionFailed,
    ControlReceived,
    DataReceived,
    GoAwayReceived,
    ReplyReceived,
    ResetReceived,
    StreamOpened,
    WindowUpdated,
)
from shared.frames import (
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
)
from shared.heads import RequestHead, ResponseHead, StreamKind, encode_request_head, encode_response_head
from shared.messages import Error, Hello, Routes, Welcome, encode_control
from shared.mux import (
    INITIAL_CONNECTION_WINDOW,
    Role,
    Session,
    SessionEvent,
    SessionState,
    StreamEvent,
    StreamState,
    session_transition,
    transition,
)

from .helpers import GET, Pair, frames, raw

OK = ResponseHead(200)
MiB = 1 << 20
KiB = 1024


def state(session: Session) -> SessionState:
    """The session state, read through a call so that mypy does not narrow it."""
    return session.state


def failed(events: list[Any]) -> ConnectionFailed:
    """The single ConnectionFailed among events."""
    (event,) = [e for e in events if isinstance(e, ConnectionFailed)]
    return event


def goaway_of(messages: list[bytes]) -> tuple[int, int, str]:
    (frame,) = [f for f in frames(messages) if f.type == FrameType.GOAWAY]
    return decode_goaway(frame.payload)


def conn_windows(messages: list[bytes]) -> list[int]:
    return [decode_window(f.payload) for f in frames(messages) if f.type == FrameType.WINDOW and f.stream_id == 0]


def check_credit(session: Session) -> None:
    """Receive-side credit accounting: nothing created, nothing lost (section 6)."""
    s = session
    assert s._recv_conn_window + s._conn_credit_pending + s._conn_credit_withheld == s.connection_window
    assert s._buffered == sum(st.buffered for st in s._streams.values())


def opened_client(pair: Pair) -> int:
    """Open a stream and have the client reply, so DATA may flow both ways."""
    stream_id = pair.open()
    pair.client.send_reply(stream_id, OK)
    pair.pump()
    pair.take()
    return stream_id


# ================================================================= stream state table (h11 _state style)

LEGAL = {
    (StreamState.OPEN, StreamEvent.SEND_END): StreamState.HALF_CLOSED_LOCAL,
    (StreamState.OPEN, StreamEvent.RECV_END): StreamState.HALF_CLOSED_REMOTE,
    (StreamState.OPEN, StreamEvent.SEND_RESET): StreamState.CLOSED,
    (StreamState.OPEN, StreamEvent.RECV_RESET): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_LOCAL, StreamEvent.RECV_END): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_LOCAL, StreamEvent.SEND_RESET): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_LOCAL, StreamEvent.RECV_RESET): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_REMOTE, StreamEvent.SEND_END): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_REMOTE, StreamEvent.SEND_RESET): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_REMOTE, StreamEvent.RECV_RESET): StreamState.CLOSED,
}
ALL = [(s, e) for s in StreamState for e in StreamEvent]


@pytest.mark.parametrize(("state", "event"), [k for k in ALL if k in LEGAL])
def test_legal_transition(state: StreamState, event: StreamEvent) -> None:
    assert transition(state, event) is LEGAL[(state, event)]


@pytest.mark.parametrize(("state", "event"), [k for k in ALL if k not in LEGAL])
def test_illegal_transition(state: StreamState, event: StreamEvent) -> None:
    with pytest.raises(InvalidState) as info:
        transition(state, event)
    assert info.value.state is state and info.value.event is event
    assert str(state) in str(info.value) and str(event) in str(info.value)


def test_illegal_transitions_are_exactly_these() -> None:
    assert sorted((s.value, e.value) for s, e in ALL if (s, e) not in LEGAL) == sorted(
        [("closed", e.value) for e in StreamEvent]
        + [("half-closed-local", "send-end"), ("half-closed-remote", "recv-end")]
    )


# ================================================================= handshake (section 5.1)


def test_initial_connection_window_is_one_mib() -> None:
    session = Session(Role.CLIENT)
    assert INITIAL_CONNECTION_WINDOW == MiB
    assert session._send_conn_window == session._recv_conn_window == MiB


def test_handshake() -> None:
    pair = Pair(handshake=False, server={"connection_window": 16 * MiB}, client={"connection_window": 4 * MiB})
    assert state(pair.server) is state(pair.client) is SessionState.HANDSHAKE
    assert not pair.server.accepting_streams
    hello = pair.hello()
    pair.client.send_hello(hello)
    pair.to_server()
    assert pair.server_events == [ControlReceived(hello)]
    assert pair.server.version == 1 and state(pair.server) is SessionState.HANDSHAKE
    welcome = pair.welcome()
    pair.server.accept(welcome)
    assert pair.server.state is SessionState.OPEN and pair.server.accepting_streams
    to_client = pair.to_client()
    # Welcome, then the server raises the client's connection window to 16 MiB.
    assert [f.type for f in frames(to_client)] == [FrameType.CONTROL, FrameType.WINDOW]
    assert conn_windows(to_client) == [15 * MiB]
    assert pair.client_events == [ControlReceived(welcome), WindowUpdated(0)]
    assert pair.client.state is SessionState.OPEN and pair.client.version == 1
    assert conn_windows(pair.to_server()) == [3 * MiB]
    assert pair.client._send_conn_window == 16 * MiB
    assert pair.server._send_conn_window == 4 * MiB
    # Each side learnt the other's limits.
    assert pair.server.peer_max_frame == pair.client.max_frame
    assert pair.server.peer_initial_window == pair.client.initial_window
    assert pair.server.peer_max_streams == pair.client.max_streams
    assert pair.client.peer_max_frame == pair.server.max_frame
    assert pair.client.peer_initial_window == pair.server.initial_window


def test_handshake_minimum_connection_window_sends_no_window() -> None:
    pair = Pair(handshake=False, server={"connection_window": MiB})
    pair.client.send_hello(pair.hello())
    pair.to_server()
    pair.server.accept(pair.welcome())
    assert [f.type for f in frames(pair.to_client())] == [FrameType.CONTROL]


def test_highest_common_version_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared.mux, "SUPPORTED_VERSIONS", (1, 2, 3))
    pair = Pair(handshake=False, hello={"versions": [2, 1, 9]})
    pair.client.send_hello(pair.hello())
    pair.to_server()
    assert pair.server.version == 2


def test_no_common_version() -> None:
    pair = Pair(handshake=False, hello={"versions": [7, 8]})
    pair.client.send_hello(pair.hello())
    pair.to_server()
    error = failed(pair.server_events).error
    assert isinstance(error, RemoteProtocolError) and "no common protocol version" in str(error)
    assert pair.server.state is SessionState.CLOSED and pair.server.error is error
    # The client is told why, with an Error message (no GOAWAY: there was no session).
    to_client = pair.to_client()
    assert [f.type for f in frames(to_client)] == [FrameType.CONTROL]
    received = [e for e in pair.client_events if isinstance(e, ControlReceived)]
    assert received == [ControlReceived(Error(code="unsupported_version", message="server speaks versions [1, 2]"))]
    assert isinstance(failed(pair.client_events).error, SessionClosed)
    assert pair.client.state is SessionState.CLOSED


def test_welcome_with_unsupported_version_fails_the_client() -> None:
    pair = Pair(handshake=False, welcome={"version": 3})
    pair.client.send_hello(pair.hello())
    pair.to_server()
    pair.server.accept(pair.welcome())
    pair.to_client()
    assert "unsupported version 3" in str(failed(pair.client_events).error)
    assert goaway_of(pair.client.data_to_send())[1] == GoAwayCode.PROTOCOL_ERROR


def test_refuse() -> None:
    pair = Pair(handshake=False)
    pair.client.send_hello(pair.hello())
    pair.to_server()
    pair.server.refuse("handshake_timeout", "no hello in time")
    assert pair.server.state is SessionState.CLOSED
    pair.to_client()
    assert ControlReceived(Error(code="handshake_timeout", message="no hello in time")) in pair.client_events
    assert pair.client.error is not None and "handshake_timeout" in str(pair.client.error)


def test_role_checks() -> None:
    server, client = Session(Role.SERVER), Session(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="send_hello is for the client side"):
        server.send_hello(Hello(versions=[1], instance_id="a"))
    with pytest.raises(LocalProtocolError, match="accept is for the server side"):
        client.accept(Welcome(version=1, session_id="s", client_id="c"))
    with pytest.raises(LocalProtocolError, match="open_stream is for the server side"):
        client.open_stream(GET)
    with pytest.raises(LocalProtocolError, match="send_reply is for the client side"):
        server.send_reply(1, OK)


def test_handshake_state_checks() -> None:
    server = Session(Role.SERVER)
    with pytest.raises(InvalidState, match="accept"):
        server.accept(Welcome(version=1, session_id="s", client_id="c"))  # no Hello yet
    with pytest.raises(InvalidState, match="send routes"):
        server.send_control(Routes())
    with pytest.raises(SessionClosed):
        server.open_stream(GET)
    pair = Pair()
    with pytest.raises(InvalidState, match="send_hello"):
        pair.client.send_hello(pair.hello())
    with pytest.raises(InvalidState, match="accept"):
        pair.server.accept(pair.welcome())


@pytest.mark.parametrize("session_kw", [{}, {"connection_window": MiB - 1}, {"connection_window": 1 << 31}])
def test_connection_window_limits(session_kw: dict[str, int]) -> None:
    if not session_kw:
        assert Session(Role.SERVER, connection_window=(1 << 31) - 1).connection_window == (1 << 31) - 1
        return
    with pytest.raises(LocalProtocolError, match="connection window"):
        Session(Role.SERVER, **session_kw)


def _server_after_hello() -> Session:
    server = Session(Role.SERVER)
    server.receive(raw(FrameType.CONTROL, 0, 0, encode_control(Hello(versions=[1], instance_id="a"))), 0)
    server.events()
    return server


@pytest.mark.parametrize(
    ("role", "message", "error"),
    [
        (Role.SERVER, raw(FrameType.PING, 0, 0, bytes(8)), "frame type 0x5 before the handshake"),
        (Role.SERVER, raw(FrameType.DATA, 0, 1, b"x"), "DATA before the handshake"),
        (Role.CLIENT, raw(FrameType.WINDOW, 0, 0, encode_window(1)), "before the handshake"),
        (Role.SERVER, raw(FrameType.CONTROL, 0, 0, encode_control(Routes())), "unexpected routes during the handshake"),
        (
            Role.SERVER,
            raw(FrameType.CONTROL, 0, 0, encode_control(Welcome(version=1, session_id="s", client_id="c"))),
            "unexpected welcome",
        ),
        (
            Role.CLIENT,
            raw(FrameType.CONTROL, 0, 0, encode_control(Hello(versions=[1], instance_id="a"))),
            "unexpected hello",
        ),
        (Role.CLIENT, raw(FrameType.CONTROL, 0, 0, b"{}"), "invalid control message"),
    ],
)
def test_bad_frames_during_handshake(role: Role, message: bytes, error: str) -> None:
    session = Session(role)
    session.receive(message, 0)
    assert error in str(failed(session.events()).error)
    assert session.state is SessionState.CLOSED
    assert goaway_of(session.data_to_send())[1] == GoAwayCode.PROTOCOL_ERROR


def test_second_hello_is_a_protocol_error() -> None:
    server = _server_after_hello()
    server.receive(raw(FrameType.CONTROL, 0, 0, encode_control(Hello(versions=[1], instance_id="a"))), 0)
    assert "unexpected hello during the handshake" in str(failed(server.events()).error)


@pytest.mark.parametrize("side", ["server", "client"])
def test_handshake_messages_after_the_handshake(side: str) -> None:
    pair = Pair()
    session = getattr(pair, side)
    message: Hello | Welcome = (
        Hello(versions=[1], instance_id="a") if side == "server" else Welcome(version=1, session_id="s", client_id="c")
    )
    session.receive(raw(FrameType.CONTROL, 0, 0, encode_control(message)), 0)
    assert f"unexpected {message.type} after the handshake" in str(failed(session.events()).error)


def test_routes_update() -> None:
    pair = Pair()
    routes = Routes(routes=[])
    pair.client.send_control(routes)
    pair.pump()
    assert pair.take()[0] == [ControlReceived(routes)]
    # Only the client sends Routes.
    pair.server.send_control(routes)
    pair.pump()
    assert "unexpected routes after the handshake" in str(failed(pair.take()[1]).error)


def test_fatal_error_message() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.take()
    pair.server.send_control(Error(code="auth_revoked", message="token revoked"))
    assert pair.server.state is SessionState.CLOSED
    pair.to_client()
    _, client_events = pair.take()
    assert ResetReceived(stream_id, ResetCode.INTERNAL_ERROR, "peer error") in client_events
    assert ControlReceived(Error(code="auth_revoked", message="token revoked")) in client_events
    assert "auth_revoked" in str(failed(client_events).error)
    assert pair.client.state is SessionState.CLOSED and pair.client.open_streams == 0


# ================================================================= streams (section 7)


def test_request_and_response_both_ways() -> None:
    pair = Pair()
    head = RequestHead(StreamKind.HTTP, "POST", "/upload", "app.example.com", headers=(("content-length", "4"),))
    stream_id = pair.server.open_stream(head)
    assert stream_id == 1
    assert pair.server.stream_state(1) is StreamState.OPEN
    pair.server.send_data(1, b"body", end_stream=True)
    assert pair.server.stream_state(1) is StreamState.HALF_CLOSED_LOCAL
    pair.pump()
    _, client_events = pair.take()
    assert client_events == [StreamOpened(1, head, False), DataReceived(1, b"body", True)]
    assert pair.client.stream_state(1) is StreamState.HALF_CLOSED_REMOTE
    reply = ResponseHead(201, (("content-type", "text/plain"),))
    pair.client.send_reply(1, reply)
    pair.client.send_data(1, b"he")
    pair.client.send_data(1, b"llo", end_stream=True)
    assert pair.client.stream_state(1) is StreamState.CLOSED and pair.client.stream_ids() == []
    pair.pump()
    server_events, _ = pair.take()
    assert server_events == [
        ReplyReceived(1, reply, False),
        DataReceived(1, b"he", False),
        DataReceived(1, b"llo", True),
    ]
    assert pair.server.stream_state(1) is StreamState.CLOSED and pair.server.open_streams == 0


def test_stream_ids_are_odd_and_increasing() -> None:
    pair = Pair()
    assert [pair.server.open_stream(GET) for _ in range(4)] == [1, 3, 5, 7]
    pair.pump()
    assert pair.client.stream_ids() == [1, 3, 5, 7]


def test_open_with_end_stream() -> None:
    pair = Pair()
    stream_id = pair.open(end_stream=True)
    assert pair.take()[1] == [StreamOpened(stream_id, GET, True)]
    assert pair.server.stream_state(stream_id) is StreamState.HALF_CLOSED_LOCAL
    assert pair.client.stream_state(stream_id) is StreamState.HALF_CLOSED_REMOTE
    pair.client.send_reply(stream_id, OK, end_stream=True)
    pair.pump()
    assert pair.take()[0] == [ReplyReceived(stream_id, OK, True)]
    assert pair.server.open_streams == pair.client.open_streams == 0


def test_reply_with_end_stream_half_closes() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.client.send_reply(stream_id, OK, end_stream=True)
    pair.pump()
    assert pair.server.stream_state(stream_id) is StreamState.HALF_CLOSED_REMOTE
    assert pair.client.stream_state(stream_id) is StreamState.HALF_CLOSED_LOCAL
    pair.server.send_data(stream_id, b"", end_stream=True)
    pair.pump()
    assert pair.take()[1][-1] == DataReceived(stream_id, b"", True)
    assert pair.server.open_streams == pair.client.open_streams == 0


def test_local_stream_misuse() -> None:
    pair = Pair()
    stream_id = pair.open()
    with pytest.raises(LocalProtocolError, match="DATA before REPLY"):
        pair.client.send_data(stream_id, b"x")
    pair.client.send_reply(stream_id, OK)
    with pytest.raises(LocalProtocolError, match="already replied"):
        pair.client.send_reply(stream_id, OK)
    pair.client.send_data(stream_id, b"", end_stream=True)
    with pytest.raises(InvalidState, match="HALF_CLOSED_LOCAL"):
        pair.client.send_data(stream_id, b"x")
    with pytest.raises(InvalidState) as info:
        pair.server.send_data(99, b"x")
    assert info.value.state is StreamState.CLOSED and info.value.event == "send_data"
    with pytest.raises(InvalidState, match="send_reply"):
        pair.client.send_reply(99, OK)


def test_sending_on_a_closed_session() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.server.close()
    with pytest.raises(SessionClosed):
        pair.server.send_data(stream_id, b"x")
    with pytest.raises(SessionClosed, match="closed"):
        pair.server.open_stream(GET)


def test_data_split_to_the_peer_frame_limit() -> None:
    pair = Pair(client={"max_frame": 1024})
    stream_id = pair.server.open_stream(GET)
    pair.server.send_data(stream_id, bytes(2500), end_stream=True)
    data = [f for f in frames(pair.server.data_to_send()) if f.type == FrameType.DATA]
    assert [(len(f.payload), f.flags) for f in data] == [(1024, 0), (1024, 0), (452, Flags.END_STREAM)]
    assert pair.server.peer_max_frame == 1024


def test_oversized_frame_from_peer_fails_the_session() -> None:
    pair = Pair(client={"max_frame": 1024})
    stream_id = pair.open()
    pair.client.receive(raw(FrameType.DATA, 0, stream_id, bytes(1025)), 0)
    assert isinstance(failed(pair.client.events()).error, FrameTooLarge)


def test_head_larger_than_the_peer_frame_limit_is_refused_locally() -> None:
    pair = Pair(client={"max_frame": 1024})
    big = RequestHead(StreamKind.HTTP, "GET", "/", "a", headers=(("x", "y" * 1100),))
    with pytest.raises(LocalProtocolError, match="exceeds the peer's frame limit"):
        pair.server.open_stream(big)
    # Nothing was queued and no stream id was used up.
    assert not pair.server.has_output and pair.server.open_streams == 0
    assert pair.server.open_stream(GET) == 1
    pair.pump()
    pair = Pair(server={"max_frame": 1024})
    pair.open()
    with pytest.raises(LocalProtocolError, match="REPLY head of 11.. bytes exceeds the peer's frame limit"):
        pair.client.send_reply(1, ResponseHead(200, (("x", "y" * 1100),)))
    assert not pair.client.has_output
    pair.client.send_reply(1, OK)  # the failed attempt did not count as the reply
    pair.pump()
    assert isinstance(pair.take()[0][0], ReplyReceived)


def test_head_that_cannot_be_encoded_leaves_no_stream() -> None:
    pair = Pair()
    with pytest.raises(LocalProtocolError, match="ISO-8859-1"):
        pair.server.open_stream(RequestHead(StreamKind.HTTP, "GET", "/\u20ac", "a"))
    assert pair.server.open_streams == 0 and not pair.server.has_output


def test_stream_ids_exhausted() -> None:
    pair = Pair()
    pair.server._next_stream_id = (1 << 31) + 1
    with pytest.raises(SessionClosed, match="exhausted"):
        pair.server.open_stream(GET)


def test_properties_for_unknown_streams() -> None:
    pair = Pair()
    assert pair.server.stream_state(5) is StreamState.CLOSED
    assert pair.server.send_window(5) == 0
    stream_id = pair.open(end_stream=True)
    assert pair.server.send_window(stream_id) == 0  # half-closed (local): cannot send


# ----------------------------------------------------------------- illegal frames from the peer


def test_data_after_peer_end_is_invalid_state() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.server.send_data(stream_id, b"", end_stream=True)
    pair.pump()
    pair.client.receive(raw(FrameType.DATA, 0, stream_id, b"more"), 0)
    error = failed(pair.client.events()).error
    assert isinstance(error, InvalidState) and error.state is StreamState.HALF_CLOSED_REMOTE


def test_data_before_reply_is_a_protocol_error() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.server.receive(raw(FrameType.DATA, 0, stream_id, b"x"), 0)
    assert "DATA before REPLY" in str(failed(pair.server.events()).error)


@pytest.mark.parametrize("end", [False, True])
def test_second_reply_is_a_protocol_error(end: bool) -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.client.send_reply(stream_id, OK, end_stream=end)
    pair.pump()
    pair.server.receive(raw(FrameType.REPLY, 0, stream_id, encode_response_head(OK)), 0)
    assert "unexpected REPLY" in str(failed(pair.server.events()).error)


def test_open_from_the_client_is_a_protocol_error() -> None:
    pair = Pair()
    pair.server.receive(raw(FrameType.OPEN, 0, 2, encode_request_head(GET)), 0)
    assert "only the exit server opens streams" in str(failed(pair.server.events()).error)


def test_reply_to_the_client_is_a_protocol_error() -> None:
    pair = Pair()
    pair.client.receive(raw(FrameType.REPLY, 0, 1, encode_response_head(OK)), 0)
    assert "REPLY sent to the client" in str(failed(pair.client.events()).error)


@pytest.mark.parametrize("stream_id", [2, 1])
def test_open_ids_must_be_new_and_odd(stream_id: int) -> None:
    pair = Pair()
    pair.open()
    pair.client.receive(raw(FrameType.OPEN, 0, stream_id, encode_request_head(GET)), 0)
    assert "is not new and odd" in str(failed(pair.client.events()).error)


def test_malformed_open_head_fails_the_session() -> None:
    pair = Pair()
    pair.client.receive(raw(FrameType.OPEN, 0, 1, b"\x09\x00\x05"), 0)
    assert "unknown stream kind" in str(failed(pair.client.events()).error)


# ================================================================= reset (section 7)


def test_server_resets() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.take()
    pair.server.reset_stream(stream_id, ResetCode.CANCEL, "caller went away")
    assert pair.server.stream_state(stream_id) is StreamState.CLOSED
    pair.pump()
    assert pair.take()[1] == [ResetReceived(stream_id, ResetCode.CANCEL, "caller went away")]
    assert pair.client.open_streams == 0


def test_client_resets() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.client.reset_stream(stream_id, ResetCode.NO_UPSTREAM)
    pair.pump()
    assert pair.take()[0] == [ResetReceived(stream_id, ResetCode.NO_UPSTREAM, "")]
    assert pair.server.open_streams == 0


def test_reset_in_half_closed_states() -> None:
    pair = Pair()
    stream_id = pair.open(end_stream=True)
    pair.take()
    pair.server.reset_stream(stream_id, ResetCode.CANCEL)  # half-closed (local) -> closed
    pair.pump()
    assert pair.take()[1] == [ResetReceived(stream_id, ResetCode.CANCEL, "")]  # half-closed (remote) -> closed


def test_reset_of_a_closed_stream_is_a_no_op() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.server.reset_stream(stream_id, ResetCode.CANCEL)
    pair.server.data_to_send()
    pair.server.reset_stream(stream_id, ResetCode.CANCEL)
    pair.server.reset_stream(77, ResetCode.CANCEL)
    assert not pair.server.has_output


def test_frames_for_closed_streams_are_ignored() -> None:
    """Section 7.3: the peer may have sent these before it saw our RESET."""
    pair = Pair()
    stream_id = pair.open()
    pair.client.send_reply(stream_id, OK)
    pair.client.send_data(stream_id, b"late")
    pair.client.reset_stream(stream_id, ResetCode.CANCEL)
    in_flight = pair.client.data_to_send()
    pair.server.reset_stream(stream_id, ResetCode.CANCEL)  # crosses the client's frames
    window_before = pair.server._recv_conn_window
    for message in in_flight:
        pair.server.receive(message, 0)
    pair.server.receive(raw(FrameType.WINDOW, 0, stream_id, encode_window(10)), 0)
    assert pair.server.events() == []
    assert pair.server.state is SessionState.OPEN
    # Section 6.3: the 4 bytes of dropped DATA still count towards connection credit.
    assert pair.server._recv_conn_window + pair.server._conn_credit_pending == window_before
    check_credit(pair.server)
    pair.to_client()
    assert pair.client.events() == [] and pair.client.state is SessionState.OPEN


def test_data_on_refused_stream_returns_connection_credit() -> None:
    pair = Pair(client={"max_streams": 1, "connection_window": MiB})
    first = pair.open()
    pair.server.peer_max_streams = 5  # the server thinks the client takes more (a lie or a race)
    second = pair.server.open_stream(GET)
    pair.server.send_data(second, bytes(256 * KiB))
    pair.to_client()
    # The client refused it and dropped its data, but returned the connection credit.
    assert conn_windows(pair.client.data_to_send()) == [256 * KiB]
    check_credit(pair.client)
    assert pair.client.stream_ids() == [first]


@pytest.mark.parametrize(
    ("side", "frame"),
    [
        ("server", raw(FrameType.DATA, 0, 3, b"x")),
        ("server", raw(FrameType.REPLY, 0, 3, encode_response_head(OK))),
        ("server", raw(FrameType.RESET, 0, 3, encode_reset(1))),
        ("server", raw(FrameType.WINDOW, 0, 3, encode_window(1))),
        ("server", raw(FrameType.RESET, 0, 2, encode_reset(1))),  # even: never opened by anyone
        ("client", raw(FrameType.DATA, 0, 3, b"x")),
        ("client", raw(FrameType.RESET, 0, 5, encode_reset(1))),
        ("client", raw(FrameType.WINDOW, 0, 3, encode_window(1))),
        ("client", raw(FrameType.WINDOW, 0, 2, encode_window(1))),
    ],
)
def test_frames_for_never_opened_streams_are_a_protocol_error(side: str, frame: bytes) -> None:
    pair = Pair()
    pair.open()  # stream 1 exists
    session: Session = getattr(pair, side)
    session.receive(frame, 0)
    assert "that was never opened" in str(failed(session.events()).error)
    assert goaway_of(session.data_to_send())[:2] == (1, GoAwayCode.PROTOCOL_ERROR)


# ================================================================= flow control (section 6)


def test_send_window_shrinks_and_returns() -> None:
    pair = Pair(server={"initial_window": 64 * KiB}, client={"initial_window": 64 * KiB})
    stream_id = opened_client(pair)
    assert pair.server.send_window(stream_id) == 64 * KiB
    pair.server.send_data(stream_id, bytes(40 * KiB))
    assert pair.server.send_window(stream_id) == 24 * KiB
    with pytest.raises(FlowControlError, match="exceed the send window"):
        pair.server.send_data(stream_id, bytes(24 * KiB + 1))
    pair.server.send_data(stream_id, bytes(24 * KiB))
    assert pair.server.send_window(stream_id) == 0
    pair.pump()
    received = sum(len(e.data) for e in pair.take()[1] if isinstance(e, DataReceived))
    assert received == 64 * KiB
    # Half the window consumed: a WINDOW for the stream goes back.
    assert not pair.client.consume(stream_id, 31 * KiB)
    assert pair.client.consume(stream_id, 1 * KiB)
    (frame,) = frames(pair.client.data_to_send())
    assert (frame.type, frame.stream_id, decode_window(frame.payload)) == (FrameType.WINDOW, stream_id, 32 * KiB)
    pair.server.receive(raw(FrameType.WINDOW, 0, stream_id, frame.payload.tobytes()), 0)
    assert pair.server.events() == [WindowUpdated(stream_id)]
    assert pair.server.send_window(stream_id) == 32 * KiB


def test_consume_edge_cases() -> None:
    pair = Pair(server={"initial_window": 64 * KiB})
    stream_id = opened_client(pair)
    assert not pair.server.consume(stream_id, 0)
    assert not pair.server.consume(99, 10)
    pair.client.send_data(stream_id, bytes(10))
    pair.pump()
    # Consuming more than was buffered is clamped.
    assert not pair.server.consume(stream_id, 1000)
    assert pair.server._streams[stream_id].buffered == 0 and pair.server._streams[stream_id].consumed == 10
    # After the peer's END no stream WINDOW is sent: it will not send more.
    pair.client.send_data(stream_id, bytes(40 * KiB), end_stream=True)
    pair.pump()
    assert not pair.server.consume(stream_id, 40 * KiB)
    check_credit(pair.server)


def test_connection_window_limits_all_streams() -> None:
    pair = Pair(client={"initial_window": 1 << 30, "connection_window": MiB, "buffer_limit": 0})
    streams = [pair.open() for _ in range(2)]
    pair.server.send_data(streams[0], bytes(MiB - 10))
    assert pair.server.send_window(streams[1]) == 10
    with pytest.raises(FlowControlError):
        pair.server.send_data(streams[1], bytes(11))
    pair.server.send_data(streams[1], bytes(10))
    assert pair.server.send_window(streams[0]) == pair.server.send_window(streams[1]) == 0


def test_connection_credit_returned_on_receipt() -> None:
    pair = Pair(client={"connection_window": MiB})
    stream_id = pair.open()
    pair.server.send_data(stream_id, bytes(200 * KiB))
    pair.to_client()
    assert conn_windows(pair.client.data_to_send()) == []  # below a quarter of the window
    pair.server.send_data(stream_id, bytes(56 * KiB))
    pair.to_client()
    # A quarter of the window has arrived: credit goes back without any consume.
    assert conn_windows(pair.client.data_to_send()) == [256 * KiB]
    check_credit(pair.client)


def test_closed_streams_do_not_return_connection_credit_twice() -> None:
    """Regression: unconsumed bytes of a stream that closed were credited a second time."""
    pair = Pair(server={"connection_window": MiB})
    received = returned = 0
    for _ in range(20):
        stream_id = pair.open(end_stream=True)
        pair.client.send_reply(stream_id, OK)
        pair.client.send_data(stream_id, bytes(100_000), end_stream=True)
        pair.to_server()
        received += 100_000
        returned += sum(conn_windows(pair.to_client()))
        check_credit(pair.server)
    assert returned <= received
    assert pair.server._recv_conn_window <= MiB


@pytest.mark.parametrize("how", ["reset", "end"])
def test_unconsumed_bytes_of_a_closed_stream_free_the_budget(how: str) -> None:
    pair = Pair(client={"connection_window": MiB, "buffer_limit": 100 * KiB})
    stream_id = pair.open()
    pair.client.send_reply(stream_id, OK)
    pair.server.send_data(stream_id, bytes(200 * KiB))
    pair.pump()
    assert pair.client._conn_credit_withheld == 100 * KiB
    if how == "reset":
        pair.client.reset_stream(stream_id, ResetCode.CANCEL)
    else:
        pair.server.send_data(stream_id, b"", end_stream=True)
        pair.to_client()
        pair.client.send_data(stream_id, b"", end_stream=True)
    assert pair.client.open_streams == 0
    assert pair.client._buffered == 0 and pair.client._conn_credit_withheld == 0
    check_credit(pair.client)


def test_buffer_limit_withholds_and_releases_connection_credit() -> None:
    kw = {"connection_window": MiB, "initial_window": 256 * KiB, "buffer_limit": 512 * KiB}
    pair = Pair(client=kw)
    s1, s2, s3 = (pair.open() for _ in range(3))
    for stream_id in (s1, s2):
        pair.server.send_data(stream_id, bytes(256 * KiB))
        pair.to_client()
        assert conn_windows(pair.client.data_to_send()) == [256 * KiB]  # within budget: returned on receipt
    pair.server.send_data(s3, bytes(256 * KiB))
    pair.to_client()
    assert conn_windows(pair.client.data_to_send()) == []  # beyond budget: withheld
    assert pair.client._conn_credit_withheld == 256 * KiB
    check_credit(pair.client)
    pair.client.consume(s1, 255 * KiB)  # still 1 KiB over the budget
    assert conn_windows(pair.client.data_to_send()) == []
    assert pair.client._conn_credit_withheld == 1 * KiB
    pair.client.consume(s1, 1 * KiB)  # back within the budget: the withheld credit flows
    assert conn_windows(pair.client.data_to_send()) == [256 * KiB]
    assert pair.client._conn_credit_withheld == 0
    pair.client.consume(s2, 256 * KiB)  # its credit went back on receipt already
    assert conn_windows(pair.client.data_to_send()) == []
    check_credit(pair.client)


def test_withheld_credit_all_comes_back_when_everything_is_consumed() -> None:
    """Regression: with a budget below the connection window, credit withheld beyond the
    budget was never released, and the whole tunnel stalled after everything was read."""
    pair = Pair(client={"connection_window": MiB, "initial_window": 256 * KiB, "buffer_limit": 100 * KiB})
    streams = [pair.open() for _ in range(5)]
    for stream_id in streams[:4]:
        pair.server.send_data(stream_id, bytes(256 * KiB))
        pair.pump()
        check_credit(pair.client)
    assert pair.server.send_window(streams[4]) == 0  # the connection window is used up
    assert pair.client._conn_credit_withheld == MiB - 100 * KiB
    for stream_id in streams[:4]:
        pair.client.consume(stream_id, 256 * KiB)
        pair.pump()
        check_credit(pair.client)
    assert pair.client._buffered == 0 and pair.client._conn_credit_withheld == 0
    assert pair.server.send_window(streams[4]) == 256 * KiB
    assert pair.server._send_conn_window == pair.client._recv_conn_window


def test_slow_readers_over_the_budget_hold_no_connection_credit() -> None:
    """Issue 24 item 4: streams whose readers are behind fill the budget, yet connection credit
    keeps flowing, so a stream that keeps up is served; the slow ones get no more stream credit
    until they catch up or the total drops below the budget."""
    kw = {"connection_window": MiB, "initial_window": 256 * KiB, "buffer_budget": 512 * KiB, "buffer_limit": 64 * MiB}
    pair = Pair(client=kw)
    slow = [pair.open() for _ in range(4)]
    fast = pair.open()
    for stream_id in slow:  # 1 MiB unconsumed: twice the budget, the whole connection window
        pair.server.send_data(stream_id, bytes(256 * KiB))
        pair.pump()
        check_credit(pair.client)
    assert pair.client._buffered == MiB
    assert pair.client._conn_credit_withheld == 0  # every byte's connection credit went back
    assert pair.server.send_window(fast) == 256 * KiB  # so the fast stream can send at once
    for _ in range(4):  # and keeps being served while the slow ones hold their buffers
        pair.server.send_data(fast, bytes(256 * KiB))
        pair.pump()
        pair.client.consume(fast, 256 * KiB)
        pair.pump()
        check_credit(pair.client)
        assert pair.server.send_window(fast) == 256 * KiB
    # A slow reader that consumed half its window but still has more than a quarter buffered
    # gets no stream credit while the session is over the budget...
    assert not pair.client.consume(slow[0], 128 * KiB)
    assert pair.server.send_window(slow[0]) == 0
    # ... and gets it once it has caught up (less than a quarter of a window buffered).
    assert pair.client.consume(slow[0], 100 * KiB)
    pair.pump()
    assert pair.server.send_window(slow[0]) == 228 * KiB
    # Another one is owed credit until the total drops below the budget, then it flows.
    assert not pair.client.consume(slow[1], 128 * KiB)
    for stream_id in slow[2:]:
        pair.client.consume(stream_id, 256 * KiB)
    pair.pump()
    assert pair.client._buffered <= 512 * KiB
    assert pair.server.send_window(slow[1]) == 128 * KiB
    assert not pair.client._behind
    check_credit(pair.client)


def test_peer_overrunning_the_stream_window_fails_the_session() -> None:
    pair = Pair(client={"initial_window": 16 * KiB})
    stream_id = pair.open()
    pair.client.receive(raw(FrameType.DATA, 0, stream_id, bytes(16 * KiB)), 0)
    pair.client.receive(raw(FrameType.DATA, 0, stream_id, b"x"), 0)
    error = failed(pair.client.events()).error
    assert isinstance(error, FlowControlError) and "window exceeded" in str(error)
    assert pair.client.state is SessionState.CLOSED
    assert goaway_of(pair.client.data_to_send())[1] == GoAwayCode.PROTOCOL_ERROR


def test_peer_overrunning_the_connection_window_fails_the_session() -> None:
    pair = Pair(client={"initial_window": 1 << 30, "connection_window": MiB, "buffer_limit": 0})
    stream_id = pair.open()
    for _ in range(4):
        pair.client.receive(raw(FrameType.DATA, 0, stream_id, bytes(256 * KiB)), 0)
    assert pair.client.events()[-1] == DataReceived(stream_id, bytes(256 * KiB), False)
    pair.client.receive(raw(FrameType.DATA, 0, stream_id, b"x"), 0)
    error = failed(pair.client.events()).error
    assert isinstance(error, FlowControlError) and "connection window exceeded by 1" in str(error)


@pytest.mark.parametrize("stream_id", [0, 1])
def test_window_overflow_fails_the_session(stream_id: int) -> None:
    pair = Pair()
    pair.open()
    pair.server.receive(raw(FrameType.WINDOW, 0, stream_id, encode_window((1 << 31) - 1)), 0)
    error = failed(pair.server.events()).error
    assert isinstance(error, FlowControlError) and "2**31-1" in str(error)


def test_zero_window_increment_fails_the_session() -> None:
    pair = Pair()
    pair.server.receive(raw(FrameType.WINDOW, 0, 0, bytes(4)), 0)
    assert "out of range" in str(failed(pair.server.events()).error)


# ================================================================= max streams


def test_own_stream_limit() -> None:
    pair = Pair(server={"max_streams": 2})
    pair.open()
    second = pair.open()
    with pytest.raises(TooManyStreams, match="2 streams open"):
        pair.server.open_stream(GET)
    pair.server.reset_stream(second, ResetCode.CANCEL)
    assert pair.server.open_stream(GET) == 5


def test_peer_stream_limit() -> None:
    pair = Pair(client={"max_streams": 1})
    assert pair.server.peer_max_streams == 1
    pair.open()
    with pytest.raises(TooManyStreams):
        pair.server.open_stream(GET)


def test_client_refuses_streams_beyond_its_limit() -> None:
    pair = Pair(client={"max_streams": 1}, hello={"max_streams": 5})
    first = pair.open()
    second = pair.open()
    server_events, client_events = pair.take()
    assert client_events == [StreamOpened(first, GET, False)]
    assert server_events == [ResetReceived(second, ResetCode.REFUSED, "not accepting streams")]
    assert pair.server.stream_ids() == [first]


# ================================================================= go-away and drain (section 8)


def test_server_goaway() -> None:
    pair = Pair()
    s1, s3 = pair.open(), pair.open()
    pair.take()
    pair.server.send_goaway(GoAwayCode.SHUTDOWN, "restarting")
    assert pair.server.state is SessionState.DRAINING and not pair.server.accepting_streams
    assert pair.server.local_goaway == (3, GoAwayCode.SHUTDOWN, "restarting")
    with pytest.raises(SessionClosed, match="draining"):
        pair.server.open_stream(GET)
    pair.pump()
    _, client_events = pair.take()
    assert client_events == [GoAwayReceived(3, GoAwayCode.SHUTDOWN, "restarting")]
    assert pair.client.state is SessionState.DRAINING and pair.client.peer_goaway == (3, 5, "restarting")
    # In-flight streams finish normally.
    assert not pair.server.is_idle
    for stream_id in (s1, s3):
        pair.server.send_data(stream_id, b"", end_stream=True)
        pair.client.send_reply(stream_id, OK, end_stream=True)
    pair.pump()
    assert pair.server.is_idle and pair.client.is_idle


def test_goaway_is_idempotent() -> None:
    pair = Pair()
    pair.server.send_goaway()
    pair.server.data_to_send()
    pair.server.send_goaway(GoAwayCode.SHUTDOWN)
    assert not pair.server.has_output
    assert pair.server.local_goaway == (0, GoAwayCode.NO_ERROR, "")


def test_goaway_before_the_handshake_just_closes() -> None:
    session = Session(Role.CLIENT)
    session.send_goaway()
    assert session.state is SessionState.CLOSED and not session.has_output
    session.send_goaway()
    assert session.state is SessionState.CLOSED and not session.has_output


def test_client_goaway_refuses_streams_it_never_saw() -> None:
    pair = Pair()
    s1 = pair.open()
    s3 = pair.server.open_stream(GET)  # in flight when the client decides to go away
    pair.client.send_goaway(GoAwayCode.NO_ERROR, "client restarting")
    assert pair.client.local_goaway == (s1, 0, "client restarting")
    pair.to_server()
    server_events, _ = pair.take()
    # Stream 3 was never processed: it is reported REFUSED, safe to retry elsewhere.
    assert server_events == [
        ResetReceived(s3, ResetCode.REFUSED, "peer going away"),
        GoAwayReceived(s1, GoAwayCode.NO_ERROR, "client restarting"),
    ]
    assert pair.server.stream_ids() == [s1] and pair.server.state is SessionState.DRAINING
    # The OPEN still reaches the client, which refuses it; the server ignores that RESET.
    to_client = pair.to_client()
    assert [f.type for f in frames(to_client)] == [FrameType.OPEN]
    (refusal,) = frames(pair.client.data_to_send())
    assert (refusal.type, refusal.stream_id) == (FrameType.RESET, s3)
    assert decode_reset(refusal.payload) == (ResetCode.REFUSED, "not accepting streams")
    pair.server.receive(raw(FrameType.RESET, 0, s3, refusal.payload.tobytes()), 0)
    assert pair.server.events() == [] and pair.server.state is SessionState.DRAINING
    # The stream the client had seen carries on.
    pair.client.send_reply(s1, OK)
    pair.pump()
    assert pair.take()[0] == [ReplyReceived(s1, OK, False)]


def test_client_refuses_new_open_after_its_goaway() -> None:
    pair = Pair()
    pair.client.send_goaway()
    pair.client.data_to_send()  # the server has not seen it yet
    stream_id = pair.server.open_stream(GET)
    pair.to_client()
    assert pair.client.events() == [] and pair.client.open_streams == 0
    (frame,) = frames(pair.client.data_to_send())
    assert (frame.type, frame.stream_id, decode_reset(frame.payload)[0]) == (FrameType.RESET, stream_id, 2)


@pytest.mark.parametrize("code", [GoAwayCode.PROTOCOL_ERROR, GoAwayCode.AUTH_REVOKED, GoAwayCode.HEARTBEAT_TIMEOUT])
def test_goaway_with_an_error_code_closes(code: GoAwayCode) -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.take()
    pair.client.receive(raw(FrameType.GOAWAY, 0, 0, encode_goaway(stream_id, code, "bad")), 0)
    assert pair.client.events() == [
        GoAwayReceived(stream_id, code, "bad"),
        ResetReceived(stream_id, ResetCode.INTERNAL_ERROR, "peer went away"),
    ]
    assert pair.client.state is SessionState.CLOSED and isinstance(pair.client.error, SessionClosed)


@pytest.mark.parametrize("code", [GoAwayCode.NO_ERROR, GoAwayCode.SHUTDOWN, GoAwayCode.REPLACED])
def test_goaway_graceful_codes_drain(code: GoAwayCode) -> None:
    pair = Pair()
    pair.open()
    pair.server.receive(raw(FrameType.GOAWAY, 0, 0, encode_goaway(1, code)), 0)
    assert pair.server.state is SessionState.DRAINING and pair.server.open_streams == 1


def test_goaway_while_draining_keeps_draining() -> None:
    pair = Pair()
    pair.server.send_goaway()
    pair.server.receive(raw(FrameType.GOAWAY, 0, 0, encode_goaway(0, 0)), 0)
    assert pair.server.state is SessionState.DRAINING and pair.server.peer_goaway == (0, 0, "")


# ================================================================= heartbeat (section 9)


def test_ping_when_due_and_rtt() -> None:
    pair = Pair(server={"heartbeat_interval": 5.0, "heartbeat_timeout": 15.0})
    pair.server.tick(4.9)
    assert not pair.server.has_output
    pair.server.tick(5.0)
    (ping,) = frames(pair.server.data_to_send())
    assert (ping.type, ping.flags, ping.stream_id) == (FrameType.PING, 0, 0)
    assert struct.unpack(">d", ping.payload) == (5.0,)
    pair.client.receive(raw(FrameType.PING, 0, 0, ping.payload.tobytes()), 5.1)
    (ack,) = frames(pair.client.data_to_send())
    assert (ack.type, ack.flags, bytes(ack.payload)) == (FrameType.PING, Flags.ACK, bytes(ping.payload))
    assert pair.server.rtt is None
    pair.server.receive(raw(FrameType.PING, Flags.ACK, 0, ack.payload.tobytes()), 5.25)
    assert pair.server.rtt == pytest.approx(0.25)
    assert pair.server.events() == [] and pair.client.events() == []
    # The next ping is due an interval after the last one.
    pair.server.tick(9.9)
    assert not pair.server.has_output
    pair.server.tick(10.0)
    assert [f.type for f in frames(pair.server.data_to_send())] == [FrameType.PING]


def test_a_client_that_hears_the_server_does_not_ping() -> None:
    """Section 9: the server pings every interval; the client answers and sends no PING of its
    own while the server's reach it, so an idle tunnel carries one PING and one ACK per
    interval."""
    pair = Pair(server={"heartbeat_interval": 4.0}, welcome={"heartbeat_interval": 4.0})
    assert pair.client.heartbeat_interval == 4.0
    sent_by_client: list[int] = []
    for step in range(1, 41):  # 20 s in half-second ticks
        pair.now = step * 0.5
        pair.server.tick(pair.now)
        pair.client.tick(pair.now)
        pair.to_client()
        sent_by_client += [f.flags for f in frames(pair.to_server()) if f.type == FrameType.PING]
    assert sent_by_client and set(sent_by_client) == {Flags.ACK}  # answers only
    assert len(sent_by_client) == 5  # the server's PINGs at 4, 8, 12, 16 and 20 s
    assert pair.server.rtt is not None and pair.client.state is SessionState.OPEN


def test_a_client_that_hears_nothing_pings_then_gives_up() -> None:
    pair = Pair(client={"heartbeat_timeout": 12.0}, welcome={"heartbeat_interval": 4.0})
    pair.client.tick(5.9)  # silent for less than 1.5 intervals
    assert not pair.client.has_output
    pair.client.tick(6.0)
    (ping,) = frames(pair.client.data_to_send())
    assert (ping.type, ping.flags) == (FrameType.PING, 0)
    pair.client.tick(9.9)  # at most one PING per interval
    assert not pair.client.has_output
    pair.client.tick(10.0)
    assert [f.type for f in frames(pair.client.data_to_send())] == [FrameType.PING]
    pair.client.tick(12.01)
    assert isinstance(failed(pair.client.events()).error, TunnelTimeout)


@pytest.mark.parametrize(
    ("interval", "own_timeout", "timeout"),
    [(4.0, 12.0, 12.0), (20.0, 12.0, 60.0), (1.0, 30.0, 30.0), (0.5, 0.3, 1.5)],
)
def test_the_client_adopts_the_interval_and_keeps_its_timeout_above_it(
    interval: float, own_timeout: float, timeout: float
) -> None:
    """A client left at 12 s behind a server pinging every 20 s would call every quiet session
    dead: the client's silence limit becomes at least three of the server's intervals."""
    pair = Pair(client={"heartbeat_timeout": own_timeout}, welcome={"heartbeat_interval": interval})
    assert pair.client.heartbeat_interval == interval
    assert pair.client.heartbeat_timeout == pytest.approx(timeout)


@pytest.mark.parametrize("stamp", [100.0, -5000.0, float("nan"), float("inf")])
def test_implausible_ack_does_not_set_rtt(stamp: float) -> None:
    pair = Pair()
    pair.server.receive(raw(FrameType.PING, Flags.ACK, 0, struct.pack(">d", stamp)), 10.0)
    assert pair.server.rtt is None and pair.server.state is SessionState.OPEN


def test_ping_payload_must_be_8_bytes() -> None:
    pair = Pair()
    pair.server.receive(raw(FrameType.PING, 0, 0, bytes(7)), 0)
    assert "8 bytes" in str(failed(pair.server.events()).error)


def test_no_ping_during_the_handshake() -> None:
    session = Session(Role.CLIENT, heartbeat_interval=1.0, heartbeat_timeout=15.0)
    session.tick(10.0)
    assert not session.has_output and session.state is SessionState.HANDSHAKE


def test_silence_kills_the_session() -> None:
    pair = Pair(client={"heartbeat_interval": 5.0, "heartbeat_timeout": 15.0})
    stream_id = pair.open()
    pair.take()
    pair.client.receive(raw(FrameType.PING, 0, 0, bytes(8)), 10.0)  # any bytes reset the clock
    pair.client.data_to_send()
    pair.client.tick(25.0)
    assert state(pair.client) is not SessionState.CLOSED
    pair.client.data_to_send()
    pair.client.tick(25.01)
    events = pair.client.events()
    error = failed(events).error
    assert isinstance(error, TunnelTimeout) and "no data from peer for 15.0s" in str(error)
    assert ResetReceived(stream_id, ResetCode.INTERNAL_ERROR, "session failed") in events
    assert pair.client.state is SessionState.CLOSED and pair.client.error is error
    assert goaway_of(pair.client.data_to_send())[:2] == (stream_id, GoAwayCode.HEARTBEAT_TIMEOUT)
    # A dead session stays dead.
    pair.client.tick(100.0)
    assert pair.client.events() == [] and not pair.client.has_output


def test_silence_during_the_handshake() -> None:
    session = Session(Role.SERVER, heartbeat_timeout=10.0, now=100.0)
    session.tick(110.0)
    assert session.state is SessionState.HANDSHAKE
    session.tick(110.5)
    assert isinstance(failed(session.events()).error, TunnelTimeout)
    assert goaway_of(session.data_to_send())[:2] == (0, GoAwayCode.HEARTBEAT_TIMEOUT)


# ================================================================= garbage and closing


@pytest.mark.parametrize(
    "message",
    [b"", b"\x00", b"\xff" * 9, raw(FrameType.DATA, 0, 1, b"x")[:-1], bytes.fromhex("000000 0f 00 00000000")],
)
def test_garbage_fails_the_session_without_raising(message: bytes) -> None:
    pair = Pair()
    pair.server.receive(message, 1.0)
    assert isinstance(failed(pair.server.events()).error, RemoteProtocolError)
    assert pair.server.state is SessionState.CLOSED
    assert goaway_of(pair.server.data_to_send())[1] == GoAwayCode.PROTOCOL_ERROR
    # The GOAWAY tells the peer, which then closes too.
    pair.server.receive(raw(FrameType.PING, 0, 0, bytes(8)), 2.0)  # ignored once closed
    assert pair.server.events() == [] and not pair.server.has_output


def test_peer_goaway_after_our_failure_reaches_the_peer() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.take()
    pair.client.receive(b"junk", 0)
    pair.to_server()
    server_events, _ = pair.take()
    assert server_events[0] == GoAwayReceived(stream_id, GoAwayCode.PROTOCOL_ERROR, "truncated frame header")
    assert pair.server.state is SessionState.CLOSED


def test_frames_after_a_fatal_frame_in_the_same_message_are_not_processed() -> None:
    pair = Pair()
    message = raw(FrameType.CONTROL, 0, 0, encode_control(Error(code="x"))) + raw(FrameType.PING, 0, 0, bytes(8))
    pair.server.receive(message, 0)
    assert not pair.server.has_output  # no ACK for the PING


def test_close() -> None:
    pair = Pair()
    stream_id = pair.open()
    error = SessionClosed("transport gone")
    pair.server.close(error)
    assert pair.server.state is SessionState.CLOSED and pair.server.error is error
    assert pair.server.events() == [ResetReceived(stream_id, ResetCode.INTERNAL_ERROR, "session closed")]
    pair.server.close(SessionClosed("again"))
    assert pair.server.error is error and pair.server.events() == []


def test_counters_and_grouping() -> None:
    pair = Pair()
    assert pair.server.data_to_send() == []
    pair.server.open_stream(GET)
    pair.server.open_stream(GET)
    pair.server.open_stream(GET)
    sizes = [len(h) + len(p) for h, p in pair.server._out]
    out = pair.server.data_to_send(max_message=sizes[0] + sizes[1])
    assert [len(m) for m in out] == [sizes[0] + sizes[1], sizes[2]]
    assert pair.server.bytes_out >= sum(sizes)
    # A frame larger than max_message travels alone.
    stream_id = 1
    pair.client.receive(b"".join(out), 0)
    pair.client.send_reply(stream_id, OK)
    pair.client.send_data(stream_id, bytes(100))
    out = pair.client.data_to_send(max_message=50)
    assert len(out) == 2 and len(out[1]) == 109
    before = pair.server.bytes_in
    for message in out:
        pair.server.receive(message, 0)
    assert pair.server.bytes_in == before + sum(len(m) for m in out)


# ================================================================= property: random operations

MIRROR = {
    StreamState.OPEN: StreamState.OPEN,
    StreamState.HALF_CLOSED_LOCAL: StreamState.HALF_CLOSED_REMOTE,
    StreamState.HALF_CLOSED_REMOTE: StreamState.HALF_CLOSED_LOCAL,
}
#: What the API may raise when asked for something the stream's state does not allow.
DOCUMENTED = (InvalidState, LocalProtocolError, TooManyStreams, SessionClosed)

#: Repeats weigh the draw towards traffic; going away is rarer.
KINDS = (
    ["open"] * 3
    + ["reply"] * 3
    + ["send"] * 6
    + ["consume"] * 3
    + ["deliver"] * 5
    + [
        "end",
        "end",
        "reset",
        "ping",
        "goaway",
    ]
)
operations = st.tuples(
    st.sampled_from(KINDS),
    st.sampled_from(["server", "client"]),
    st.integers(0, 7),  # which of the side's live streams
    st.integers(0, 3000),  # bytes to send or consume
    st.booleans(),  # end_stream
    st.sampled_from(list(ResetCode)),
)


class Model:
    """Drives a pair with random operations and records what each side sent and received."""

    def __init__(self) -> None:
        self.pair = Pair(
            server={
                "initial_window": 2048,
                "max_frame": 1024,
                "max_streams": 6,
                "buffer_budget": 1000,
                "buffer_limit": 2000,
            },
            client={
                "initial_window": 3072,
                "max_frame": 1024,
                "max_streams": 4,
                "buffer_budget": 500,
                "buffer_limit": 1000,
            },
        )
        self.sent: dict[tuple[str, int], bytearray] = {}
        self.received: dict[tuple[str, int], bytearray] = {}
        self.reset: set[int] = set()
        self.counter = 0

    def pick(self, session: Session, i: int) -> int | None:
        ids = session.stream_ids()
        return ids[i % len(ids)] if ids else None

    def collect(self) -> None:
        for side, events in zip(("server", "client"), self.pair.take(), strict=True):
            for event in events:
                assert not isinstance(event, ConnectionFailed), event.error
                if isinstance(event, DataReceived):
                    self.received.setdefault((side, event.stream_id), bytearray()).extend(event.data)
                elif isinstance(event, ResetReceived):
                    self.reset.add(event.stream_id)

    def run(self, op: tuple[str, str, int, int, bool, ResetCode]) -> None:
        kind, side, i, size, end, code = op
        pair = self.pair
        session: Session = getattr(pair, side)
        stream_id = self.pick(pair.client if kind == "reply" else session, i)
        try:
            if kind == "open":
                pair.server.open_stream(GET, end_stream=end)
            elif kind == "deliver":
                pair.to_client() if side == "server" else pair.to_server()
            elif kind == "goaway":
                session.send_goaway()
            elif kind == "ping":
                session.send_ping(pair.now)
            elif stream_id is None:
                pass
            elif kind == "reply":
                pair.client.send_reply(stream_id, OK, end_stream=end)
            elif kind == "send":
                n = min(size, session.send_window(stream_id))
                data = bytes((self.counter + k) % 251 for k in range(n))
                self.counter += n
                session.send_data(stream_id, data, end_stream=end)
                self.sent.setdefault((side, stream_id), bytearray()).extend(data)
            elif kind == "end":
                session.send_data(stream_id, b"", end_stream=True)
            elif kind == "consume":
                session.consume(stream_id, size)
            else:
                session.reset_stream(stream_id, code)
                self.reset.add(stream_id)
        except DOCUMENTED:
            pass
        self.collect()

    def check(self) -> None:
        pair = self.pair
        pair.pump()
        self.collect()
        server, client = pair.server, pair.client
        for session in (server, client):
            assert session.state in (SessionState.OPEN, SessionState.DRAINING)
            check_credit(session)
        # Both sides agree on which streams live, and in mirrored states.
        assert sorted(server.stream_ids()) == sorted(client.stream_ids())
        for stream_id in server.stream_ids():
            assert client.stream_state(stream_id) is MIRROR[server.stream_state(stream_id)]
            ours, theirs = server._streams[stream_id], client._streams[stream_id]
            assert ours.send_window == theirs.recv_window
            assert ours.recv_window == theirs.send_window
        # Connection credit seen the same way from both ends.
        assert server._send_conn_window == client._recv_conn_window
        assert client._send_conn_window == server._recv_conn_window
        # Bytes arrive in order and whole, unless the stream was reset (then a prefix).
        for (side, stream_id), sent in self.sent.items():
            other = "client" if side == "server" else "server"
            got = self.received.get((other, stream_id), bytearray())
            if stream_id in self.reset:
                assert sent.startswith(got)
            else:
                assert got == sent
        if server.state is SessionState.DRAINING and not server.stream_ids():
            assert server.is_idle
        # Liveness: once the application has read everything, no credit stays withheld.
        for session in (server, client):
            for stream_id in session.stream_ids():
                session.consume(stream_id, session._streams[stream_id].buffered)
        pair.pump()
        for session in (server, client):
            assert session._buffered == 0 and session._conn_credit_withheld == 0
            check_credit(session)


@settings(max_examples=300, deadline=None)
@given(st.lists(operations, min_size=20, max_size=150))
def test_random_operations_keep_both_sides_consistent(
    ops: list[tuple[str, str, int, int, bool, ResetCode]],
) -> None:
    model = Model()
    for op in ops:
        model.run(op)
    model.check()


def test_refused_streams_on_peer_goaway_free_their_buffer() -> None:
    """A client that answered and sent DATA on a stream, then excluded it with its GOAWAY: the
    stream's buffered bytes must leave the budget with it."""
    pair = Pair()
    pair.open()
    s3 = pair.open()
    pair.client.send_reply(s3, OK)
    pair.client.send_data(s3, bytes(1000))
    pair.to_server()
    assert pair.server._buffered == 1000
    pair.server.receive(raw(FrameType.GOAWAY, 0, 0, encode_goaway(1, GoAwayCode.NO_ERROR)), 0)
    assert ResetReceived(s3, ResetCode.REFUSED, "peer going away") in pair.server.events()
    assert pair.server._buffered == 0
    check_credit(pair.server)


# ================================================================= property: garbage never escapes

frame_types = st.integers(0, 9)


@st.composite
def plausible_messages(draw: st.DrawFn) -> bytes:
    """Messages made of well-framed frames with arbitrary contents: they get past the codec and
    reach the session's handlers."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        ftype = draw(frame_types)
        flags = draw(st.sampled_from([0, 1, 2]))
        stream_id = draw(st.sampled_from([0, 1, 2, 3, 5]))
        payload = draw(
            st.one_of(
                st.binary(max_size=40),
                st.just(encode_request_head(GET)),
                st.just(encode_response_head(OK)),
                st.just(encode_window(100)),
                st.just(encode_goaway(1, 0)),
                st.just(encode_reset(2)),
                st.just(bytes(8)),
                st.just(encode_control(Routes())),
                st.just(encode_control(Hello(versions=[1], instance_id="a"))),
            )
        )
        parts.append(raw(ftype, flags, stream_id, payload) if ftype <= 7 else bytes([0, 0, 0, ftype, 0]) + payload)
    return b"".join(parts)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["server", "client"]),
    st.booleans(),
    st.lists(st.one_of(st.binary(max_size=60), plausible_messages()), min_size=1, max_size=6),
)
def test_garbage_never_escapes_receive(side: str, handshake: bool, messages: list[bytes]) -> None:
    pair = Pair(handshake=handshake)
    if handshake:
        pair.open()
        pair.client.send_reply(1, OK)
        pair.pump()
        pair.take()
    session: Session = getattr(pair, side)
    for message in messages:
        session.receive(message, 1.0)  # must not raise
        for event in session.events():
            if isinstance(event, ConnectionFailed):
                assert session.state is SessionState.CLOSED and session.error is event.error
                assert isinstance(event.error, RemoteProtocolError | InvalidState | FlowControlError | SessionClosed)
        session.data_to_send()


# ================================================================= the worked example of PROTOCOL.md


def test_worked_example_bytes() -> None:
    """The byte-exact session of docs/PROTOCOL.md (appendix A)."""
    hello = Hello(versions=[1], instance_id="edge-1")
    welcome = Welcome(version=1, session_id="s1", client_id="default")
    hello_json = (
        b'{"type":"hello","versions":[1],"instance_id":"edge-1","routes":[],"tcp":[],"labels":{},'
        b'"max_streams":10000,"initial_window":262144,"max_frame":262144,"software":""}'
    )
    welcome_json = (
        b'{"type":"welcome","version":1,"session_id":"s1","client_id":"default","routes":[],"tcp":[],'
        b'"refused":[],"max_streams":10000,"initial_window":262144,"max_frame":262144,"heartbeat_interval":5.0}'
    )
    server, client = Session(Role.SERVER), Session(Role.CLIENT)

    client.send_hello(hello)
    (message,) = client.data_to_send()
    assert message == bytes.fromhex("0000a4 07 00 00000000") + hello_json
    server.receive(message, 0.0)

    server.accept(welcome)
    (message,) = server.data_to_send()
    assert message == (
        bytes.fromhex("0000c0 07 00 00000000") + welcome_json + bytes.fromhex("000004 04 00 00000000 00f00000")
    )
    client.receive(message, 0.0)
    (message,) = client.data_to_send()
    assert message == bytes.fromhex("000004 04 00 00000000 00f00000")
    server.receive(message, 0.0)

    head = RequestHead(StreamKind.HTTP, "GET", "/", "a.example", "https", "10.0.0.1", (("accept", "*/*"),))
    assert server.open_stream(head, end_stream=True) == 1
    (message,) = server.data_to_send()
    assert message == bytes.fromhex(
        "000034 01 01 00000001"
        "01 0007 0003 474554 0001 2f 0009 612e6578616d706c65 0005 6874747073 0008 31302e302e302e31"
        " 0006 616363657074 0003 2a2f2a"
    )
    client.receive(message, 0.0)

    client.send_reply(1, ResponseHead(200, (("content-length", "2"),)))
    client.send_data(1, b"ok", end_stream=True)
    (message,) = client.data_to_send()
    assert message == bytes.fromhex(
        "000017 02 00 00000001 00c8 0002 000e 636f6e74656e742d6c656e677468 0001 32000002 00 01 00000001 6f6b"
    )
    server.receive(message, 0.0)
    assert server.open_streams == client.open_streams == 0

    server.tick(12.5)
    (message,) = server.data_to_send()
    assert message == bytes.fromhex("000008 05 00 00000000 4029000000000000")
    client.receive(message, 12.5)
    (message,) = client.data_to_send()
    assert message == bytes.fromhex("000008 05 01 00000000 4029000000000000")
    server.receive(message, 12.54)
    assert server.rtt == pytest.approx(0.04)

    server.send_goaway(GoAwayCode.SHUTDOWN, "bye")
    (message,) = server.data_to_send()
    assert message == bytes.fromhex("000009 06 00 00000000 00000001 0005 627965")
    client.receive(message, 13.0)
    assert client.events()[-1] == GoAwayReceived(1, GoAwayCode.SHUTDOWN, "bye")
    assert server.is_idle and client.is_idle


SESSION_TABLE = {
    (SessionState.HANDSHAKE, SessionEvent.ACCEPT): SessionState.OPEN,
    (SessionState.HANDSHAKE, SessionEvent.GOAWAY): SessionState.CLOSED,
    (SessionState.OPEN, SessionEvent.GOAWAY): SessionState.DRAINING,
    (SessionState.DRAINING, SessionEvent.GOAWAY): SessionState.DRAINING,
    (SessionState.CLOSED, SessionEvent.GOAWAY): SessionState.CLOSED,
    **{(state, SessionEvent.CLOSE): SessionState.CLOSED for state in SessionState},
}


@pytest.mark.parametrize("state", list(SessionState))
@pytest.mark.parametrize("event", list(SessionEvent))
def test_session_transition_table(state: SessionState, event: SessionEvent) -> None:
    """Every session transition is in one table; an accept anywhere but the handshake is illegal."""
    expected = SESSION_TABLE.get((state, event))
    if expected is None:
        with pytest.raises(InvalidState):
            session_transition(state, event)
    else:
        assert session_transition(state, event) is expected
