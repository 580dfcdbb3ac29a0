"""The public listener's response head (exit_server/h1.py, ``response_head``) is written from a
list of fields in one pass. Differential test: for any fields, status, method, version, body
and keep-alive, it must give the bytes, framing and reuse that the earlier multidict version
(kept below as the oracle: popall, setitem and ``in`` on a ``CIMultiDict``) gave, whether the
response was made from a list (the proxied answer) or its ``headers`` were used as a dict."""

from __future__ import annotations

import asyncio
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from exit_server import h1
from exit_server.h1 import H1Connection, H1Listener, Request, Response, StreamResponse
from shared.h1server import Head

_NAMES = [
    "Content-Length",
    "content-length",
    "Transfer-Encoding",
    "Content-Type",
    "date",
    "Server",
    "Connection",
    "X-A",
]
_VALUES = ["0", "5", "chunked", "text/plain", "close", "keep-alive", "v"]


def _oracle(
    conn: H1Connection,
    request: Request,
    fields: list[tuple[str, str]],
    status: int,
    keep_alive: bool,
    body: bytes | None,
) -> tuple[bytes, bool, bool, bool]:
    """The multidict version of response_head, as it was before the one-pass rewrite."""
    headers: CIMultiDict[str] = CIMultiDict(fields)
    chunked = False
    version = request.version if request.version in (h1.HttpVersion10, h1.HttpVersion11) else h1.HttpVersion11
    no_body = request.method == "HEAD" or status in h1._EMPTY_STATUS or status < 200
    keep = keep_alive and request.keep_alive and not conn._closing and not request.upgrade
    if status == 101:
        keep = True
    elif no_body:
        if status in h1._EMPTY_STATUS:
            headers.popall("Content-Length", None)
        headers.popall("Transfer-Encoding", None)
    elif body is not None:
        headers["Content-Length"] = str(len(body))
    elif "Content-Length" not in headers:
        if version >= h1.HttpVersion11:
            headers["Transfer-Encoding"] = "chunked"
            chunked = True
        else:
            keep = False
    sized_empty = body == b"" or (body is None and headers.get("Content-Length") == "0")
    if not no_body and not sized_empty and "Content-Type" not in headers and status != 101:
        headers["Content-Type"] = "application/octet-stream"
    if "Date" not in headers:
        headers["Date"] = h1._date()
    if "Server" not in headers:
        headers["Server"] = h1.SERVER
    if "Connection" not in headers and status != 101:
        if not keep:
            headers["Connection"] = "close"
        elif version == h1.HttpVersion10:
            headers["Connection"] = "keep-alive"
    lines = [f"HTTP/{version[0]}.{version[1]} {status} {h1._REASONS.get(status, 'Unknown')}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
    lines.append("\r\n")
    return "".join(lines).encode("latin-1"), keep, chunked, no_body


def _same_date(head: bytes) -> bytes:
    return re.sub(rb"(?im)^(date): [^\r]*", rb"\1: D", head)


async def _connection() -> H1Connection:
    return H1Connection(H1Listener(lambda request: asyncio.sleep(0, Response())))


# made once, on a loop closed at once: response_head runs no loop code
_CONN = asyncio.run(_connection())


@settings(max_examples=400, deadline=None)
@given(
    fields=st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=6),
    status=st.sampled_from([101, 103, 200, 204, 301, 304, 404, 503]),
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    version=st.sampled_from([(1, 0), (1, 1)]),
    body=st.sampled_from([None, b"", b"hello"]),
    keep_alive=st.booleans(),
    request_keep_alive=st.booleans(),
    as_dict=st.booleans(),
)
def test_one_pass_head_is_what_the_multidict_version_wrote(
    fields: list[tuple[str, str]],
    status: int,
    method: str,
    version: tuple[int, int],
    body: bytes | None,
    keep_alive: bool,
    request_keep_alive: bool,
    as_dict: bool,
) -> None:
    head = Head(method, "/", version, (), request_keep_alive, False, None, False)
    request = Request(head, _CONN, h1._NO_BODY)
    resp = (
        Response(status=status, body=body, headers=list(fields))
        if body is not None
        else StreamResponse(status=status, headers=list(fields))
    )
    if as_dict:
        resp.headers.add("X-Dict", "1")  # the multidict form: made from the list, then used
        fields = [*fields, ("X-Dict", "1")]
    if not keep_alive:
        resp.force_close()
    want, keep, chunked, no_body = _oracle(_CONN, request, fields, status, keep_alive, body)
    got = _CONN.response_head(request, resp, body)
    assert _same_date(got) == _same_date(want)
    assert (resp.keep_alive, resp._chunked, resp._no_body) == (keep, chunked, no_body)
    # what was sent is what ``headers`` shows afterwards
    sent = [line.split(": ", 1) for line in got.decode("latin-1").split("\r\n")[1:] if line]
    assert [tuple(pair) for pair in sent] == list(resp.headers.items())


def test_set_default_adds_only_a_missing_field_either_form() -> None:
    listed = StreamResponse(headers=[("server", "up")])
    listed.set_default("Server", "backhaul")
    listed.set_default("Date", "d")
    assert list(listed.headers.items()) == [("server", "up"), ("Date", "d")]
    mapped = StreamResponse(headers={"X": "1"})
    mapped.set_default("x", "2")
    mapped.set_default("Server", "backhaul")
    assert list(mapped.headers.items()) == [("X", "1"), ("Server", "backhaul")]
