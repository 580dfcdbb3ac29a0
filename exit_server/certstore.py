"""Certificates for the public TLS listener, chosen per SNI hostname.

``--public-cert-dir DIR`` holds ``HOST.pem`` (the chain) and ``HOST-key.pem`` for each name;
``HOST`` may be a wildcard (``*.example.com.pem``: one label, as in RFC 6125). A pair is served
for its name only when the certificate covers that name, is valid now and matches its key;
anything else is logged and skipped (a broken pair never takes the whole directory down). The
directory is reloaded on SIGHUP and when its contents change (exit_server/reload.py).

A ClientHello for a name with no certificate (or without SNI) is refused with the
``unrecognized_name`` alert: never a certificate for another name.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from shared.aio.tls import AEAD_CIPHERS
from shared.errors import ConfigError
from shared.routing import HOST_PATTERN

if TYPE_CHECKING:
    from prometheus_client.core import GaugeMetricFamily

__all__ = ["CertStore", "PublicCertCollector", "Served", "public_context"]

log = logging.getLogger(__name__)

_KEY_SUFFIX = "-key.pem"
_NAME = re.compile(HOST_PATTERN)


@dataclass(frozen=True, slots=True)
class Served:
    """One certificate the listener serves."""

    name: str  # the hostname (or *.domain) it is served for
    source: str  # where it came from: "file" (--public-cert-dir) or "acme"
    issuer: str
    not_after: dt.datetime
    context: ssl.SSLContext
    files: tuple[str, ...] = ()
    not_before: dt.datetime | None = None


def public_context() -> ssl.SSLContext:
    """The public listener's TLS settings: TLS 1.2+, AEAD suites, no compression or
    renegotiation (the same rules as the control listener, shared/aio/tls.py)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(AEAD_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _covers(cert: x509.Certificate, name: str) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    names = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    return name in names


def load_pair(name: str, chain: Path, key: Path, now: dt.datetime | None = None, *, source: str = "file") -> Served:
    """A context serving ``chain``/``key`` for ``name`` (``source``: "file" or "acme").

    Raises:
        ConfigError: unreadable, mismatched, expired, or not covering ``name``.
    """
    now = now or dt.datetime.now(dt.UTC)
    try:
        pem = chain.read_bytes()
        cert = x509.load_pem_x509_certificates(pem)[0]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--public-cert-dir: cannot read {chain}: {exc}") from None
    if not _covers(cert, name):
        raise ConfigError(f"--public-cert-dir: {chain.name} does not name {name} in its subjectAltName")
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise ConfigError(f"--public-cert-dir: {chain.name} is not valid now (until {cert.not_valid_after_utc:%F})")
    ctx = public_context()
    try:
        ctx.load_cert_chain(chain, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--public-cert-dir: cannot load {chain.name} with {key.name}: {exc}") from None
    issuer = cert.issuer.rfc4514_string()
    return Served(
        name, source, issuer, cert.not_valid_after_utc, ctx, (str(chain), str(key)), cert.not_valid_before_utc
    )


def _valid_name(name: str) -> bool:
    """A host name, or ``*.`` and a domain of two labels or more (a wildcard covers one label)."""
    if name.startswith("*.") and "." not in name[2:]:
        return False
    return _NAME.match(name) is not None


class CertStore:
    """The certificates of the public TLS listener, by hostname: files from ``path`` (the
    ``--public-cert-dir``, None: none) win over those another source adds with :meth:`put`
    (ACME, exit_server/acme.py)."""

    def __init__(self, path: Path | None, http2: bool = False) -> None:
        #: ALPN offered on every context served (h2 only when HTTP/2 is on: --no-http2)
        self.alpn = ["h2", "http/1.1"] if http2 else ["http/1.1"]
        #: what exit_server/reload.py watches (a path that never exists when there is none)
        self.path = path if path is not None else Path("/nonexistent")
        self._dir = path
        self._files: dict[str, Served] = {}
        self._other: dict[str, Served] = {}

    # -- Reloadable (exit_server/reload.py)
    def reload(self, strict: bool = False) -> bool:
        """Re-read the directory; True when the set of served certificates changed.

        Raises:
            ConfigError: ``strict`` (start-up) and the directory cannot be listed.
        """
        if self._dir is None:
            return False
        try:
            entries = sorted(p for p in self._dir.iterdir() if p.name.endswith(".pem"))
        except OSError as exc:
            if strict:
                raise ConfigError(f"--public-cert-dir: cannot list {self.path}: {exc}") from None
            log.error("public certificates: cannot list %s, keeping what was loaded: %s", self.path, exc)
            return False
        loaded: dict[str, Served] = {}
        for chain in entries:
            if chain.name.endswith(_KEY_SUFFIX):
                continue
            name = chain.name.removesuffix(".pem").lower()
            key = chain.with_name(chain.name.removesuffix(".pem") + _KEY_SUFFIX)
            if not _valid_name(name):
                log.error("public certificates: %s is not HOST.pem for a host name; skipped", chain.name)
                continue
            if not key.exists():
                log.error("public certificates: %s has no %s; skipped", chain.name, key.name)
                continue
            try:
                loaded[name] = load_pair(name, chain, key)
                loaded[name].context.set_alpn_protocols(self.alpn)
            except ConfigError as exc:
                log.error("public certificates: %s; skipped", exc)
        before = {n: (s.files, s.not_after) for n, s in self._files.items()}
        after = {n: (s.files, s.not_after) for n, s in loaded.items()}
        changed = before != after or any(
            _mtimes(s.files) != _mtimes(self._files[n].files) for n, s in loaded.items() if n in self._files
        )
        self._files = loaded
        if changed:
            log.info("public certificates: %d loaded from %s", len(loaded), self.path)
        return changed

    def put(self, served: Served) -> None:
        """Serve a certificate from another source (ACME) for ``served.name``."""
        served.context.set_alpn_protocols(self.alpn)
        self._other[served.name] = served

    def has_file(self, name: str) -> bool:
        """True when --public-cert-dir serves ``name`` (exactly or by wildcard): ACME stays out."""
        served = self.lookup(name)
        return served is not None and served.source == "file"

    def lookup(self, server_name: str | None) -> Served | None:
        """The certificate for an SNI name: the exact name, then the wildcard one label up."""
        if not server_name:
            return None
        name = server_name.lower().rstrip(".")
        found = self._files.get(name) or self._other.get(name)
        if found is not None:
            return found
        parent = name.partition(".")[2]
        if not parent:
            return None
        return self._files.get("*." + parent) or self._other.get("*." + parent)

    def all(self) -> list[Served]:
        """Every certificate served, by name (for the admin API and metrics)."""
        seen = dict(self._other)
        seen.update(self._files)
        return sorted(seen.values(), key=lambda s: s.name)

    def sni_callback(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        """``SSLContext.sni_callback``: switch to the name's context, or refuse the handshake."""
        served = self.lookup(server_name)
        if served is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = served.context
        return None

    def listener_context(self) -> ssl.SSLContext:
        """The context the listener starts every handshake with: no certificate of its own,
        only the SNI callback that picks one. The context switched to keeps the same ALPN:
        OpenSSL selects the protocol with the context the SNI callback chose."""
        ctx = public_context()
        ctx.set_alpn_protocols(self.alpn)
        ctx.sni_callback = self.sni_callback
        return ctx


def _mtimes(files: tuple[str, ...]) -> tuple[int, ...]:
    out = []
    for name in files:
        try:
            out.append(Path(name).stat().st_mtime_ns)
        except OSError:
            out.append(0)
    return tuple(out)


class PublicCertCollector:
    """``backhaul_public_cert_expiry_seconds{host}``: seconds until each served public
    certificate expires (negative once expired), read from the store at scrape time."""

    def __init__(self, store: CertStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from prometheus_client.core import GaugeMetricFamily  # at scrape time (exit_server/observe.py)

        family = GaugeMetricFamily(
            "backhaul_public_cert_expiry_seconds",
            "Seconds until the public HTTPS certificate for a host name expires",
            labels=["host", "source"],
        )
        now = dt.datetime.now(dt.UTC)
        for served in self.store.all():
            family.add_metric([served.name, served.source], (served.not_after - now).total_seconds())
        yield family
