"""Run ``exit-server`` or ``tunnel-client`` exactly as their console scripts do, plus a probe.

    RELIABILITY_PROBE=/path/probe.sock python reliability/probe.py exit-server run --public-addr ...

The command line, configuration, logging, uvloop and signal handling are the packages' own
(``exit_server.__main__.main`` / ``tunnel_client.__main__.main``); the only addition is an HTTP
listener on a Unix socket (a path, so it is reachable from any network namespace) answering
``GET /probe`` with what cannot be seen from outside the process: the number of asyncio tasks
(by name, digits stripped), next to fds, RSS and thread count. Nothing is added to the packages.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import re
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web


def snapshot() -> dict[str, Any]:
    tasks = asyncio.all_tasks()
    names = collections.Counter(re.sub(r"[0-9a-f]{6,}|\d+", "#", t.get_name()) for t in tasks)
    rss = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return {
        "pid": os.getpid(),
        "tasks": len(tasks) - 1,  # minus this probe request's own handler task
        "task_names": dict(names.most_common(20)),
        "fds": len(os.listdir("/proc/self/fd")),
        "rss_kib": rss,
        "threads": threading.active_count(),
        "gc_objects": len(gc.get_objects()),
    }


async def start_probe(path: str) -> web.AppRunner:
    async def probe(request: web.Request) -> web.Response:
        data = snapshot()
        if request.query.get("live"):  # objects of these types still in memory, without forcing a collection
            wanted = set(request.query["live"].split(","))
            live = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
            data["live"] = {name: live.get(name, 0) for name in wanted}
        if request.query.get("trim"):  # give freed heap back to the OS: separates a leak from retained free memory
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
            data["rss_kib_after_trim"] = snapshot()["rss_kib"]
        if request.query.get("types"):  # live objects by type after a full collection (leak hunting)
            gc.collect()
            counts = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
            data["types"] = dict(counts.most_common(int(request.query["types"])))
        return web.json_response(data)

    app = web.Application()
    app.router.add_get("/probe", probe)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    if os.path.exists(path):
        os.unlink(path)
    await web.UnixSite(runner, path).start()
    return runner


def wrap(serve: Callable[..., Awaitable[int]], path: str) -> Callable[..., Awaitable[int]]:
    async def serve_with_probe(config: Any, stop: asyncio.Event) -> int:
        runner = await start_probe(path)
        try:
            return await serve(config, stop)
        finally:
            await runner.cleanup()

    return serve_with_probe


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("exit-server", "tunnel-client"):
        print("usage: probe.py exit-server|tunnel-client ARGS...", file=sys.stderr)
        return 2
    path = os.environ.get("RELIABILITY_PROBE", "")
    if os.environ.get("RELIABILITY_NO_UVLOOP") == "1":  # plain asyncio (shared/runtime/runner.py falls back)
        sys.modules["uvloop"] = None  # type: ignore[assignment]
    prog, argv = sys.argv[1], sys.argv[2:]
    if prog == "exit-server":
        import exit_server.__main__ as cli
    else:
        import tunnel_client.__main__ as cli  # type: ignore[no-redef]
    if path:
        cli.serve = wrap(cli.serve, path)  # type: ignore[assignment]
    sys.argv[0] = prog
    return int(cli.main(argv))


if __name__ == "__main__":
    sys.exit(main())
