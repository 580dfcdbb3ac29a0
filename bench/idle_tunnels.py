"""Helper for bench/scale.py: N idle tunnel clients in this one process (library API, uvloop).

    python bench/idle_tunnels.py --server wss://localhost:PORT --ca-file ca.pem --token-file F \
        --start 0 --count 100

Each client registers ``h{i}.example.com=http://127.0.0.1:9`` with instance id ``idle-{i}``.
Prints ``READY <connected> <rss_kib>`` once every client is registered (or ``FAILED <reason>``),
then idles until stdin reaches EOF (the parent closes it, or dies), shuts the clients down and
exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from tunnel_client import ClientConfig, TunnelClient


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def run(args: argparse.Namespace) -> int:
    token = Path(args.token_file).read_text().strip()
    clients: list[TunnelClient] = []
    tasks: list[asyncio.Task[None]] = []
    # Newer clients open an admin listener on a fixed port by default: one per process at most.
    extra = {"admin_addr": ""} if "admin_addr" in ClientConfig.model_fields else {}
    for i in range(args.start, args.start + args.count):
        config = ClientConfig(
            server=[args.server],
            ca_file=args.ca_file,
            upstream=[f"h{i}.example.com=http://127.0.0.1:9"],
            instance_id=f"idle-{i}",
            **extra,
        )
        client = TunnelClient(config, token=token)
        clients.append(client)
        tasks.append(asyncio.create_task(client.run()))
        await asyncio.sleep(args.stagger)
    results = await asyncio.gather(*(c.wait_connected(timeout=args.timeout) for c in clients), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        print(f"FAILED {len(failed)} of {len(clients)} not connected: {failed[0]!r}", flush=True)
    else:
        print(f"READY {len(clients)} {rss_kib()}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10):
            await asyncio.gather(*(c.shutdown(drain_timeout=1) for c in clients), return_exceptions=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True)
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--stagger", type=float, default=0.01, help="seconds between client starts")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds for every client to register")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        import uvloop

        return uvloop.run(run(args))
    except ImportError:  # pragma: no cover
        return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
