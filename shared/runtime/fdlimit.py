"""File descriptors: raise the soft limit at start, tell when they run out (issue 24 item 8).

Systemd and Docker often start services with a soft ``RLIMIT_NOFILE`` of 1,024 (or less) under
a much higher hard limit; every public connection, tunnel session and upstream connection is a
descriptor, so both programs raise the soft limit to the hard one at start. The exit server
also keeps a reserve (:func:`public_connection_limit`) so that when public callers exhaust
what is left, the admin port and tunnel reconnects still get descriptors.

When ``accept()`` fails with EMFILE/ENFILE, asyncio and uvloop report it to the loop's
exception handler (asyncio pauses that listener for a second). :class:`DescriptorAlarm`
turns those reports into one throttled warning and a counter instead of silence.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
from collections.abc import Callable
from typing import Any

__all__ = ["FD_RESERVE_MIN", "DescriptorAlarm", "public_connection_limit", "raise_nofile"]

log = logging.getLogger(__name__)

#: Ceiling when the hard limit is unlimited (the kernel's nr_open default).
_UNLIMITED_CAP = 1 << 20
#: Descriptors always kept for the admin listener, tunnel sessions, upstreams and files.
FD_RESERVE_MIN = 64


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) as now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # a container may forbid it: keep what we have
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft, hard


def public_connection_limit(soft: int) -> int:
    """Public connections served at once under a soft limit of ``soft`` descriptors: all but a
    reserve of a tenth (at least :data:`FD_RESERVE_MIN`). Each proxied request may also hold
    an upstream-side stream, but not a descriptor on the exit server (the tunnel multiplexes)."""
    reserve = max(FD_RESERVE_MIN, soft // 10)
    return max(1, soft - reserve)


class DescriptorAlarm:
    """A loop exception handler that logs running out of descriptors once per ``interval``
    seconds (with the count since the last line) and counts each occurrence."""

    def __init__(self, count: Callable[[], None] | None = None, interval: float = 10.0) -> None:
        self.count = count
        self.interval = interval
        self.seen = 0
        self._held = 0
        self._last: float | None = None
        self._previous: Any = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self._handle)

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            self.report(loop.time(), exc)
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def report(self, now: float, exc: OSError) -> None:
        """Count one descriptor shortage; log it unless one was logged within ``interval``."""
        self.seen += 1
        if self.count is not None:
            self.count()
        if self._last is not None and now - self._last < self.interval:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.error(
            "out of file descriptors (%s, limit %d): new connections are refused%s",
            errno.errorcode.get(exc.errno or 0, "?"),
            soft,
            f"; {held} more since the last such line" if held else "",
        )
