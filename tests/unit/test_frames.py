"""shared.frames: golden bytes, round trips, and every rejection (docs/PROTOCOL.md section 3)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import FrameTooLarge, LocalProtocolError, ProtocolError, RemoteProtocolError
from shared.frames import (
    ABSOLUTE_MAX_PAYLOAD,
    ALLOWED_FLAGS,
    CONNECTION_TYPES,
    HEADER_SIZE,
    MAX_REASON,
    STREAM_TYPES,
    Flags,
    Frame,
    FrameType,
    GoAwayCode,
    ResetCode,
    decode_frames,
    decode_goaway,
    decode_reset,
    decode_window,
    encode_frame,
    encode_goaway,
    encode_header,
    encode_reset,
    encode_window,
)

MAX = 256 * 1024


def one(message: bytes, max_payload: int = MAX) -> Frame:
    (frame,) = list(decode_frames(message, max_payload))
    return frame


# ---------------------------------------------------------------- wire values are pinned


def test_frame_type_wire_values() -> None:
    assert {t.name: t.value for t in FrameType} == {
        "DATA": 0,
        "OPEN": 1,
        "REPLY": 2,
        "RESET": 3,
        "WINDOW": 4,
        "PING": 5,
        "GOAWAY": 6,
        "CONTROL": 7,
        "TRAILERS": 8,
    }


def test_flag_wire_values() -> None:
    assert int(Flags.NONE) == 0
    assert int(Flags.END_STREAM) == 1
    assert int(Flags.ACK) == 1  # same bit, meaning depends on the frame type


def test_allowed_flags_per_type() -> None:
    assert ALLOWED_FLAGS == {
        FrameType.DATA: 1,
        FrameType.OPEN: 1,
        FrameType.REPLY: 1,
        FrameType.RESET: 0,
        FrameType.WINDOW: 0,
        FrameType.PING: 1,
        FrameType.GOAWAY: 0,
        FrameType.CONTROL: 0,
        FrameType.TRAILERS: 0,
    }
    assert CONNECTION_TYPES == {FrameType.PING, FrameType.GOAWAY, FrameType.CONTROL}
    assert STREAM_TYPES == {FrameType.DATA, FrameType.OPEN, FrameType.REPLY, FrameType.RESET, FrameType.TRAILERS}
    # WINDOW is the only type legal on both stream 0 and a stream.
    assert set(FrameType) - CONNECTION_TYPES - STREAM_TYPES == {FrameType.WINDOW}


def test_reset_code_wire_values() -> None:
    assert {c.name: c.value for c in ResetCode} == {
        "CANCEL": 1,
        "REFUSED": 2,
        "UPSTREAM_CONNECT": 3,
        "UPSTREAM_TIMEOUT": 4,
        "UPSTREAM_RESET": 5,
        "NO_UPSTREAM": 6,
        "PROTOCOL_ERROR": 7,
        "FLOW_CONTROL_ERROR": 8,
        "INTERNAL_ERROR": 9,
        "FORBIDDEN": 10,
        "TOO_LARGE": 11,
        "NO_TRAILERS": 12,
        "H2_BASE": 0x100,
    }


def test_goaway_code_wire_values() -> None:
    assert {c.name: c.value for c in GoAwayCode} == {
        "NO_ERROR": 0,
        "PROTOCOL_ERROR": 1,
        "INTERNAL_ERROR": 2,
        "AUTH_REVOKED": 3,
        "REPLACED": 4,
        "SHUTDOWN": 5,
        "HEARTBEAT_TIMEOUT": 6,
    }


def test_constants() -> None:
    assert HEADER_SIZE == 9
    assert ABSOLUTE_MAX_PAYLOAD == 0xFFFFFF
    assert MAX_REASON == 256


# ---------------------------------------------------------------- golden bytes (PROTOCOL.md examples)

GOLDEN = [
    # DATA, END_STREAM, stream 1, "hello"
    (
        (FrameType.DATA, Flags.END_STREAM, 1, b"hello"),
        bytes.fromhex("000005 00 01 00000001 68656c6c6f"),
    ),
    # WINDOW on stream 0: +15 MiB (16 MiB window minus the 1 MiB initial one)
    (
        (FrameType.WINDOW, 0, 0, encode_window(15 << 20)),
        bytes.fromhex("000004 04 00 00000000 00f00000"),
    ),
    # WINDOW on stream 3: +128 KiB
    (
        (FrameType.WINDOW, 0, 3, encode_window(128 * 1024)),
        bytes.fromhex("000004 04 00 00000003 00020000"),
    ),
    # PING with ACK, timestamp 1.5 (IEEE 754 double, big-endian)
    (
        (FrameType.PING, Flags.ACK, 0, struct.pack(">d", 1.5)),
        bytes.fromhex("000008 05 01 00000000 3ff8000000000000"),
    ),
    # RESET stream 3, REFUSED, reason "busy"
    (
        (FrameType.RESET, 0, 3, encode_reset(ResetCode.REFUSED, "busy")),
        bytes.fromhex("000006 03 00 00000003 0002 62757379"),
    ),
    # GOAWAY last stream 5, NO_ERROR, no reason
    (
        (FrameType.GOAWAY, 0, 0, encode_goaway(5, GoAwayCode.NO_ERROR)),
        bytes.fromhex("000006 06 00 00000000 00000005 0000"),
    ),
    # CONTROL: {"type":"error","code":"x","message":""}
    (
        (FrameType.CONTROL, 0, 0, b'{"type":"error","code":"x","message":""}'),
        bytes.fromhex("000028 07 00 00000000") + b'{"type":"error","code":"x","message":""}',
    ),
]


@pytest.mark.parametrize(("fields", "wire"), GOLDEN)
def test_golden_encode(fields: tuple[int, int, int, bytes], wire: bytes) -> None:
    assert encode_frame(*fields) == wire


@pytest.mark.parametrize(("fields", "wire"), GOLDEN)
def test_golden_decode(fields: tuple[int, int, int, bytes], wire: bytes) -> None:
    frame = one(wire)
    assert (frame.type, frame.flags, frame.stream_id, bytes(frame.payload)) == fields


def test_golden_header_24_bit_length() -> None:
    assert encode_header(FrameType.DATA, 0, 0x7FFFFFFF, 0x010203) == bytes.fromhex("010203 00 00 7fffffff")
    assert encode_header(FrameType.OPEN, 0, 1, ABSOLUTE_MAX_PAYLOAD) == bytes.fromhex("ffffff 01 00 00000001")


def test_golden_payloads() -> None:
    assert encode_reset(ResetCode.CANCEL) == b"\x00\x01"
    assert encode_window(1) == b"\x00\x00\x00\x01"
    assert encode_window((1 << 31) - 1) == b"\x7f\xff\xff\xff"
    assert encode_goaway(0, GoAwayCode.HEARTBEAT_TIMEOUT, "idle") == bytes.fromhex("00000000 0006 69646c65")


def test_several_frames_in_one_message() -> None:
    message = GOLDEN[0][1] + GOLDEN[1][1] + encode_frame(FrameType.DATA, 0, 7)
    decoded = list(decode_frames(message, MAX))
    assert [(f.type, f.stream_id, bytes(f.payload)) for f in decoded] == [
        (FrameType.DATA, 1, b"hello"),
        (FrameType.WINDOW, 0, b"\x00\xf0\x00\x00"),
        (FrameType.DATA, 7, b""),
    ]


def test_payload_is_a_view_into_the_message() -> None:
    frame = one(GOLDEN[0][1])
    assert isinstance(frame.payload, memoryview)
    assert frame.payload.readonly


# ---------------------------------------------------------------- rejections


def test_empty_message() -> None:
    with pytest.raises(RemoteProtocolError, match="empty"):
        list(decode_frames(b"", MAX))


def test_truncated_header() -> None:
    with pytest.raises(RemoteProtocolError, match="truncated frame header"):
        list(decode_frames(GOLDEN[0][1][:8], MAX))
    # a whole frame followed by a partial header
    with pytest.raises(RemoteProtocolError, match="truncated frame header"):
        list(decode_frames(GOLDEN[0][1] + b"\x00\x00", MAX))


def test_truncated_payload() -> None:
    with pytest.raises(RemoteProtocolError, match="truncated frame payload"):
        list(decode_frames(GOLDEN[0][1][:-1], MAX))


def test_declared_length_checked_before_payload() -> None:
    # Only the header is present: the limit is enforced before any payload is expected.
    header = encode_header(FrameType.DATA, 0, 1, 17)
    with pytest.raises(FrameTooLarge, match="17 exceeds limit 16"):
        list(decode_frames(header, 16))
    assert one(header + bytes(16 + 1), 17).payload.nbytes == 17


def test_frame_too_large_is_a_remote_protocol_error() -> None:
    assert issubclass(FrameTooLarge, RemoteProtocolError)


def test_unknown_frame_type() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown frame type 0x9"):
        list(decode_frames(bytes.fromhex("000000 09 00 00000001"), MAX))


@pytest.mark.parametrize("ftype", list(FrameType))
def test_reserved_flag_bits(ftype: FrameType) -> None:
    stream_id = 0 if ftype in CONNECTION_TYPES else 1
    for bit in range(8):
        flag = 1 << bit
        message = encode_header(ftype, flag, stream_id, 0)
        if flag & ALLOWED_FLAGS[ftype]:
            assert one(message).flags == flag
        else:
            with pytest.raises(RemoteProtocolError, match="reserved flag bits"):
                list(decode_frames(message, MAX))


def test_reserved_stream_id_bit() -> None:
    with pytest.raises(RemoteProtocolError, match="reserved stream id bit"):
        list(decode_frames(bytes.fromhex("000000 00 00 80000001"), MAX))


@pytest.mark.parametrize("ftype", sorted(STREAM_TYPES))
def test_stream_frames_not_on_stream_zero(ftype: FrameType) -> None:
    with pytest.raises(RemoteProtocolError, match="on stream 0"):
        list(decode_frames(encode_header(ftype, 0, 0, 0), MAX))


@pytest.mark.parametrize("ftype", sorted(CONNECTION_TYPES))
def test_connection_frames_only_on_stream_zero(ftype: FrameType) -> None:
    with pytest.raises(RemoteProtocolError, match="on stream 5"):
        list(decode_frames(encode_header(ftype, 0, 5, 0), MAX))


def test_window_on_any_stream() -> None:
    for stream_id in (0, 1, 2):
        assert one(encode_frame(FrameType.WINDOW, 0, stream_id, encode_window(5))).stream_id == stream_id


def test_decode_is_lazy_frames_before_an_error_are_yielded() -> None:
    frames = decode_frames(GOLDEN[0][1] + b"\x00", MAX)
    assert next(frames).stream_id == 1
    with pytest.raises(RemoteProtocolError):
        next(frames)


@pytest.mark.parametrize("length", [-1, ABSOLUTE_MAX_PAYLOAD + 1])
def test_encode_header_length_range(length: int) -> None:
    with pytest.raises(LocalProtocolError, match="length"):
        encode_header(FrameType.DATA, 0, 1, length)


@pytest.mark.parametrize("stream_id", [-1, 1 << 31])
def test_encode_header_stream_id_range(stream_id: int) -> None:
    with pytest.raises(LocalProtocolError, match="stream id"):
        encode_header(FrameType.DATA, 0, stream_id, 0)


# ---------------------------------------------------------------- RESET / WINDOW / GOAWAY payloads


def test_reset_round_trip_and_reason_limit() -> None:
    assert decode_reset(memoryview(encode_reset(ResetCode.TOO_LARGE, "too big"))) == (11, "too big")
    long = encode_reset(1, "é" * 300)  # 600 bytes of UTF-8, cut to 256
    assert len(long) == 2 + MAX_REASON
    code, reason = decode_reset(memoryview(long))
    assert code == 1 and reason == "é" * 128


def test_reason_cut_inside_a_character_decodes_with_replacement() -> None:
    payload = encode_reset(1, "a" + "é" * 200)  # the 256th byte is half of an "é"
    assert decode_reset(memoryview(payload))[1].endswith("\ufffd")


def test_reset_rejections() -> None:
    with pytest.raises(RemoteProtocolError, match="RESET payload too short"):
        decode_reset(memoryview(b"\x00"))
    with pytest.raises(RemoteProtocolError, match="reason too long"):
        decode_reset(memoryview(b"\x00\x01" + b"x" * 257))
    # invalid UTF-8 is replaced, not an error
    assert decode_reset(memoryview(b"\x00\x01\xff")) == (1, "\ufffd")


def test_window_rejections() -> None:
    for payload in (b"", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"):
        with pytest.raises(RemoteProtocolError, match="4 bytes"):
            decode_window(memoryview(payload))
    for value in (0, 1 << 31, 0xFFFFFFFF):
        with pytest.raises(RemoteProtocolError, match="out of range"):
            decode_window(memoryview(struct.pack(">I", value)))
    for value in (0, -1, 1 << 31):
        with pytest.raises(LocalProtocolError, match="out of range"):
            encode_window(value)


def test_goaway_round_trip_and_rejections() -> None:
    payload = encode_goaway(7, GoAwayCode.SHUTDOWN, "bye")
    assert decode_goaway(memoryview(payload)) == (7, 5, "bye")
    with pytest.raises(RemoteProtocolError, match="GOAWAY payload too short"):
        decode_goaway(memoryview(payload[:5]))
    with pytest.raises(RemoteProtocolError, match="reason too long"):
        decode_goaway(memoryview(payload[:6] + b"x" * 257))


# ---------------------------------------------------------------- hypothesis: round trips

stream_ids = st.integers(min_value=1, max_value=(1 << 31) - 1)


@st.composite
def valid_frames(draw: st.DrawFn) -> tuple[int, int, int, bytes]:
    ftype = draw(st.sampled_from(list(FrameType)))
    if ftype in CONNECTION_TYPES:
        stream_id = 0
    elif ftype in STREAM_TYPES:
        stream_id = draw(stream_ids)
    else:
        stream_id = draw(st.one_of(st.just(0), stream_ids))
    flags = draw(st.sampled_from([0, ALLOWED_FLAGS[ftype]]))
    payload = draw(st.binary(max_size=300))
    return ftype, flags, stream_id, payload


@given(st.lists(valid_frames(), min_size=1, max_size=8))
def test_frames_round_trip(fields: list[tuple[int, int, int, bytes]]) -> None:
    message = b"".join(encode_frame(*f) for f in fields)
    assert len(message) == sum(HEADER_SIZE + len(f[3]) for f in fields)
    decoded = [(f.type, f.flags, f.stream_id, bytes(f.payload)) for f in decode_frames(message, 300)]
    assert decoded == fields


@given(st.integers(0, 0xFFFF), st.text(max_size=100))
def test_reset_round_trip(code: int, reason: str) -> None:
    payload = encode_reset(code, reason)
    decoded_code, decoded_reason = decode_reset(memoryview(payload))
    assert decoded_code == code
    assert decoded_reason == payload[2:].decode("utf-8", "replace")
    if len(reason.encode("utf-8", "surrogatepass")) <= MAX_REASON and reason.isprintable():
        assert decoded_reason == reason


@given(st.integers(1, (1 << 31) - 1))
def test_window_round_trip(increment: int) -> None:
    assert decode_window(memoryview(encode_window(increment))) == increment


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFF), st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_goaway_round_trip(last: int, code: int, reason: str) -> None:
    assert decode_goaway(memoryview(encode_goaway(last, code, reason))) == (last, code, reason)


# ---------------------------------------------------------------- hypothesis: garbage in


@given(st.binary(max_size=200), st.integers(0, 64))
def test_garbage_frames_raise_only_protocol_errors(data: bytes, max_payload: int) -> None:
    try:
        for frame in decode_frames(data, max_payload):
            assert len(frame.payload) <= max_payload
    except ProtocolError:
        pass


@given(st.binary(max_size=40))
def test_garbage_payloads_raise_only_protocol_errors(data: bytes) -> None:
    view = memoryview(data)
    for decode in (decode_reset, decode_window, decode_goaway):
        try:
            decode(view)
        except ProtocolError:
            pass
