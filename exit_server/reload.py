"""Hot reload of the exit server's files (``--tokens``, ``--access``, ``--public-cert-dir``): on
SIGHUP and when a file changes (its mtime, size or inode, polled every second: no dependency,
and atomic renames are seen as well as in-place edits; for a directory, each entry's)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

__all__ = ["Reloadable", "Reloader"]

log = logging.getLogger(__name__)


class Reloadable(Protocol):
    path: Path

    def reload(self, strict: bool = False) -> bool: ...


def _signature(path: Path) -> tuple[object, ...] | None:
    """What changes when the file does; for a directory (--public-cert-dir), each entry's."""
    try:
        st = os.stat(path)
        if not path.is_dir():
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        entries = []
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            est = entry.stat()
            entries.append((entry.name, est.st_mtime_ns, est.st_size, est.st_ino))
        return tuple(entries)
    except OSError:
        return None


class Reloader:
    """Polls files and reloads what changed; ``on_change`` runs after any effective change.

    Args:
        items: the reloadable objects (each has ``path`` and ``reload()``).
        on_change: called once after a reload that changed something.
        interval: seconds between polls.
    """

    def __init__(self, items: list[Reloadable], on_change: Callable[[], None], interval: float = 1.0) -> None:
        self.items = items
        self.on_change = on_change
        self.interval = interval
        self._seen = {id(item): _signature(item.path) for item in items}
        self.reloads = 0

    def reload_now(self, why: str = "SIGHUP") -> bool:
        """Reload every file now (SIGHUP); True when something changed."""
        log.info("reloading %s (%s)", ", ".join(str(i.path) for i in self.items) or "nothing", why)
        return self._reload(self.items)

    def poll(self) -> bool:
        """Reload the files whose signature changed since the last look."""
        changed = []
        for item in self.items:
            sig = _signature(item.path)
            if sig != self._seen.get(id(item)):
                self._seen[id(item)] = sig
                if sig is not None:
                    changed.append(item)
                else:
                    log.error("reload: %s disappeared; keeping what was loaded", item.path)
        return self._reload(changed) if changed else False

    def _reload(self, items: list[Reloadable]) -> bool:
        effective = False
        for item in items:
            self._seen[id(item)] = _signature(item.path)
            effective = item.reload() or effective
        if effective:
            self.reloads += 1
            self.on_change()
        return effective

    async def run(self) -> None:
        """Poll forever (cancel to stop)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.poll()
            except Exception:  # a reload must never kill the server
                log.exception("reload failed")
