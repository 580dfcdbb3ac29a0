"""The floor under any tunnel of Backhaul's shape: a bare uvloop relay with TLS between two
processes, measured beside nginx and Backhaul in one run.

    .venv/bin/python bench/relay_floor.py [--rounds 3] [--duration 4] [--quick] [--build DIR] [--doc PATH]

A tunnel of this kind moves every byte through two processes (the exit server and the client)
with a TLS connection between them: public TCP -> process A -> TLS -> process B -> upstream TCP.
The targets of the performance issue (round 2) for one connection (p50 over direct) and for
1 MiB GETs (MiB/s against the nginx one-hop proxy) are measured here against what that shape
costs with no Backhaul code at all:

* ``pair``: each public connection is relayed over a TLS connection of its own, which the client
  process opened in advance: bytes in, bytes out, no framing, no multiplexing, no HTTP, nothing
  checked. No tunnel can do less work per byte and keep TLS between its halves.
* ``mux``: all public connections share one TLS connection, each piece of data behind a 9-byte
  header (stream, kind, length): the least a multiplexed tunnel adds to ``pair``. No flow
  control per stream (the tunnel's reading pauses while any public connection's writes are
  backed up), no keep-alive, no authentication. A frame that spans reads is joined into one
  ``bytes`` (a copy per byte Backhaul's own reader avoids), so for 1 MiB GETs ``pair`` is the
  floor, not ``mux``.
* the same two relays without TLS between the processes: what TLS costs the floor;
* Backhaul's TCP mode and HTTP mode (``--build DIR`` imports a build with PYTHONPATH, for
  example ``build/compiled``; default: what PYTHONPATH already names, as under ``make bench``,
  else the installed tree), and nginx direct and as a one-hop proxy, all in the same run.

Everything under test runs pinned to CPU 1 (as ``bench/run.py --pin``: the relay's two
processes, nginx, Backhaul's two), wrk on CPU 0 with 1 thread. Targets alternate their order
each round; the report gives the medians and goes into the ``<!-- floor:begin -->`` section of
``--doc`` (docs/BENCHMARKS.md). ``make bench`` runs it after bench/fleet.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import typing
from collections import deque
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HEADER = struct.Struct(">IBI")  # stream, kind, length
OPEN, DATA, CLOSE = 0, 1, 2
PAIRS = 64  # TLS connections the pair client keeps open in advance (wrk opens at most 50)
DOC = bl.ROOT / "docs" / "BENCHMARKS.md"


# ---------------------------------------------------------------- the relay's two processes


def _transport(t: asyncio.BaseTransport) -> asyncio.Transport:
    return typing.cast(asyncio.Transport, t)  # uvloop's transports are not asyncio.Transport subclasses


class _Flow(asyncio.Protocol):
    """One leg of a relay: what it reads goes to ``peer``; when its own writes back up, the peer
    stops reading."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Flow | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = _transport(transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.early.append(data)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def join(self, peer: _Flow) -> None:
        self.peer, peer.peer = peer, self
        for flow in (self, peer):
            if flow.early and flow.peer is not None and flow.peer.transport is not None:
                flow.peer.transport.writelines(flow.early)
            flow.early = []


async def pair_exit(public_port: int, control_port: int, context: ssl.SSLContext | None) -> None:
    """Process A of ``pair``: a public connection takes the next idle TLS connection, or waits
    for one (the client replaces each closed one)."""
    loop = asyncio.get_running_loop()
    idle: deque[_Flow] = deque()
    waiting: deque[_Flow] = deque()

    class TunnelLeg(_Flow):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            if waiting:
                self.join(waiting.popleft())
            else:
                idle.append(self)

        def connection_lost(self, exc: Exception | None) -> None:
            if self in idle:
                idle.remove(self)
            super().connection_lost(exc)

    class PublicLeg(_Flow):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            if idle:
                self.join(idle.popleft())
            else:
                waiting.append(self)

        def connection_lost(self, exc: Exception | None) -> None:
            if self in waiting:
                waiting.remove(self)
            super().connection_lost(exc)

    await loop.create_server(TunnelLeg, "127.0.0.1", control_port, ssl=context)
    await loop.create_server(PublicLeg, "127.0.0.1", public_port)
    await asyncio.Event().wait()


