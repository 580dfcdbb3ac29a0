"""What the public HTTP/1.1 listener itself costs per request: aiohttp's low-level web server
against a bare protocol on httptools, both answering a fixed 100 B response, nothing behind.

    .venv/bin/python bench/listener_floor.py [--rounds 3] [--duration 5]

The performance issue (round 2) proposes moving the public listener off aiohttp's web server
onto httptools. The exit server's CPU per request includes the listener's share and the
tunnel's; this measures the listener's share alone, as a ceiling on what that move can save.
Each server runs on CPU 1 under uvloop, wrk (1 thread, 50 keep-alive connections) on CPU 0;
the two servers alternate, A B B A ..., and the report gives the medians. The bare protocol
does no more than parse and answer: a real listener adds the limits, timeouts and error
handling of exit_server/httpguard.py, so the difference is an upper bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

BODY = b"x" * 100
HEAD = b"HTTP/1.1 200 OK\r\nServer: backhaul\r\nContent-Length: 100\r\nContent-Type: application/octet-stream\r\n\r\n"


async def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=BODY, headers={"Server": "backhaul"})

    loop = asyncio.get_running_loop()
    await loop.create_server(web.Server(handler), "127.0.0.1", port)
    await asyncio.Event().wait()


class _Bare(asyncio.Protocol):
    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.headers = []
        assert self.transport is not None
        self.transport.write(HEAD + BODY)


async def serve_bare(port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(_Bare, "127.0.0.1", port)
    await asyncio.Event().wait()


def child(kind: str, port: int) -> None:
    import uvloop

    uvloop.install()
    asyncio.run(serve_aiohttp(port) if kind == "aiohttp" else serve_bare(port))


def measure(kind: str, duration: int) -> tuple[float, float]:
    """(requests a second, CPU microseconds per request) of one run of ``kind``."""
    port = bl.free_port()
    proc = subprocess.Popen(
        bl.pinned([bl.venv_python(), str(Path(__file__).resolve()), "--child", kind, "--port", str(port)], 1),
        env=bl.clean_env(),
    )
    try:
        bl.wait_http(f"http://127.0.0.1:{port}/", procs=[proc])
        before = bl.cpu_seconds(proc.pid)
        out = subprocess.run(
            ["taskset", "-c", "0", "wrk", "-t1", "-c50", f"-d{duration}s", f"http://127.0.0.1:{port}/"],
            capture_output=True,
            text=True,
            timeout=duration + 30,
        )
        if out.returncode != 0:
            raise RuntimeError(f"wrk against the {kind} server failed: {out.stderr.strip() or out.stdout.strip()}")
        used = bl.cpu_seconds(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(10)
    found = re.search(r"(\d+) requests in ([\d.]+)s", out.stdout)
    if found is None:
        raise RuntimeError(f"wrk: no request count in {out.stdout!r}")
    requests, seconds = int(found.group(1)), float(found.group(2))
    if requests == 0 or "Socket errors" in out.stdout or "Non-2xx" in out.stdout:
        raise RuntimeError(f"wrk: errors against the {kind} server: {out.stdout!r}")
    return requests / seconds, used / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs per server (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--child", choices=["aiohttp", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.port)
        return 0
    if not 1 <= args.rounds <= 20 or not 1 <= args.duration <= 60:
        parser.error("--rounds must be in 1..20 and --duration in 1..60")
    if (os.cpu_count() or 1) < 2:
        parser.error("needs 2 CPUs (wrk on CPU 0, the server on CPU 1)")
    bl.ensure_tools()
    os.sched_setaffinity(0, {0})
    runs: dict[str, list[tuple[float, float]]] = {"aiohttp": [], "bare": []}
    for i in range(args.rounds):
        for kind in ("aiohttp", "bare") if i % 2 == 0 else ("bare", "aiohttp"):
            runs[kind].append(measure(kind, args.duration))
            rps, cpu = runs[kind][-1]
            bl.log(f"{kind:8} {rps:9,.0f} req/s  {cpu:6.1f} us CPU per request")
    print(f"\nmedians of {args.rounds} runs x {args.duration} s, 100 B answers, 50 connections, server on CPU 1:")
    med = {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    for kind, (rps, cpu) in med.items():
        print(f"  {kind:8} {rps:9,.0f} req/s  {cpu:6.1f} us CPU per request")
    print(
        f"  aiohttp's web server costs {med['aiohttp'][1] - med['bare'][1]:.1f} us more per request than bare httptools"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
