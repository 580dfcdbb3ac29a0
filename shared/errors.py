"""Exception hierarchy shared by both sides of the tunnel.

::

    TunnelError
    ├── ProtocolError
    │   ├── LocalProtocolError      we were asked to do something the protocol forbids
    │   ├── RemoteProtocolError     the peer sent something the protocol forbids
    │   │   └── FrameTooLarge       a declared frame length is above the negotiated limit
    │   ├── InvalidState            an event arrived in a state that does not allow it
    │   └── FlowControlError        more data than the credit allowed
    ├── AuthError                   the exit server refused our credentials (client)
    ├── SessionClosed               the tunnel session is gone
    ├── StreamReset                 a stream was reset (``code``: shared.frames.ResetCode)
    ├── NoTunnel                    no live session can take this request (exit server)
    ├── TooManyStreams              the per-session stream limit is reached
    ├── TunnelTimeout               a deadline passed (heartbeat, response head)
    ├── UpstreamError               the local upstream failed (client)
    └── ConfigError                 invalid configuration (CLI exit status 2)

Errors carry no status of their own: each boundary maps them in one table, the public HTTP
status in ``exit_server/public.py`` (``ERROR_STATUS``) and the stream reset code in
``tunnel_client/upstream.py`` (``reset_for``); the CLI maps ConfigError to status 2 and every
other error to 1 (``shared/runtime/cli.py``).
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


class ProtocolError(TunnelError):
    """A violation of the wire protocol (docs/PROTOCOL.md)."""


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
    """The exit server refused the client's credentials (missing, wrong or revoked)."""


class SessionClosed(TunnelError):
    """The tunnel session ended before the operation completed."""


class StreamReset(TunnelError):
    """A stream was reset; ``code`` is a :class:`shared.frames.ResetCode`."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"stream reset (code {code}): {reason}" if reason else f"stream reset (code {code})")
        self.code = code
        self.reason = reason


class NoTunnel(TunnelError):
    """No live tunnel session can take the request (none routed, or the one picked closed)."""


class TooManyStreams(TunnelError):
    """The per-session concurrent stream limit is reached."""


class TunnelTimeout(TunnelError):
    """A deadline passed (heartbeat, response head)."""


class UpstreamError(TunnelError):
    """The local upstream could not be reached or broke the exchange.

    Attributes:
        connect: the connection could not be opened.
        timeout: opening it took longer than the connect timeout.
        before_head: no response head had arrived (the caller gets 502/504, not a cut body).
        retriable: a pooled connection failed before any response byte: safe to send again
            when the request body was not streamed.
        head_too_large: the response head went past the configured bytes or fields.
    """

    def __init__(
        self,
        reason: str,
        *,
        connect: bool = False,
        timeout: bool = False,
        before_head: bool = True,
        retriable: bool = False,
        head_too_large: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.head_too_large = head_too_large
        self.connect = connect
        self.timeout = timeout
        self.before_head = before_head
        self.retriable = retriable


class ConfigError(TunnelError):
    """The configuration is invalid; the CLI exits with status 2."""
