"""Backhaul exit server: public HTTP ingress routed by Host over tunnel sessions."""

from shared.runtime.gcpause import pause_for_run

pause_for_run("exit-server")  # `exit-server run` only, before the imports below (shared/runtime/gcpause.py)

from .config import ServerConfig  # noqa: E402
from .server import ExitServer  # noqa: E402

__all__ = ["__version__", "ExitServer", "ServerConfig"]


def __getattr__(name: str) -> str:
    """``__version__``, read from the installed metadata when asked: the exit server itself
    needs it only for ``--version``, its metrics and its ACME user agent, not at every start."""
    if name == "__version__":
        from shared.runtime.version import version

        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
