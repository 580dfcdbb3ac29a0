"""Metrics every Backhaul process exports besides its own: the process (CPU, memory, open
descriptors: prometheus_client's default collectors), ``backhaul_build_info`` and the seconds
until each configured TLS certificate expires."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .version import version

# prometheus_client is imported where a scrape needs it: the tunnel client builds its registry
# at the first scrape (tunnel_client/admin.py), not at start.
if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily

__all__ = ["CertExpiryCollector", "BuildInfoCollector", "register_process_metrics"]


class BuildInfoCollector:
    """``backhaul_build_info{version, component} 1``."""

    def __init__(self, component: str) -> None:
        self.component = component

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from prometheus_client.core import GaugeMetricFamily

        info = GaugeMetricFamily("backhaul_build_info", "Backhaul version (always 1)", labels=["version", "component"])
        info.add_metric([version(), self.component], 1)
        yield info


class CertExpiryCollector:
    """``backhaul_tls_cert_expiry_seconds{cert}``: seconds until a certificate's notAfter
    (negative once expired), read at scrape time and re-parsed only when the file changes, so a
    renewed certificate shows without a restart. A file that cannot be read or parsed is left
    out of the scrape (the server itself would already have refused it at start)."""

    def __init__(self, certs: Mapping[str, Path]) -> None:
        self.certs = dict(certs)
        self._cache: dict[str, tuple[tuple[int, int], float]] = {}

    def _not_after(self, name: str, path: Path) -> float | None:
        try:
            stat = os.stat(path)
            key = (stat.st_mtime_ns, stat.st_size)
            cached = self._cache.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
            from cryptography import x509  # at the first scrape, not at start

            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            return None
        not_after = cert.not_valid_after_utc.timestamp()
        self._cache[name] = (key, not_after)
        return not_after

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "backhaul_tls_cert_expiry_seconds", "Seconds until the certificate expires", labels=["cert"]
        )
        now = datetime.datetime.now(datetime.UTC).timestamp()
        for name, path in self.certs.items():
            not_after = self._not_after(name, path)
            if not_after is not None:
                family.add_metric([name], not_after - now)
        yield family


def register_process_metrics(registry: CollectorRegistry, component: str, certs: Mapping[str, Path | None]) -> None:
    """Add the process, platform, build-info and certificate-expiry collectors to ``registry``.

    Args:
        registry: the process's own registry (each server keeps one, see exit_server/observe.py).
        component: ``exit-server`` or ``tunnel-client``.
        certs: label -> certificate file; None entries (not configured) are skipped.
    """
    from prometheus_client import PlatformCollector, ProcessCollector

    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(BuildInfoCollector(component))
    configured = {name: path for name, path in certs.items() if path is not None}
    if configured:
        registry.register(CertExpiryCollector(configured))
