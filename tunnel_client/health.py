"""Active health checks of the local upstreams: a route whose upstream is unhealthy is withdrawn
from the exit servers (a Routes control message), so they send its traffic to other replicas
or answer 503 at once; it comes back after ``rise`` good checks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import Upstream

if TYPE_CHECKING:  # aiohttp is imported only when health checks are configured
    import aiohttp

__all__ = ["HealthChecker", "parse_health_path"]

log = logging.getLogger(__name__)


def parse_health_path(spec: str) -> tuple[str, str]:
    """Parse ``HOST[/PREFIX]=PATH`` into (route key, path).

    Raises:
        ValueError: malformed spec.
    """
    key, sep, path = spec.partition("=")
    if not sep or not key or not path.startswith("/"):
        raise ValueError(f"expected HOST[/PREFIX]=/PATH, got {spec!r}")
    host, slash, prefix = key.partition("/")
    return f"{host.lower()}{'/' + prefix.rstrip('/') if slash and prefix.strip('/') else ''}", path


def route_key(upstream: Upstream) -> str:
    return upstream.host + ("" if upstream.path_prefix == "/" else upstream.path_prefix)


@dataclass
class _State:
    upstream: Upstream
    path: str
    healthy: bool = True
    streak: int = 0  # consecutive results contradicting the current state


class HealthChecker:
    """Checks every upstream that has a health path; the others always count as healthy.

    Args:
        upstreams: the configured routes.
        paths: route key (``HOST[/PREFIX]``) -> health path.
        interval, timeout: seconds between checks, seconds per check.
        rise, fall: consecutive good/bad results needed to change state.
        on_change: called after any route changed state.
    """

    def __init__(
        self,
        upstreams: list[Upstream],
        paths: dict[str, str],
        interval: float,
        timeout: float,
        rise: int,
        fall: int,
        on_change: Callable[[], None],
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self.rise = rise
        self.fall = fall
        self.on_change = on_change
        self._states = {route_key(u): _State(u, paths[route_key(u)]) for u in upstreams if route_key(u) in paths}

    def add(self, upstream: Upstream, path: str) -> None:
        self._states[route_key(upstream)] = _State(upstream, path)

    def healthy(self, upstream: Upstream) -> bool:
        state = self._states.get(route_key(upstream))
        return state is None or state.healthy

    async def _probe(self, http: aiohttp.ClientSession, state: _State) -> bool:
        import aiohttp  # loaded already: run() and initial() made the session

        url = state.upstream.origin + state.upstream.base_path + state.path
        try:
            async with http.get(url, allow_redirects=False) as resp:
                await resp.read()
                return resp.status < 400
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def check_all(self, http: aiohttp.ClientSession, first: bool = False) -> None:
        """One round of checks. The first round sets each state directly."""
        if not self._states:
            return
        results = await asyncio.gather(*(self._probe(http, s) for s in self._states.values()))
        changed = False
        for (key, state), good in zip(self._states.items(), results, strict=True):
            if first:
                if good != state.healthy:
                    state.healthy, changed = good, True
                    log.warning("health: %s starts %s", key, "healthy" if good else "UNHEALTHY")
                continue
            if good == state.healthy:
                state.streak = 0
                continue
            state.streak += 1
            if state.streak >= (self.rise if good else self.fall):
                state.healthy, state.streak, changed = good, 0, True
                log.warning(
                    "health: %s is now %s; %s the route",
                    key,
                    "healthy" if good else "UNHEALTHY",
                    "announcing" if good else "withdrawing",
                )
        if changed:
            self.on_change()

    async def run(self, stop: asyncio.Event) -> None:
        """Check every ``interval`` until ``stop`` is set."""
        if not self._states:
            return
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()) as http:
            while not stop.is_set():
                try:
                    async with asyncio.timeout(self.interval):
                        await stop.wait()
                    return
                except TimeoutError:
                    pass
                await self.check_all(http)

    async def initial(self) -> None:
        """The first round, before any session registers (so a dead upstream is not announced)."""
        if not self._states:
            return
        import aiohttp

        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout), cookie_jar=aiohttp.DummyCookieJar()
        ) as http:
            await self.check_all(http, first=True)
