"""Exception hierarchy shared by both sides of the tunnel.

::

    TunnelError
    ├── ProtocolError
    │   ├── LocalProtocolError      we were asked to do something the protocol forbids
    │   ├── RemoteProtocolError     the peer sent something the protocol forbids
    │   │   └── FrameTooLarge       a declared frame length is above the negotiated limit
    │   ├── InvalidState            an event arrived in a state that does not allow it
    │   └── FlowControlError        more data than the credit allowed
    ├── AuthError                   bad, missing or revoked credentials (status hint 401)
    ├── SessionClosed               the tunnel session is gone (status hint 502)
    ├── StreamReset                 the peer reset a stream (status hint 502)
    ├── NoTunnel                    no live session serves this host (status hint 503)
    ├── TooManyStreams              the per-tunnel stream limit is reached (status hint 503)
    ├── TunnelTimeout               a deadline passed (status hint 504)
    ├── UpstreamError               the local upstream failed (status hint 502)
    └── ConfigError                 invalid configuration (CLI exit code 2)

Every error the exit server can surface to a public caller carries ``status_hint``, the HTTP
status it maps to (the idea of h11's ``error_status_hint``).
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "FlowControlError",
    "FrameTooLarge",
    "InvalidState",
    "LocalProtocolError",
    "NoTunnel",
    "ProtocolError",
    "RemoteProtocolError",
    "SessionClosed",
    "StreamReset",
    "TooManyStreams",
    "TunnelError",
    "TunnelTimeout",
    "UpstreamError",
]


class TunnelError(Exception):
    """Base class of every error raised by Backhaul."""

    status_hint: int = 502


class ProtocolError(TunnelError):
    """A violation of the wire protocol (docs/PROTOCOL.md)."""

    status_hint = 502


class LocalProtocolError(ProtocolError):
    """This side tried something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class FrameTooLarge(RemoteProtocolError):
    """A frame declared a payload longer than the negotiated maximum."""


class InvalidState(ProtocolError):
    """An event is not legal in the current session or stream state."""

    def __init__(self, what: str, state: object, event: object) -> None:
        super().__init__(f"{what}: {event} is not allowed in state {state}")
        self.state = state
        self.event = event


class FlowControlError(ProtocolError):
    """Data was sent beyond the credit the receiver granted."""


class AuthError(TunnelError):
    """Credentials were missing, wrong, or revoked."""

    status_hint = 401


class SessionClosed(TunnelError):
    """The tunnel session ended before the operation completed."""

    status_hint = 502


class StreamReset(TunnelError):
    """The peer reset the stream; ``code`` is a :class:`shared.frames.ResetCode`."""

    status_hint = 502

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"stream reset (code {code}): {reason}" if reason else f"stream reset (code {code})")
        self.code = code
        self.reason = reason


class NoTunnel(TunnelError):
    """No live tunnel session serves the requested host."""

    status_hint = 503


class TooManyStreams(TunnelError):
    """The per-session concurrent stream limit is reached."""

    status_hint = 503


class TunnelTimeout(TunnelError):
    """A deadline passed (response head, heartbeat, drain)."""

    status_hint = 504


class UpstreamError(TunnelError):
    """The local upstream refused, failed or broke the connection."""

    status_hint = 502


class ConfigError(TunnelError):
    """The configuration is invalid; the CLI exits with status 2."""
