"""Fleet state on Redis (``--state redis://...``; Valkey compatible): the credentials every exit
server of a fleet shares, so that a token added or revoked through one is in force on all.

Layout (``PREFIX`` is ``backhaul:``):

* ``PREFIX tokens``: the text of a tokens file (exit_server/tokens.py, the same TOML a
  ``--tokens`` file holds: hashes and grants, never a token);
* ``PREFIX tokens:version``: an integer, incremented by every change;
* ``PREFIX access`` and ``PREFIX access:version``: the text of an ``--access`` file (access
  rules for public hostnames, exit_server/access.py) and its version
  (``exit-server access push --state``);
* channel ``PREFIX changes``: the new version is published after every change.

Changes go through :func:`update` (``exit-server token ... --state``): a compare-and-set on the
version (WATCH/MULTI), so two operators never overwrite each other, acknowledged only once Redis
has it. Each exit server (:class:`StateFollower`) loads the state at start, then follows the
channel and re-reads the version every ``resync`` seconds, so a change reaches it within a
second and a lost message within one resync. **Redis is not in the request path**: requests
and registrations are decided from memory; while Redis is unreachable a server keeps the last
state, accepts the clients it knows, says so in one log line and ``backhaul_state_store_up 0``,
and reconnects with backoff; changes are refused by the CLI with a clear error meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import TunnelError

from .tokens import TokenEntry, TokenRegistry, parse_entries, render_entries

if TYPE_CHECKING:
    from .access import AccessRules

__all__ = ["PREFIX", "StateFollower", "StateUnavailable", "push_access", "read_access", "read_state", "update"]

log = logging.getLogger(__name__)

PREFIX = "backhaul:"
TOKENS = PREFIX + "tokens"
VERSION = PREFIX + "tokens:version"
CHANNEL = PREFIX + "changes"
ACCESS = PREFIX + "access"
ACCESS_VERSION = PREFIX + "access:version"


class StateUnavailable(TunnelError):
    """The state store could not be reached or did not answer (nothing was changed)."""


def connect(
    url: str,
    password: str | None,
    ca_file: Path | None = None,
    *,
    aio: bool = False,
    read_timeout: float | None = 5.0,
    connect_timeout: float = 5.0,
) -> Any:
    """A redis-py client for the store (``aio``: its asyncio one). A ``rediss://`` store's
    certificate is verified against ``ca_file`` (``--state-ca-file``), else the system's CAs."""
    import redis
    import redis.asyncio

    kwargs: dict[str, Any] = {
        "password": password,
        "socket_timeout": read_timeout,
        "socket_connect_timeout": connect_timeout,
    }
    if url.startswith("rediss://") and ca_file is not None:
        kwargs["ssl_ca_certs"] = str(ca_file)
    return (redis.asyncio.Redis if aio else redis.Redis).from_url(url, **kwargs)


def _read(url: str, password: str | None, ca_file: Path | None, key: str, version_key: str) -> tuple[str | None, int]:
    """One document's text (None: never stored) and version.

    Raises:
        StateUnavailable: Redis cannot be reached.
    """
    import redis

    client = connect(url, password, ca_file)
    try:
        text, version = client.mget(key, version_key)
    except redis.RedisError as exc:
        raise _unavailable(url, exc) from None
    finally:
        client.close()
    return (text.decode() if text else None), int(version or 0)


def read_state(url: str, password: str | None, ca_file: Path | None = None) -> tuple[dict[str, TokenEntry], int]:
    """The entries and version in the store (empty, 0 when nothing was stored yet).

    Raises:
        StateUnavailable: Redis cannot be reached.
    """
    text, version = _read(url, password, ca_file, TOKENS, VERSION)
    return (parse_entries(text) if text else {}), version


