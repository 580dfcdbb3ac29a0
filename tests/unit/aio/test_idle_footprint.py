"""What an idle tunnel keeps in Python objects, per part (performance issue, target 4: at most
32 KiB per idle tunnel on the exit server; docs/BENCHMARKS.md, round 12).

Measured with tracemalloc over a few hundred instances, no sockets. The bounds sit about
twice above what the parts take now and below what they took before round 12 (Session
2,075 B, TunnelConnection 1,760 B): an instance dict or an empty set or asyncio.Event coming
back fails here before it shows in ``bench/memprobe.py tunnels``.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Callable

import pytest

from shared.aio.connection import TunnelConnection
from shared.mux import Role, Session

from .aio_pair import pair

COUNT = 300


def bytes_each(make: Callable[[int], object]) -> float:
    """Bytes that ``COUNT`` live results of ``make(i)`` hold, per result."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        kept = [make(i) for i in range(COUNT)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert len(kept) == COUNT
    return sum(stat.size_diff for stat in after.compare_to(before, "filename")) / COUNT


@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_an_idle_session_keeps_under_1_kib(role: Role) -> None:
    each = bytes_each(lambda _: Session(role, now=0.0))
    assert each <= 1024, f"{each:.0f} B per idle Session"


@pytest.mark.asyncio
async def test_an_idle_tunnel_connection_keeps_under_1_kib() -> None:
    sessions = [Session(Role.SERVER, now=0.0) for _ in range(COUNT)]
    ws = object()  # stored only: nothing is sent before run()
    each = bytes_each(lambda i: TunnelConnection(ws, sessions[i], name="s"))  # type: ignore[arg-type]
    assert each <= 1024, f"{each:.0f} B per idle TunnelConnection"


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_wait_closed_wakes_every_waiter_when_the_session_ends() -> None:
    """wait_closed() (a future made when first awaited, no longer an asyncio.Event) wakes
    every waiter, a cancelled waiter does not cancel it for the others, and it returns at
    once after the end."""
    async with pair() as p:
        waiters = [asyncio.ensure_future(p.server.wait_closed()) for _ in range(3)]
        await asyncio.sleep(0)
        waiters[0].cancel()
        assert not p.server.closed
        await p.client.close(1000, "bye")
        done = await asyncio.wait_for(asyncio.gather(*waiters[1:]), 5)
        assert done == [None, None] and waiters[0].cancelled() and p.server.closed
        await asyncio.wait_for(p.server.wait_closed(), 1)  # after the end: at once
