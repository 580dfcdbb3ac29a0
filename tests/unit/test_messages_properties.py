"""Properties of the control messages (shared/messages.py) over generated valid messages:
every valid message survives the wire unchanged, whatever decodes re-encodes to itself, and
any corruption of a valid encoding is either refused as a protocol error or still valid.
(The example-based tests and the garbage-in properties live in test_messages.py.)"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.errors import ProtocolError
from shared.messages import (
    MAX_CONTROL_SIZE,
    Error,
    Hello,
    RouteRefusal,
    Routes,
    RouteSpec,
    TcpSpec,
    Welcome,
    decode_control,
    encode_control,
)

label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20})", fullmatch=True)
hosts = st.one_of(
    st.just("default"),
    st.lists(label, min_size=1, max_size=4).map(".".join),
    st.lists(label, min_size=1, max_size=3).map(lambda parts: "*." + ".".join(parts)),
)
routes = st.builds(RouteSpec, host=hosts, path_prefix=st.text(max_size=30).map(lambda t: "/" + t))
tcps = st.builds(TcpSpec, port=st.integers(1, 65535))
short = st.text(max_size=40)
windows = st.integers(1024, (1 << 31) - 1)
frames = st.integers(1024, (1 << 24) - 1)

hellos = st.builds(
    Hello,
    versions=st.lists(st.integers(0, 1 << 16), min_size=1, max_size=16),
    instance_id=st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True),
    routes=st.lists(routes, max_size=5),
    tcp=st.lists(tcps, max_size=3),
    labels=st.dictionaries(short, st.text(max_size=256), max_size=5),
    max_streams=st.integers(1, 1_000_000),
    initial_window=windows,
    max_frame=frames,
    software=st.text(max_size=64),
)
welcomes = st.builds(
    Welcome,
    version=st.integers(-(1 << 40), 1 << 40),
    session_id=st.text(max_size=64),
    client_id=st.text(max_size=128),
    routes=st.lists(routes, max_size=5),
    tcp=st.lists(tcps, max_size=3),
    refused=st.lists(st.builds(RouteRefusal, route=short, reason=short), max_size=3),
    max_streams=st.integers(1, 1_000_000),
    initial_window=windows,
    max_frame=frames,
    heartbeat_interval=st.floats(min_value=0, max_value=300, exclude_min=True, allow_nan=False),
)
messages = st.one_of(
    hellos,
    welcomes,
    st.builds(Routes, routes=st.lists(routes, max_size=8)),
    st.builds(Error, code=st.text(max_size=64), message=st.text(max_size=512)),
)


@given(messages)
def test_every_valid_message_round_trips(message: Hello | Welcome | Routes | Error) -> None:
    payload = encode_control(message)
    assert len(payload) <= MAX_CONTROL_SIZE
    assert decode_control(payload) == message
    assert encode_control(decode_control(payload)) == payload  # the encoding is canonical


@given(messages, st.data())
def test_corrupted_encodings_are_refused_or_valid(
    message: Hello | Welcome | Routes | Error, data: st.DataObject
) -> None:
    payload = bytearray(encode_control(message))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(payload) - 1))
        payload[index] = data.draw(st.integers(0, 255))
    try:
        decoded = decode_control(bytes(payload))
    except ProtocolError:
        return
    assert decode_control(encode_control(decoded)) == decoded  # anything accepted is a valid message


@given(messages, st.integers(0, 200))
def test_truncated_encodings_are_refused(message: Hello | Welcome | Routes | Error, cut: int) -> None:
    payload = encode_control(message)
    truncated = payload[: max(0, len(payload) - 1 - cut)]
    try:
        decode_control(truncated)
    except ProtocolError:
        return
    raise AssertionError(f"a truncated message decoded: {truncated!r}")
