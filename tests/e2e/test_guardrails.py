"""Customer guardrails against a HOSTILE exit server: whatever it sends, the client connects only
to upstreams in its own configuration, and answers anything else with a reset.

The fake exit server below is a bare websockets server driving ``Session(Role.SERVER)``: it
accepts the client's Hello, then opens streams with crafted heads. A second, "forbidden"
listener on 127.0.0.1 stands for every address the server might try to name; it must never
see a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from websockets.asyncio.server import Server, ServerConnection, serve

from shared.aio.connection import ws_limits
from shared.aio.tls import server_context
from shared.events import ControlReceived, DataReceived, ReplyReceived, ResetReceived
from shared.frames import ResetCode
from shared.heads import RequestHead, StreamKind
from shared.messages import Hello, Welcome
from shared.mux import Role, Session
from tunnel_client import ClientConfig, TunnelClient

from .helpers import TOKEN, Certs, stack, upstream

pytestmark = pytest.mark.asyncio

TCP_PUBLIC_PORT = 7000


@dataclass
class Outcome:
    kind: str  # "reply" or "reset"
    value: int  # status or reset code
    body: bytes = b""


@dataclass
class HostileServer:
    """A fake exit server that opens streams with whatever heads a test crafts."""

    certs: Certs
    server: Server | None = None
    session: Session | None = None
    ws: ServerConnection | None = None
    port: int = 0
    welcomed: asyncio.Event = field(default_factory=asyncio.Event)
    results: dict[int, asyncio.Future[Outcome]] = field(default_factory=dict)
    bodies: dict[int, bytearray] = field(default_factory=dict)
    replies: dict[int, Outcome] = field(default_factory=dict)

    async def start(self) -> None:
        self.server = await serve(
            self._handler, "127.0.0.1", 0, ssl=server_context(self.certs.cert, self.certs.key), **ws_limits(256 * 1024)
        )
        self.port = next(iter(self.server.sockets)).getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handler(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        session = Session(Role.SERVER, now=loop.time())
        self.session, self.ws = session, ws
        async for message in ws:
            assert isinstance(message, bytes)
            session.receive(message, loop.time())
            for event in session.events():
                if isinstance(event, ControlReceived) and isinstance(event.message, Hello):
                    hello = event.message
                    session.accept(
                        Welcome(
                            version=1, session_id="hostile-1", client_id="victim", routes=hello.routes, tcp=hello.tcp
                        )
                    )
                    self.welcomed.set()
                elif isinstance(event, ReplyReceived):
                    self.bodies[event.stream_id] = bytearray()
                    self._settle(event.stream_id, Outcome("reply", event.head.status), event.end_stream)
                elif isinstance(event, DataReceived):
                    self.bodies.setdefault(event.stream_id, bytearray()).extend(event.data)
                    session.consume(event.stream_id, len(event.data))
                    if event.end_stream:
                        self._finish(event.stream_id)
                elif isinstance(event, ResetReceived):
                    self._settle(event.stream_id, Outcome("reset", event.code), True)
            await self.flush()

    def _settle(self, stream_id: int, outcome: Outcome, done: bool) -> None:
        future = self.results.get(stream_id)
        if future is None or future.done():
            return
        if outcome.kind == "reset" or done:
            future.set_result(outcome)
        else:  # a reply: wait for the body to end
            self.replies[stream_id] = outcome

    def _finish(self, stream_id: int) -> None:
        future = self.results.get(stream_id)
        if future is not None and not future.done():
            outcome = self.replies.get(stream_id, Outcome("reply", 0))
            future.set_result(Outcome(outcome.kind, outcome.value, bytes(self.bodies.get(stream_id, b""))))

    async def flush(self) -> None:
        assert self.session is not None and self.ws is not None
        for message in self.session.data_to_send():
            await self.ws.send(message)

    async def request(self, head: RequestHead, end_stream: bool = True, timeout: float = 5.0) -> Outcome:
        """Open a stream with ``head`` and wait for the client's reset, or its reply and body."""
        assert self.session is not None
        stream_id = self.session.open_stream(head, end_stream=end_stream)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.results[stream_id] = future
        await self.flush()
        async with asyncio.timeout(timeout):
            outcome = await future
        if outcome.kind == "reply" and head.kind is not StreamKind.HTTP:
            self.session.reset_stream(stream_id, ResetCode.CANCEL, "test done")
            await self.flush()
        return outcome


