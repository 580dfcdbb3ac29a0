"""Host and path matching, used by the exit server's route table and the client's upstream
table (docs/PROTOCOL.md section 11). Pure data structures, no I/O.

Order: exact host, then the longest matching ``*.suffix`` wildcard, then ``default``; within
the chosen host, the longest path prefix that matches on a segment boundary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = ["HOST_PATTERN", "RouteTable", "normalize_host", "path_matches"]

#: A lower-case host name, or ``*.`` and a domain (a wildcard covers one label).
HOST_PATTERN = r"^(\*\.)?[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))*$"

T = TypeVar("T")


def normalize_host(host: str) -> str:
    """Lower-case a Host header value and strip the port and a trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def path_matches(prefix: str, path: str) -> bool:
    """True when ``path`` lies under ``prefix`` on a segment boundary (``/api`` matches
    ``/api`` and ``/api/x`` but not ``/apix``)."""
    if prefix == "/" or path == prefix:
        return True
    if not path.startswith(prefix):
        return False
    return prefix.endswith("/") or path[len(prefix)] == "/"


class RouteTable(Generic[T]):
    """Maps (host pattern, path prefix) to values; several values may share a key."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, list[T]]] = {}
        self._wild: dict[str, dict[str, list[T]]] = {}
        self._default: dict[str, list[T]] = {}

    def _bucket(self, host: str, create: bool) -> dict[str, list[T]] | None:
        host = host.lower()
        if host == "default":
            return self._default
        table, key = (self._wild, host[2:]) if host.startswith("*.") else (self._exact, host)
        if create:
            return table.setdefault(key, {})
        return table.get(key)

    def add(self, host: str, prefix: str, value: T) -> None:
        """Add ``value`` under ``host`` (exact, ``*.suffix`` or ``default``) and ``prefix``."""
        bucket = self._bucket(host, True)
        assert bucket is not None
        bucket.setdefault(prefix, []).append(value)

    def remove(self, host: str, prefix: str, value: T) -> None:
        """Remove one value; empty keys disappear."""
        bucket = self._bucket(host, False)
        if bucket is None or prefix not in bucket:
            return
        values = bucket[prefix]
        if value in values:
            values.remove(value)
        if not values:
            del bucket[prefix]
            if not bucket and host != "default":
                table, key = (self._wild, host[2:]) if host.startswith("*.") else (self._exact, host)
                table.pop(key.lower(), None)

    def holders(self, host: str, prefix: str) -> list[T]:
        """Values registered exactly under (host, prefix)."""
        bucket = self._bucket(host, False)
        return list(bucket.get(prefix, [])) if bucket else []

    def host_holders(self, host: str) -> list[T]:
        """Values registered under ``host`` (exact, ``*.suffix`` or ``default``), any prefix."""
        bucket = self._bucket(host, False)
        return [value for values in bucket.values() for value in values] if bucket else []

    def lookup(self, host: str, path: str) -> list[T]:
        """The values of the best match for a normalized host and a path, or []."""
        return self.match(host, path)[1]

    def match(self, host: str, path: str) -> tuple[str, list[T]]:
        """Like :meth:`lookup`, also naming the host pattern that matched (exact host,
        ``*.suffix`` or ``default``; "" when nothing did): a bounded label for metrics."""
        pattern = host
        bucket = self._exact.get(host)
        if bucket is None and self._wild:
            labels = host.split(".")
            for i in range(1, len(labels)):  # longest suffix first
                suffix = ".".join(labels[i:])
                bucket = self._wild.get(suffix)
                if bucket is not None:
                    pattern = "*." + suffix
                    break
        if bucket is None:
            bucket, pattern = self._default, "default"
        if not bucket:
            return "", []
        values = _best_prefix(bucket, path)
        return (pattern, values) if values else ("", [])

    def keys(self) -> Iterable[tuple[str, str]]:
        """Every (host pattern, prefix) that has values."""
        for host, bucket in self._exact.items():
            for prefix in bucket:
                yield host, prefix
        for suffix, bucket in self._wild.items():
            for prefix in bucket:
                yield "*." + suffix, prefix
        for prefix in self._default:
            yield "default", prefix


def _best_prefix(bucket: dict[str, list[T]], path: str) -> list[T]:
    if len(bucket) == 1:
        ((prefix, values),) = bucket.items()
        return values if path_matches(prefix, path) else []
    best: str | None = None
    for prefix in bucket:
        if path_matches(prefix, path) and (best is None or len(prefix) > len(best)):
            best = prefix
    return bucket[best] if best is not None else []
