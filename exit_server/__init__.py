"""Backhaul exit server: public HTTP ingress routed by Host over tunnel sessions."""

from shared.runtime.gcpause import pause_for_run

pause_for_run("exit-server")  # `exit-server run` only, before the imports below (shared/runtime/gcpause.py)

from shared.runtime.version import version as _version  # noqa: E402

from .config import ServerConfig  # noqa: E402
from .server import ExitServer  # noqa: E402

__version__ = _version()

__all__ = ["__version__", "ExitServer", "ServerConfig"]