@dataclass
class Forbidden:
    """A listener that must never be contacted."""

    port: int = 0
    connections: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> None:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]


def recording_app(seen: list[str]) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.Response(text="allowed upstream")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@contextlib.asynccontextmanager
async def hostile_setup(
    certs: Certs, upstreams: list[str] | None = None, **overrides: Any
) -> AsyncIterator[tuple[HostileServer, Forbidden, list[str], list[bytes]]]:
    seen: list[str] = []
    tcp_seen: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tcp_seen.append(b"connected")
        writer.close()

    forbidden = Forbidden()
    await forbidden.start()
    tcp_allowed = await asyncio.start_server(echo, "127.0.0.1", 0)
    tcp_port = tcp_allowed.sockets[0].getsockname()[1]
    hostile = HostileServer(certs)
    await hostile.start()
    async with upstream(recording_app(seen)) as up:
        config = ClientConfig(
            server=[f"wss://localhost:{hostile.port}"],
            ca_file=certs.ca,
            upstream=[u.format(up=up.url) for u in (upstreams or ["app.test={up}"])],
            tcp=[f"{TCP_PUBLIC_PORT}=127.0.0.1:{tcp_port}"],
            backoff_base=0.2,
            backoff_cap=1.0,
            **overrides,
        )
        client = TunnelClient(config, token=TOKEN)
        task = asyncio.create_task(client.run())
        try:
            async with asyncio.timeout(10):
                await hostile.welcomed.wait()
            yield hostile, forbidden, seen, tcp_seen
        finally:
            await client.shutdown(drain_timeout=1)
            await asyncio.wait_for(task, 10)
            await hostile.close()
            tcp_allowed.close()
            assert forbidden.server is not None
            forbidden.server.close()


def http(
    target: str, authority: str = "app.test", method: str = "GET", headers: tuple[tuple[str, str], ...] = ()
) -> RequestHead:
    return RequestHead(StreamKind.HTTP, method, target, authority, "http", "203.0.113.7", headers)