async def pair_client(control_port: int, upstream_port: int, context: ssl.SSLContext | None) -> None:
    """Process B of ``pair``: ``PAIRS`` TLS connections wait; the first bytes on one open its
    upstream connection and a new waiting one. A leg ends when either side closes (no half-close:
    HTTP keep-alive does not need it)."""
    loop = asyncio.get_running_loop()

    class TunnelLeg(_Flow):
        def data_received(self, data: bytes) -> None:
            if self.peer is None and not self.early:
                loop.create_task(self._open())
                loop.create_task(connect())  # the pool stays full
            super().data_received(data)

        async def _open(self) -> None:
            try:
                _, upstream = await loop.create_connection(_Flow, "127.0.0.1", upstream_port)
            except OSError:
                if self.transport is not None:
                    self.transport.close()
                return
            if self.transport is None:
                upstream.transport.close()  # type: ignore[union-attr]
                return
            self.join(upstream)

    async def connect() -> None:
        hostname = "localhost" if context is not None else None
        await loop.create_connection(TunnelLeg, "127.0.0.1", control_port, ssl=context, server_hostname=hostname)

    for _ in range(PAIRS):
        await connect()
    await asyncio.Event().wait()


class _MuxTunnel(asyncio.Protocol):
    """The shared TLS connection of ``mux``, either end: frames in, frames out."""

    def __init__(self, on_frame: Callable[[int, int, bytes], None]) -> None:
        self.on_frame = on_frame
        self.transport: asyncio.Transport | None = None
        self.pieces: list[bytes] = []  # a frame that spans reads, joined once it is whole
        self.have = self.need = 0
        self.sources: dict[int, asyncio.Transport] = {}
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = _transport(transport)

    def send(self, stream: int, kind: int, data: bytes = b"") -> None:
        assert self.transport is not None
        self.transport.writelines((HEADER.pack(stream, kind, len(data)), data))

    def data_received(self, data: bytes) -> None:
        if self.pieces:
            self.pieces.append(data)
            self.have += len(data)
            if self.have < self.need:
                return
            data, self.pieces = b"".join(self.pieces), []
        view, pos, end, on_frame = memoryview(data), 0, len(data), self.on_frame
        while end - pos >= 9:
            stream, kind, length = HEADER.unpack_from(data, pos)
            if end - pos - 9 < length:
                self.need = 9 + length
                break
            on_frame(stream, kind, view[pos + 9 : pos + 9 + length] if length else b"")  # type: ignore[arg-type]
            pos += 9 + length
        else:
            self.need = 9
        if pos < end:
            self.pieces, self.have = [bytes(view[pos:])], end - pos

    def pause_writing(self) -> None:
        self.paused = True
        for source in self.sources.values():
            source.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        for source in self.sources.values():
            source.resume_reading()


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _transport(transport).abort()


class _MuxLeg(asyncio.Protocol):
    """A public connection (A) or an upstream connection (B) of ``mux``."""

    def __init__(self, tunnel: _MuxTunnel, stream: int, legs: dict[int, _MuxLeg]) -> None:
        self.tunnel, self.stream, self.legs = tunnel, stream, legs
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = _transport(transport)
        self.tunnel.sources[self.stream] = self.transport
        if self.tunnel.paused:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.tunnel.send(self.stream, DATA, data)

    def pause_writing(self) -> None:
        if self.tunnel.transport is not None:
            self.tunnel.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.tunnel.transport is not None:
            self.tunnel.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.legs.get(self.stream) is self:
            del self.legs[self.stream]
        if self.tunnel.sources.pop(self.stream, None) is not None and self.tunnel.transport is not None:
            self.tunnel.send(self.stream, CLOSE)


