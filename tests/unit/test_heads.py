"""shared.heads: OPEN and REPLY payloads (docs/PROTOCOL.md section 4)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from shared.frames import FrameType, encode_frame
from shared.heads import (
    MAX_FIELDS,
    RequestHead,
    ResponseHead,
    StreamKind,
    decode_request_head,
    decode_response_head,
    encode_request_head,
    encode_response_head,
)

REQUEST = RequestHead(StreamKind.HTTP, "GET", "/", "a.example", "https", "10.0.0.1", (("accept", "*/*"),))
REQUEST_WIRE = bytes.fromhex(
    "01"  # kind HTTP
    "0007"  # 7 fields: 5 fixed + 1 header pair
    "0003 474554"  # GET
    "0001 2f"  # /
    "0009 612e6578616d706c65"  # a.example
    "0005 6874747073"  # https
    "0008 31302e302e302e31"  # 10.0.0.1
    "0006 616363657074"  # accept
    "0003 2a2f2a"  # */*
)
RESPONSE = ResponseHead(200, (("content-length", "2"),))
RESPONSE_WIRE = bytes.fromhex(
    "00c8"  # 200
    "0002"  # 2 fields
    "000e 636f6e74656e742d6c656e677468"  # content-length
    "0001 32"  # 2
)


def test_stream_kind_wire_values() -> None:
    assert {k.name: k.value for k in StreamKind} == {"HTTP": 1, "WEBSOCKET": 2, "TCP": 3}


def test_request_golden() -> None:
    assert encode_request_head(REQUEST) == REQUEST_WIRE
    assert decode_request_head(REQUEST_WIRE) == REQUEST
    assert decode_request_head(memoryview(REQUEST_WIRE)) == REQUEST


def test_open_frame_golden() -> None:
    # The whole OPEN frame of docs/PROTOCOL.md section 4 (stream 1, END_STREAM: no body).
    assert encode_frame(FrameType.OPEN, 1, 1, REQUEST_WIRE) == bytes.fromhex("000034 01 01 00000001") + REQUEST_WIRE


def test_response_golden() -> None:
    assert encode_response_head(RESPONSE) == RESPONSE_WIRE
    assert decode_response_head(RESPONSE_WIRE) == RESPONSE
    assert encode_response_head(ResponseHead(204)) == bytes.fromhex("00cc 0000")


def test_tcp_head_defaults() -> None:
    head = RequestHead(StreamKind.TCP, "", "5432", "db.example")
    assert head.scheme == "https" and head.client_addr == "" and head.headers == ()
    assert decode_request_head(encode_request_head(head)) == head


def test_repeated_headers_keep_order() -> None:
    head = ResponseHead(200, (("set-cookie", "a=1"), ("x", "y"), ("set-cookie", "b=2")))
    assert decode_response_head(encode_response_head(head)) == head


def test_latin1_octets() -> None:
    head = ResponseHead(200, (("x-name", "caf\xe9 \xff"),))
    assert b"caf\xe9 \xff" in encode_response_head(head)
    assert decode_response_head(encode_response_head(head)) == head


# ---------------------------------------------------------------- encoder refusals


def test_non_latin1_refused() -> None:
    with pytest.raises(LocalProtocolError, match="ISO-8859-1"):
        encode_request_head(RequestHead(StreamKind.HTTP, "GET", "/\u20ac", "a"))
    with pytest.raises(LocalProtocolError, match="ISO-8859-1"):
        encode_response_head(ResponseHead(200, (("x", "\u20ac"),)))


def test_field_too_long_refused() -> None:
    assert decode_request_head(encode_request_head(RequestHead(StreamKind.HTTP, "GET", "/" * 0xFFFF, "a"))).target
    with pytest.raises(LocalProtocolError, match="65535"):
        encode_request_head(RequestHead(StreamKind.HTTP, "GET", "/" * 0x10000, "a"))


def test_too_many_fields_refused() -> None:
    pairs = (("a", "b"),) * ((MAX_FIELDS - 5) // 2)  # 5 + 1018 = 1023 fields: the most allowed
    most = RequestHead(StreamKind.HTTP, "G", "/", "a", headers=pairs)
    assert len(decode_request_head(encode_request_head(most)).headers) == 509
    with pytest.raises(LocalProtocolError, match="too many"):
        encode_request_head(RequestHead(StreamKind.HTTP, "G", "/", "a", headers=pairs + (("c", "d"),)))
    pairs = (("a", "b"),) * (MAX_FIELDS // 2)
    assert len(decode_response_head(encode_response_head(ResponseHead(200, pairs))).headers) == 512
    with pytest.raises(LocalProtocolError, match="too many"):
        encode_response_head(ResponseHead(200, pairs + (("c", "d"),)))


@pytest.mark.parametrize("status", [0, 99, 1000, 65535])
def test_status_range_refused(status: int) -> None:
    with pytest.raises(LocalProtocolError, match="status"):
        encode_response_head(ResponseHead(status))


@pytest.mark.parametrize("status", [100, 999])
def test_status_range_edges(status: int) -> None:
    assert decode_response_head(encode_response_head(ResponseHead(status))).status == status


# ---------------------------------------------------------------- decoder rejections


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "OPEN payload too short"),
        (b"\x01\x00", "OPEN payload too short"),
        (b"\x00\x00\x05", "unknown stream kind 0"),
        (b"\x04\x00\x05", "unknown stream kind 4"),
        (b"\x01\x00\x04", "bad OPEN field count 4"),
        (b"\x01\x00\x06", "bad OPEN field count 6"),
        (b"\x01" + struct.pack(">H", MAX_FIELDS + 1), "bad OPEN field count"),
        (b"\x01\x00\x05", "truncated head field length"),
        (b"\x01\x00\x05\x00", "truncated head field length"),
        (b"\x01\x00\x05\x00\x03GE", "truncated head field"),
        (REQUEST_WIRE + b"\x00", "trailing bytes"),
    ],
)
def test_request_rejections(payload: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode_request_head(payload)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00\xc8\x00", "REPLY payload too short"),
        (b"\x00\x63\x00\x00", "status 99 out of range"),
        (b"\x03\xe8\x00\x00", "status 1000 out of range"),
        (b"\x00\xc8\x00\x01", "bad REPLY field count 1"),
        (b"\x00\xc8" + struct.pack(">H", MAX_FIELDS + 2), "bad REPLY field count"),
        (b"\x00\xc8\x00\x02\x00\x01x", "truncated head field length"),
        (b"\x00\xc8\x00\x00\x00", "trailing bytes"),
    ],
)
def test_response_rejections(payload: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode_response_head(payload)


# ---------------------------------------------------------------- hypothesis

latin1 = st.text(alphabet=st.characters(codec="latin-1"), max_size=40)
headers = st.lists(st.tuples(latin1, latin1), max_size=10).map(tuple)


@given(st.sampled_from(list(StreamKind)), latin1, latin1, latin1, latin1, latin1, headers)
def test_request_round_trip(
    kind: StreamKind,
    method: str,
    target: str,
    authority: str,
    scheme: str,
    addr: str,
    hdrs: tuple[tuple[str, str], ...],
) -> None:
    head = RequestHead(kind, method, target, authority, scheme, addr, hdrs)
    decoded = decode_request_head(encode_request_head(head))
    assert decoded == head
    assert decoded.kind is kind


@given(st.integers(100, 999), headers)
def test_response_round_trip(status: int, hdrs: tuple[tuple[str, str], ...]) -> None:
    head = ResponseHead(status, hdrs)
    assert decode_response_head(encode_response_head(head)) == head


@given(st.binary(max_size=120))
def test_garbage_raises_only_protocol_errors(data: bytes) -> None:
    for decode in (decode_request_head, decode_response_head):
        try:
            decode(data)
        except ProtocolError:
            pass
        try:
            decode(memoryview(data))
        except ProtocolError:
            pass


@given(st.sampled_from([b"\x01\x00\x07", b"\x02\x00\x05", b"\x00\xc8\x00\x02"]), st.binary(max_size=60))
def test_garbage_after_a_plausible_prefix_raises_only_protocol_errors(prefix: bytes, rest: bytes) -> None:
    for decode in (decode_request_head, decode_response_head):
        try:
            decode(prefix + rest)
        except ProtocolError:
            pass
