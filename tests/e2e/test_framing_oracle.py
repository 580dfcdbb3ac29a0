"""Request boundaries at the public listener against h11's: a differential test.

hypothesis writes one connection's bytes: one to three pipelined requests whose framing is
drawn from the cases request smuggling lives in (Content-Length and Transfer-Encoding in every
spelling, together, twice, disagreeing with the body; chunk sizes and chunk data that disagree;
bare LF, obsolete line folding, a space before the colon), then a last request with
``Connection: close``. h11 (python-hyper's sans-I/O HTTP/1.1, strict and RFC 9112-based) is
the oracle: the requests it reads, in order, with their bodies.

The property: what reaches the upstream through the exit server is a prefix of what h11
reads: the same methods, targets and bodies, in the same order, and never a request h11
did not see (a smuggled one) nor a body h11 framed otherwise. The exit server may stop
earlier (it refuses more than h11: see docs/SECURITY.md, "Request smuggling"), never
later. For requests built only from well-formed parts it must read exactly what h11 reads.

The public listener is the one a lean HTTP/1.1 parser would replace (performance issue,
"The public HTTP path"): this test is what such a parser must pass unchanged.

One exit server, tunnel client and upstream serve every example; they run on uvloop in a
thread of their own and the examples speak to them over blocking sockets, each with a
deadline (a connection the server neither answers nor closes fails the example).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import h11
import pytest
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from exit_server import ExitServer
from tunnel_client import TunnelClient

from .helpers import TOKEN, Certs, RunningClient, _token_auth, client_config, server_config

HOST = b"app.example"
END = b"GET /end HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n"
DEADLINE = 10.0  # seconds for one example's connection to end


Seen = tuple[bytes, bytes, bytes]  # method, target, body

EMPTY_LINES = re.compile(rb"\A(?:\r?\n)+")

#: How a request's body is framed: the first three well-formed, the rest the smuggling cases.
FRAMINGS = ["none", "length", "chunked", "length-odd", "length-twice", "coding-odd", "coding-twice"]
FRAMINGS += ["both", "chunk-odd"]


@dataclass
class Edge:
    port: int
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> list[Seen]:
        with self.lock:
            seen, self.seen[:] = list(self.seen), []
        return seen


@pytest.fixture(scope="module")
def edge(certs: Certs) -> Iterator[Edge]:
    """An exit server, a tunnel client for app.example and a recording upstream, served by a
    uvloop loop in a thread until the module's tests end."""
    import uvloop

    loop = uvloop.new_event_loop()
    ready: concurrent.futures.Future[Edge] = concurrent.futures.Future()  # set in the loop's thread
    stop = asyncio.Event()
    box: dict[str, Edge] = {}

    async def record(request: web.Request) -> web.Response:
        body = await request.read()
        edge = box["edge"]
        with edge.lock:
            edge.seen.append((request.method.encode(), request.raw_path.encode(), body))
        return web.Response(text="ok")

    async def serve() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        runner = web.AppRunner(app, access_log=None)
        server = ExitServer(server_config(certs), auth=_token_auth())
        running: RunningClient | None = None
        try:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            up_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            await server.start()
            client = TunnelClient(
                client_config(certs, server, [f"app.example=http://127.0.0.1:{up_port}"]), token=TOKEN
            )
            running = RunningClient(client, asyncio.create_task(client.run()))
            await client.wait_connected(10)
            box["edge"] = Edge(server.public_port)
            ready.set_result(box["edge"])
            await stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise
        finally:
            if running is not None:
                await running.stop()
            await server.close()
            await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        yield ready.result(30)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        assert not thread.is_alive(), "the edge's loop did not stop"
        loop.close()


# ------------------------------------------------------------------ the oracle


