"""Public-key pinning of the exit server (``tunnel-client run --pin sha256:BASE64``).

A pin is the SHA-256 of the server certificate's SubjectPublicKeyInfo (DER), base64-encoded, as
in HPKP. It is checked *in addition to* normal verification (CA chain and hostname), right after
the TLS handshake and before websockets writes the HTTP upgrade request, so the token is never
sent to a server whose key is not pinned: websockets' ``create_connection`` hook gives us the
connection object, whose ``handshake()`` we check first. Give several pins to rotate keys.

Compute a pin from a certificate::

    openssl x509 -in server.pem -pubkey -noout | openssl pkey -pubin -outform der \\
        | openssl dgst -sha256 -binary | base64
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

from websockets.exceptions import InvalidHandshake

from shared.aio.wsclient import TunnelClientConnection

__all__ = ["PinMismatch", "parse_pin", "pinned_connection", "spki_pin"]


class PinMismatch(InvalidHandshake):
    """The server's public key matches no ``--pin``: nothing was sent to it."""


def parse_pin(value: str) -> bytes:
    """``sha256:BASE64`` -> the 32-byte digest.

    Raises:
        ValueError: not of that form.
    """
    algo, sep, encoded = value.strip().partition(":")
    if not sep or algo.lower() != "sha256":
        raise ValueError(f"expected sha256:BASE64, got {value!r}")
    try:
        digest = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"bad base64 in pin {value!r}") from None
    if len(digest) != 32:
        raise ValueError(f"a sha256 pin is 32 bytes, {value!r} has {len(digest)}")
    return digest


def spki_digest(der_cert: bytes) -> bytes:
    """SHA-256 of a DER certificate's SubjectPublicKeyInfo."""
    from cryptography import x509  # only with --pin: a client without pins never loads it
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = x509.load_der_x509_certificate(der_cert).public_key()
    return hashlib.sha256(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()


def spki_pin(der_cert: bytes) -> str:
    """The ``sha256:BASE64`` pin of a DER certificate."""
    return "sha256:" + base64.b64encode(spki_digest(der_cert)).decode()


def pinned_connection(pins: frozenset[bytes]) -> type[TunnelClientConnection]:
    """A websockets connection class that refuses, before any HTTP byte, a server whose leaf
    certificate's public key is not in ``pins``."""

    class PinnedClientConnection(TunnelClientConnection):
        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            ssl_object = self.transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if der is None or spki_digest(der) not in pins:
                raise PinMismatch("the server's public key matches no --pin (nothing was sent)")
            await super().handshake(*args, **kwargs)

    return PinnedClientConnection
