"""What the public listeners answer while ACME orders are pending: HTTP-01 key authorizations
and TLS-ALPN-01 validation contexts.

Kept apart from exit_server/acme.py so that the listeners, which look up an answer on every
``/.well-known/acme-challenge/`` request, do not load the ACME client (certbot's ``acme``,
requests, josepy: about 80 ms and several MiB of every start) on a server run without
``--acme-dir``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

__all__ = ["ACME_TLS_ALPN", "CHALLENGE_PATH", "Challenges", "is_challenge_path"]

#: The ALPN protocol of TLS-ALPN-01 validation handshakes (RFC 8737 section 6.2).
ACME_TLS_ALPN = "acme-tls/1"
#: Where HTTP-01 answers live (RFC 8555 section 8.3).
CHALLENGE_PATH = "/.well-known/acme-challenge/"


@dataclass
class Challenges:
    """The answers the listeners give while orders are pending."""

    http: dict[str, tuple[str, str]] = field(default_factory=dict)  # token -> (name, key authorization)
    alpn: dict[str, ssl.SSLContext] = field(default_factory=dict)  # name -> validation context
    alpn_keys: dict[str, str] = field(default_factory=dict)  # name -> the key authorization it answers

    def forget(self, name: str, tokens: list[str], alpn: list[str]) -> None:
        """Drop the answers one order placed for ``name`` (its HTTP-01 tokens, its TLS-ALPN-01
        key authorizations) and nothing else: a later order's answers for the same name stay.
        Single-item dict operations only, so the issuer's worker thread may call it."""
        for token in tokens:
            self.http.pop(token, None)
        for key in alpn:
            if self.alpn_keys.get(name) == key:
                self.alpn.pop(name, None)
                self.alpn_keys.pop(name, None)

    def http_answer(self, host: str, path: str) -> str | None:
        """The key authorization for ``GET /.well-known/acme-challenge/TOKEN`` on ``host``, or
        None (not a pending token, or another Host: DNS rebinding gets nothing)."""
        if not path.startswith(CHALLENGE_PATH):
            return None
        entry = self.http.get(path[len(CHALLENGE_PATH) :])
        if entry is None or entry[0] != host:
            return None
        return entry[1]


def is_challenge_path(path: str) -> bool:
    return path.startswith(CHALLENGE_PATH)
