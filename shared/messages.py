"""Control messages carried as JSON in CONTROL frames on stream 0 (docs/PROTOCOL.md section 5).

Control messages are rare (once per session, or on a route change), so they are pydantic models:
validated, frozen, unknown fields refused. Data frames never go through pydantic.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import RemoteProtocolError
from .routing import HOST_PATTERN
from .sizes import DEFAULT_MAX_FRAME, DEFAULT_STREAM_WINDOW

__all__ = [
    "MAX_ROUTES",
    "MAX_TCP",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "TRAILERS_VERSION",
    "ControlMessage",
    "Error",
    "Hello",
    "MESSAGE_TYPES",
    "RouteRefusal",
    "RouteSpec",
    "Routes",
    "TcpSpec",
    "Welcome",
    "decode_control",
    "encode_control",
]

#: The protocol version this build speaks; bumped by any change to the wire format.
PROTOCOL_VERSION = 2
#: 1: the original protocol; 2 adds TRAILERS frames and HTTP/2 reset codes (docs/PROTOCOL.md
#: section 14.1). A version 1 peer is still served: requests that need trailers get 502.
SUPPORTED_VERSIONS: tuple[int, ...] = (1, 2)
#: The first version that carries TRAILERS.
TRAILERS_VERSION = 2

_HOST = HOST_PATTERN + "|^default$"


#: Routes one session may announce (Hello and Routes messages): a client configured with more
#: is refused at start (``--upstream``), the exit server refuses longer messages.
MAX_ROUTES = 256
#: TCP tunnels one session may ask for (``--tcp``).
MAX_TCP = 64


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouteSpec(_Model):
    """A hostname (exact, ``*.suffix`` or ``default``) and an optional path prefix."""

    host: Annotated[str, Field(pattern=_HOST, max_length=253)]
    path_prefix: Annotated[str, Field(pattern=r"^/", max_length=1024)] = "/"


class TcpSpec(_Model):
    """A public TCP port the client asks the exit server to listen on."""

    port: Annotated[int, Field(ge=1, le=65535)]


class RouteRefusal(_Model):
    """A route or port the server would not grant, with a reason for the client's log."""

    route: str
    reason: str


class Hello(_Model):
    """First message, client to server."""

    type: Literal["hello"] = "hello"
    versions: Annotated[list[int], Field(min_length=1, max_length=16)]
    instance_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
    routes: Annotated[list[RouteSpec], Field(max_length=MAX_ROUTES)] = []
    tcp: Annotated[list[TcpSpec], Field(max_length=MAX_TCP)] = []
    labels: Annotated[dict[str, Annotated[str, Field(max_length=256)]], Field(max_length=32)] = {}
    max_streams: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    initial_window: Annotated[int, Field(ge=1024, le=(1 << 31) - 1)] = DEFAULT_STREAM_WINDOW
    max_frame: Annotated[int, Field(ge=1024, le=(1 << 24) - 1)] = DEFAULT_MAX_FRAME
    software: Annotated[str, Field(max_length=64)] = ""


class Welcome(_Model):
    """Server's answer to Hello: the chosen version and what it granted."""

    type: Literal["welcome"] = "welcome"
    version: int
    session_id: Annotated[str, Field(max_length=64)]
    client_id: Annotated[str, Field(max_length=128)]
    routes: list[RouteSpec] = []
    tcp: list[TcpSpec] = []
    refused: list[RouteRefusal] = []
    max_streams: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    initial_window: Annotated[int, Field(ge=1024, le=(1 << 31) - 1)] = DEFAULT_STREAM_WINDOW
    max_frame: Annotated[int, Field(ge=1024, le=(1 << 24) - 1)] = DEFAULT_MAX_FRAME
    heartbeat_interval: Annotated[float, Field(gt=0, le=300)] = 5.0


class Routes(_Model):
    """Client to server after the handshake: replace the set of routes this session serves
    (used when an upstream turns unhealthy or healthy again)."""

    type: Literal["routes"] = "routes"
    routes: Annotated[list[RouteSpec], Field(max_length=MAX_ROUTES)] = []


class Error(_Model):
    """A fatal error; the sender closes the session after it."""

    type: Literal["error"] = "error"
    code: Annotated[str, Field(max_length=64)]
    message: Annotated[str, Field(max_length=512)] = ""


ControlMessage = Annotated[Hello | Welcome | Routes | Error, Field(discriminator="type")]

#: The registry of control message types (a test pins it).
MESSAGE_TYPES: dict[str, type[_Model]] = {
    "hello": Hello,
    "welcome": Welcome,
    "routes": Routes,
    "error": Error,
}

_ADAPTER: TypeAdapter[Hello | Welcome | Routes | Error] = TypeAdapter(ControlMessage)
MAX_CONTROL_SIZE = 64 * 1024


def encode_control(message: Hello | Welcome | Routes | Error) -> bytes:
    """Serialise a control message to JSON bytes."""
    return message.model_dump_json().encode()


def decode_control(payload: bytes | memoryview) -> Hello | Welcome | Routes | Error:
    """Parse and validate a control message.

    Raises:
        RemoteProtocolError: not JSON, not a known message, or an invalid field.
    """
    if len(payload) > MAX_CONTROL_SIZE:
        raise RemoteProtocolError("control message too large")
    try:
        return _ADAPTER.validate_json(bytes(payload))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise RemoteProtocolError(f"invalid control message at {where or 'top'}: {first['msg']}") from None
