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
from typing import Any

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "MemoryRelief", "run_service", "tune_malloc"]

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
#: Allocations of this size and more get a mapping of their own when the heap's free top cannot
#: hold them: uvloop's 256 KiB TLS read buffer, one per connection, of which an idle tunnel
#: touches a page or two. Carved from the heap instead (the threshold was 4 MiB until round
#: 10), each landed on pages the previous connection's handshake had dirtied: 22 KiB more per
#: idle TLS connection, with no gain at 1 MiB downloads (docs/BENCHMARKS.md, round 10).
MMAP_THRESHOLD = 256 << 10
#: Free memory at the top of the heap kept for reuse rather than given back at once: the
#: tunnel's 256 KiB messages are carved from it and given back to it, without page faults.
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
        return f"malloc mmap threshold {MMAP_THRESHOLD >> 10} KiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
    return "malloc defaults (mallopt refused)"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


class MemoryRelief:
    """Give freed heap back to the kernel once it piles up (issue 24 item 4).

    After a burst (hundreds of slow streams, each holding a few hundred KiB of chunks), the
    chunks are freed but glibc keeps the pages: free chunks in the middle of the heap are never
    returned by the trim threshold, which only looks at the top. Every ``interval`` seconds this
    reads how much of the heap is free (``mallinfo2``, a walk of the free lists: microseconds)
    and, above ``threshold``, calls ``malloc_trim(0)``, which also releases whole free pages
    inside the heap. Not glibc: does nothing."""

    def __init__(self, interval: float = 10.0, threshold: int = TRIM_THRESHOLD) -> None:
        self.interval = interval
        self.threshold = threshold
        self.released = 0  # times malloc_trim gave memory back
        self._mallinfo2: Any = None
        self._trim: Any = None
        try:
            libc = ctypes.CDLL(None)
            self._mallinfo2 = libc.mallinfo2
            self._mallinfo2.restype = _MallInfo2
            self._trim = libc.malloc_trim
        except (OSError, AttributeError):
            self._mallinfo2 = self._trim = None  # not glibc (or older than 2.33)

    @property
    def available(self) -> bool:
        return self._trim is not None

    def free_bytes(self) -> int:
        """Bytes the heap holds in free chunks (0 when unknown)."""
        if self._mallinfo2 is None:
            return 0
        return int(self._mallinfo2().fordblks)

    def relieve(self) -> bool:
        """Trim now when at least ``threshold`` bytes are free in the heap; True if trimmed."""
        if self._trim is None or self.free_bytes() < self.threshold:
            return False
        if self._trim(0):
            self.released += 1
            return True
        return False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)  # a period, not a synchronisation
            if self.relieve():
                log.debug("memory: returned freed heap to the system (malloc_trim)")


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
        relief = MemoryRelief()
        reliever = loop.create_task(relief.run(), name="memory-relief") if relief.available else None
        try:
            return await main(stop)
        except asyncio.CancelledError:
            return 130
        finally:
            if reliever is not None:
                reliever.cancel()

    return asyncio.run(wrapper())
