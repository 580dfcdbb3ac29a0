"""Loopback ports a test must name before something binds them (a server's --public-addr that
its peers or a balancer must be told first, a port nobody listens on).

A port the kernel gave to ``bind(("127.0.0.1", 0))`` and that was released is free only when
asked: it lies in the ephemeral range (``net.ipv4.ip_local_port_range``), from which the kernel
also picks the source port of every outgoing connection and every later ``bind`` to port 0.
With thousands of loopback connections in the suite, a Redis connection opened by the first of
three exit servers once took the port found for the third (CI, 2026-12-04: "address already in
use"). So the ports handed out here come from below (or above) that range, where the kernel
never picks on its own, are checked free by binding them, and are never handed out twice in
one process. Nothing fixed: the start is random, so two suites on one machine rarely meet.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

__all__ = ["free_port", "free_port_run", "outside_ephemeral"]

#: the lowest port used: below this, well-known and registered services live
FLOOR = 10_000
_issued: set[int] = set()
_random = random.SystemRandom()  # not the global one: hypothesis seeds that
_lock = threading.Lock()


def outside_ephemeral(
    source: Path = Path("/proc/sys/net/ipv4/ip_local_port_range"),
) -> tuple[int, int] | None:
    """The wider span of ports (first, last) outside the kernel's ephemeral range and at or
    above ``FLOOR``; None when there is none wide enough (then the kernel's choice is used)."""
    try:
        low, high = (int(part) for part in source.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    spans = [(FLOOR, low - 1), (high + 1, 65535)]
    first, last = max(spans, key=lambda span: span[1] - span[0])
    return (first, last) if last - first >= 1000 else None


def _bindable(port: int) -> bool:
    # SO_REUSEADDR, as the servers under test bind: a port whose old connections linger in
    # TIME_WAIT is free for a listener
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_run(count: int = 1) -> int:
    """The first of ``count`` consecutive loopback ports, free now, outside the ephemeral range,
    none handed out before in this process.

    Raises:
        RuntimeError: no such run found in 500 tries.
    """
    span = outside_ephemeral()
    with _lock:
        for _ in range(500):
            if span is None:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    base = int(sock.getsockname()[1])
                if base + count - 1 > 65535:
                    continue
            else:
                base = _random.randint(span[0], span[1] - count + 1)
            ports = range(base, base + count)
            if any(p in _issued for p in ports) or not all(_bindable(p) for p in ports):
                continue
            _issued.update(ports)
            return base
    raise RuntimeError(f"no run of {count} free loopback ports found")


def free_port() -> int:
    """One loopback port, free now, outside the ephemeral range, not handed out before."""
    return free_port_run(1)
