"""Backhaul tunnel client: dials the exit server and serves local upstreams."""

from shared.runtime.gcpause import pause_for_run

pause_for_run("tunnel-client")  # `tunnel-client run` only, before the imports below (shared/runtime/gcpause.py)

from shared.runtime.version import version as _version  # noqa: E402

from .client import TunnelClient  # noqa: E402
from .config import ClientConfig  # noqa: E402

__version__ = _version()

__all__ = ["__version__", "ClientConfig", "TunnelClient"]
