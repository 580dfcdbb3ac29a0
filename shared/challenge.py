"""Challenge authentication (``--auth challenge``): a tunnel that survives a TLS-inspecting
proxy without handing it a reusable secret. Sans-I/O; docs/PROTOCOL.md, "Challenge
authentication", is the specification.

Outside it, the bearer token travels in the upgrade request, so a proxy that decrypts TLS
reads it. With challenge authentication:

1. the client's upgrade request carries ``Backhaul-Auth: challenge-v1 id=ID, cnonce=CN``
   (no ``Authorization``; ID is the token's id, ``-`` for a shared token; CN 32 random bytes);
2. the exit server answers 101 with ``Backhaul-Auth: challenge-v1 snonce=SN, key=SPKI,
   sig=SIG``: SIG is the exit server's control key (the one ``--pin`` names) signing the
   transcript hash ``T = SHA-256(label, ID, CN, SN, SPKI)`` (each length-prefixed). The
   client checks SPKI against ``--pin`` and SIG against SPKI, and stops there on a mismatch:
   a substituted server gets nothing derived from the token;
3. the client's first WebSocket message is ``PROOF`` (``BHAUTH1`` and 32 bytes):
   ``ClientKey XOR HMAC(StoredKey, T)`` with ``ClientKey = HMAC(token, "backhaul client
   key")`` and ``StoredKey = SHA-256(ClientKey)`` (SCRAM's construction, RFC 5802 / 7677);
   the server, which keeps StoredKey only, recovers ClientKey and checks its hash;
4. the server's first message is ``OK`` (``BHAUTH1OK`` and ``HMAC(ServerKey, T)`` with
   ``ServerKey = HMAC(token, "backhaul server key")``): it proves the server holds the
   verifier too. Then the tunnel protocol starts (``Hello``) as with a bearer token.

A relaying proxy sees ID, nonces, the public key, the signature and PROOF: none of them lets
it log in (PROOF answers this SN only; a replay meets a new SN). Tokens are high-entropy
random strings, so no slow key derivation is needed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:  # cryptography is loaded only where a key is used (a bearer client never does)
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    SigningKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

__all__ = [
    "HEADER",
    "OK_PREFIX",
    "PROOF_PREFIX",
    "SCHEME",
    "Keys",
    "check_proof",
    "client_proof",
    "derive_keys",
    "format_header",
    "parse_header",
    "server_signature",
    "sign",
    "spki_of",
    "token_id_of",
    "transcript",
    "verify",
]

HEADER = "Backhaul-Auth"
SCHEME = "challenge-v1"
LABEL = b"backhaul challenge-v1"
PROOF_PREFIX = b"BHAUTH1 "
OK_PREFIX = b"BHAUTH1OK "
NONCE_BYTES = 32
SHARED_ID = "-"


@dataclass(frozen=True)
class Keys:
    """What a token yields: the client keeps ``client_key``; the server needs ``stored_key``
    and ``server_key`` only."""

    client_key: bytes
    stored_key: bytes
    server_key: bytes


def derive_keys(token: str) -> Keys:
    secret = token.encode()
    client_key = hmac.new(secret, b"backhaul client key", hashlib.sha256).digest()
    server_key = hmac.new(secret, b"backhaul server key", hashlib.sha256).digest()
    return Keys(client_key, hashlib.sha256(client_key).digest(), server_key)


_TOKEN_ID = re.compile(r"^bh_([0-9a-f]{12})_[A-Za-z0-9_-]{32,128}$")


def token_id_of(token: str) -> str:
    """The public id of a ``bh_<id>_<secret>`` token (exit_server/tokens.py), else ``-``."""
    match = _TOKEN_ID.match(token)
    return match.group(1) if match else SHARED_ID


def transcript(token_id: str, cnonce: bytes, snonce: bytes, spki: bytes) -> bytes:
    """``T``: SHA-256 over the label and each field with a 2-byte length prefix."""
    h = hashlib.sha256()
    for part in (LABEL, token_id.encode(), cnonce, snonce, spki):
        h.update(struct.pack("!H", len(part)))
        h.update(part)
    return h.digest()


def client_proof(keys: Keys, t: bytes) -> bytes:
    signature = hmac.new(keys.stored_key, t, hashlib.sha256).digest()
    return bytes(a ^ b for a, b in zip(keys.client_key, signature, strict=True))


def check_proof(stored_key: bytes, t: bytes, proof: bytes) -> bool:
    """Constant time in the proof's content."""
    if len(proof) != 32:
        return False
    signature = hmac.new(stored_key, t, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key)


def server_signature(server_key: bytes, t: bytes) -> bytes:
    return hmac.new(server_key, t, hashlib.sha256).digest()


def spki_of(key: SigningKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(key: SigningKey, t: bytes) -> bytes:
    """The control key's signature of ``T`` (ECDSA or RSA-PSS with SHA-256, or Ed25519)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(t, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(t, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH), hashes.SHA256())
    return key.sign(t)


def verify(spki: bytes, t: bytes, signature: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    try:
        public = serialization.load_der_public_key(spki)
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, t, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(
                signature, t, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH), hashes.SHA256()
            )
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, t)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None


def format_header(**fields: str | bytes) -> str:
    """``challenge-v1 name=value, ...`` (bytes values base64url without padding)."""
    items = [f"{k}={_b64(v) if isinstance(v, bytes) else v}" for k, v in fields.items()]
    return f"{SCHEME} " + ", ".join(items)


def parse_header(value: str, *, text: tuple[str, ...] = ("id",)) -> dict[str, str | bytes]:
    """The fields of a ``Backhaul-Auth`` value (those not in ``text`` decoded from base64url).

    Raises:
        ValueError: another scheme, or a malformed field.
    """
    scheme, _, rest = value.strip().partition(" ")
    if scheme != SCHEME:
        raise ValueError(f"not {SCHEME}: {scheme[:20]!r}")
    out: dict[str, str | bytes] = {}
    for item in rest.split(","):
        name, sep, raw = item.strip().partition("=")
        if not sep or not name.isalpha() or len(raw) > 2048:
            raise ValueError("malformed Backhaul-Auth field")
        try:
            out[name] = raw if name in text else _unb64(raw)
        except ValueError:
            raise ValueError(f"Backhaul-Auth {name}: not base64url") from None
    return out
