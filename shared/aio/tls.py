"""TLS contexts for the tunnel: TLS 1.2+ with AEAD suites only, verification always on."""

from __future__ import annotations

import ssl
from pathlib import Path

from ..errors import ConfigError

__all__ = ["AEAD_CIPHERS", "client_context", "server_context"]

#: TLS 1.2 suites allowed (TLS 1.3 suites are all AEAD).
AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """Server context from a PEM chain and key; with ``client_ca``, clients must present a
    certificate signed by it (mutual TLS).

    No TLS 1.3 session tickets: OpenSSL sends two after every handshake by default, and a
    tunnel client never resumes a session (asyncio has no API to offer one), so they were
    work for nothing: 40 us of the server's 280 us per handshake, 510 of 1,930 bytes on the
    wire, and 5.5 KiB kept by the client per session (docs/BENCHMARKS.md, round 13). The
    public HTTPS listener's contexts (exit_server/certstore.py) keep them: browsers resume.

    Raises:
        ConfigError: the files are missing or do not match.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(AEAD_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--tls-cert/--tls-key: cannot load {cert} / {key}: {exc}") from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--client-ca: cannot load {client_ca}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca_file: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Client context that verifies the server against the system store or ``ca_file``; with
    ``cert`` (and ``key``), it presents a client certificate (mutual TLS)."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ca-file: cannot load {ca_file}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(AEAD_CIPHERS)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert is not None:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--client-cert/--client-key: cannot load {cert} / {key}: {exc}") from None
    return ctx
