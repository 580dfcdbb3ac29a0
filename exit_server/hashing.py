"""Salted, slow secret hashes for everything the exit server stores: client tokens (``--tokens``),
basic-auth passwords and bearer tokens of public routes (``--access``).

Format (PHC-like, one line, no secret in it): ``scrypt$ln=14,r=8,p=1$<salt b64>$<hash b64>``.
scrypt is in the standard library (``hashlib.scrypt``), memory-hard, and its cost is stored with
each hash so it can be raised later without invalidating old entries. Verification compares the
derived bytes with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

__all__ = ["DEFAULT_LN", "HashFormatError", "hash_secret", "verify_secret", "waste_time"]

#: log2 of scrypt's N: 2**14 with r=8 costs 16 MiB and about 0.1 s on one core.
DEFAULT_LN = 14
_R = 8
_P = 1
_DKLEN = 32
_MAXMEM = 256 << 20


class HashFormatError(ValueError):
    """A stored hash is not in the ``scrypt$...`` format (the message never holds the hash)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _derive(secret: str, salt: bytes, ln: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=1 << ln, r=r, p=p, dklen=_DKLEN, maxmem=_MAXMEM)


def hash_secret(secret: str, ln: int = DEFAULT_LN) -> str:
    """Hash ``secret`` with a fresh 16-byte salt.

    Raises:
        ValueError: empty secret.
    """
    if not secret:
        raise ValueError("empty secret")
    salt = os.urandom(16)
    return f"scrypt$ln={ln},r={_R},p={_P}${_b64(salt)}${_b64(_derive(secret, salt, ln, _R, _P))}"


def parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    """Split a stored hash into (ln, r, p, salt, digest).

    Raises:
        HashFormatError: not a hash this module wrote.
    """
    try:
        scheme, params, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            raise ValueError
        values = dict(item.split("=", 1) for item in params.split(","))
        ln, r, p = int(values["ln"]), int(values["r"]), int(values["p"])
        if not (1 <= ln <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
            raise ValueError
        return ln, r, p, _unb64(salt), _unb64(digest)
    except (ValueError, KeyError):
        raise HashFormatError("expected scrypt$ln=N,r=R,p=P$SALT$HASH") from None


def verify_secret(secret: str, encoded: str) -> bool:
    """True when ``secret`` matches ``encoded`` (constant-time comparison of the derived bytes).

    Raises:
        HashFormatError: ``encoded`` is malformed.
    """
    ln, r, p, salt, digest = parse_hash(encoded)
    return hmac.compare_digest(_derive(secret, salt, ln, r, p), digest)


_DUMMY_SALT = os.urandom(16)


def waste_time(secret: str, ln: int = DEFAULT_LN) -> None:
    """Spend what a verification would, for an unknown id (so timing does not tell ids apart)."""
    _derive(secret or "-", _DUMMY_SALT, ln, _R, _P)
