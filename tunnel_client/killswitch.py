"""Local kill switch: withdraw the tunnel until an operator lifts it.

Two independent holds; the tunnel is withdrawn while either is on:

- the file hold: ``--kill-switch-file PATH`` exists (checked every :data:`POLL_INTERVAL`);
- the signal hold: toggled by SIGUSR1 (``kill -USR1 PID``; installed by the command line only).

While withdrawn, every link sends GOAWAY (the exit server stops routing to it at once; streams it
opens in the meantime are refused: 503 with ``Retry-After``), closes its session without waiting
for in-flight streams (they are cut: an emergency stop, not a drain), and does not reconnect. The
forwarder also refuses any stream that still arrives (REFUSED). When both holds are off the
links reconnect at once (within about a poll interval plus the connect time).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

__all__ = ["POLL_INTERVAL", "KillSwitch"]

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5


class KillSwitch:
    """The withdrawn/serving state of a tunnel client.

    Args:
        path: the kill-switch file, or None for the signal hold only.
        poll_interval: seconds between checks of the file.
    """

    def __init__(self, path: Path | None = None, poll_interval: float = POLL_INTERVAL) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self.file_hold = path is not None and path.exists()
        self.signal_hold = False
        self._engaged = asyncio.Event()
        self._lifted = asyncio.Event()
        self._apply(announce=False)

    @property
    def engaged(self) -> bool:
        """True while the tunnel must stay withdrawn."""
        return self.file_hold or self.signal_hold

    def toggle(self) -> None:
        """Flip the signal hold (SIGUSR1)."""
        self.signal_hold = not self.signal_hold
        if not self.signal_hold and self.file_hold:
            log.warning("kill switch: signal hold lifted, but %s still exists", self.path)
        self._apply()

    def poll(self) -> None:
        """Check the file now."""
        if self.path is None:
            return
        present = self.path.exists()
        if present != self.file_hold:
            self.file_hold = present
            self._apply()

    def _apply(self, announce: bool = True) -> None:
        engaged = self.engaged
        if engaged == self._engaged.is_set() and (engaged or self._lifted.is_set()):
            return
        if engaged:
            self._lifted.clear()
            self._engaged.set()
        else:
            self._engaged.clear()
            self._lifted.set()
        if announce:
            why = " and ".join(n for n, on in (("file", self.file_hold), ("SIGUSR1", self.signal_hold)) if on)
            if engaged:
                log.warning("kill switch engaged (%s): withdrawing the tunnel", why)
            else:
                log.warning("kill switch lifted: reconnecting")

    async def wait_engaged(self) -> None:
        """Return once the switch is engaged."""
        await self._engaged.wait()

    async def wait_lifted(self, stop: asyncio.Event) -> None:
        """Return once the switch is lifted or ``stop`` is set."""
        if not self.engaged or stop.is_set():
            return
        lifted = asyncio.ensure_future(self._lifted.wait())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({lifted, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lifted.cancel()
            stopped.cancel()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll the file until ``stop`` is set."""
        if self.path is None:
            return
        if self.file_hold:
            log.warning("kill switch: %s exists: the tunnel stays withdrawn until it is removed", self.path)
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.poll_interval):
                    await stop.wait()
            except TimeoutError:
                self.poll()

    def install_signal_handler(self, loop: asyncio.AbstractEventLoop) -> None:
        """Toggle on SIGUSR1 (command line only: a library must not take process signals)."""
        loop.add_signal_handler(signal.SIGUSR1, self.toggle)