def update(
    url: str,
    password: str | None,
    change: Callable[[dict[str, TokenEntry]], dict[str, TokenEntry]],
    ca_file: Path | None = None,
) -> int:
    """Apply ``change`` to the stored entries atomically and publish it; returns the new
    version. A concurrent change makes it re-read and apply ``change`` again (at most 5 times).

    Raises:
        StateUnavailable: Redis cannot be reached, or kept changing under us.
        ConfigError: ``change`` refused (it raises it), or the stored text is invalid.
    """
    import redis

    client = connect(url, password, ca_file)
    try:
        for _ in range(5):
            with client.pipeline() as pipe:
                try:
                    pipe.watch(TOKENS, VERSION)
                    text, version = pipe.mget(TOKENS, VERSION)
                    entries = change(parse_entries(text.decode()) if text else {})
                    new_version = int(version or 0) + 1
                    pipe.multi()
                    pipe.set(TOKENS, render_entries(entries))
                    pipe.set(VERSION, new_version)
                    pipe.publish(CHANNEL, str(new_version))
                    pipe.execute()
                    return new_version
                except redis.WatchError:
                    continue
        raise StateUnavailable("the state store kept changing during the update; nothing changed, try again")
    except redis.RedisError as exc:
        raise _unavailable(url, exc) from None
    finally:
        client.close()


def read_access(url: str, password: str | None, ca_file: Path | None = None) -> tuple[str | None, int]:
    """The access rules' text in the store (None, 0: none pushed yet).

    Raises:
        StateUnavailable: Redis cannot be reached.
    """
    return _read(url, password, ca_file, ACCESS, ACCESS_VERSION)


def push_access(url: str, password: str | None, text: str, ca_file: Path | None = None) -> int:
    """Replace the fleet's access rules with ``text`` (validated first) and publish; returns
    the new version.

    Raises:
        ConfigError: ``text`` is not a valid access file (nothing changed).
        StateUnavailable: Redis cannot be reached.
    """
    import redis

    from .access import parse_sites

    parse_sites(text, "the access file")
    client = connect(url, password, ca_file)
    try:
        with client.pipeline() as pipe:  # MULTI: the text and its version together
            pipe.set(ACCESS, text)
            pipe.incr(ACCESS_VERSION)
            _, version = pipe.execute()
        client.publish(CHANNEL, f"access:{version}")
        return int(version)
    except redis.RedisError as exc:
        raise _unavailable(url, exc) from None
    finally:
        client.close()


def _unavailable(url: str, exc: Exception) -> StateUnavailable:
    """One line for a failed store command: a refused password is not "unreachable"."""
    import redis

    if isinstance(exc, redis.AuthenticationError) or "WRONGPASS" in str(exc) or "NOAUTH" in str(exc):
        return StateUnavailable(
            f"state store {redact(url)} refused the password ({exc}): check --state-password-file or "
            "BACKHAUL_STATE_PASSWORD (nothing changed)"
        )
    return StateUnavailable(f"state store {redact(url)} unreachable: {exc} (nothing changed)")


def redact(url: str) -> str:
    """``url`` without any userinfo (a password never reaches a log line)."""
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rpartition("@")[2] if sep else url


