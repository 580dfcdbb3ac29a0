"""Protocol version 2: TRAILERS frames and their negotiation (docs/PROTOCOL.md 3.2, 14.1)."""

from __future__ import annotations

import pytest

from shared.errors import LocalProtocolError, RemoteProtocolError
from shared.events import ConnectionFailed, DataReceived, TrailersReceived
from shared.frames import FrameType, encode_frame
from shared.heads import ResponseHead, decode_trailers, encode_trailers
from shared.mux import StreamState

from .helpers import Pair

V2 = {"hello": {"versions": [1, 2]}, "welcome": {"version": 2}}
GRPC_OK = (("grpc-status", "0"), ("grpc-message", ""))


def replied(pair: Pair) -> int:
    stream_id = pair.open()
    pair.client.send_reply(stream_id, ResponseHead(200, (("content-type", "application/grpc"),)))
    pair.pump()
    pair.take()
    return stream_id


def test_trailers_payload_round_trip() -> None:
    payload = encode_trailers(GRPC_OK)
    assert payload.hex() == "0004000b677270632d73746174757300013000" + "0c677270632d6d6573736167650000"
    assert payload[:2] == b"\x00\x04"
    assert decode_trailers(payload) == GRPC_OK
    assert decode_trailers(encode_trailers(())) == ()


def test_protocol_md_trailers_example() -> None:
    """docs/PROTOCOL.md section 4.3."""
    frame = encode_frame(FrameType.TRAILERS, 0, 1, encode_trailers((("grpc-status", "0"),)))
    assert frame.hex(" ") == ("00 00 12 08 00 00 00 00 01 00 02 00 0b 67 72 70 63 2d 73 74 61 74 75 73 00 01 30")


@pytest.mark.parametrize("payload", [b"", b"\x00", b"\x00\x01\x00\x00", b"\x00\x02\x00\x01a", b"\x00\x00x"])
def test_bad_trailers_payload(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_trailers(payload)


def test_version_2_is_chosen_when_both_speak_it() -> None:
    pair = Pair(**V2)
    assert pair.server.version == 2 and pair.client.version == 2
    assert pair.server.carries_trailers and pair.client.carries_trailers


def test_response_trailers_end_the_clients_half() -> None:
    pair = Pair(**V2)
    sid = replied(pair)
    pair.client.send_data(sid, b"body")
    pair.client.send_trailers(sid, GRPC_OK)
    pair.pump()
    server_events = pair.take()[0]
    assert [type(e) for e in server_events] == [DataReceived, TrailersReceived]
    assert server_events[1] == TrailersReceived(sid, GRPC_OK)
    assert pair.server.stream_state(sid) is StreamState.HALF_CLOSED_REMOTE
    with pytest.raises(Exception, match="HALF_CLOSED_LOCAL"):
        pair.client.send_data(sid, b"more")


def test_request_trailers_from_the_server() -> None:
    pair = Pair(**V2)
    sid = pair.open()
    pair.server.send_trailers(sid, (("x-checksum", "abc"),))
    pair.pump()
    client_events = pair.take()[1]
    assert TrailersReceived(sid, (("x-checksum", "abc"),)) in client_events
    assert pair.client.stream_state(sid) is StreamState.HALF_CLOSED_REMOTE


def test_client_cannot_send_trailers_before_reply() -> None:
    pair = Pair(**V2)
    sid = pair.open()
    with pytest.raises(LocalProtocolError, match="before REPLY"):
        pair.client.send_trailers(sid, GRPC_OK)


def test_version_1_session_refuses_to_send_trailers() -> None:
    pair = Pair()
    assert pair.server.version == 1 and not pair.server.carries_trailers
    sid = replied(pair)
    with pytest.raises(LocalProtocolError, match="version 1"):
        pair.client.send_trailers(sid, GRPC_OK)


def test_trailers_in_a_version_1_session_are_a_protocol_error() -> None:
    pair = Pair()
    sid = replied(pair)
    pair.server.receive(encode_frame(FrameType.TRAILERS, 0, sid, encode_trailers(GRPC_OK)), 0.0)
    (failed,) = [e for e in pair.server.events() if isinstance(e, ConnectionFailed)]
    assert "TRAILERS in a version 1 session" in str(failed.error)


def test_trailers_before_reply_are_a_protocol_error() -> None:
    pair = Pair(**V2)
    sid = pair.open()
    pair.server.receive(encode_frame(FrameType.TRAILERS, 0, sid, encode_trailers(GRPC_OK)), 0.0)
    (failed,) = [e for e in pair.server.events() if isinstance(e, ConnectionFailed)]
    assert isinstance(failed.error, RemoteProtocolError) and "before REPLY" in str(failed.error)
