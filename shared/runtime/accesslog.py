"""Access lines written straight to the log stream (``exit-server run`` with text logs): the
same line the logging module would write (``TIME INFO backhaul.access: MESSAGE``, control
characters escaped), without a LogRecord, a caller lookup and a flush per line. Lines gather
during one event-loop turn and go out in one write at its end (or when 256 are waiting, and at
exit), so a busy server makes one write per turn instead of one per request.

Measured in ``make bench`` row (g): the access log at the default level cost the exit server
about 46 us of CPU per 100 B request through ``logging``; see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import atexit
import time
from typing import TextIO

from .textsafe import escape_controls

__all__ = ["AccessWriter"]

#: Lines that may wait for the end of the loop turn before they are written at once.
MAX_PENDING = 256


class AccessWriter:
    """Writes ``NAME`` lines to ``stream`` at INFO, batched per event-loop turn."""

    def __init__(self, stream: TextIO, name: str = "backhaul.access") -> None:
        self.stream = stream
        self.name = name
        self._pending: list[str] = []
        self._scheduled = False
        self._second = -1
        self._prefix = ""
        atexit.register(self.flush)

    def _stamp(self, now: float) -> str:
        """RFC 3339 UTC with milliseconds, as shared/runtime/cli.py's rfc3339 (cached per second)."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int(now * 1000) % 1000:03d}Z"

    def write(self, message: str) -> None:
        """One access line (``message`` is escaped here)."""
        self._pending.append(f"{self._stamp(time.time())} INFO {self.name}: {escape_controls(message)}\n")
        if len(self._pending) >= MAX_PENDING:
            self.flush()
        elif not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a test, or the process ending): now
                self.flush()
                return
            self._scheduled = True

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: as logging, never raise
            pass
