"""Backhaul tunnel client: dials the exit server and serves local upstreams."""

from .client import TunnelClient
from .config import ClientConfig

__all__ = ["ClientConfig", "TunnelClient"]
