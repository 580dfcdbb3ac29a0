"""The endpoints the locust mix (tests/load/locustfile.py) and the reliability load generator
expect, shared by the two local upstreams: bench/upstream.py (``make load``, the scale
benchmark) and reliability/upstream.py (``make reliability``, the soak).

    GET  /small             100-byte body
    POST /upload            consumes the body, answers {"received": N, "sha256": ...}
    GET  /download?n=BYTES  BYTES (default 1 MiB) of a fixed 64 KiB pattern, with Content-Length
    GET  /sse?seconds=S&interval_ms=I
                            text/event-stream: one "event: tick" every I ms (default 100) for S
                            seconds (default 5, at most ``max_sse_seconds``), flushed one by
                            one, then "event: done"
    GET  /ws                WebSocket echo: every text or binary message comes back as it was
"""

from __future__ import annotations

import asyncio
import hashlib

from aiohttp import web

__all__ = ["CHUNK", "MIB", "SMALL", "add_load_routes"]

SMALL = b"x" * 99 + b"\n"
CHUNK = bytes(range(256)) * 256  # 64 KiB pattern (the locustfile checks the digest of 1 MiB of it)
MIB = 1 << 20


async def small(request: web.Request) -> web.Response:
    return web.Response(body=SMALL, content_type="text/plain")


async def upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    received = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        received += len(chunk)
    return web.json_response({"received": received, "sha256": digest.hexdigest()})


async def download(request: web.Request) -> web.StreamResponse:
    n = int(request.query.get("n", MIB))
    if n < 0 or n > (1 << 31):
        raise web.HTTPBadRequest(text="n out of range\n")
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "Content-Length": str(n)})
    await resp.prepare(request)
    sent = 0
    while sent < n:
        part = CHUNK[: min(len(CHUNK), n - sent)]
        await resp.write(part)
        sent += len(part)
    await resp.write_eof()
    return resp


def sse_handler(max_seconds: float):  # type: ignore[no-untyped-def]
    async def sse(request: web.Request) -> web.StreamResponse:
        seconds = min(float(request.query.get("seconds", 5)), max_seconds)
        interval = max(float(request.query.get("interval_ms", 100)), 10.0) / 1000
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        n = 0
        while loop.time() < end:
            n += 1
            await resp.write(f'id: {n}\nevent: tick\ndata: {{"n": {n}}}\n\n'.encode())
            await asyncio.sleep(interval)
        await resp.write(b"event: done\ndata: {}\n\n")
        await resp.write_eof()
        return resp

    return sse


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=4 * MIB)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is web.WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is web.WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


def add_load_routes(app: web.Application, max_sse_seconds: float = 60.0) -> None:
    """Add /small, /upload (POST and PUT), /download, /sse and /ws to ``app``."""
    app.router.add_get("/small", small)
    app.router.add_post("/upload", upload)
    app.router.add_put("/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_get("/sse", sse_handler(max_sse_seconds))
    app.router.add_get("/ws", ws_echo)
