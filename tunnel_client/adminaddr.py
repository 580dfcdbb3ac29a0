"""Where the client's admin listener is, for ``tunnel-client healthcheck``.

Several clients may run on one host with the default settings (ECS host network mode puts every
sidecar in one network namespace). When the *default* admin address is taken, the client listens
on a free port of the same host instead and says so in its log; an explicit ``--admin-addr``
that is taken is a configuration error. Either way, the address actually bound is written to a
run file, ``<run dir>/tunnel-client.<pid>.admin``, removed on exit, so that ``tunnel-client
healthcheck`` without ``--admin-addr`` finds every client on this file system.

The run dir is ``$BACKHAUL_RUN_DIR``, else ``$XDG_RUNTIME_DIR/backhaul``, else
``<temp dir>/backhaul-<uid>``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["live_admin_addrs", "remove_run_file", "run_dir", "write_run_file"]

_SUFFIX = ".admin"
_PREFIX = "tunnel-client."


def run_dir() -> Path:
    """The directory of the clients' run files (see the module docstring)."""
    if explicit := os.environ.get("BACKHAUL_RUN_DIR"):
        return Path(explicit)
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "backhaul"
    return Path(tempfile.gettempdir()) / f"backhaul-{os.getuid()}"


def _path(pid: int) -> Path:
    return run_dir() / f"{_PREFIX}{pid}{_SUFFIX}"


def write_run_file(addr: str) -> Path | None:
    """Record this process's admin address; None (and nothing written) when the run dir is
    not writable: the healthcheck then needs ``--admin-addr``."""
    path = _path(os.getpid())
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(addr + "\n")
        tmp.replace(path)  # a reader never sees half an address
    except OSError:
        return None
    return path


def remove_run_file() -> None:
    """Remove this process's run file, if any."""
    with contextlib.suppress(OSError):
        _path(os.getpid()).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def live_admin_addrs() -> list[str]:
    """The admin addresses of the clients whose run files name a live process (stale files of
    killed clients are skipped)."""
    addrs: list[str] = []
    with contextlib.suppress(OSError):
        for entry in sorted(run_dir().glob(f"{_PREFIX}*{_SUFFIX}")):
            pid = entry.name[len(_PREFIX) : -len(_SUFFIX)]
            if not pid.isdigit() or not _alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                addr = entry.read_text().strip()
                if addr:
                    addrs.append(addr)
    return addrs
