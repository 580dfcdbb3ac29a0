"""A host name with an IPv4 and an IPv6 loopback address, for listeners given a name: the
hosts file here maps localhost to 127.0.0.1 only, so the name is made by answering
``socket.getaddrinfo`` for it (every other name resolves as the system does). What binds and
connects is real; only the name's lookup is answered here."""

from __future__ import annotations

import socket
from typing import Any

import pytest

__all__ = ["DUAL_NAME", "dual_name", "needs_ipv6"]

DUAL_NAME = "dual.test"
_REAL = socket.getaddrinfo


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")


def dual_name(monkeypatch: pytest.MonkeyPatch) -> str:
    """:data:`DUAL_NAME`, resolving to 127.0.0.1 then ::1 for the rest of the test."""

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host != DUAL_NAME:
            return _REAL(host, port, *args, **kwargs)
        return _REAL("127.0.0.1", port, *args, **kwargs) + _REAL("::1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return DUAL_NAME
