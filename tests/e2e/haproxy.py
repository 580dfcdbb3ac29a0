"""A real HAProxy (Debian's, installed by scripts/ci-deps.sh) in front of exit servers: TCP
mode, round robin, health checks on each server's ``/readyz``, the way docs/SCALING.md deploys
a fleet."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ..waiting import wait_until
from .test_cli import free_port, wait_port

CONFIG = """
global
    maxconn 4000
    stats socket {sock} level operator
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch
frontend public
    bind 127.0.0.1:{front}
    default_backend exits
backend exits
    balance roundrobin
    option httpchk GET /readyz
{servers}
{extra}
"""

EXTRA = """
frontend public{n}
    bind 127.0.0.1:{front}
    default_backend exits{n}
backend exits{n}
    balance roundrobin
    option httpchk GET /readyz
{servers}
"""


@dataclass(frozen=True)
class Balancer:
    port: int  # the public front
    sock: Path  # the stats socket

    async def up(self, prefix: str = "exits,") -> int:
        """How many servers of the main backend (``prefix`` "exits": of every backend) HAProxy
        reports UP."""
        reader, writer = await asyncio.open_unix_connection(str(self.sock))
        writer.write(b"show stat\n")
        await writer.drain()
        text = (await reader.read()).decode()
        writer.close()
        rows = [line.split(",") for line in text.splitlines() if line.startswith(prefix)]
        return sum(1 for row in rows if row[1] not in ("FRONTEND", "BACKEND") and row[17] == "UP")


@contextlib.asynccontextmanager
async def haproxy(
    tmp: Path, backends: list[tuple[int, int]], front: int | None = None, also: dict[int, list[int]] | None = None
) -> AsyncIterator[Balancer]:
    """HAProxy balancing its front port over ``backends`` (public port, admin port), once
    every backend is UP.

    Args:
        front: the public port (e.g. the one pebble validates on); a free one by default.
        also: more fronts: front port -> the backends' ports behind it (the same servers, in
            the order of ``backends``, health-checked on the same admin ports).
    """
    binary = shutil.which("haproxy")
    assert binary is not None, "haproxy is missing: `make test` installs it (scripts/ci-deps.sh)"
    front = front or free_port()
    sock = tmp / "haproxy.sock"
    lines = "\n".join(
        f"    server es{i} 127.0.0.1:{public} check port {admin} inter 200 fall 2 rise 1"
        for i, (public, admin) in enumerate(backends)
    )
    extra = "".join(
        EXTRA.format(
            n=n,
            front=port,
            servers="\n".join(
                f"    server es{i} 127.0.0.1:{public} check port {admin} inter 200 fall 2 rise 1"
                for i, (public, (_, admin)) in enumerate(zip(ports, backends, strict=True))
            ),
        )
        for n, (port, ports) in enumerate((also or {}).items(), start=2)
    )
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(CONFIG.format(front=front, servers=lines, sock=sock, extra=extra))
    proc = subprocess.Popen([binary, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await asyncio.to_thread(wait_port, front)
        balancer = Balancer(front, sock)
        everyone = len(backends) * (1 + len(also or {}))
        await wait_until(lambda: _all_up(balancer, everyone), 15, 0.1, "haproxy: every exit server up")
        yield balancer
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)


async def _all_up(balancer: Balancer, n: int) -> bool:
    return await balancer.up("exits") == n
