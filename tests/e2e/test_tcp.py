"""Raw TCP tunnels: half-close, port policy, PROXY protocol v2, and redis as a real protocol."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from shared.proxyproto import SIGNATURE
from tests.names import dual_name, needs_ipv6
from tests.ports import free_port, free_port_run
from tests.waiting import wait_until

from .helpers import Certs, stack

pytestmark = pytest.mark.asyncio


def port_range(n: int = 20) -> tuple[int, str]:
    """A run of ports free right now for --tcp-port-range (tests/ports.py: outside the kernel's
    ephemeral range, never a fixed start)."""
    base = free_port_run(n + 1)
    return base, f"{base}-{base + n}"


@pytest_asyncio.fixture
async def echo_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """Reads until EOF, then answers with what it got and closes: needs half-close to work."""
    headers: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        if data.startswith(SIGNATURE):
            length = int.from_bytes(data[14:16], "big")
            headers.append(data[: 16 + length])
            data = data[16 + length :]
        writer.write(b"got:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], headers
    server.close()


async def test_tcp_half_close_both_directions(certs: Certs, echo_server: tuple[int, list[bytes]]) -> None:
    port, _ = echo_server
    base, rng = port_range()
    async with stack(certs, tcp_port_range=rng) as s:
        await s.add_client([], tcp=[f"{base}=127.0.0.1:{port}"])
        reader, writer = await asyncio.open_connection("127.0.0.1", base)
        writer.write(b"hello " * 1000)
        writer.write_eof()  # caller half-closes; the upstream only answers after EOF
        answer = await asyncio.wait_for(reader.read(), 5)  # and then the upstream's EOF arrives
        assert answer == b"got:" + b"hello " * 1000
        writer.close()


async def test_tcp_server_speaks_first_and_client_keeps_sending(certs: Certs) -> None:
    received = asyncio.Queue[bytes]()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner\n")
        writer.write_eof()  # the upstream is done sending but still reads
        received.put_nowait(await reader.read())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    base, rng = port_range()
    try:
        async with stack(certs, tcp_port_range=rng) as s:
            await s.add_client([], tcp=[f"{base}=127.0.0.1:{server.sockets[0].getsockname()[1]}"])
            reader, writer = await asyncio.open_connection("127.0.0.1", base)
            assert await asyncio.wait_for(reader.read(), 5) == b"banner\n"  # EOF seen by the caller
            writer.write(b"still talking")
            writer.write_eof()
            assert await asyncio.wait_for(received.get(), 5) == b"still talking"
            writer.close()
    finally:
        server.close()


async def test_port_outside_range_is_refused_with_reason(
    certs: Certs, caplog: pytest.LogCaptureFixture, echo_server: tuple[int, list[bytes]]
) -> None:
    caplog.set_level(logging.INFO)
    port, _ = echo_server
    base, rng = port_range()
    outside = base + 100
    async with stack(certs, tcp_port_range=rng) as s:
        await s.add_client([], tcp=[f"{outside}=127.0.0.1:{port}", f"{base}=127.0.0.1:{port}"])
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", outside)
        reader, writer = await asyncio.open_connection("127.0.0.1", base)  # the allowed one works
        writer.write(b"x")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"got:x"
        writer.close()
    assert any(
        f"tcp:{outside} refused: port outside the server's --tcp-port-range" in r.getMessage()
        for r in caplog.records
        if r.name.startswith("tunnel_client")
    )


@needs_ipv6
async def test_tcp_port_on_every_address_of_the_public_host(
    certs: Certs, echo_server: tuple[int, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--public-addr given a name with an IPv4 and an IPv6 address: a TCP tunnel's port
    listens on both (as the public HTTP listener does), and closes on both when its client
    leaves."""
    port, _ = echo_server
    base, rng = port_range()
    name = dual_name(monkeypatch)
    async with stack(certs, tcp_port_range=rng, public_addr=f"{name}:0") as s:
        running = await s.add_client([], tcp=[f"{base}=127.0.0.1:{port}"])
        for address in ("127.0.0.1", "::1"):
            reader, writer = await asyncio.open_connection(address, base)
            writer.write(address.encode())
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"got:" + address.encode()
            writer.close()
        await running.stop()

        async def refused(address: str) -> bool:
            try:
                _, writer = await asyncio.open_connection(address, base)
            except OSError:
                return True
            writer.close()
            return False

        for address in ("127.0.0.1", "::1"):
            await wait_until(lambda address=address: refused(address), timeout=10)


