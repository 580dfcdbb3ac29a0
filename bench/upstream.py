"""A local aiohttp upstream for the load test (``make load``) and the scale benchmark.

    python bench/upstream.py --port 9000 [--host 127.0.0.1]

Endpoints (all on loopback):

    GET  /small             100-byte body
    POST /upload            consumes the body, answers {"received": N, "sha256": ...}
    GET  /download?n=BYTES  streams BYTES (default 1 MiB) of a fixed pattern, with Content-Length
    GET  /sse?seconds=S&interval_ms=I
                            text/event-stream: one event every I ms (default 100) for S seconds
                            (default 5, at most 60), flushed one by one
    GET  /slow?ms=MS[&gate=N]
                            long poll: answers after MS milliseconds (default 2000, at most 60000);
                            with gate=N it first waits until N slow requests are parked at once
    GET  /stats             {"in_flight": ..., "peak_in_flight": ..., "served": ...}; ?reset=1 zeroes
                            the peak and the counter
    GET  /healthz           "ok"
    GET  /ws                WebSocket echo: every text or binary message comes back as it was

Runs on uvloop when installed and raises its own RLIMIT_NOFILE (the scale benchmark parks
10,000 connections on it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys

from aiohttp import web
from loadapp import MIB, SMALL, add_load_routes  # bench/ is this script's directory (sys.path[0])


def raise_nofile(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in ((want, max(want, hard)), (min(want, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Stats:
    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.served = 0
        self.slow_in_flight = 0
        self.gates: dict[int, asyncio.Event] = {}


STATS = web.AppKey("stats", Stats)


@web.middleware
async def count(request: web.Request, handler):  # type: ignore[no-untyped-def]
    stats = request.app[STATS]
    if request.path == "/stats":
        return await handler(request)
    stats.in_flight += 1
    stats.peak = max(stats.peak, stats.in_flight)
    try:
        return await handler(request)
    finally:
        stats.in_flight -= 1
        stats.served += 1


async def slow(request: web.Request) -> web.Response:
    """Long poll. With ``gate=N`` the request first waits (at most ``gate_timeout`` s, default 30)
    until N slow requests are parked at once, so a burst really is N-way concurrent; then ``ms``."""
    ms = min(max(int(request.query.get("ms", 2000)), 0), 60000)
    gate = int(request.query.get("gate", 0))
    st = request.app[STATS]
    st.slow_in_flight += 1
    try:
        if gate > 0:
            event = st.gates.setdefault(gate, asyncio.Event())
            if st.slow_in_flight >= gate:
                event.set()
            try:
                await asyncio.wait_for(event.wait(), min(float(request.query.get("gate_timeout", 30)), 120.0))
            except TimeoutError:
                pass
        await asyncio.sleep(ms / 1000)
    finally:
        st.slow_in_flight -= 1
    return web.Response(body=SMALL, content_type="text/plain")


async def stats(request: web.Request) -> web.Response:
    st = request.app[STATS]
    body = {"in_flight": st.in_flight, "peak_in_flight": st.peak, "served": st.served}
    if request.query.get("reset"):
        st.peak = st.in_flight
        st.served = 0
        st.gates.clear()
    return web.Response(text=json.dumps(body), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def build_app() -> web.Application:
    app = web.Application(middlewares=[count], client_max_size=64 * MIB)
    app[STATS] = Stats()
    add_load_routes(app, max_sse_seconds=60.0)  # /small /upload /download /sse /ws (bench/loadapp.py)
    app.router.add_get("/slow", slow)
    app.router.add_get("/stats", stats)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("loopback only")
    raise_nofile()
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    loop = loop_factory() if loop_factory else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(
        build_app(),
        host=args.host,
        port=args.port,
        backlog=args.backlog,
        print=None,
        access_log=None,
        loop=loop,
        shutdown_timeout=1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
