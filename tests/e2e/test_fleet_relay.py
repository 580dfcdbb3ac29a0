"""Relaying to a peer instead of 503 (exit_server/peers.py), with a real redis-server: a request
reaching an exit server with no session for its host is answered through the peer that has one,
signed and once; unsigned relay fields are refused; a client whose link to one server is cut
keeps being served through it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from exit_server.server import ExitServer
from tests.waiting import wait_until
from tunnel_client.client import TunnelClient

from .helpers import Certs, RunningClient, client_config, server_config, upstream
from .test_fleet_state import Redis, add_client, free_port, redis_server  # noqa: F401 (the fixture)

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed (scripts/ci-deps.sh)"),
]


def echo() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"headers": dict(request.headers), "body": len(body), "path": request.path_qs})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@dataclass
class Pair:
    a: ExitServer
    b: ExitServer
    certs: Certs
    token: str
    clients: list[RunningClient]

    async def client(self, servers: list[ExitServer], upstreams: list[str], **kw: Any) -> RunningClient:
        client = TunnelClient(client_config(self.certs, servers, upstreams, **kw), token=self.token)
        running = RunningClient(client, asyncio.create_task(client.run()))
        self.clients.append(running)
        await client.wait_connected(10)
        return running


@pytest_asyncio.fixture
async def pair(certs: Certs, redis_server: Redis) -> AsyncIterator[Pair]:  # noqa: F811
    token = add_client(redis_server.url, "acme", ["app.test"])
    servers = []
    for _ in range(2):
        port = free_port()
        servers.append(
            ExitServer(
                server_config(
                    certs,
                    public_addr=f"127.0.0.1:{port}",
                    state=redis_server.url,
                    peer_url=f"http://127.0.0.1:{port}",
                    heartbeat_interval=0.5,
                    heartbeat_timeout=2.0,
                    # B takes HTTP/2 callers (prior knowledge) too; A takes h2c from its peers only
                    h2c=len(servers) == 1,
                )
            )
        )
    p = Pair(servers[0], servers[1], certs, token, [])
    try:  # a server that fails to start closes itself; the finally closes the one before it
        for server in servers:
            await server.start()
        yield p
    finally:
        for running in p.clients:
            with contextlib.suppress(Exception):
                await running.stop()
        for server in servers:
            await server.close()


async def get(server: ExitServer, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"http://127.0.0.1:{server.public_port}{path}", headers={"Host": "app.test", **(headers or {})}
        ) as resp:
            return resp.status, await resp.text()


def known(server: ExitServer) -> bool:
    return server.peers is not None and server.peers.peer_for("app.test", "/") is not None


async def test_a_request_without_a_local_session_is_relayed_once(pair: Pair) -> None:
    async with upstream(echo()) as up:
        await pair.client([pair.a], [f"app.test={up.url}"])  # a session on A only
        await wait_until(lambda: known(pair.b), timeout=5, what="B learnt that A serves app.test")
        status, text = await get(pair.b, "/x?y=1", {"X-Forwarded-For": "6.6.6.6"})
        assert status == 200
        seen = json.loads(text)
        assert seen["path"] == "/x?y=1"
        assert seen["headers"]["Host"] == "app.test"
        assert seen["headers"]["X-Real-IP"] == "127.0.0.1"  # the caller, as B decided it
        assert not any(k.lower().startswith("backhaul-") for k in seen["headers"])  # the relay's own fields stay
        assert pair.b.peers is not None and pair.b.peers.relayed == {"ok": 1}
        # posting a body through the relay
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"http://127.0.0.1:{pair.b.public_port}/up", data=b"x" * 300_000, headers={"Host": "app.test"}
            ) as resp:
                assert resp.status == 200 and (await resp.json())["body"] == 300_000


async def test_an_http2_request_is_relayed(pair: Pair) -> None:
    """An HTTP/2 caller on the server without a session: relayed to the peer (over HTTP/1.1,
    body streamed both ways); a request that needs trailers goes over HTTP/2 to the peer, whose
    client answers it as gRPC to an HTTP/1.1 upstream is answered (UNAVAILABLE, in trailers)."""
    from .h2client import H2Caller

    async with upstream(echo()) as up:
        await pair.client([pair.a], [f"app.test={up.url}"])
        await wait_until(lambda: known(pair.b), timeout=5, what="B learnt that A serves app.test")
        caller = await H2Caller.open(pair.b.public_port)
        try:
            answer = await caller.request("app.test", "/h2?q=1", headers=[("x-forwarded-for", "6.6.6.6")])
            assert answer.status == 200
            seen = json.loads(answer.body)
            assert seen["path"] == "/h2?q=1" and seen["headers"]["Host"] == "app.test"
            assert seen["headers"]["X-Real-IP"] == "127.0.0.1"
            assert not any(k.lower().startswith("backhaul-") for k in seen["headers"])
            assert [v for n, v in answer.headers if n == "x-request-id"].__len__() == 1
            posted = await caller.request("app.test", "/up", method="POST", body=b"y" * 300_000)
            assert posted.status == 200 and json.loads(posted.body)["body"] == 300_000
            grpc = await caller.request(
                "app.test",
                "/pkg.Svc/Call",
                method="POST",
                headers=[("content-type", "application/grpc"), ("te", "trailers")],
                body=b"\x00\x00\x00\x00\x00",
            )
            assert grpc.status == 200 and grpc.header("grpc-status") == "14"  # Trailers-Only, from A's client
        finally:
            await caller.close()
        assert pair.b.peers is not None and pair.b.peers.relayed == {"ok": 3}


async def test_a_websocket_is_relayed_both_ways(pair: Pair) -> None:
    """A WebSocket upgrade on the server without a session: relayed to the peer, 101, then
    messages both ways (a 200 KB one too); an upgrade the upstream declines passes its answer."""

    async def ws_echo(request: web.Request) -> web.StreamResponse:
        if request.path != "/ws":
            return web.Response(status=404, text="no socket here")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(f"{request.headers.get('X-Real-IP')}:{msg.data}")
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", ws_echo)
    async with upstream(app) as up:
        await pair.client([pair.a], [f"app.test={up.url}"])
        await wait_until(lambda: known(pair.b), timeout=5, what="B learnt that A serves app.test")
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{pair.b.public_port}/ws"
            async with session.ws_connect(url, headers={"Host": "app.test"}) as ws:
                await ws.send_str("hello")
                assert (await ws.receive(timeout=5)).data == "127.0.0.1:hello"
                big = "x" * 200_000
                await ws.send_str(big)
                assert (await ws.receive(timeout=10)).data == "127.0.0.1:" + big
            with pytest.raises(aiohttp.WSServerHandshakeError) as declined:
                await session.ws_connect(f"http://127.0.0.1:{pair.b.public_port}/nope", headers={"Host": "app.test"})
            assert declined.value.status == 404
        assert pair.b.peers is not None and pair.b.peers.relayed == {"ok": 2}


async def test_unsigned_relay_fields_are_refused(pair: Pair) -> None:
    async with upstream(echo()) as up:
        await pair.client([pair.a], [f"app.test={up.url}"])
        for fields in (
            {"Backhaul-Relayed": "x", "Backhaul-Peer-Client": "1.2.3.4", "Backhaul-Peer-Proto": "https"},
            {"Backhaul-Relayed": "x", "Backhaul-Peer-Auth": "1:00", "Backhaul-Peer-Client": "1.2.3.4",
             "Backhaul-Peer-Proto": "https"},
        ):  # fmt: skip
            assert (await get(pair.a, "/", fields))[0] == 403


async def test_a_relayed_request_is_not_relayed_again(pair: Pair) -> None:
    """B relays to A only; when A lost its session meanwhile it answers 503, never back to B."""
    from exit_server import peers

    await wait_until(lambda: pair.a.peers is not None and pair.a.peers.key is not None, what="fleet key")
    assert pair.a.peers is not None and pair.a.peers.key is not None
    key = pair.a.peers.key
    signature = peers.sign(key, "peer-b", "GET", "/", "app.test", "127.0.0.1", "http")
    fields = {
        "Backhaul-Relayed": "peer-b",
        "Backhaul-Peer-Auth": signature,
        "Backhaul-Peer-Client": "127.0.0.1",
        "Backhaul-Peer-Proto": "http",
    }
    assert (await get(pair.a, "/", fields))[0] == 503
    assert pair.a.peers.relayed == {}


class CuttableRelay:
    """A TCP relay for one client's link to one exit server; ``cut()`` closes every connection
    through it and refuses new ones (the firewall between that client and that server)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.open = True
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [writer, up_writer]

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    def cut(self) -> None:
        self.open = False
        for writer in self.writers:
            writer.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_the_partition_case_keeps_zero_errors(pair: Pair) -> None:
    """A client with a link to each server; its link to B is cut (B stays up, its control
    connection to that client only is gone): requests on B keep succeeding, relayed to A."""
    relay = CuttableRelay(pair.b.control_port)
    port = await relay.start()
    try:
        async with upstream(echo()) as up:
            running = await pair.client(
                [pair.a], [f"app.test={up.url}"], server=[f"wss://localhost:{pair.a.control_port}",
                                                          f"wss://localhost:{port}"],
            )  # fmt: skip
            await wait_until(lambda: len(pair.b.registry.tunnels) == 1 and known(pair.b), what="both linked")
            relay.cut()
            await wait_until(lambda: not pair.b.registry.tunnels, timeout=5, what="B lost its session")
            failures = 0
            for _ in range(100):
                for server in (pair.a, pair.b):
                    failures += (await get(server))[0] != 200
            assert failures == 0
            assert pair.b.peers is not None and pair.b.peers.relayed.get("ok", 0) >= 100
            assert running.client.links[0].connected  # the link to A never moved
    finally:
        await relay.close()


