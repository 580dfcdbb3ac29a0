"""shared.errors: the hierarchy of STYLE.md section 5 and the status hints."""

from __future__ import annotations

import pytest

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
    ("cls", "status"),
    [
        (TunnelError, 502),
        (ProtocolError, 502),
        (AuthError, 401),
        (SessionClosed, 502),
        (StreamReset, 502),
        (NoTunnel, 503),
        (TooManyStreams, 503),
        (TunnelTimeout, 504),
        (UpstreamError, 502),
    ],
)
def test_status_hints(cls: type[TunnelError], status: int) -> None:
    assert cls.status_hint == status


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