async def mux_exit(public_port: int, control_port: int, context: ssl.SSLContext | None) -> None:
    """Process A of ``mux``: each public connection is a stream on the one tunnel."""
    loop = asyncio.get_running_loop()
    tunnels: list[_MuxTunnel] = []
    legs: dict[int, _MuxLeg] = {}
    counter = iter(range(1, 1 << 31))

    def on_frame(stream: int, kind: int, data: bytes) -> None:
        leg = legs.get(stream)
        if leg is None or leg.transport is None or leg.transport.is_closing():
            return
        if kind == DATA:
            leg.transport.write(data)
        elif kind == CLOSE:
            legs.pop(stream, None)
            leg.tunnel.sources.pop(stream, None)
            leg.transport.close()

    class Tunnel(_MuxTunnel):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            tunnels.append(self)  # after the handshake

        def connection_lost(self, exc: Exception | None) -> None:
            tunnels.remove(self)

    def tunnel_factory() -> _MuxTunnel:
        return Tunnel(on_frame)

    def public_factory() -> asyncio.Protocol:
        if not tunnels:
            return _Refuse()  # an exception here would stop uvloop's listener
        stream = next(counter)
        leg = legs[stream] = _MuxLeg(tunnels[-1], stream, legs)
        tunnels[-1].send(stream, OPEN)
        return leg

    await loop.create_server(tunnel_factory, "127.0.0.1", control_port, ssl=context)
    await loop.create_server(public_factory, "127.0.0.1", public_port)
    await asyncio.Event().wait()


async def mux_client(control_port: int, upstream_port: int, context: ssl.SSLContext | None) -> None:
    """Process B of ``mux``: a stream opens an upstream connection; data waits until it is up."""
    loop = asyncio.get_running_loop()
    legs: dict[int, _MuxLeg] = {}
    early: dict[int, list[bytes]] = {}
    lost = loop.create_future()

    async def open_stream(stream: int) -> None:
        try:
            _, leg = await loop.create_connection(lambda: _MuxLeg(tunnel, stream, legs), "127.0.0.1", upstream_port)
        except OSError:
            early.pop(stream, None)
            tunnel.send(stream, CLOSE)
            return
        pending = early.pop(stream, None)
        if pending is None:  # closed while connecting
            leg.transport.close()  # type: ignore[union-attr]
            return
        legs[stream] = leg
        leg.transport.writelines(pending)  # type: ignore[union-attr]

    def on_frame(stream: int, kind: int, data: bytes) -> None:
        if kind == DATA:
            leg = legs.get(stream)
            if leg is not None and leg.transport is not None:
                if not leg.transport.is_closing():
                    leg.transport.write(data)
            elif stream in early:
                early[stream].append(bytes(data))
        elif kind == OPEN:
            early[stream] = []
            loop.create_task(open_stream(stream))
        elif kind == CLOSE:
            early.pop(stream, None)
            gone = legs.pop(stream, None)
            if gone is not None and gone.transport is not None:
                tunnel.sources.pop(stream, None)
                gone.transport.close()

    class Tunnel(_MuxTunnel):
        def connection_lost(self, exc: Exception | None) -> None:
            if not lost.done():
                lost.set_result(None)

    tunnel = Tunnel(on_frame)
    hostname = "localhost" if context is not None else None
    await loop.create_connection(lambda: tunnel, "127.0.0.1", control_port, ssl=context, server_hostname=hostname)
    await lost


def child(args: argparse.Namespace) -> None:
    import uvloop

    server_ctx: ssl.SSLContext | None = None
    client_ctx: ssl.SSLContext | None = None
    if not args.plain:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(args.cert, args.key)
        client_ctx = ssl.create_default_context(cafile=args.ca)
    if args.child == "exit":
        main = pair_exit if args.kind == "pair" else mux_exit
        uvloop.run(main(args.public_port, args.control_port, server_ctx))
    else:
        client_main = pair_client if args.kind == "pair" else mux_client
        uvloop.run(client_main(args.control_port, args.upstream_port, client_ctx))


# ---------------------------------------------------------------- the measurement