async def test_grpc_is_relayed_over_http2_with_trailers_cancel_and_status(pair: Pair) -> None:
    """gRPC on the server without a session (B): relayed over HTTP/2 to A (h2c, which A takes
    from its peers only), real grpcio server and caller: unary with trailing metadata, a status
    with details, 1,000 streamed messages, and a caller's cancel reaching the upstream handler."""
    import time

    import grpc

    from .test_grpc import SERVICE, start_grpc_server

    server, up = start_grpc_server(None)
    try:
        await pair.client([pair.a], [f"app.test={up.url}"])
        await wait_until(lambda: known(pair.b), timeout=5, what="B learnt that A serves app.test")
        target = f"127.0.0.1:{pair.b.public_port}"

        def calls() -> tuple[Any, ...]:
            with grpc.insecure_channel(target, options=[("grpc.default_authority", "app.test")]) as channel:
                unary = channel.unary_unary(f"/{SERVICE}/Unary")
                response, rpc = unary.with_call(b"ping", timeout=10)
                trailing = {m.key: m.value for m in rpc.trailing_metadata()}
                try:
                    unary(b"status:please", timeout=10)
                    raise AssertionError("no error")
                except grpc.RpcError as exc:
                    error = exc
                streamed = list(channel.unary_stream(f"/{SERVICE}/ServerStream")(b"1000", timeout=30))
                forever = channel.unary_stream(f"/{SERVICE}/ServerStream")(b"forever", timeout=30)
                assert next(forever) == b"tick"
                cancelled_at = time.monotonic()
                forever.cancel()
                return response, trailing, error, streamed, cancelled_at

        response, trailing, error, streamed, cancelled_at = await asyncio.to_thread(calls)
        assert response == b"ping" and trailing["x-echo-len"] == "4"
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION and error.details() == "details: héllo % wörld"
        assert {m.key: m.value for m in error.trailing_metadata()}["x-bin-bin"] == b"\x00\x01\xff"
        assert streamed == [i.to_bytes(4, "big") for i in range(1000)]
        await wait_until(lambda: "forever" in up.seen.cancelled, timeout=2, what="the cancel reached the upstream")
        assert up.seen.cancelled["forever"] - cancelled_at < 1.0
        assert pair.b.peers is not None and pair.b.peers.relayed.get("ok", 0) == 4
    finally:
        server.stop(grace=None)


async def test_a_stranger_gets_no_http2_from_a_server_that_takes_it_from_peers_only(pair: Pair) -> None:
    """A takes h2c (prior knowledge) only for relayed streams, since it runs without --h2c:
    a caller opening h2c there without the fleet's signature gets 403, not the upstream."""
    from .h2client import H2Caller

    async with upstream(echo()) as up:
        await pair.client([pair.a], [f"app.test={up.url}"])
        caller = await H2Caller.open(pair.a.public_port)
        try:
            answer = await caller.request("app.test", "/")
            assert answer.status == 403
            forged = await caller.request(
                "app.test", "/", headers=[("backhaul-relayed", "peer-x"), ("backhaul-peer-auth", "1:00")]
            )
            assert forged.status == 403
        finally:
            await caller.close()
        assert (await get(pair.a))[0] == 200  # HTTP/1.1 there is as before