def crafted(forbidden: int) -> list[tuple[str, RequestHead, int]]:
    """(name, head, expected reset code) for every trick we know."""
    evil = f"127.0.0.1:{forbidden}"
    return [
        ("absolute-form to the forbidden port", http(f"http://{evil}/latest/meta-data"), ResetCode.FORBIDDEN),
        ("absolute-form to the metadata service", http("http://169.254.169.254/latest/meta-data"), ResetCode.FORBIDDEN),
        ("https absolute-form", http(f"https://{evil}/"), ResetCode.FORBIDDEN),
        ("network-path reference", http(f"//{evil}/x"), ResetCode.FORBIDDEN),
        ("userinfo trick", http(f"@{evil}/"), ResetCode.FORBIDDEN),
        ("userinfo trick without slash", http(f"@{evil}"), ResetCode.FORBIDDEN),
        ("port trick", http(f":{forbidden}/x"), ResetCode.FORBIDDEN),
        ("authority-form", http(evil), ResetCode.FORBIDDEN),
        ("asterisk-form", http("*", method="OPTIONS"), ResetCode.FORBIDDEN),
        ("CONNECT", http(evil, method="CONNECT"), ResetCode.FORBIDDEN),
        ("CONNECT with a path", http("/", method="CONNECT"), ResetCode.FORBIDDEN),
        ("authority names the forbidden port", http("/", authority=evil), ResetCode.NO_UPSTREAM),
        ("authority names another host", http("/", authority="evil.test"), ResetCode.NO_UPSTREAM),
        ("authority with userinfo", http("/", authority=f"app.test@{evil}"), ResetCode.FORBIDDEN),
        ("authority with a path", http("/", authority=f"{evil}/x"), ResetCode.FORBIDDEN),
        ("CR/LF in a header value", http("/", headers=(("X-A", f"1\r\nHost: {evil}"),)), ResetCode.FORBIDDEN),
        ("LF in a header value", http("/", headers=(("X-A", "1\nX-B: 2"),)), ResetCode.FORBIDDEN),
        ("NUL in a header value", http("/", headers=(("X-A", "a\x00b"),)), ResetCode.FORBIDDEN),
        ("header name with a colon", http("/", headers=(("Host: evil\r\nX", "1"),)), ResetCode.FORBIDDEN),
        ("header name with a space", http("/", headers=(("X A", "1"),)), ResetCode.FORBIDDEN),
        ("empty header name", http("/", headers=(("", "1"),)), ResetCode.FORBIDDEN),
        (
            "request line in the method",
            http("/", method=f"GET http://{evil}/ HTTP/1.1\r\n\r\nGET"),
            ResetCode.FORBIDDEN,
        ),
        ("CR/LF in the target", http(f"/x HTTP/1.1\r\nHost: {evil}\r\n\r\nGET /"), ResetCode.FORBIDDEN),
        ("space in the target", http("/x HTTP/1.1"), ResetCode.FORBIDDEN),
        ("fragment", http("/x#y"), ResetCode.FORBIDDEN),
        ("bad percent-escape", http("/x%zz"), ResetCode.FORBIDDEN),
        ("dot segment behind ;", http("/..;/admin"), ResetCode.FORBIDDEN),
        ("huge target", http("/" + "a" * 20_000), ResetCode.FORBIDDEN),
        ("huge headers", http("/", headers=tuple((f"X-{i}", "v" * 1000) for i in range(200))), ResetCode.FORBIDDEN),
        (
            "WebSocket to the forbidden authority",
            RequestHead(StreamKind.WEBSOCKET, "GET", "/ws", evil, "http", "", ()),
            ResetCode.NO_UPSTREAM,
        ),
        (
            "WebSocket userinfo trick",
            RequestHead(StreamKind.WEBSOCKET, "GET", f"@{evil}/", "app.test", "http", "", ()),
            ResetCode.FORBIDDEN,
        ),
        (
            "WebSocket with header injection",
            RequestHead(
                StreamKind.WEBSOCKET,
                "GET",
                "/ws",
                "app.test",
                "http",
                "",
                (("Upgrade", "websocket\r\n\r\nGET /smuggled HTTP/1.1"),),
            ),
            ResetCode.FORBIDDEN,
        ),
        (
            "WebSocket with a POST",
            RequestHead(StreamKind.WEBSOCKET, "POST", "/ws", "app.test", "http", "", ()),
            ResetCode.FORBIDDEN,
        ),
        (
            "TCP for the forbidden port",
            RequestHead(StreamKind.TCP, "", str(forbidden), "", "tcp", "", ()),
            ResetCode.NO_UPSTREAM,
        ),
        ("TCP naming an address", RequestHead(StreamKind.TCP, "", evil, "", "tcp", "", ()), ResetCode.NO_UPSTREAM),
        (
            "TCP with a unicode digit",
            RequestHead(StreamKind.TCP, "", "7\xb2", "", "tcp", "", ()),
            ResetCode.NO_UPSTREAM,
        ),
        ("TCP port 0", RequestHead(StreamKind.TCP, "", "0", "", "tcp", "", ()), ResetCode.NO_UPSTREAM),
        ("TCP port out of range", RequestHead(StreamKind.TCP, "", "99999", "", "tcp", "", ()), ResetCode.NO_UPSTREAM),
        (
            "TCP port with a sign",
            RequestHead(StreamKind.TCP, "", f"+{TCP_PUBLIC_PORT}", "", "tcp", "", ()),
            ResetCode.NO_UPSTREAM,
        ),
    ]


