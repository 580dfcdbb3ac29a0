"""gRPC end to end with real grpcio servers and clients: caller -> exit server (h2c with prior
knowledge, or h2 by ALPN on the public TLS listener) -> tunnel (protocol v2: trailers, resets)
-> tunnel client -> upstream gRPC server (h2c://, or https:// with ALPN h2).

The gRPC server and the callers are grpcio's synchronous API, on their own threads: grpcio's
threads never touch the test's event loop, where the exit server and the client run.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import trustme
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.waiting import wait_until

from .helpers import Certs, stack

pytestmark = pytest.mark.asyncio

SERVICE = "backhaul.test.Echo"
BIG = 4 * 1024 * 1024
OPTIONS = [("grpc.max_receive_message_length", 8 * 1024 * 1024), ("grpc.max_send_message_length", 8 * 1024 * 1024)]


@dataclass
class Observed:
    """What the upstream handlers saw: cancellations with the time they were noticed."""

    cancelled: dict[str, float] = field(default_factory=dict)
    started: dict[str, threading.Event] = field(default_factory=dict)

    def event(self, name: str) -> threading.Event:
        return self.started.setdefault(name, threading.Event())


def _wait_inactive(context: grpc.ServicerContext, seen: Observed, name: str, limit: float = 30.0) -> None:
    seen.event(name).set()
    end = time.monotonic() + limit
    while context.is_active() and time.monotonic() < end:
        time.sleep(0.005)
    if not context.is_active():
        seen.cancelled[name] = time.monotonic()


def echo_handlers(seen: Observed) -> grpc.GenericRpcHandler:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request.startswith(b"status:"):
            context.set_trailing_metadata((("x-detail", "trailing value"), ("x-bin-bin", b"\x00\x01\xff")))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "details: héllo % wörld")
        if request == b"sleep":
            _wait_inactive(context, seen, "sleep")
            return b""
        context.set_trailing_metadata((("x-echo-len", str(len(request))),))
        return request

    def server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        if request == b"forever":
            seen.event("forever").set()
            while context.is_active():
                yield b"tick"
                time.sleep(0.02)
            seen.cancelled["forever"] = time.monotonic()
            return
        for i in range(int(request)):
            yield i.to_bytes(4, "big")

    def client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = 0
        count = 0
        for message in requests:
            total += len(message)
            count += 1
        return f"{count}:{total}".encode()

    def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )


@dataclass
class GrpcUpstream:
    url: str
    seen: Observed
    health: health.HealthServicer


@pytest.fixture(scope="module")
def upstream_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("grpc-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, path


def start_grpc_server(tls: trustme.CA | None) -> tuple[grpc.Server, GrpcUpstream]:
    seen = Observed()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=160), options=OPTIONS)
    server.add_generic_rpc_handlers((echo_handlers(seen),))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
        url = f"h2c://127.0.0.1:{port}"
    else:
        cert = tls.issue_cert("127.0.0.1")
        creds = grpc.ssl_server_credentials(
            [(cert.private_key_pem.bytes(), b"".join(p.bytes() for p in cert.cert_chain_pems))]
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        url = f"https://127.0.0.1:{port}"
    server.start()
    return server, GrpcUpstream(url, seen, servicer)


@dataclass
class Path2:
    """How a caller reaches the upstream: the channel factory and the stack behind it."""

    channel: Callable[[], grpc.Channel]
    up: GrpcUpstream
    server: Any


@pytest_asyncio.fixture(params=["h2c", "tls"])
async def path(request: pytest.FixtureRequest, certs: Certs, tmp_path: Path, upstream_tls: Any) -> AsyncIterator[Path2]:
    """h2c: the plain public listener with --h2c to an h2c:// upstream. tls: the public TLS
    listener (ALPN h2) to an https:// upstream that picks h2 by ALPN."""
    mode = request.param
    ca, ca_file = upstream_tls
    server, up = start_grpc_server(ca if mode == "tls" else None)
    overrides: dict[str, Any] = {"h2c": True}
    public_ca = b""
    if mode == "tls":
        cert_dir = tmp_path / "public"
        cert_dir.mkdir()
        pub = ca.issue_cert("grpc.test")
        (cert_dir / "grpc.test.pem").write_bytes(b"".join(p.bytes() for p in pub.cert_chain_pems))
        (cert_dir / "grpc.test-key.pem").write_bytes(pub.private_key_pem.bytes())
        overrides = {"public_tls_addr": "127.0.0.1:0", "public_cert_dir": cert_dir}
        public_ca = ca.cert_pem.bytes()
    try:
        async with stack(certs, **overrides) as s:
            await s.add_client([f"grpc.test={up.url}"], upstream_ca=ca_file)
            options = [*OPTIONS, ("grpc.default_authority", "grpc.test")]
            if mode == "tls":
                port = s.server.public_tls_port
                creds = grpc.ssl_channel_credentials(root_certificates=public_ca)

                def channel() -> grpc.Channel:
                    return grpc.secure_channel(
                        f"127.0.0.1:{port}", creds, options=[*options, ("grpc.ssl_target_name_override", "grpc.test")]
                    )
            else:
                port = s.server.public_port

                def channel() -> grpc.Channel:
                    return grpc.insecure_channel(f"127.0.0.1:{port}", options=options)

            yield Path2(channel, up, s.server)
    finally:
        server.stop(grace=None)