WORKLOADS = {  # key: (path, connections, label)
    "small1": ("/" + bl.SMALL_FILE, 1, "100 B GET, 1 conn"),
    "big50": ("/" + bl.BIG_FILE, 50, "1 MiB GET, 50 conns"),
    "small50": ("/" + bl.SMALL_FILE, 50, "100 B GET, 50 conns"),
}


def wrk(port: int, path: str, connections: int, duration: int) -> tuple[int, float, float, float]:
    """(requests, req/s, p50 in us, MiB/s) of one wrk run on CPU 0; errors raise."""
    out = subprocess.run(
        ["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s"]
        + ["-H", "Host: bench.localhost", f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    if "Socket errors" in out or "Non-2xx" in out or " 0 requests in" in out:
        raise RuntimeError(f"wrk reported errors against port {port}: {out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"50%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    rate, runit = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", out).groups()  # type: ignore[union-attr]
    mibps = float(rate) * {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1, "GB": 1024}[runit]
    return requests, rps, float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit], mibps


def start_relay(stack: bl.Stack, certs: bl.Certs, nginx: bl.Nginx, kind: str, plain: bool) -> tuple[int, list[int]]:
    public, control = bl.free_port(), bl.free_port()
    base = [bl.venv_python(), str(Path(__file__).resolve()), "--kind", kind, "--control-port", str(control)]
    base += ["--cert", str(certs.cert), "--key", str(certs.key), "--ca", str(certs.ca)] + (["--plain"] if plain else [])
    name = f"{kind}{'-plain' if plain else ''}"
    exit_proc = stack.add(
        bl.spawn(
            f"{name}-exit", [*base, "--child", "exit", "--public-port", str(public)], stack.workdir / "logs", cpu=1
        )
    )
    bl.wait_port(control, proc=exit_proc.popen)
    client_cmd = [*base, "--child", "client", "--upstream-port", str(nginx.direct)]
    client = stack.add(bl.spawn(f"{name}-client", client_cmd, stack.workdir / "logs", cpu=1))
    bl.wait_port(public, proc=exit_proc.popen)
    try:  # the client's TLS connections (or its one tunnel) are up when a request goes through
        bl.wait_http(f"http://127.0.0.1:{public}/{bl.SMALL_FILE}", procs=[exit_proc.popen, client.popen])
    except RuntimeError as exc:
        raise RuntimeError(f"{name}: {exc}\n{exit_proc.tail()}\n{client.tail()}") from None
    return public, [exit_proc.pid, client.pid]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs per target and workload (default 3)")
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (default 4)")
    parser.add_argument("--build", type=Path, help="a Backhaul tree to import with PYTHONPATH (build/compiled)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s")
    parser.add_argument("--doc", type=Path, default=DOC, help="the report goes into this file's floor section")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # a child without TLS
    for flag in ("--child", "--kind", "--cert", "--key", "--ca"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--public-port", "--control-port", "--upstream-port"):
        parser.add_argument(flag, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.quick:
        args.rounds, args.duration = 2, 3
    if not 1 <= args.rounds <= 20 or not 1 <= args.duration <= 60:
        parser.error("--rounds must be in 1..20 and --duration in 1..60")
    if (os.cpu_count() or 1) < 2:
        parser.error("needs 2 CPUs (wrk on CPU 0, everything under test on CPU 1)")
    if args.build is not None and not (args.build / "exit_server").is_dir():
        parser.error(f"--build {args.build}: not a Backhaul tree (no exit_server/)")
    bl.ensure_tools()
    from run import start_http_mode, start_tcp_mode  # noqa: PLC0415 (bench/run.py, beside this file)

    workdir = Path(tempfile.mkdtemp(prefix="backhaul-floor-"))
    stack = bl.Stack(workdir)
    targets: dict[str, tuple[int, list[int]]] = {}
    try:
        certs = bl.make_certs(workdir)
        nginx = bl.start_nginx(stack, cpu=1)
        targets["nginx direct"] = (nginx.direct, [nginx.worker_pid()])
        targets["nginx one-hop proxy"] = (nginx.proxy, [nginx.worker_pid()])
        for kind in ("pair", "mux"):
            for plain in (False, True):
                label = f"relay floor, {kind}" + (", no TLS" if plain else ", TLS")
                targets[label] = start_relay(stack, certs, nginx, kind, plain)
        inherited = os.environ.get("PYTHONPATH")
        if args.build is not None:
            os.environ["PYTHONPATH"] = str(args.build.resolve())  # bl.clean_env() passes it on
        args.backhaul = os.environ.get("PYTHONPATH") or "the installed tree"
        for label, start in (("Backhaul TCP mode", start_tcp_mode), ("Backhaul HTTP mode", start_http_mode)):
            server, client, port = start(stack, certs, nginx, 1)
            targets[label] = (port, [server.pid, client.pid])
        if inherited is None:
            os.environ.pop("PYTHONPATH", None)
        runs: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
        names = list(targets)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for wl, (path, conns, _) in WORKLOADS.items():
                for name in order:
                    port, pids = targets[name]
                    wrk(port, path, conns, 1)  # warm-up
                    cpu0 = sum(bl.cpu_seconds(p) for p in pids)
                    requests, rps, p50, mibps = wrk(port, path, conns, args.duration)
                    cpu = (sum(bl.cpu_seconds(p) for p in pids) - cpu0) / requests * 1e6
                    runs.setdefault((name, wl), []).append((rps, p50, mibps, cpu))
                    bl.log(
                        f"round {r + 1} {wl:8} {name:28} {rps:9,.0f} req/s p50 {p50:7.0f} us "
                        f"{mibps:7.1f} MiB/s {cpu:6.0f} us CPU"
                    )
    finally:
        stack.close()
    med = {k: tuple(statistics.median(v[i] for v in runs[k]) for i in range(4)) for k in runs}
    report = render(med, names, args)
    print(report)
    bl.update_section(args.doc, "<!-- floor:begin -->", "<!-- floor:end -->", report)
    return 0


def render(med: dict[tuple[str, str], tuple[float, ...]], names: list[str], args: argparse.Namespace) -> str:
    direct_p50 = med[("nginx direct", "small1")][1]
    proxy_mibps = med[("nginx one-hop proxy", "big50")][2]
    proxy_rps = med[("nginx one-hop proxy", "small50")][0]
    flags = " --quick" if args.quick else f" --rounds {args.rounds} --duration {args.duration}"
    flags += f" --build {args.build}" if args.build is not None else ""
    via = " (run by `make bench`)" if os.environ.get("BENCH_VIA") else ""
    backhaul = str(args.backhaul).replace(str(ROOT) + "/", "")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "## The floor under a tunnel: a bare uvloop relay with TLS",
        "",
        f"`.venv/bin/python bench/relay_floor.py{flags}`{via}, run {when}, "
        f"Backhaul from {backhaul}; "
        "everything under test on CPU 1, wrk on CPU 0, medians of the rounds. *pair*: each public connection "
        "relayed over a TLS connection of its own between the two processes, no framing; *mux*: one TLS "
        "connection, a 9-byte header per piece of data. Neither authenticates, checks or routes anything. "
        "*mux* joins a frame that spans reads into one `bytes`, a copy per byte that Backhaul's reader avoids "
        "(round 4), so its 1 MiB figure is not a floor: *pair*'s is. "
        "CPU per request: both processes (nginx's worker for its own rows), not the upstream.",
        "",
        "| target | 1 conn: p50 over direct | 1 MiB x50: MiB/s (÷ proxy) | 100 B x50: req/s (÷ proxy) "
        "| CPU per request: 1 conn / 100 B x50 / 1 MiB x50 |",
        "|---|---:|---:|---:|---|",
    ]
    for name in names:
        one, big, small = med[(name, "small1")], med[(name, "big50")], med[(name, "small50")]
        lines.append(
            f"| {name} | {one[1]:.0f} us ({one[1] - direct_p50:+.0f} us) | {big[2]:,.0f} ({big[2] / proxy_mibps:.2f}x) "
            f"| {small[0]:,.0f} ({small[0] / proxy_rps:.2f}x) | {one[3]:.0f} / {small[3]:.0f} / {big[3]:,.0f} us |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
