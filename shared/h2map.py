"""HTTP/2 and gRPC semantics on the tunnel (docs/PROTOCOL.md section 14.1): how an HTTP/2
request becomes a stream head and back, how HTTP/2 error codes travel as reset codes, and the
few gRPC rules the edge needs. Pure functions, no I/O: the exit server's HTTP/2 listener
(exit_server/h2public.py) and the client's HTTP/2 upstreams (tunnel_client/http2.py) share them.
"""

from __future__ import annotations

from collections.abc import Iterable

from .frames import ResetCode
from .heads import Headers
from .httputil import is_grpc  # compiled there: the client asks it of every request

__all__ = [
    "CONNECTION_SPECIFIC",
    "H2Error",
    "PREFACE",
    "from_h2_reset",
    "grpc_status_headers",
    "grpc_timeout",
    "is_grpc",
    "split_pseudo",
    "to_h2_reset",
    "wants_trailers",
]


#: The client connection preface (RFC 9113 section 3.4): an h2c caller with prior knowledge
#: starts with it on a plain listener.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class H2Error:
    """HTTP/2 error codes (RFC 9113 section 7); plain ints so callers need not import h2."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    ENHANCE_YOUR_CALM = 0xB


#: Header fields HTTP/2 forbids (RFC 9113 section 8.2.2); ``te`` is allowed only as "trailers".
CONNECTION_SPECIFIC = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host", "te"}
)

_TO_H2: dict[int, int] = {
    ResetCode.CANCEL: H2Error.CANCEL,
    ResetCode.REFUSED: H2Error.REFUSED_STREAM,
    ResetCode.PROTOCOL_ERROR: H2Error.PROTOCOL_ERROR,
    ResetCode.FLOW_CONTROL_ERROR: H2Error.FLOW_CONTROL_ERROR,
}


def to_h2_reset(code: int) -> int:
    """The RST_STREAM code an HTTP/2 caller gets for a tunnel reset ``code``: an HTTP/2 code
    carried through (0x100 + code) comes out unchanged, CANCEL and REFUSED keep their meaning
    (REFUSED_STREAM tells the caller it may retry), anything else is INTERNAL_ERROR."""
    if ResetCode.H2_BASE <= code < ResetCode.H2_BASE + 0x100:
        return code - ResetCode.H2_BASE
    return _TO_H2.get(code, H2Error.INTERNAL_ERROR)


def from_h2_reset(error_code: int, carries_h2: bool) -> int:
    """The tunnel reset code for an HTTP/2 peer's RST_STREAM ``error_code``: carried through as
    0x100 + code on a version 2 session (``carries_h2``), else the nearest version 1 code."""
    if carries_h2 and 0 <= error_code < 0x100:
        return ResetCode.H2_BASE + error_code
    if error_code == H2Error.CANCEL:
        return ResetCode.CANCEL
    if error_code == H2Error.REFUSED_STREAM:
        return ResetCode.REFUSED
    return ResetCode.UPSTREAM_RESET


def split_pseudo(fields: Iterable[tuple[bytes, bytes]]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Split HTTP/2 header fields into pseudo-headers and regular fields, both as ISO-8859-1
    text (h2 has already checked names are lower case and pseudo-headers come first)."""
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for raw_name, raw_value in fields:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        if name.startswith(":"):
            pseudo[name] = value
        else:
            regular.append((name, value))
    return pseudo, regular


def wants_trailers(headers: Iterable[tuple[str, str]]) -> bool:
    """True when the request says it accepts trailers (``te: trailers``) or is gRPC."""
    found_grpc = False
    for name, value in headers:
        lower = name.lower()
        if lower == "te" and "trailers" in value.lower():
            return True
        if lower == "content-type" and value.lower().startswith("application/grpc"):
            found_grpc = True
    return found_grpc


_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def grpc_timeout(headers: Iterable[tuple[str, str]]) -> float | None:
    """Seconds from a ``grpc-timeout`` header (at most 8 digits and a unit), or None."""
    for name, value in headers:
        if name.lower() == "grpc-timeout":
            digits, unit = value[:-1], value[-1:]
            if 0 < len(digits) <= 8 and digits.isascii() and digits.isdigit() and unit in _TIMEOUT_UNITS:
                return int(digits) * _TIMEOUT_UNITS[unit]
            return None
    return None


def _percent_encode(message: str) -> str:
    """gRPC's percent-encoding of ``grpc-message`` (PROTOCOL-HTTP2.md): printable ASCII except
    ``%`` stays, every other UTF-8 byte becomes %XX."""
    out = []
    for byte in message.encode("utf-8"):
        out.append(chr(byte) if 0x20 <= byte <= 0x7E and byte != 0x25 else f"%{byte:02X}")
    return "".join(out)


def grpc_status_headers(code: int, message: str) -> Headers:
    """A gRPC Trailers-Only response's fields: HTTP 200 with the status in the head."""
    return (
        ("content-type", "application/grpc"),
        ("grpc-status", str(code)),
        ("grpc-message", _percent_encode(message)),
    )