def _call(path: Path2, fn: Callable[[grpc.Channel], Any]) -> Any:
    with path.channel() as channel:
        return fn(channel)


async def run(path: Path2, fn: Callable[[grpc.Channel], Any]) -> Any:
    return await asyncio.to_thread(_call, path, fn)


def unary(channel: grpc.Channel) -> Any:
    return channel.unary_unary(f"/{SERVICE}/Unary")


async def test_unary_with_trailing_metadata(path: Path2) -> None:
    def call(channel: grpc.Channel) -> tuple[bytes, Any]:
        response, rpc = unary(channel).with_call(b"ping", timeout=10)
        return response, rpc.trailing_metadata()

    response, trailing = await run(path, call)
    assert response == b"ping"
    assert ("x-echo-len", "4") in [(m.key, m.value) for m in trailing]


async def test_status_details_and_trailing_metadata_preserved(path: Path2) -> None:
    def call(channel: grpc.Channel) -> grpc.RpcError:
        try:
            unary(channel)(b"status:please", timeout=10)
        except grpc.RpcError as exc:
            return exc
        raise AssertionError("no error")

    error = await run(path, call)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "details: héllo % wörld"
    trailing = {m.key: m.value for m in error.trailing_metadata()}
    assert trailing["x-detail"] == "trailing value"
    assert trailing["x-bin-bin"] == b"\x00\x01\xff"


async def test_server_streaming_1000_messages(path: Path2) -> None:
    def call(channel: grpc.Channel) -> list[bytes]:
        return list(channel.unary_stream(f"/{SERVICE}/ServerStream")(b"1000", timeout=30))

    messages = await run(path, call)
    assert [int.from_bytes(m, "big") for m in messages] == list(range(1000))


async def test_client_streaming(path: Path2) -> None:
    def call(channel: grpc.Channel) -> bytes:
        return channel.stream_unary(f"/{SERVICE}/ClientStream")(iter([b"x" * i for i in range(500)]), timeout=30)

    assert await run(path, call) == f"500:{sum(range(500))}".encode()


async def test_bidirectional_ping_pong_1000_round_trips(path: Path2) -> None:
    def call(channel: grpc.Channel) -> int:
        import queue

        outbox: queue.Queue[bytes | None] = queue.Queue()

        def requests() -> Iterator[bytes]:
            while (item := outbox.get()) is not None:
                yield item

        responses = channel.stream_stream(f"/{SERVICE}/Bidi")(requests(), timeout=60)
        rounds = 0
        for i in range(1000):
            outbox.put(i.to_bytes(4, "big"))
            assert int.from_bytes(next(responses), "big") == i  # one answer before the next ping
            rounds += 1
        outbox.put(None)
        assert list(responses) == []
        return rounds

    assert await run(path, call) == 1000


async def test_4_mib_messages_both_ways(path: Path2) -> None:
    payload = bytes(range(256)) * (BIG // 256)

    def call(channel: grpc.Channel) -> bytes:
        return unary(channel)(payload, timeout=30)

    assert await run(path, call) == payload


async def test_deadline_expires_and_the_upstream_is_cancelled(path: Path2) -> None:
    def call(channel: grpc.Channel) -> tuple[grpc.StatusCode, float]:
        try:
            unary(channel)(b"sleep", timeout=0.5)
        except grpc.RpcError as exc:
            return exc.code(), time.monotonic()
        raise AssertionError("no deadline")

    code, failed_at = await run(path, call)
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until(lambda: "sleep" in path.up.seen.cancelled, timeout=5, what="upstream context cancelled")
    assert path.up.seen.cancelled["sleep"] - failed_at < 1.0


async def test_caller_cancel_reaches_the_upstream_handler(path: Path2) -> None:
    started = path.up.seen.event("forever")

    def call(channel: grpc.Channel) -> float:
        stream = channel.unary_stream(f"/{SERVICE}/ServerStream")(b"forever")  # no deadline: only a cancel ends it
        assert next(stream) == b"tick"
        assert started.wait(10)
        stream.cancel()
        return time.monotonic()

    cancelled_at = await run(path, call)
    await wait_until(lambda: "forever" in path.up.seen.cancelled, timeout=5, what="upstream saw the cancel")
    assert path.up.seen.cancelled["forever"] - cancelled_at < 1.0


async def test_100_concurrent_calls_on_one_channel(path: Path2) -> None:
    def call(channel: grpc.Channel) -> list[bytes]:
        method = unary(channel)
        pending = [method.future(f"call-{i}".encode(), timeout=30) for i in range(100)]
        return [f.result() for f in pending]

    results = await run(path, call)
    assert results == [f"call-{i}".encode() for i in range(100)]


async def test_standard_health_checking_service(path: Path2) -> None:
    def call(channel: grpc.Channel) -> tuple[Any, Any, list[Any]]:
        stub = health_pb2_grpc.HealthStub(channel)
        overall = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        try:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
            missing = None
        except grpc.RpcError as exc:
            missing = exc.code()
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        first = next(watch)
        path.up.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        second = next(watch)
        watch.cancel()
        return overall.status, missing, [first.status, second.status]

    overall, missing, watched = await run(path, call)
    assert overall == health_pb2.HealthCheckResponse.SERVING
    assert missing is grpc.StatusCode.NOT_FOUND
    assert watched == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
