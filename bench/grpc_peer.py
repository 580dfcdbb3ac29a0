"""The two gRPC processes of bench/h2.py's unary-call row.

    grpc_peer.py serve PORT                 an echo service (grpcio, sync server, 64 threads)
    grpc_peer.py load TARGET AUTHORITY S C  unary calls for S seconds from C concurrent callers
                                            (grpc.aio, one channel); prints a JSON result

The caller is the same program for the direct row and the tunnelled one, so the ratio between
them compares the paths, not the clients.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from concurrent import futures

import grpc

METHOD = "/backhaul.bench.Echo/Unary"
PAYLOAD = b"x" * 100


def serve(port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("backhaul.bench.Echo", {"Unary": handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


async def load(target: str, authority: str, seconds: float, concurrency: int) -> dict[str, float]:
    options = [("grpc.default_authority", authority)] if authority else []
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(METHOD)
        await call(PAYLOAD, timeout=10)  # connected and routed before the clock starts
        done = 0
        failed = 0
        latencies: list[float] = []
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done, failed
            while time.perf_counter() < end:
                started = time.perf_counter()
                try:
                    await call(PAYLOAD, timeout=10)
                except grpc.RpcError:
                    failed += 1
                    continue
                done += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    p50 = latencies[len(latencies) // 2] if latencies else 0.0
    return {"calls": done, "failed": failed, "seconds": elapsed, "rate": done / elapsed, "p50_ms": p50 * 1000}


def main() -> int:
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
        return 0
    target, authority, seconds, concurrency = sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
    print(json.dumps(asyncio.run(load(target, authority, seconds, concurrency))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