async def test_hostile_server_cannot_make_the_client_connect_elsewhere(certs: Certs) -> None:
    async with hostile_setup(certs) as (hostile, forbidden, seen, tcp_seen):
        # Positive controls first: the configured routes do work, so the refusals below mean something.
        ok = await hostile.request(http("/ok?x=%2F"))
        assert (ok.kind, ok.value, ok.body) == ("reply", 200, b"allowed upstream")
        tcp = await hostile.request(
            RequestHead(StreamKind.TCP, "", str(TCP_PUBLIC_PORT), "", "tcp", "", ()), end_stream=False
        )
        assert (tcp.kind, tcp.value) == ("reply", 200)
        failures = []
        for name, head, expected in crafted(forbidden.port):
            outcome = await hostile.request(head, end_stream=head.kind is StreamKind.HTTP)
            if (outcome.kind, outcome.value) != ("reset", expected):
                failures.append(f"{name}: {outcome}")
        assert not failures, failures
        # Dot segments are resolved before routing: the upstream gets the path that was checked.
        normalized = await hostile.request(http("/a/%2e%2e/b/./c"))
        assert normalized.value == 200
        assert seen == ["/ok?x=%2F", "/b/c"]
        assert tcp_seen == [b"connected"]
        assert forbidden.connections == 0
        # The session survived every refusal.
        assert (await hostile.request(http("/still-up"))).value == 200


async def test_default_route_only_ever_reaches_the_configured_upstream(certs: Certs) -> None:
    async with hostile_setup(certs, ["default={up}"]) as (hostile, forbidden, seen, _):
        for authority in (f"127.0.0.1:{forbidden.port}", "169.254.169.254", "localhost", "[::1]:1"):
            outcome = await hostile.request(http("/x", authority=authority))
            assert outcome.value == 200, authority
        assert len(seen) == 4
        assert forbidden.connections == 0


async def test_allow_list_refuses_other_paths_and_tricks(certs: Certs) -> None:
    async with hostile_setup(certs, ["app.test={up}"], allow_path=["app.test=/api/*,/health"]) as (
        hostile,
        forbidden,
        seen,
        _,
    ):
        for target in ("/api", "/api/", "/api/x?q=1", "/health", "/x/../api/y"):
            outcome = await hostile.request(http(target))
            assert (outcome.kind, outcome.value) == ("reply", 200), target
        for target in (
            "/",
            "/admin",
            "/healthz",
            "/health/x",
            "/API/x",
            "/apix",
            "/api/../admin",
            "/api/%2e%2e/admin",
            "/api%2F..%2Fadmin",
            "/api/x%2F..%2F..%2Fadmin",
            "/api/..;/admin",
        ):
            outcome = await hostile.request(http(target))
            assert (outcome.kind, outcome.value) == ("reset", ResetCode.FORBIDDEN), target
        ws = await hostile.request(
            RequestHead(StreamKind.WEBSOCKET, "GET", "/admin", "app.test", "http", "", ()), end_stream=False
        )
        assert (ws.kind, ws.value) == ("reset", ResetCode.FORBIDDEN)
        assert seen == ["/api", "/api/", "/api/x?q=1", "/health", "/api/y"]
        assert forbidden.connections == 0


async def test_allow_list_through_the_exit_server_is_403(certs: Certs) -> None:
    seen: list[str] = []
    async with upstream(recording_app(seen)) as up, stack(certs) as s:
        await s.add_client([f"app.example.com={up.url}"], allow_path=["app.example.com=/api/*", "/health"])
        async with aiohttp.ClientSession() as session:
            for path, status in (("/api/users", 200), ("/health", 200), ("/admin", 403), ("/", 403)):
                async with session.get(s.base + path, headers={"Host": "app.example.com"}) as r:
                    assert r.status == status, path
                    if status == 403:
                        assert "admin" not in await r.text()
    assert seen == ["/api/users", "/health"]
