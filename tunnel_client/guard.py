"""Customer guardrails: what the tunnel client accepts from the exit server before it touches an
upstream. Pure functions, no I/O.

The exit server chooses a configured route by naming a host and a path; it never names an
address. These checks make sure nothing in a request head can widen that:

- the request target must be origin-form (``/path?query``): absolute-form
  (``http://169.254.169.254/…``), authority-form, ``//host/…`` and ``@host…`` are refused, so
  the URL built from the upstream's origin and the target can never name another host;
- the path is canonicalised (percent-escapes of unreserved characters decoded, dot segments
  removed, characters outside RFC 3986 ``pchar`` escaped): route and allow-list decisions are
  made on exactly the path the upstream receives;
- methods must be tokens (RFC 9110 section 5.6.2), CONNECT is refused, WebSocket streams are GET;
- header names must be tokens and values free of CR, LF, NUL and other controls (no request
  splitting towards the upstream);
- heads above :data:`MAX_TARGET` / :data:`MAX_HEADER_BYTES` are refused;
- an optional per-route allow-list of paths (``--allow-path``).

A refusal is :class:`Refused` carrying the RESET code the client answers with: FORBIDDEN (the
exit server answers 403).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence

from shared.frames import ResetCode
from shared.heads import RequestHead, StreamKind

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_TARGET",
    "Guard",
    "Refused",
    "canonical_path",
    "check_authority",
    "check_headers",
    "check_method",
    "check_tcp_target",
    "parse_allow_paths",
    "path_allowed",
    "split_target",
]

#: Longest request target accepted (the exit server's own parser stops near 8 KiB).
MAX_TARGET = 16 * 1024
#: Most header bytes (names + values) accepted in one head.
MAX_HEADER_BYTES = 128 * 1024
MAX_METHOD = 32
MAX_AUTHORITY = 300

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # every control but HTAB
_AUTHORITY_BAD = re.compile(r"[\x00-\x20\x7f/\\?#@]")
_PORT = re.compile(r"[0-9]{1,5}")
_HEX = frozenset(string.hexdigits)
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
#: RFC 3986 pchar minus pct-encoded, plus "/": left as they are in a path.
_PATH_SAFE = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
#: Characters left as they are in a query (RFC 3986 ``query``); "%" is checked separately.
_QUERY_SAFE = _PATH_SAFE | frozenset("?")
#: A path :func:`canonical_path` returns unchanged: "/" then characters of ``_PATH_SAFE`` only
#: (no "%"); with no "/." in it and no "//" at its start, it has no dot segment to remove.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
#: A query :func:`_canonical_query` returns unchanged: characters of ``_QUERY_SAFE`` only.
_PLAIN_QUERY = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?]*")
#: Header names joined by LF: every one a token (LF is not a token character).
_TOKEN_OCTETS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_VALUE_OCTETS = bytes(range(0x20, 0x7F)) + b"\t"  # what an ASCII value may hold
_PATTERN = re.compile(r"/(?:[A-Za-z0-9\-._~!$&'()+,;:@%]+/)*(?:[A-Za-z0-9\-._~!$&'()+,;:@%]+|\*)?")


class Refused(Exception):
    """A head the guardrails refuse; the stream is reset with ``code``."""

    def __init__(self, reason: str, code: ResetCode = ResetCode.FORBIDDEN) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def check_method(method: str, kind: StreamKind) -> None:
    """A method must be a token; CONNECT is refused (the client is not a forward proxy) and a
    WebSocket stream is a GET.

    Raises:
        Refused: otherwise.
    """
    if len(method) > MAX_METHOD or not _TOKEN.fullmatch(method):
        raise Refused("method is not a token")
    if method.upper() == "CONNECT":
        raise Refused("CONNECT is refused")
    if kind is StreamKind.WEBSOCKET and method != "GET":
        raise Refused("a WebSocket upgrade is a GET")


def check_headers(headers: Sequence[tuple[str, str]]) -> None:
    """Header names must be tokens; values must not contain CR, LF, NUL or other controls
    (HTAB is allowed); the total size is bounded.

    Raises:
        Refused: otherwise.
    """
    # Two joined strings and two checks, not two per header. HTAB, allowed in values, joins
    # them; LF joins the names: never a token character, and a name holding one shows as one
    # LF too many.
    names = "\n".join([pair[0] for pair in headers])
    values = "\t".join([pair[1] for pair in headers])
    if len(names) + len(values) > MAX_HEADER_BYTES:  # the joins add one per header: a bound either way
        if sum(len(name) + len(value) for name, value in headers) > MAX_HEADER_BYTES:
            raise Refused("request head too large")
    # A bytes translate deleting the allowed octets, one C pass each: half the time of the two
    # regexes it replaced. A non-ASCII name is never a token; a non-ASCII value goes to the
    # regex. tests/unit/test_guard.py compares the verdicts with a per-header reference.
    if (
        headers
        and not (
            names.isascii()
            and names.encode().translate(None, _TOKEN_OCTETS) == b"\n" * (len(headers) - 1)
            and names[:1] not in ("", "\n")  # an empty name: first, last or inside
            and names[-1:] != "\n"
            and "\n\n" not in names
        )
    ):
        raise Refused("header name is not a token")
    if values.encode().translate(None, _VALUE_OCTETS) if values.isascii() else _FIELD_VALUE_BAD.search(values):
        raise Refused("control character in a header value")


def check_authority(authority: str) -> None:
    """The authority only selects a route, but it still must look like ``host[:port]``.

    Raises:
        Refused: controls, whitespace, ``/``, ``\\``, ``?``, ``#``, ``@`` or too long.
    """
    if len(authority) > MAX_AUTHORITY or _AUTHORITY_BAD.search(authority):
        raise Refused("bad authority")


def check_tcp_target(target: str) -> int:
    """A TCP stream's target is the public port in ASCII digits.

    Raises:
        Refused: anything else (code NO_UPSTREAM: no configured TCP upstream can match it).
    """
    if not _PORT.fullmatch(target) or not 1 <= int(target) <= 65535:
        raise Refused("bad TCP port", ResetCode.NO_UPSTREAM)
    return int(target)


def _escape(char: str) -> str:
    return "".join(f"%{b:02X}" for b in char.encode("latin-1", "replace"))


def canonical_path(path: str) -> str:
    """Canonical form of an origin-form path: escapes of unreserved characters decoded, other
    escapes upper-cased, characters outside ``pchar`` escaped, dot segments removed
    (RFC 3986 sections 6.2.2 and 5.2.4).

    Raises:
        Refused: a malformed escape, a dot segment hidden behind ``;`` (``/..;/``), or a result
            starting with ``//``.
    """
    if "/." not in path and not path.startswith("//") and _PLAIN_PATH.fullmatch(path):
        return path  # nothing to decode, escape or remove (the usual path)
    return _remove_dot_segments(_normalise_escapes(path))


def _normalise_escapes(path: str) -> str:
    """Escapes of unreserved characters decoded, other escapes upper-cased, characters
    outside ``pchar`` escaped.

    Raises:
        Refused: a malformed escape.
    """
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        char = path[i]
        if char == "%":
            pair = path[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise Refused("bad percent-escape in path")
            decoded = chr(int(pair, 16))
            out.append(decoded if decoded in _UNRESERVED else "%" + pair.upper())
            i += 3
            continue
        out.append(char if char in _PATH_SAFE else _escape(char))
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    segments = path.split("/")[1:]
    kept: list[str] = []
    for seg in segments:
        if seg in (".", ".."):
            if seg == ".." and kept:
                kept.pop()
            continue
        if seg.split(";", 1)[0] in (".", ".."):
            # Some servers (Tomcat, Jetty) strip ";params" before resolving: "/a/..;/b" is "/b".
            raise Refused("dot segment with parameters in path")
        kept.append(seg)
    result = "/" + "/".join(kept)
    if segments and segments[-1] in (".", "..") and not result.endswith("/"):
        result += "/"
    if result.startswith("//"):  # "/a/..//evil": would read as a network-path reference
        raise Refused("path resolves to a network-path reference")
    return result


def _canonical_query(query: str) -> str:
    if _PLAIN_QUERY.fullmatch(query):
        return query
    return _canonical_query_general(query)


def _canonical_query_general(query: str) -> str:
    out: list[str] = []
    for i, char in enumerate(query):
        if char == "%":
            pair = query[i + 1 : i + 3]
            out.append("%" if len(pair) == 2 and set(pair) <= _HEX else "%25")
        else:
            out.append(char if char in _QUERY_SAFE else _escape(char))
    return "".join(out)


def split_target(target: str) -> tuple[str, str | None]:
    """Check an HTTP or WebSocket request target and return its canonical path and query.

    Raises:
        Refused: not origin-form (absolute-form, ``//host``, ``@host``, ``*``), a control or
            space character, a fragment, a malformed escape, or too long.
    """
    if len(target) > MAX_TARGET:
        raise Refused("request target too long")
    if not target.startswith("/") or target.startswith("//"):
        raise Refused("request target is not origin-form")
    if _CONTROL_OR_SPACE.search(target):
        raise Refused("control character in request target")
    if "#" in target:
        raise Refused("fragment in request target")
    path, sep, query = target.partition("?")
    return canonical_path(path), (_canonical_query(query) if sep else None)


def path_allowed(patterns: Iterable[str], path: str) -> bool:
    """True when ``path`` matches one pattern: ``/exact`` or ``/prefix/*`` (the prefix itself
    and anything below it on a segment boundary; ``/*`` is everything). Case-sensitive."""
    for pattern in patterns:
        if pattern.endswith("/*"):
            prefix = pattern[:-2]
            if path == prefix or path.startswith(prefix + "/"):
                return True
        elif path == pattern:
            return True
    return False


def _route_key(route: str) -> tuple[str, str]:
    host, slash, prefix = route.partition("/")
    return host.lower(), (("/" + prefix).rstrip("/") or "/") if slash else "/"


def parse_allow_paths(items: Iterable[str]) -> dict[tuple[str, str], tuple[str, ...]]:
    """Parse ``HOST[/PREFIX]=PATTERN[,PATTERN…]`` items into ``{(host, prefix): patterns}``.

    An item without ``=`` continues the previous one (``BACKHAUL_ALLOW_PATH`` is split at
    commas). HOST[/PREFIX] is written exactly as in ``--upstream``. A pattern is ``/exact``
    or ``/prefix/*``, canonical (as :func:`canonical_path` leaves it).

    Raises:
        ValueError: a malformed item or pattern.
    """
    out: dict[tuple[str, str], list[str]] = {}
    key: tuple[str, str] | None = None
    for item in items:
        for piece in (p.strip() for p in item.split(",")):
            if not piece:
                continue
            route, sep, pattern = piece.partition("=")
            if sep:
                if not route:
                    raise ValueError(f"expected HOST[/PREFIX]=PATTERN, got {piece!r}")
                key = _route_key(route)
            elif key is None:
                raise ValueError(f"expected HOST[/PREFIX]=PATTERN, got {piece!r}")
            else:
                pattern = route
            stem = pattern.removesuffix("*")
            if not _PATTERN.fullmatch(pattern) or canonical_path(stem) != stem:
                raise ValueError(f"bad path pattern {pattern!r} (/exact or /prefix/*, canonical)")
            out.setdefault(key, []).append(pattern)
    return {k: tuple(v) for k, v in out.items()}


class Guard:
    """The client's checks on request heads, with the per-route allow-lists.

    Args:
        allow: ``{(host pattern, path prefix): path patterns}``; a route not in it allows
            every path.
    """

    def __init__(self, allow: Mapping[tuple[str, str], tuple[str, ...]] | None = None) -> None:
        self.allow = dict(allow or {})

    def check_request(self, head: RequestHead) -> tuple[str, str | None]:
        """Check an HTTP or WebSocket head; return the canonical path and query.

        Raises:
            Refused: the head breaks a rule above.
        """
        check_method(head.method, head.kind)
        check_authority(head.authority)
        check_headers(head.headers)
        return split_target(head.target)

    def check_route(self, host: str, prefix: str, path: str) -> None:
        """Apply the allow-list of the route ``(host, prefix)`` to a canonical path.

        Raises:
            Refused: the route has an allow-list and ``path`` matches none of it, or hides a
                separator in an escape (``%2F``, ``%5C``) that the upstream might decode.
        """
        patterns = self.allow.get((host, prefix))
        if patterns is None:
            return
        upper = path.upper()
        if "%2F" in upper or "%5C" in upper:
            raise Refused("escaped path separator on an allow-listed route")
        if not path_allowed(patterns, path):
            raise Refused("path not in the allow-list")
