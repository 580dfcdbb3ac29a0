"""Coverage-guided fuzzing of the sans-I/O protocol with atheris (libFuzzer for Python).

What it checks, for arbitrary input:

- ``Session.receive()`` on both roles, before and after the handshake, never raises: every
  protocol violation becomes a CLOSED session with ``error`` set and a ConnectionFailed event
  (the contract in shared/mux.py);
- local calls made in between (send_reply, send_data, consume, reset, go-away, open_stream,
  tick) raise nothing outside the TunnelError family;
- whatever a session queues for sending decodes cleanly (frames, heads, control messages): a
  session never emits bytes its peer would reject;
- the decode functions (frames, heads, control messages, RESET/GOAWAY/WINDOW payloads) raise
  only ProtocolError-family errors.

Run (see fuzz/README.md)::

    pip install atheris
    python fuzz/fuzz_session.py -max_total_time=600            # add a corpus directory to keep finds

The input is read as a little program: each step picks an operation from the next byte. Frames
are built structurally most of the time (valid header, fuzzed fields) so the fuzzer gets past
the header checks and into the stream state machine, and raw bytes the rest of the time.
:func:`fuzz_one` needs nothing but the project, so tests/unit/test_fuzz_harness.py also runs it
under hypothesis in CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared import events  # noqa: E402 (after the path set-up above)
from shared.errors import ProtocolError, TunnelError  # noqa: E402
from shared.events import ConnectionFailed  # noqa: E402
from shared.frames import (  # noqa: E402
    ABSOLUTE_MAX_PAYLOAD,
    FrameType,
    GoAwayCode,
    ResetCode,
    decode_frames,
    decode_goaway,
    decode_reset,
    decode_window,
    encode_frame,
)
from shared.heads import (  # noqa: E402
    RequestHead,
    ResponseHead,
    StreamKind,
    decode_request_head,
    decode_response_head,
    encode_request_head,
    encode_response_head,
)
from shared.messages import (  # noqa: E402
    Error,
    Hello,
    Routes,
    RouteSpec,
    Welcome,
    decode_control,
    encode_control,
)
from shared.mux import Role, Session, SessionState  # noqa: E402

EVENT_TYPES = tuple(getattr(events, name) for name in events.__all__ if name != "Event")


class Reader:
    """Reads the fuzzer's bytes as a stream of small choices (zeros once exhausted)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.byte() << 8 | self.byte()

    def u32(self) -> int:
        return self.u16() << 16 | self.u16()

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def text(self, limit: int = 40) -> str:
        return self.take(self.byte() % (limit + 1)).decode("latin-1")


MAX_FRAME = 16 * 1024


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return encode_frame(ftype, flags, stream_id, payload)


def _client(handshake: bool) -> Session:
    session = Session(
        Role.CLIENT,
        max_frame=MAX_FRAME,
        initial_window=4096,
        connection_window=1 << 20,
        max_streams=8,
        buffer_budget=64 * 1024,
        heartbeat_timeout=30.0,
    )
    session.send_hello(Hello(versions=[1], instance_id="fuzz", max_frame=MAX_FRAME, initial_window=4096))
    if handshake:
        welcome = Welcome(
            version=1, session_id="s", client_id="c", max_frame=MAX_FRAME, initial_window=4096, max_streams=8
        )
        session.receive(_frame(FrameType.CONTROL, 0, 0, encode_control(welcome)), 0.0)
    session.events()
    session.data_to_send()
    return session


def _server(handshake: bool) -> Session:
    session = Session(
        Role.SERVER,
        max_frame=MAX_FRAME,
        initial_window=4096,
        connection_window=1 << 20,
        max_streams=8,
        buffer_budget=64 * 1024,
        heartbeat_timeout=30.0,
    )
    if handshake:
        hello = Hello(versions=[1], instance_id="fuzz", max_frame=MAX_FRAME, initial_window=4096, max_streams=8)
        session.receive(_frame(FrameType.CONTROL, 0, 0, encode_control(hello)), 0.0)
        session.accept(Welcome(version=1, session_id="s", client_id="c", max_frame=MAX_FRAME, initial_window=4096))
        for i in range(3):
            session.open_stream(RequestHead(StreamKind.HTTP, "GET", f"/{i}", "a.example", "http", "", ()), i == 2)
    session.events()
    session.data_to_send()
    return session


