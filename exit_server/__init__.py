"""Backhaul exit server: public HTTP ingress routed by Host over tunnel sessions."""

from .config import ServerConfig
from .server import ExitServer

__all__ = ["ExitServer", "ServerConfig"]
