"""shared.messages: control messages and their registry (docs/PROTOCOL.md section 5)."""

from __future__ import annotations

import json
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from shared.errors import ProtocolError, RemoteProtocolError
from shared.messages import (
    MAX_CONTROL_SIZE,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    ControlMessage,
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


def test_version_constants() -> None:
    assert PROTOCOL_VERSION == 2
    assert PROTOCOL_VERSION in SUPPORTED_VERSIONS
    assert max(SUPPORTED_VERSIONS) == PROTOCOL_VERSION


def test_registry_is_pinned_and_complete() -> None:
    assert MESSAGE_TYPES == {"hello": Hello, "welcome": Welcome, "routes": Routes, "error": Error}
    union = typing.get_args(typing.get_args(ControlMessage)[0])
    assert set(union) == set(MESSAGE_TYPES.values())
    for name, model in MESSAGE_TYPES.items():
        assert model.model_fields["type"].default == name


def test_models_are_frozen_and_strict() -> None:
    models: list[type[BaseModel]] = [*MESSAGE_TYPES.values(), RouteSpec, TcpSpec, RouteRefusal]
    for model in models:
        assert model.model_config.get("extra") == "forbid"
        assert model.model_config.get("frozen") is True
    error = Error(code="x")
    with pytest.raises(ValidationError):
        error.code = "y"
    with pytest.raises(ValidationError):
        Error(code="x", surprise=1)  # type: ignore[call-arg]


# ---------------------------------------------------------------- golden JSON


def test_hello_golden() -> None:
    hello = Hello(versions=[1], instance_id="a")
    assert encode_control(hello) == (
        b'{"type":"hello","versions":[1],"instance_id":"a","routes":[],"tcp":[],"labels":{},'
        b'"max_streams":10000,"initial_window":262144,"max_frame":262144,"software":""}'
    )


def test_error_golden() -> None:
    assert encode_control(Error(code="x")) == b'{"type":"error","code":"x","message":""}'


def test_routes_golden() -> None:
    message = Routes(routes=[RouteSpec(host="*.example.com"), RouteSpec(host="default", path_prefix="/api")])
    assert json.loads(encode_control(message)) == {
        "type": "routes",
        "routes": [{"host": "*.example.com", "path_prefix": "/"}, {"host": "default", "path_prefix": "/api"}],
    }


def test_welcome_defaults() -> None:
    welcome = Welcome(version=1, session_id="s", client_id="c")
    assert json.loads(encode_control(welcome)) == {
        "type": "welcome",
        "version": 1,
        "session_id": "s",
        "client_id": "c",
        "routes": [],
        "tcp": [],
        "refused": [],
        "max_streams": 10000,
        "initial_window": 262144,
        "max_frame": 262144,
        "heartbeat_interval": 5.0,
    }


# ---------------------------------------------------------------- round trips

MESSAGES = [
    Hello(
        versions=[1, 2],
        instance_id="host-1:a_b.c",
        routes=[RouteSpec(host="app.example.com", path_prefix="/v1")],
        tcp=[TcpSpec(port=5432)],
        labels={"env": "prod"},
        max_streams=5,
        initial_window=1024,
        max_frame=1024,
        software="backhaul/0.1.0",
    ),
    Welcome(
        version=1,
        session_id="abc",
        client_id="default",
        routes=[RouteSpec(host="app.example.com")],
        refused=[RouteRefusal(route="x.example.com/", reason="taken")],
        heartbeat_interval=0.5,
    ),
    Routes(),
    Error(code="unsupported_version", message="server speaks versions [1]"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.type)
def test_round_trip(message: Hello | Welcome | Routes | Error) -> None:
    assert decode_control(encode_control(message)) == message
    assert decode_control(memoryview(encode_control(message))) == message


# ---------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        (b"", "top"),
        (b"not json", "top"),
        (b"[]", "top"),
        (b'{"type":"nope"}', "top"),
        (b'{"code":"x"}', "top"),
        (b'{"type":"error"}', "error.code"),
        (b'{"type":"error","code":"x","extra":1}', "error.extra"),
        (b'{"type":"hello","versions":[],"instance_id":"a"}', "hello.versions"),
        (b'{"type":"hello","versions":[1],"instance_id":"a b"}', "hello.instance_id"),
        (b'{"type":"hello","versions":[1],"instance_id":"a","max_frame":100}', "hello.max_frame"),
        (b'{"type":"hello","versions":[1],"instance_id":"a","routes":[{"host":"UP.example"}]}', "hello.routes.0.host"),
        (b'{"type":"hello","versions":[1],"instance_id":"a","tcp":[{"port":0}]}', "hello.tcp.0.port"),
        (
            b'{"type":"welcome","version":1,"session_id":"s","client_id":"c","heartbeat_interval":0}',
            "welcome.heartbeat_interval",
        ),
    ],
)
def test_invalid_messages(payload: bytes, where: str) -> None:
    with pytest.raises(RemoteProtocolError, match=f"invalid control message at {where}:"):
        decode_control(payload)


def test_too_large() -> None:
    padding = " " * (MAX_CONTROL_SIZE - len(b'{"type":"error","code":"x"}'))
    assert decode_control(b'{"type":"error","code":"x"}' + padding.encode()) == Error(code="x")
    with pytest.raises(RemoteProtocolError, match="too large"):
        decode_control(b'{"type":"error","code":"x"}' + padding.encode() + b" ")


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("app.example.com", True),
        ("*.example.com", True),
        ("default", True),
        ("localhost", True),
        ("a-b.c0", True),
        ("App.example.com", False),
        ("*.*.example.com", False),
        ("-a.example.com", False),
        ("a..b", False),
        ("*", False),
        ("", False),
        ("a" * 64, False),
        ("a" * 63, True),
    ],
)
def test_route_host_pattern(host: str, ok: bool) -> None:
    if ok:
        assert RouteSpec(host=host).host == host
    else:
        with pytest.raises(ValidationError):
            RouteSpec(host=host)


def test_route_path_prefix() -> None:
    assert RouteSpec(host="default").path_prefix == "/"
    with pytest.raises(ValidationError):
        RouteSpec(host="default", path_prefix="api")


# ---------------------------------------------------------------- hypothesis: garbage in


@given(st.binary(max_size=200))
def test_garbage_bytes_raise_only_protocol_errors(data: bytes) -> None:
    try:
        decode_control(data)
    except ProtocolError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@given(
    st.sampled_from([*MESSAGE_TYPES, "other"]),
    st.dictionaries(
        st.sampled_from(["versions", "instance_id", "routes", "version", "session_id", "client_id", "code", "x"]),
        json_values,
        max_size=5,
    ),
)
def test_garbage_json_raises_only_protocol_errors(kind: str, fields: dict[str, object]) -> None:
    payload = json.dumps({"type": kind, **fields}).encode()
    try:
        message = decode_control(payload)
    except ProtocolError:
        return
    assert message.type == kind


def test_deeply_nested_json_is_a_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError):
        decode_control(b'{"type":"error","code":' + b"[" * 5000 + b"]" * 5000 + b"}")
