"""Backhaul tunnel client: dials the exit server and serves local upstreams."""

from shared.runtime.version import version as _version

from .client import TunnelClient
from .config import ClientConfig

__version__ = _version()

__all__ = ["__version__", "ClientConfig", "TunnelClient"]