async def test_tcp_port_closes_when_client_leaves_and_other_tenant_cannot_take_it(
    certs: Certs, echo_server: tuple[int, list[bytes]]
) -> None:
    port, _ = echo_server
    base, rng = port_range()
    async with stack(certs, tcp_port_range=rng) as s:
        running = await s.add_client([], tcp=[f"{base}=127.0.0.1:{port}"])
        await running.stop()
        for _ in range(50):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", base)
                w.close()
            except OSError:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("public TCP port still open after the client left")


async def test_proxy_protocol_v2_carries_the_caller_address(certs: Certs, echo_server: tuple[int, list[bytes]]) -> None:
    port, headers = echo_server
    base, rng = port_range()
    async with stack(certs, tcp_port_range=rng) as s:
        await s.add_client([], tcp=[f"{base}=127.0.0.1:{port}"], proxy_protocol=True)
        reader, writer = await asyncio.open_connection("127.0.0.1", base)
        caller_port = writer.get_extra_info("sockname")[1]
        writer.write(b"ping")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"got:ping"
        writer.close()
    header = headers[0]
    assert header[12] == 0x21 and header[13] == 0x11  # v2 PROXY, TCP over IPv4
    assert socket.inet_ntoa(header[16:20]) == "127.0.0.1"
    assert int.from_bytes(header[24:26], "big") == caller_port
    assert int.from_bytes(header[26:28], "big") == base


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is missing: `make test` installs it (scripts/ci-deps.sh)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        import time

        time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait()


async def test_redis_hundred_thousand_pipelined_commands(certs: Certs, redis_port: int) -> None:
    import redis.asyncio as aioredis

    base, rng = port_range()
    async with stack(certs, tcp_port_range=rng) as s:
        await s.add_client([], tcp=[f"{base}=127.0.0.1:{redis_port}"])

        async def run(port: int, prefix: str) -> list[object]:
            client = aioredis.Redis(host="127.0.0.1", port=port)
            try:
                pipe = client.pipeline(transaction=False)
                for i in range(50_000):
                    pipe.set(f"{prefix}:{i}", f"value-{i}" * (i % 7 + 1))
                    pipe.get(f"{prefix}:{i}")
                results = await pipe.execute()
                return [r.replace(prefix.encode(), b"P") if isinstance(r, bytes) else r for r in results]
            finally:
                await client.aclose()

        direct = await run(redis_port, "direct")
        tunneled = await asyncio.wait_for(run(base, "tunnel"), 120)
    assert len(tunneled) == 100_000
    assert tunneled == direct


async def test_tcp_stream_idle_timeout(certs: Certs) -> None:
    """--stream-idle-timeout closes a TCP stream silent both ways for that long (a busy one
    lives on); the upstream connection behind it is closed too."""
    upstream_closed = asyncio.Event()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            upstream_closed.set()
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    base, rng = port_range()
    try:
        async with stack(certs, tcp_port_range=rng, stream_idle_timeout=0.6) as s:
            await s.add_client([], tcp=[f"{base}=127.0.0.1:{port}"])
            reader, writer = await asyncio.open_connection("127.0.0.1", base)
            try:
                loop = asyncio.get_running_loop()
                for i in range(8):  # traffic every 0.15 s for 1.2 s: never idle for 0.6 s
                    await asyncio.sleep(0.15 if i else 0)
                    writer.write(b"ping %d" % i)
                    assert await asyncio.wait_for(reader.read(100), 5) == b"ping %d" % i
                last_byte = loop.time()
                try:
                    assert await asyncio.wait_for(reader.read(100), 10) == b""  # closed by the exit server
                except ConnectionResetError:
                    pass  # or reset: either way the connection is gone
                assert 0.5 < loop.time() - last_byte < 5
                await asyncio.wait_for(upstream_closed.wait(), 5)
            finally:
                writer.close()
    finally:
        server.close()
        await server.wait_closed()
