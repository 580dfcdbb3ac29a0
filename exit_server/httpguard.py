"""Hygiene of the public HTTP/1.1 listener (exit_server/h1.py on shared/h1server.py).

What the parser does (shared/h1server.py): a request target over :data:`REQUEST_LINE_LIMIT`
is 414, a header over :data:`FIELD_LIMIT` or more than :data:`MAX_HEADERS` headers 431, and
llhttp refuses Content-Length together with Transfer-Encoding, a duplicate, signed or
non-numeric Content-Length, a Transfer-Encoding whose final coding is not ``chunked``,
malformed chunk sizes, bare LF, obsolete line folding and whitespace before a colon (400). Each
is answered with a short generic body that never echoes the caller's bytes, and the connection
closes. :func:`head_problem` adds the checks on a parsed head: the total size of the headers
(431), a transfer coding other than plain ``chunked`` (501: we could not forward it faithfully),
Transfer-Encoding on HTTP/1.0 (400, RFC 9112 section 6.1) and a version other than 1.0 or 1.1
(505). The connection's deadlines (408 for a slow head, the keep-alive timeout) are in
exit_server/h1.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from shared.h1server import FIELD_LIMIT, HEADERS_LIMIT, MAX_HEADERS, REQUEST_LINE_LIMIT

from .h1 import SERVER, generic_response

__all__ = [
    "FIELD_LIMIT",
    "HEADERS_LIMIT",
    "MAX_HEADERS",
    "REQUEST_LINE_LIMIT",
    "SERVER",
    "generic_response",
    "head_problem",
]

_VERSIONS = frozenset({(1, 0), (1, 1)})


class ParsedHead(Protocol):
    """What :func:`head_problem` reads of a request (exit_server/h1.py's ``Request``). A
    protocol, not the class: the compiled build checks no type for it, so a stand-in serves."""

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]: ...

    @property
    def version(self) -> tuple[int, int]: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


def head_problem(request: ParsedHead) -> int | None:
    """Checks on a parsed head the parser does not make; the status to answer, or None."""
    total = 0
    for name, value in request.raw_headers:
        total += len(name) + len(value) + 4
    if total > HEADERS_LIMIT:
        return 431
    if request.version not in _VERSIONS:  # HTTP/2.0 or 0.9 on an HTTP/1 request line
        return 505
    te = request.headers.get("Transfer-Encoding")
    if te is not None:
        if request.version < (1, 1):
            return 400
        if te.strip().lower() != "chunked":
            return 501
    return None
