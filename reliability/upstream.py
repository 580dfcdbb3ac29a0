"""An aiohttp upstream for the reliability scenarios, with well-behaved and faulty endpoints.

    python reliability/upstream.py --port PORT        (binds 127.0.0.1 of its network namespace)

Well-behaved (the same formats as tests/load/locustfile.py expects):
    /small, /upload, /download, /sse (at most 120 s), /ws  bench/loadapp.py, shared with bench/upstream.py
    GET  /slow?ms=MS                 answers after MS milliseconds
    POST /slowpost?ms=MS             reads the body, answers after MS milliseconds
    GET  /stream?seconds=S&interval_ms=I  chunked body, one line every I ms for S seconds, ends with "end\\n"
Faulty:
    GET  /hang                       never answers (the handler is cancelled when the caller leaves)
    GET  /reset?n=BYTES&chunked=0|1  sends the head (Content-Length 1 MiB, or chunked) and BYTES of body,
                                     then resets the connection (RST)
Bookkeeping:
    GET  /stats                      {"in_flight": ..., "hanging": ..., "served": ...}
    GET  /healthz                    "ok"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from loadapp import CHUNK, MIB, SMALL, add_load_routes  # noqa: E402


class Stats:
    in_flight = 0
    hanging = 0
    served = 0


STATS = Stats()


@web.middleware
async def count(request: web.Request, handler):  # type: ignore[no-untyped-def]
    if request.path == "/stats":
        return await handler(request)
    STATS.in_flight += 1
    try:
        return await handler(request)
    finally:
        STATS.in_flight -= 1
        STATS.served += 1


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(min(max(int(request.query.get("ms", 2000)), 0), 600_000) / 1000)
    return web.Response(body=SMALL, content_type="text/plain")


async def slowpost(request: web.Request) -> web.Response:
    body = await request.read()
    await asyncio.sleep(min(max(int(request.query.get("ms", 2000)), 0), 600_000) / 1000)
    return web.json_response({"received": len(body)})


async def stream(request: web.Request) -> web.StreamResponse:
    seconds = min(float(request.query.get("seconds", 10)), 600.0)
    interval = max(float(request.query.get("interval_ms", 100)), 10.0) / 1000
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    n = 0
    while loop.time() < end:
        n += 1
        await resp.write(f"line {n}\n".encode())
        await asyncio.sleep(interval)
    await resp.write(b"end\n")
    await resp.write_eof()
    return resp


async def hang(request: web.Request) -> web.Response:
    STATS.hanging += 1
    try:
        await asyncio.sleep(3600)
    finally:
        STATS.hanging -= 1
    return web.Response(text="too late\n")


async def reset(request: web.Request) -> web.StreamResponse:
    n = min(max(int(request.query.get("n", 65536)), 0), MIB // 2)
    chunked = request.query.get("chunked", "0") == "1"
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if chunked:
        resp.enable_chunked_encoding()
    else:
        resp.content_length = MIB
    await resp.prepare(request)
    await resp.write(CHUNK[:n] if n <= len(CHUNK) else (CHUNK * (n // len(CHUNK) + 1))[:n])
    await asyncio.sleep(0.05)
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    if sock is not None:  # linger 0: close() sends RST, not FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    return resp


async def stats(request: web.Request) -> web.Response:
    body = {"in_flight": STATS.in_flight, "hanging": STATS.hanging, "served": STATS.served}
    return web.Response(text=json.dumps(body), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def build_app() -> web.Application:
    app = web.Application(middlewares=[count], client_max_size=64 * MIB)
    add_load_routes(app, max_sse_seconds=120.0)  # /small /upload /download /sse /ws (bench/loadapp.py)
    app.router.add_get("/slow", slow)
    app.router.add_post("/slowpost", slowpost)
    app.router.add_get("/stream", stream)
    app.router.add_get("/hang", hang)
    app.router.add_get("/reset", reset)
    app.router.add_get("/stats", stats)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(port: int) -> None:
    runner = web.AppRunner(build_app(), handler_cancellation=True, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096, reuse_address=True)
    await site.start()
    print(f"upstream: listening on 127.0.0.1:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.port))
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