def _payload(r: Reader, ftype: int) -> bytes:
    """A payload for ``ftype``: often well-formed, sometimes raw."""
    if r.byte() % 16 == 0:
        return r.take(r.u16() % (MAX_FRAME + 64))
    if ftype == FrameType.OPEN:
        headers = tuple((r.text(8), r.text(16)) for _ in range(r.byte() % 4))
        head = RequestHead(StreamKind(1 + r.byte() % 3), r.text(8), r.text(), r.text(), "http", r.text(8), headers)
        return encode_request_head(head)
    if ftype == FrameType.REPLY:
        headers = tuple((r.text(8), r.text(16)) for _ in range(r.byte() % 4))
        return encode_response_head(ResponseHead(100 + r.u16() % 900, headers))
    if ftype == FrameType.WINDOW:
        return r.u32().to_bytes(4, "big")
    if ftype in (FrameType.RESET, FrameType.GOAWAY):
        prefix = r.u32().to_bytes(4, "big") if ftype == FrameType.GOAWAY else b""
        return prefix + (r.byte() % 12).to_bytes(2, "big") + r.take(r.byte() % 8)
    if ftype == FrameType.PING:
        return r.take(8 if r.byte() % 8 else r.byte() % 12)
    if ftype == FrameType.CONTROL:
        pick = r.byte() % 8
        if pick == 0:
            return r.take(r.u16() % 512)
        if pick == 1:
            return encode_control(Error(code=r.text(8), message=r.text()))
        return encode_control(Routes(routes=[RouteSpec(host="a.example", path_prefix="/" + r.text(8))]))
    return bytes(r.u16() % 3000)  # DATA: the bytes do not matter, their count does (4 KiB windows)


#: What each role may legitimately receive, weighted; other types come from the 1-in-16 "any".
_TYPES = {
    Role.CLIENT: [
        FrameType.DATA,
        FrameType.DATA,
        FrameType.OPEN,
        FrameType.OPEN,
        FrameType.RESET,
        FrameType.WINDOW,
        FrameType.PING,
        FrameType.GOAWAY,
    ],
    Role.SERVER: [
        FrameType.DATA,
        FrameType.DATA,
        FrameType.REPLY,
        FrameType.REPLY,
        FrameType.RESET,
        FrameType.WINDOW,
        FrameType.PING,
        FrameType.GOAWAY,
    ],
}
_FLAGGED = {FrameType.DATA, FrameType.OPEN, FrameType.REPLY, FrameType.PING}
_ON_CONNECTION = {FrameType.PING, FrameType.GOAWAY, FrameType.CONTROL, FrameType.WINDOW}


class Program:
    """What the harness remembers between messages: the next new stream id to OPEN."""

    def __init__(self) -> None:
        self.next_open = 1


def _message(r: Reader, session: Session, program: Program) -> bytes:
    """One WebSocket message of 1..4 frames, each valid in shape most of the time: the stream
    id fits the type (connection frames on 0, OPEN on the next odd id, others on live streams)
    and flags are those the type allows; now and then any of it is wrong on purpose."""
    parts = []
    for _ in range(1 + r.byte() % 4):
        if not r.remaining and parts:
            break
        choice = r.byte()
        ftype = _TYPES[session.role][choice % 8] if choice < 240 else choice % 16  # 16 types: 8 unknown
        wrong = r.byte()
        known = session.stream_ids()
        if session.role is Role.CLIENT and not known and ftype in (FrameType.DATA, FrameType.RESET) and wrong % 4:
            ftype = FrameType.OPEN  # nothing to send DATA on yet: open a stream first
        if wrong % 16 == 0:
            stream_id = r.byte() % 16
        elif ftype == FrameType.OPEN:
            stream_id = program.next_open
            program.next_open += 2
        elif ftype in _ON_CONNECTION and (ftype != FrameType.WINDOW or wrong % 2 or not known):
            stream_id = 0
        elif known:
            stream_id = known[r.byte() % len(known)]
        else:
            stream_id = 1 + 2 * (r.byte() % 4)
        if wrong % 16 == 1:
            flags = r.byte() % 4
        else:
            flags = int(r.byte() % 4 == 0) if ftype in _FLAGGED else 0  # END_STREAM / ACK one time in 4
        parts.append(_frame(ftype, flags, stream_id, _payload(r, ftype)))
    return b"".join(parts)


