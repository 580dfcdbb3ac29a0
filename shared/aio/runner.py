"""Process runner for both command lines: uvloop when installed, signal handling for graceful
drain (first SIGTERM/SIGINT drains, a second one exits at once)."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "run_service", "tune_malloc"]

log = logging.getLogger(__name__)


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations up to this size come from the heap, not from a fresh mmap each.
MMAP_THRESHOLD = 4 << 20
#: Free memory at the top of the heap kept for reuse rather than given back at once.
TRIM_THRESHOLD = 16 << 20
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_malloc() -> str:
    """Fix glibc's mmap and trim thresholds (unless the environment sets malloc tunables).

    Tunnel payloads are 256 KiB messages allocated and freed thousands of times a second.
    glibc's thresholds adapt to the sizes freed, and with this pattern they settle where most of
    those buffers were fresh mmaps or re-grown heap: 29,000 page faults a second in the exit
    server at 1 MiB downloads, 2 with fixed thresholds (docs/BENCHMARKS.md). The cost is up to
    TRIM_THRESHOLD of freed heap kept after a burst. Returns what was done, for the debug log."""
    if any(name in os.environ for name in _MALLOC_ENV):
        return "malloc tunables from the environment"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (or no libc symbols): nothing to tune
        return "malloc defaults"
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        return f"malloc mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
    return "malloc defaults (mallopt refused)"


def run_service(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run ``main(stop_event)`` on uvloop (or asyncio). The first SIGTERM/SIGINT sets the
    event so ``main`` can drain; a second one exits immediately with status 130."""
    loop_name = _install_uvloop()
    malloc = tune_malloc()
    # Per-request objects are short-lived and acyclic: a higher generation-0 threshold makes the
    # cyclic collector run far less often on the hot path (it showed up at 5-7 % in profiles).
    gc.set_threshold(50_000, 20, 20)

    async def wrapper() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.current_task()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("received %s: draining (send it again to exit now)", signal.Signals(signum).name)
                stop.set()
            else:
                log.warning("second signal: exiting now")
                assert task is not None
                task.cancel()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        log.debug("event loop: %s; %s", loop_name, malloc)
        try:
            return await main(stop)
        except asyncio.CancelledError:
            return 130

    return asyncio.run(wrapper())
