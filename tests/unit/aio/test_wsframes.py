"""The compiled frame loops (shared/aio/wsframes.py) against websockets' own frame codec: what
``frame_message`` writes, websockets parses; what websockets writes, ``parse_frames`` delivers;
partial and odd frames stop the loop where they start. No sockets."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from shared.aio.wsframes import JOIN_BELOW, frame_message, mask_key, parse_frames


class _Conn:
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self._sink = self.got.append


def _websockets_parse(data: bytes, mask: bool) -> list[Frame]:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    while True:
        parser = Frame.parse(reader.read_exact, mask=mask, max_size=None, extensions=[])
        try:
            while True:
                next(parser)
        except StopIteration as done:
            frames.append(done.value)
        except EOFError:
            return frames


def _websockets_frame(payload: bytes, mask: bool, opcode: Opcode = Opcode.BINARY, fin: bool = True) -> bytes:
    return Frame(opcode, payload, fin=fin).serialize(mask=mask, extensions=[])


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "pieces",
    [
        [b""],
        [b"x" * 125],
        [b"a" * 100, b"b" * 27],  # joined, then masked once
        [b"c" * 126],
        [b"d" * 70_000],
        [b"e" * 3, bytes(range(256)) * 100, memoryview(b"f" * 5)],  # a large piece among small ones
        [b"g" * JOIN_BELOW, b"h" * (JOIN_BELOW + 3), b"i"],  # rotated keys at odd offsets
    ],
)
def test_frame_message_is_what_websockets_parses(pieces: list[bytes | memoryview], masked: bool) -> None:
    wire = b"".join(bytes(p) for p in frame_message(list(pieces), masked))
    (frame,) = _websockets_parse(wire, mask=masked)
    assert frame.opcode is Opcode.BINARY and frame.fin
    assert frame.data == b"".join(bytes(p) for p in pieces)


def test_small_pieces_go_in_one_write_and_large_ones_as_they_are() -> None:
    big = b"z" * (JOIN_BELOW + 1)
    out = frame_message([b"head", big, b"tail"], masked=False)
    assert len(out) == 3 and out[1] is big  # header + "head", the big piece uncopied, "tail"


@pytest.mark.parametrize("masked", [False, True])
def test_parse_frames_delivers_whole_frames_and_stops_at_a_partial_one(masked: bool) -> None:
    payloads = [b"", b"one", b"t" * 200, b"u" * 70_000]
    wire = b"".join(_websockets_frame(p, masked) for p in payloads)
    partial = _websockets_frame(b"v" * 1000, masked)
    data = memoryview(wire + partial[:-10])
    conn = _Conn()
    pos, need, odd = parse_frames(conn, data, 0, len(data), masked, 1 << 62)
    assert conn.got == payloads
    assert (pos, need, odd) == (len(wire), len(partial), False)
    # a header cut short: its length is not known yet
    conn2 = _Conn()
    assert parse_frames(conn2, memoryview(partial[:3]), 0, 3, masked, 1 << 62) == (0, 0, False)


def test_parse_frames_stops_at_what_websockets_must_parse() -> None:
    ok = _websockets_frame(b"ok", mask=True)
    for odd in (
        _websockets_frame(b"bye", mask=True, opcode=Opcode.CLOSE),
        _websockets_frame(b"text", mask=True, opcode=Opcode.TEXT),
        _websockets_frame(b"part", mask=True, fin=False),
        _websockets_frame(b"unmasked", mask=False),  # the server wants masked frames
        _websockets_frame(b"x" * 300, mask=True),  # over the limit below
    ):
        conn = _Conn()
        data = memoryview(ok + odd)
        assert parse_frames(conn, data, 0, len(data), True, 200) == (len(ok), 0, True)
        assert conn.got == [b"ok"]


def test_a_sink_dropped_by_a_message_stops_the_loop() -> None:
    conn = _Conn()

    def once(payload: bytes) -> None:
        conn.got.append(payload)
        conn._sink = None  # type: ignore[assignment]  # the session detached

    conn._sink = once
    wire = _websockets_frame(b"a", False) + _websockets_frame(b"b", False)
    first = len(_websockets_frame(b"a", False))
    assert parse_frames(conn, memoryview(wire), 0, len(wire), False, 1 << 62) == (first, 0, True)
    assert conn.got == [b"a"]


def test_mask_keys_are_four_bytes() -> None:
    assert {len(mask_key()) for _ in range(2000)} == {4}