def _local(r: Reader, session: Session) -> None:
    """Something the adapter might do between messages; TunnelErrors are its documented outcome."""
    known = session.stream_ids() or [1 + 2 * (r.byte() % 4)]
    stream_id = known[r.byte() % len(known)]
    op = r.byte() % 7
    try:
        if op == 0:
            session.send_reply(stream_id, ResponseHead(200, (("X", r.text(8)),)), r.byte() % 2 == 0)
        elif op == 1:
            session.send_data(stream_id, r.take(min(session.send_window(stream_id), r.u16())), r.byte() % 2 == 0)
        elif op == 2:
            session.consume(stream_id, r.u16())
        elif op == 3:
            session.reset_stream(stream_id, ResetCode(1 + r.byte() % 11), r.text(8))
        elif op == 4:
            session.send_goaway(GoAwayCode(r.byte() % 7), r.text(8))
        elif op == 5:
            session.open_stream(RequestHead(StreamKind.HTTP, "GET", "/", "a", "http", "", ()), r.byte() % 2 == 0)
        else:
            session.send_data(stream_id, r.take(r.u16()))  # may exceed the window on purpose
    except TunnelError:
        pass


def _check_output(session: Session) -> None:
    """Everything a session queued must be acceptable to its peer."""
    for message in session.data_to_send():
        for frame in decode_frames(message, ABSOLUTE_MAX_PAYLOAD):
            if frame.type == FrameType.OPEN:
                decode_request_head(frame.payload)
            elif frame.type == FrameType.REPLY:
                decode_response_head(frame.payload)
            elif frame.type == FrameType.CONTROL:
                decode_control(frame.payload)
            elif frame.type == FrameType.RESET:
                decode_reset(frame.payload)
            elif frame.type == FrameType.GOAWAY:
                decode_goaway(frame.payload)
            elif frame.type == FrameType.WINDOW:
                decode_window(frame.payload)


def _check_events(session: Session) -> None:
    for event in session.events():
        assert isinstance(event, EVENT_TYPES), event
        if isinstance(event, ConnectionFailed):
            assert session.state is SessionState.CLOSED and isinstance(event.error, TunnelError)


DECODERS = (
    lambda b: list(decode_frames(b, MAX_FRAME)),
    decode_request_head,
    decode_response_head,
    decode_control,
    lambda b: decode_reset(memoryview(b)),
    lambda b: decode_goaway(memoryview(b)),
    lambda b: decode_window(memoryview(b)),
)


def fuzz_decoders(data: bytes) -> None:
    """Every decode function raises only ProtocolError-family errors."""
    for decode in DECODERS:
        try:
            decode(data)
        except ProtocolError:
            pass


def fuzz_one(data: bytes) -> None:
    """One fuzzing input: decoders on the raw bytes, then a session driven by them."""
    fuzz_decoders(data[:4096])
    r = Reader(data)
    mode = r.byte()
    session = (_client if mode & 1 else _server)(mode & 0x0E != 0)  # 1 run in 8 fuzzes the handshake
    program = Program()
    now = 0.0
    steps = 0
    while r.remaining and steps < 64:
        steps += 1
        op = r.byte() % 8
        if op <= 3:
            session.receive(_message(r, session, program), now)
        elif op == 4:
            session.receive(r.take(r.u16() % 4096), now)  # raw bytes, maybe empty
        elif op == 5:
            now += r.byte() / 4
            session.tick(now)
        else:
            _local(r, session)
        _check_events(session)
        _check_output(session)
        if session.state is SessionState.CLOSED:
            session.receive(r.take(64) or b"\x00", now)  # a closed session ignores everything
            assert not session.events() and not session.data_to_send()
            return


def main() -> None:
    import atheris

    atheris.instrument_all()  # coverage feedback for everything loaded: shared/, pydantic models
    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
