"""shared.errors: the hierarchy of STYLE.md section 5, and the one table at each boundary."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from exit_server.public import status_of
from shared import errors
from shared.errors import (
    AuthError,
    ConfigError,
    FlowControlError,
    FrameTooLarge,
    InvalidState,
    LocalProtocolError,
    NoTunnel,
    ProtocolError,
    RemoteProtocolError,
    SessionClosed,
    StreamReset,
    TooManyStreams,
    TunnelError,
    TunnelTimeout,
    UpstreamError,
)
from shared.frames import ResetCode
from tunnel_client.upstream import reset_for

PARENTS = {
    ProtocolError: TunnelError,
    LocalProtocolError: ProtocolError,
    RemoteProtocolError: ProtocolError,
    FrameTooLarge: RemoteProtocolError,
    InvalidState: ProtocolError,
    FlowControlError: ProtocolError,
    AuthError: TunnelError,
    SessionClosed: TunnelError,
    StreamReset: TunnelError,
    NoTunnel: TunnelError,
    TooManyStreams: TunnelError,
    TunnelTimeout: TunnelError,
    UpstreamError: TunnelError,
    ConfigError: TunnelError,
}


@pytest.mark.parametrize(("cls", "parent"), PARENTS.items(), ids=lambda c: getattr(c, "__name__", ""))
def test_hierarchy(cls: type[TunnelError], parent: type[Exception]) -> None:
    assert cls.__bases__ == (parent,)


def test_timeouts_are_not_protocol_or_network_errors() -> None:
    assert not issubclass(TunnelTimeout, (ProtocolError, SessionClosed, OSError))
    assert not issubclass(TunnelTimeout, TimeoutError)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NoTunnel("gone"), 503),
        (TooManyStreams("full"), 503),
        (LocalProtocolError("head too large"), 431),
        (SessionClosed("lost"), 502),
        (TunnelTimeout(), 504),
        (StreamReset(ResetCode.REFUSED), 503),
        (StreamReset(ResetCode.FORBIDDEN), 403),
        (StreamReset(ResetCode.TOO_LARGE), 413),
        (StreamReset(ResetCode.UPSTREAM_TIMEOUT), 504),
        (StreamReset(ResetCode.UPSTREAM_CONNECT), 502),
        (StreamReset(999), 502),
        (FrameTooLarge("x"), 502),
        (TunnelError("x"), 502),
    ],
    ids=repr,
)
def test_the_exit_server_maps_errors_to_statuses_in_one_table(error: TunnelError, status: int) -> None:
    assert status_of(error) == status


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UpstreamError("refused", connect=True), ResetCode.UPSTREAM_CONNECT),
        (UpstreamError("slow", connect=True, timeout=True), ResetCode.UPSTREAM_TIMEOUT),
        (UpstreamError("big", head_too_large=True), ResetCode.UPSTREAM_RESET),
        (UpstreamError("closed"), ResetCode.UPSTREAM_CONNECT),
        (UpstreamError("cut", before_head=False), ResetCode.UPSTREAM_RESET),
    ],
    ids=repr,
)
def test_the_client_maps_upstream_errors_to_reset_codes_in_one_place(error: UpstreamError, code: ResetCode) -> None:
    assert reset_for(error)[0] is code


def test_every_error_is_raised_somewhere_and_defined_once() -> None:
    """No error class is dead weight (each is constructed somewhere), and none is defined twice."""
    root = Path(__file__).resolve().parents[2]
    sources = [
        path.read_text()
        for package in ("shared", "exit_server", "tunnel_client")
        for path in (root / package).rglob("*.py")
    ]
    code = "\n".join(sources)
    for name in errors.__all__:
        if name in ("TunnelError", "ProtocolError"):  # bases: caught, not raised
            continue
        assert re.search(rf"(?<!class )\b{name}\(", code), f"{name} is never raised"
        assert len(re.findall(rf"^class {name}\(", code, re.M)) == 1, f"{name} is defined more than once"


def test_invalid_state_names_state_and_event() -> None:
    error = InvalidState("stream 3", "half-closed", "DATA")
    assert (error.state, error.event) == ("half-closed", "DATA")
    assert str(error) == "stream 3: DATA is not allowed in state half-closed"


def test_stream_reset() -> None:
    error = StreamReset(2, "busy")
    assert (error.code, error.reason, str(error)) == (2, "busy", "stream reset (code 2): busy")
    bare = StreamReset(1)
    assert (bare.reason, str(bare)) == ("", "stream reset (code 1)")


def test_docstring_draws_the_tree() -> None:
    import shared.errors

    doc = shared.errors.__doc__ or ""
    for cls in PARENTS:
        assert cls.__name__ in doc