class StateFollower:
    """Keeps one exit server's credentials in step with the store.

    Args:
        on_change: called after the credentials changed (the server closes revoked sessions).
        on_up: called with True/False when the store becomes reachable/unreachable (a metric).
    """

    def __init__(
        self,
        url: str,
        password: str | None,
        registry: TokenRegistry,
        on_change: Callable[[], None],
        on_up: Callable[[bool], None] | None = None,
        resync: float = 5.0,
        ca_file: Path | None = None,
    ) -> None:
        self.url = url
        self.password = password
        self.ca_file = ca_file
        self.registry = registry
        self.on_change = on_change
        self.on_up = on_up
        self.resync = resync
        self.version = -1
        self.up = False
        self.syncs = 0
        self._behind = -1  # the store's version while it is behind ours (logged once)
        self._client: Any = None
        #: the access rules that follow the store (``PREFIX access``), and their version
        self.access: AccessRules | None = None
        self.access_version = 0

    def _connect(self) -> Any:
        return connect(self.url, self.password, self.ca_file, aio=True)

    async def start(self, timeout: float = 10.0) -> None:
        """Load the state before serving (retried for ``timeout`` seconds).

        Raises:
            StateUnavailable: no answer within ``timeout``.
        """
        import redis

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.2
        while True:
            try:
                await self.sync()
                return
            except (redis.RedisError, OSError) as exc:
                if loop.time() + delay > deadline:
                    raise StateUnavailable(
                        f"--state: {redact(self.url)} unreachable at start: {exc}; the credentials live there"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def sync(self) -> bool:
        """Read the version (and the text when it moved); True when the credentials changed."""
        if self._client is None:
            self._client = self._connect()
        text, version, access_version = await self._client.mget(TOKENS, VERSION, ACCESS_VERSION)
        self._set_up(True)
        self.syncs += 1
        if self.access is not None and int(access_version or 0) > self.access_version:
            await self._sync_access(int(access_version))
        version = int(version or 0)
        if version == self.version:
            return False
        if 0 <= version < self.version:
            # The store went back (restarted without persistence, or a failover that lost
            # writes): applying it would revoke every client added since. Keep what we have.
            if self._behind != version:
                log.error(
                    "state: %s is at version %d, behind this server's %d (restarted empty or lost writes?): "
                    "keeping version %d; restore the store's data",
                    redact(self.url),
                    version,
                    self.version,
                    self.version,
                )
            self._behind = version
            return False
        self._behind = -1
        changed = self.registry.load_text(text.decode() if text else "[clients]\n", strict=self.version < 0)
        if self.version >= 0:
            log.info("state: credentials version %d from %s", version, redact(self.url))
        self.version = version
        if changed:
            self.on_change()
        return changed

    async def _sync_access(self, version: int) -> None:
        assert self.access is not None
        text = await self._client.get(ACCESS)
        if text is None:
            return
        first = self.access_version == 0
        self.access.load_text(text.decode(), strict=first)  # invalid at start: refuse to start open
        self.access_version = version
        if not first:
            log.info("state: access rules version %d from %s", version, redact(self.url))

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            if self.on_up is not None:
                self.on_up(up)
            if up and self.version >= 0:
                log.info("state: %s reachable again; resynchronising", redact(self.url))

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the change channel and resync periodically until ``stop``."""
        import redis

        delay = 0.5
        while not stop.is_set():
            pubsub = None
            try:
                if self._client is None:
                    self._client = self._connect()
                pubsub = self._client.pubsub()
                await pubsub.subscribe(CHANNEL)
                await self.sync()  # anything missed while subscribing
                delay = 0.5
                while not stop.is_set():
                    # a change message, or the resync period passed: read the version either way
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.resync)
                    await self.sync()
            except (TimeoutError, redis.RedisError, OSError) as exc:
                if self.up:
                    log.error(
                        "state: %s unreachable (%s): serving with credentials version %d; changes wait for it",
                        redact(self.url),
                        exc,
                        self.version,
                    )
                self._set_up(False)
                client, self._client = self._client, None
                if client is not None:
                    await _quiet_close(client)
                try:
                    async with asyncio.timeout(delay * (0.5 + random.random())):
                        await stop.wait()
                except TimeoutError:
                    pass
                delay = min(delay * 2, 5.0)
            finally:
                if pubsub is not None:
                    await _quiet_close(pubsub)

    async def close(self) -> None:
        if self._client is not None:
            await _quiet_close(self._client)
            self._client = None


async def _quiet_close(thing: Any) -> None:
    try:
        closer = getattr(thing, "aclose", None) or thing.close
        result = closer()
        if asyncio.iscoroutine(result):
            await result
    except Exception:  # noqa: BLE001 (closing a broken connection: nothing to report)
        pass
