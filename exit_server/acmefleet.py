"""ACME for a fleet (``--state redis://`` with ``--acme-dir``): one account, one order per
hostname, every server serving the result.

Layout in the store (``PREFIX`` is ``backhaul:``):

* ``PREFIX acme:account-key``: the account key (PEM), made by the first server (SET NX);
* ``PREFIX acme:accounts``: a hash, directory URL -> account URL;
* ``PREFIX acme:cert:NAME``: a hash with ``chain`` and ``key`` (PEM) of NAME's certificate;
* ``PREFIX acme:lock:NAME``: held (SET NX PX) by the server ordering NAME; it expires by itself
  if that server dies (:data:`LOCK_TTL`);
* channel ``PREFIX acme``: JSON messages: ``{"kind": "http", "token", "name", "validation"}`` and
  ``{"kind": "alpn", "name", "validation"}`` (a challenge answer every server must give, since
  the CA's validation may reach any of them through the balancer), ``{"kind": "done", "name",
  "tokens", "alpn"}`` (drop exactly those answers, published before the lock is released),
  ``{"kind": "cert", "name"}`` (a new certificate: load and serve it);
* ``PREFIX acme:ack:ID``: a set of server ids that hold challenge answer ID in memory.

The ordering server publishes a challenge answer, waits until as many servers as received the
message have acknowledged it (at most :data:`ACK_WAIT`), and only then tells the CA to validate.
The lock is checked again after it is taken: a certificate a peer stored meanwhile (and not due
for renewal) is served instead of ordering another. Each server keeps ``--acme-dir`` as a local
copy of what it serves. The request path never reads Redis: challenge answers and certificates
are pushed into memory.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.errors import ConfigError

from .acme import AcmeFiles, _pem, renew_at
from .state import PREFIX, StateUnavailable, connect, redact

__all__ = ["ACK_WAIT", "CHANNEL", "LOCK_TTL", "FleetAcmeFiles"]

log = logging.getLogger(__name__)

CHANNEL = PREFIX + "acme"
ACCOUNT_KEY = PREFIX + "acme:account-key"
ACCOUNTS = PREFIX + "acme:accounts"
CERT = PREFIX + "acme:cert:"
LOCK = PREFIX + "acme:lock:"
ACK = PREFIX + "acme:ack:"
#: How long an order may hold its name's lock (the issuer's order deadline plus margin).
LOCK_TTL = 600.0
#: Longest wait for every server to hold a challenge answer before the CA is asked to validate.
ACK_WAIT = 5.0

_UNLOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class FleetAcmeFiles(AcmeFiles):
    """:class:`AcmeFiles` whose truth is the fleet's store; ``root`` keeps a local copy.

    The blocking methods run in the issuer's worker thread (or once at start).
    """

    fleet = True

    def __init__(self, root: Path, url: str, password: str | None, server_id: str, ca_file: Path | None = None) -> None:
        super().__init__(root)
        self.url = url
        self.password = password
        self.ca_file = ca_file
        self.server_id = server_id
        self._sync: Any = None

    # ------------------------------------------------------------------ blocking (worker thread)

    def _client(self) -> Any:
        if self._sync is None:
            self._sync = connect(self.url, self.password, self.ca_file)
        return self._sync

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        import redis

        try:
            return fn(self._client())
        except redis.RedisError as exc:
            raise StateUnavailable(f"acme: state store {redact(self.url)} unreachable ({what}): {exc}") from None

    def account_key(self) -> ec.EllipticCurvePrivateKey:
        pem = self._call("account key", lambda c: c.get(ACCOUNT_KEY))
        if pem is None:
            # the first server of the fleet: its own key (made now if it has none) for everyone
            local = super().account_key()
            self._call("account key", lambda c: c.set(ACCOUNT_KEY, _pem(local), nx=True))
            pem = self._call("account key", lambda c: c.get(ACCOUNT_KEY))
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except ValueError as exc:
            raise ConfigError(f"--state: the stored ACME account key cannot be read: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("--state: the stored ACME account key is not an EC key")
        return key

    def account_url(self, directory: str) -> str | None:
        url = self._call("account", lambda c: c.hget(ACCOUNTS, directory))
        return url.decode() if url else None

    def save_account_url(self, directory: str, url: str) -> None:
        self._call("account", lambda c: c.hset(ACCOUNTS, directory, url))

    def save_cert(self, name: str, chain_pem: bytes, key_pem: bytes) -> None:
        """Store, then copy locally, then tell the fleet (every server serves it)."""

        def store(c: Any) -> None:
            pipe = c.pipeline()
            pipe.hset(CERT + name, mapping={"chain": chain_pem, "key": key_pem})
            pipe.publish(CHANNEL, json.dumps({"kind": "cert", "name": name}))
            pipe.execute()

        self._call("certificate", store)
        super().save_cert(name, chain_pem, key_pem)

    def fetch(self, name: str) -> bool:
        """Copy NAME's stored certificate into the local directory (False: none stored)."""
        got = self._call("certificate", lambda c: c.hmget(CERT + name, "chain", "key"))
        if not got or got[0] is None or got[1] is None:
            return False
        chain, key = self.paths(name)
        if chain.exists() and key.exists() and chain.read_bytes() == got[0] and key.read_bytes() == got[1]:
            return True
        super().save_cert(name, got[0], got[1])
        return True

    def stored(self) -> list[str]:
        """The fleet's certificates (copied locally first)."""
        names = sorted(
            n.decode()[len(CERT) :] for n in self._call("certificates", lambda c: list(c.scan_iter(CERT + "*")))
        )
        return [name for name in names if self.fetch(name)]

    def fresh(self, name: str, now: float) -> bool:
        """A stored certificate for NAME that is not due for renewal (a peer's order finished
        while we waited for the lock): copied locally, served instead of ordering."""
        if not self.fetch(name):
            return False
        chain, _ = self.paths(name)
        try:
            cert = x509.load_pem_x509_certificates(chain.read_bytes())[0]
        except (OSError, ValueError):
            return False
        due = renew_at(cert.not_valid_before_utc, cert.not_valid_after_utc)
        return due > now

    def lock(self, name: str) -> str | None:
        """Take NAME's order lock; its value (to release it), or None: a peer holds it."""
        value = f"{self.server_id}:{secrets.token_hex(8)}"
        got = self._call("lock", lambda c: c.set(LOCK + name, value, nx=True, px=int(LOCK_TTL * 1000)))
        return value if got else None

    def unlock(self, name: str, value: str) -> None:
        try:
            self._call("lock", lambda c: c.eval(_UNLOCK, 1, LOCK + name, value))
        except StateUnavailable as exc:  # it expires by itself
            log.warning("%s; the lock on %s expires within %.0fs", exc, name, LOCK_TTL)

    def share(self, message: dict[str, str]) -> None:
        """Publish a challenge answer and wait until every server that received it holds it."""
        ident = secrets.token_hex(8)
        body = json.dumps({**message, "id": ident})
        receivers = int(self._call("challenge", lambda c: c.publish(CHANNEL, body)))
        deadline = time.monotonic() + ACK_WAIT
        acked = 0
        while time.monotonic() < deadline:
            acked = int(self._call("challenge", lambda c: c.scard(ACK + ident)))
            if acked >= receivers:
                break
            time.sleep(0.01)
        else:
            log.warning(
                "acme: %d of %d servers confirmed the %s challenge answer for %s within %.0fs; validating anyway",
                acked,
                receivers,
                message["kind"],
                message["name"],
                ACK_WAIT,
            )
        self._call("challenge", lambda c: c.delete(ACK + ident))

    def withdraw(self, name: str, tokens: list[str], alpn: list[str]) -> None:
        """Tell every server to drop exactly these answers (a later order's stay)."""
        message = json.dumps({"kind": "done", "name": name, "tokens": tokens, "alpn": alpn})
        try:
            self._call("challenge", lambda c: c.publish(CHANNEL, message))
        except StateUnavailable:
            pass  # peers drop stale answers at their next order for the name

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    # ------------------------------------------------------------------ the follower (event loop)

    async def follow(self, on_message: Callable[[dict[str, Any]], Any], stop: asyncio.Event) -> None:
        """Deliver the fleet's ACME messages to ``on_message`` (acknowledging challenge answers
        once it returned) until ``stop``; reconnect with backoff when Redis is lost."""
        import redis

        delay = 0.5
        while not stop.is_set():
            client = connect(self.url, self.password, self.ca_file, aio=True, read_timeout=None)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                delay = 0.5
                on_message({"kind": "resync"})  # anything stored while we were not listening
                while not stop.is_set():
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None:
                        continue
                    try:
                        data = json.loads(msg["data"])
                    except (TypeError, ValueError):
                        continue
                    if not isinstance(data, dict):
                        continue
                    result = on_message(data)
                    if asyncio.iscoroutine(result):
                        await result
                    if data.get("id") and data.get("kind") in ("http", "alpn"):
                        await client.sadd(ACK + str(data["id"]), self.server_id)
                        await client.expire(ACK + str(data["id"]), 60)
            except (TimeoutError, redis.RedisError, OSError) as exc:
                log.warning("acme: fleet channel on %s lost (%s); reconnecting", redact(self.url), exc)
                try:
                    async with asyncio.timeout(delay * (0.5 + random.random())):
                        await stop.wait()
                except TimeoutError:
                    pass
                delay = min(delay * 2, 5.0)
            finally:
                for thing in (pubsub, client):
                    try:
                        await thing.aclose()
                    except Exception:  # noqa: BLE001 (closing a broken connection)
                        pass


def not_after(chain: Path) -> dt.datetime | None:
    try:
        return x509.load_pem_x509_certificates(chain.read_bytes())[0].not_valid_after_utc
    except (OSError, ValueError):
        return None
