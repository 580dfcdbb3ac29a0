"""Backhaul exit server: public HTTP ingress routed by Host over tunnel sessions."""

from shared.runtime.version import version as _version

from .config import ServerConfig
from .server import ExitServer

__version__ = _version()

__all__ = ["__version__", "ExitServer", "ServerConfig"]