def h11_reads(data: bytes) -> tuple[list[Seen], str]:
    """The requests h11, as a server, reads from ``data`` in order (bodies de-chunked), and
    how it stopped: "closed" (after a request that ends the connection), "error: ..." or
    "need_data" (the bytes end inside a request).

    Empty lines before a request line are skipped, as RFC 9112 section 2.2 allows a server to
    (llhttp does; h11 refuses them): the one place the oracle is less strict than h11."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    reads: list[Seen] = []
    current: list[bytes] = []
    while True:
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return reads, f"error: {exc}"
        if ev is h11.NEED_DATA:
            return reads, "need_data"
        if isinstance(ev, h11.Request):
            current = [ev.method, ev.target, b""]
        elif isinstance(ev, h11.Data):
            current[2] += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            reads.append((current[0], current[1], current[2]))
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is h11.MUST_CLOSE:
                return reads, "closed"
            conn.start_next_cycle()
            rest = bytes(conn.trailing_data[0])
            if (skipped := EMPTY_LINES.sub(b"", rest, count=1)) != rest:
                conn = h11.Connection(h11.SERVER)  # a fresh parser for what follows them
                conn.receive_data(skipped)
        else:  # PAUSED or ConnectionClosed: no more requests on this connection
            return reads, "closed"


# ------------------------------------------------------------------ requests


@dataclass
class Drawn:
    data: bytes
    strict: bool  # built only from well-formed parts


def _chunked(body: bytes, cuts: list[int], size_fmt: str, ext: bytes, trailers: bytes) -> bytes:
    out = b""
    start = 0
    for cut in [*sorted(c for c in cuts if 0 < c < len(body)), len(body)]:
        piece = body[start:cut]
        if piece:
            out += format(len(piece), size_fmt).encode() + ext + b"\r\n" + piece + b"\r\n"
        start = cut
    return out + b"0" + ext + b"\r\n" + trailers + b"\r\n"


@st.composite
def one_request(draw: st.DrawFn) -> Drawn:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT"]))
    target = b"/" + draw(st.text("abcxyz019", max_size=6)).encode() + draw(st.sampled_from([b"", b"?q=1"]))
    body = draw(st.binary(max_size=24) | st.sampled_from([b"GET /smuggled HTTP/1.1\r\nHost: app.example\r\n\r\n"]))
    framing = draw(
        st.sampled_from(
            [
                "none",
                "length",
                "chunked",
                "length-odd",
                "length-twice",
                "coding-odd",
                "coding-twice",
                "both",
                "chunk-odd",
            ]
        )
    )
    strict = framing in ("none", "length", "chunked")
    headers: list[bytes] = [b"Host: " + HOST]
    payload = b""
    n = len(body)
    if framing == "none":
        pass
    elif framing == "length":
        headers.append(b"Content-Length: %d" % n)
        payload = body
    elif framing == "length-odd":
        value = draw(
            st.sampled_from(
                [b"%d" % (n + 1), b"%d" % max(n - 1, 0), b"0%d" % n, b"+%d" % n, b"%d, %d" % (n, n), b" %d " % n]
            )
        )
        headers.append(b"Content-Length: " + value)
        payload = body
    elif framing == "length-twice":
        headers += [b"Content-Length: %d" % n, b"Content-Length: %d" % draw(st.sampled_from([n, n + 1]))]
        payload = body
    elif framing in ("chunked", "chunk-odd", "coding-odd", "coding-twice", "both"):
        cuts = draw(st.lists(st.integers(0, 24), max_size=3))
        size_fmt = "x" if framing == "chunked" else draw(st.sampled_from(["x", "X", "04x"]))
        ext = b"" if framing == "chunked" else draw(st.sampled_from([b"", b";a=b", b" ", b";"]))
        trailers = b"" if framing == "chunked" else draw(st.sampled_from([b"", b"X-T: 1\r\n"]))
        payload = _chunked(body, cuts, size_fmt, ext, trailers)
        if framing == "chunk-odd" and payload:
            i = draw(st.integers(0, len(payload) - 1))
            payload = payload[:i] + draw(st.sampled_from([b"", b"x", b"\r\n", b"-1\r\n"])) + payload[i + 1 :]
        coding = b"chunked"
        if framing == "coding-odd":
            coding = draw(
                st.sampled_from(
                    [b"Chunked", b"chunked ", b" chunked", b"identity, chunked", b"chunked, identity", b"xchunked"]
                )
            )
        headers.append(b"Transfer-Encoding: " + coding)
        if framing == "coding-twice":
            headers.append(b"Transfer-Encoding: chunked")
        if framing == "both":
            headers.insert(draw(st.integers(1, 2)), b"Content-Length: %d" % draw(st.sampled_from([0, n, len(payload)])))
    noise = draw(st.sampled_from([b"", b"", b"", b"X-A: b\r\n c", b"X-A : b", b"X-A: b\x00c"]))
    if noise:
        headers.append(noise)
        strict = False
    head = method + b" " + target + b" HTTP/1.1\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    if draw(st.integers(0, 9)) == 0:  # one bare LF somewhere in the head
        crlfs = [i for i in range(len(head) - 1) if head[i : i + 2] == b"\r\n"]
        i = draw(st.sampled_from(crlfs))
        head = head[:i] + head[i + 1 :]
        strict = False
    return Drawn(head + payload, strict)


@st.composite
def connection_bytes(draw: st.DrawFn) -> Drawn:
    requests = draw(st.lists(one_request(), min_size=1, max_size=3))
    return Drawn(b"".join(r.data for r in requests) + END, all(r.strict for r in requests))


def edge_reads(edge: Edge, data: bytes, half_close: bool) -> tuple[list[Seen], bytes]:
    """Send ``data`` on one connection to the exit server and read until it closes (within
    DEADLINE); the requests the upstream saw, in order, and what the caller got."""
    edge.take()
    got = b""
    with socket.create_connection(("127.0.0.1", edge.port), timeout=DEADLINE) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):  # socket.timeout past DEADLINE fails the example
            got += chunk
    return edge.take(), got


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(drawn=connection_bytes())
def test_what_reaches_the_upstream_is_what_h11_reads(edge: Edge, drawn: Drawn) -> None:
    expected, how = h11_reads(drawn.data)
    # Bytes that end inside a request (a length longer than what follows): the caller's
    # half-close ends the connection for both.
    seen, answer = edge_reads(edge, drawn.data, half_close=how == "need_data")
    assert seen == expected[: len(seen)], (
        f"the exit server forwarded {seen!r} where h11 reads {expected!r} ({how}) from {drawn.data!r}"
    )
    event(f"h11 {how.split(':')[0]}; exit server {'same' if seen == expected else 'stops earlier'}")
    if drawn.strict:
        assert how == "closed" and seen == expected, f"well-formed {drawn.data!r}: {seen!r}, answer {answer[:200]!r}"
    if len(seen) < len(expected):  # refused: one error answer, then the connection closed
        assert b" 400 " in answer or b" 501 " in answer or b" 413 " in answer, answer[-300:]
