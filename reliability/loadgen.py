"""A bounded aiohttp load generator, run in its own process (the soak when locust is absent).

    python reliability/loadgen.py --url http://127.0.0.1:PORT --host app.rel.test --concurrency 16 \\
        --duration 60 --out result.json [--max-requests N]

Mix per worker (weights): 100 B GET (10), 100 KiB upload (2), 1 MiB download (2), a 2 s SSE
stream (1), each checked: status, size, digest, every SSE event and the final one. Between two
requests a worker waits uniform(--think-min, --think-max) seconds. Stops at --duration seconds
or --max-requests, whichever first (or on SIGTERM), and writes a JSON summary: counts and
latency percentiles per kind, and every error with its wall-clock time.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path

import aiohttp

MIB = 1 << 20
UPLOAD = os.urandom(100 * 1024)
UPLOAD_SHA = hashlib.sha256(UPLOAD).hexdigest()
CHUNK = bytes(range(256)) * 256
DOWNLOAD_SHA = hashlib.sha256(CHUNK * 16).hexdigest()
MIX = [("small", 10), ("upload", 2), ("download", 2), ("sse", 1)]


class Failed(Exception):
    pass


async def one(http: aiohttp.ClientSession, base: str, kind: str, sse_seconds: float) -> None:
    if kind == "small":
        async with http.get(base + "/small") as r:
            body = await r.read()
            if r.status != 200 or len(body) != 100:
                raise Failed(f"status {r.status}, {len(body)} bytes")
    elif kind == "upload":
        async with http.post(base + "/upload", data=UPLOAD, headers={"Content-Type": "application/octet-stream"}) as r:
            if r.status != 200:
                raise Failed(f"status {r.status}")
            body = await r.json(content_type=None)
            if body.get("received") != len(UPLOAD) or body.get("sha256") != UPLOAD_SHA:
                raise Failed("upstream got a different body")
    elif kind == "download":
        async with http.get(base + f"/download?n={MIB}") as r:
            body = await r.read()
            if r.status != 200 or len(body) != MIB or hashlib.sha256(body).hexdigest() != DOWNLOAD_SHA:
                raise Failed(f"status {r.status}, {len(body)} bytes")
    elif kind == "sse":
        async with http.get(base + f"/sse?seconds={sse_seconds:g}&interval_ms=100") as r:
            if r.status != 200:
                raise Failed(f"status {r.status}")
            ticks = 0
            done = False
            async for line in r.content:
                if line.startswith(b"event: tick"):
                    ticks += 1
                elif line.startswith(b"event: done"):
                    done = True
            if not done or ticks < sse_seconds * 10 * 0.5:
                raise Failed(f"stream: {ticks} events, final event {'seen' if done else 'missing'}")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run(args: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    deadline = loop.time() + args.duration
    kinds = [k for k, w in MIX for _ in range(w)]
    lat: dict[str, list[float]] = {k: [] for k, _ in MIX}
    errors: list[dict] = []
    counts = {"started": 0, "ok": 0, "failed": 0}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers={"Host": args.host}, auto_decompress=False
    ) as http:

        async def worker() -> None:
            while not stop.is_set() and loop.time() < deadline and counts["started"] < args.max_requests:
                kind = random.choice(kinds)
                counts["started"] += 1
                t0 = loop.time()
                try:
                    await one(http, args.url, kind, args.sse_seconds)
                    counts["ok"] += 1
                    lat[kind].append(loop.time() - t0)
                except (Failed, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                    counts["failed"] += 1
                    errors.append(
                        {
                            "time": time.time(),
                            "kind": kind,
                            "after_s": round(loop.time() - t0, 3),
                            "error": f"{type(exc).__name__}: {exc}"[:300],
                        }
                    )
                try:
                    async with asyncio.timeout(random.uniform(args.think_min, args.think_max)):
                        await stop.wait()
                except TimeoutError:
                    pass

        started = time.time()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        ended = time.time()
    return {
        "started": started,
        "ended": ended,
        "requests": counts["ok"] + counts["failed"],
        "ok": counts["ok"],
        "failed": counts["failed"],
        "errors": errors[:500],
        "by_kind": {
            k: {
                "ok": len(v),
                "p50_ms": _ms(percentile(v, 0.5)),
                "p95_ms": _ms(percentile(v, 0.95)),
                "p99_ms": _ms(percentile(v, 0.99)),
                "max_ms": _ms(max(v) if v else None),
            }
            for k, v in lat.items()
        },
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--max-requests", type=int, default=2_000_000)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--think-min", type=float, default=0.02)
    parser.add_argument("--think-max", type=float, default=0.1)
    parser.add_argument("--sse-seconds", type=float, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not 1 <= args.concurrency <= 1000 or not 0 < args.duration <= 7200:
        parser.error("--concurrency 1..1000, --duration 0..7200")
    if not args.url.startswith(("http://127.", "http://localhost")):
        parser.error("loopback only")
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:  # pragma: no cover
        result = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"loadgen: {result['requests']} requests, {result['failed']} failed", flush=True)


if __name__ == "__main__":
    main()
