"""Certificates from an ACME CA (RFC 8555) for the public HTTPS listener.

* **Which names.** Only a host name a tunnel client registered as a route, and only when that
  client's token grant admitted it (``--tokens``) or the name matches ``--acme-domain``. An
  SNI name or a Host header never starts an order: a flood of random names costs nothing.
  Wildcard routes are not issued (HTTP-01 and TLS-ALPN-01 cannot prove a wildcard).
* **When.** On the first registration of such a route with no certificate from
  ``--public-cert-dir`` or ACME; renewal at two thirds of the lifetime, with jitter. A failed
  attempt is retried after 1, 2, 5, 10, 30 minutes, then hourly (at least an hour after a
  ``rateLimited`` error, and never sooner than the CA's ``Retry-After``); the old
  certificate is served meanwhile. At most
  ``ORDERS_PER_HOUR`` orders start per hour. Every attempt is logged and counted
  (``backhaul_acme_orders_total{result}``).
* **How.** The ``acme`` package of the certbot project (JWS, nonces and ``badNonce`` retries,
  polling) in one worker thread, since it is synchronous. Challenges: HTTP-01 on the public
  HTTP listener (answered only for the token of a pending order, and only when Host is the
  name being validated) or TLS-ALPN-01 on the TLS port (RFC 8737: the ClientHello offers
  ``acme-tls/1`` only; exit_server/frontdoor.py routes it here).
* **Storage.** ``--acme-dir``: ``account-key.pem``, ``account.json`` (the account URL for the
  directory it belongs to) and ``certs/HOST.pem`` / ``certs/HOST-key.pem``, every file 0600
  and written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import hashlib
import json
import logging
import os
import random
import ssl
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from shared.errors import ConfigError, TunnelError
from shared.runtime.version import version

from .acmeanswers import ACME_TLS_ALPN, Challenges, is_challenge_path
from .certstore import CertStore, Served, load_pair, public_context

if TYPE_CHECKING:
    from .acmefleet import FleetAcmeFiles

__all__ = [
    "ACME_TLS_ALPN",
    "ORDERS_PER_HOUR",
    "AcmeFiles",
    "AcmeIssuer",
    "Challenges",
    "is_challenge_path",
    "renew_at",
    "retry_delay",
    "tls_alpn_context",
]

log = logging.getLogger(__name__)

_ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")


class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The (empty, RFC 8555 section 7.5.1) answer to a TLS-ALPN-01 challenge."""

    typ = "tls-alpn-01"


class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """RFC 8737's challenge. The acme library dropped its own class in 4.0 (certbot never
    answered it); the challenge itself is current, and Let's Encrypt offers it."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: JWK, **unused_kwargs: Any) -> str:
        return self.key_authorization(account_key)


if TLSALPN01.typ not in challenges.Challenge.TYPES:  # a later acme may bring its own again
    challenges.ChallengeResponse.register(TLSALPN01Response)
    challenges.Challenge.register(TLSALPN01)
#: Orders started per hour at most (Let's Encrypt allows 300 new orders per 3 hours per account).
ORDERS_PER_HOUR = 30
#: Seconds before a failed attempt is repeated: 1, 2, 5, 10, 30 minutes, then hourly.
_RETRY = (60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: How often stored certificates are looked at for renewal, at most.
_CHECK = 600.0
_ORDER_DEADLINE = 90.0
#: Orders tried in one attempt when the CA keeps rejecting nonces.
_NONCE_TRIES = 3


def retry_delay(failures: int, rate_limited: bool = False) -> float:
    """Seconds before attempt ``failures + 1`` (``failures`` >= 1), with up to 10 % jitter."""
    base = _RETRY[min(failures, len(_RETRY)) - 1]
    if rate_limited:
        base = max(base, 3600.0)
    return base * random.uniform(0.9, 1.0)


#: A Retry-After beyond this is taken as this (a week: Let's Encrypt's longest window).
_MAX_RETRY_AFTER = 7 * 86400.0


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` value asks to wait (RFC 9110 section 10.2.3: delay-seconds
    or an HTTP-date; ``now`` in seconds since the epoch), at most a week; None when absent or
    unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return min(max(when.timestamp() - now, 0.0), _MAX_RETRY_AFTER)


class _Network(client.ClientNetwork):
    """The acme package's network layer, remembering the ``Retry-After`` of the last error
    answer (it raises ``messages.Error`` without it)."""

    retry_after: str | None = None

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        if not response.ok:
            self.retry_after = response.headers.get("Retry-After")
        return response


def renew_at(not_before: dt.datetime, not_after: dt.datetime) -> float:
    """When to renew: two thirds into the lifetime, minus up to 5 % of it (jitter), so that a
    fleet of certificates issued together does not renew together."""
    lifetime = (not_after - not_before).total_seconds()
    return not_before.timestamp() + lifetime * (2 / 3) - lifetime * random.uniform(0, 0.05)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (never readable by others, never
    half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AcmeFiles:
    """What ``--acme-dir`` holds."""

    fleet = False  # True: exit_server/acmefleet.py's store-backed subclass

    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs = root / "certs"

    def account_key(self) -> ec.EllipticCurvePrivateKey:
        """The account key, made (P-256) and stored at first use.

        Raises:
            ConfigError: the stored key cannot be read.
        """
        path = self.root / "account-key.pem"
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--acme-dir: cannot read {path}: {exc}") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigError(f"--acme-dir: {path} is not an EC key")
            return key
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(path, _pem(key))
        return key

    def account_url(self, directory: str) -> str | None:
        path = self.root / "account.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data.get("url") if data.get("directory") == directory else None

    def save_account_url(self, directory: str, url: str) -> None:
        _write_private(self.root / "account.json", json.dumps({"directory": directory, "url": url}).encode())

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.certs / f"{name}.pem", self.certs / f"{name}-key.pem"

    def save_cert(self, name: str, chain_pem: bytes, key_pem: bytes) -> None:
        chain, key = self.paths(name)
        _write_private(key, key_pem)
        _write_private(chain, chain_pem)

    def stored(self) -> list[str]:
        try:
            return sorted(
                p.name.removesuffix(".pem")
                for p in self.certs.iterdir()
                if p.name.endswith(".pem") and not p.name.endswith("-key.pem")
            )
        except OSError:
            return []


def _alpn_certificate(name: str, key_authorization: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """RFC 8737 section 3: a self-signed certificate naming ``name``, with the critical
    acmeIdentifier extension holding the SHA-256 of the key authorization."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode()).digest()
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(_ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def tls_alpn_context(name: str, key_authorization: str) -> ssl.SSLContext:
    """The TLS-ALPN-01 validation context for ``name``: :func:`_alpn_certificate`, offered
    with ALPN ``acme-tls/1`` only."""
    cert, key = _alpn_certificate(name, key_authorization)
    ctx = public_context()
    ctx.set_alpn_protocols([ACME_TLS_ALPN])
    with tempfile.TemporaryDirectory() as tmp:  # the ssl module loads certificates from files only
        cert_path, key_path = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem(key))
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


class _PeerOrdering(Exception):
    """Another server of the fleet holds this name's order lock."""


class _Failed(Exception):
    """One attempt failed; ``retry_after`` is what the CA asked for (seconds), if anything."""

    def __init__(
        self, message: str, rate_limited: bool = False, retry_after: float | None = None, bad_nonce: bool = False
    ) -> None:
        super().__init__(message)
        self.rate_limited = rate_limited
        self.retry_after = retry_after
        self.bad_nonce = bad_nonce


@dataclass
class _State:
    failures: int = 0
    next_try: float = 0.0
    renew_at: float = 0.0


class AcmeIssuer:
    """Obtains and renews certificates for allowed route names into a :class:`CertStore`.

    Args:
        directory: the ACME directory URL.
        files: the ``--acme-dir`` storage.
        store: where issued certificates are served from.
        email: contact address for the account (optional).
        challenge: ``http-01`` or ``tls-alpn-01``.
        ca_file: a CA bundle to trust for the directory's own TLS (a private ACME CA).
        on_result: called with "issued" or "failed" after every attempt (the metric).
        clock: seconds since the epoch (tests move it to reach renewal).
    """

    def __init__(
        self,
        directory: str,
        files: AcmeFiles,
        store: CertStore,
        *,
        email: str | None = None,
        challenge: str = "http-01",
        ca_file: Path | None = None,
        on_result: Callable[[str], None] = lambda result: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.files = files
        self.store = store
        self.email = email
        self.challenge = challenge
        self.ca_file = ca_file
        self.challenges = Challenges()
        self._on_result = on_result
        self.clock = clock
        self._states: dict[str, _State] = {}
        self._wanted: set[str] = set()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="acme")
        self._task: asyncio.Task[None] | None = None
        self._client: client.ClientV2 | None = None
        self._net: _Network | None = None
        self._key: JWKEC | None = None
        self._started: list[float] = []  # order start times within the last hour
        self.attempts = 0
        #: the fleet's store (--state): one order per name, challenge answers on every server
        self.fleet = cast("FleetAcmeFiles", files) if files.fleet else None
        self._stop = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None
        self._adopting: set[asyncio.Task[None]] = set()
        #: per name, the answers this server's current order placed: (HTTP-01 tokens, ALPN keys)
        self._mine: dict[str, tuple[list[str], list[str]]] = {}

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Serve what ``--acme-dir`` holds and start the issuing task."""
        for name in self.files.stored():
            chain, key = self.files.paths(name)
            try:
                served = load_pair(name, chain, key, source="acme")
            except ConfigError as exc:
                log.warning("acme: stored certificate for %s not served: %s", name, exc)
                self._wanted.add(name)
                continue
            self._serve(served)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="acme")
        if self.fleet is not None:
            self._follower = loop.create_task(self.fleet.follow(self._on_fleet, self._stop), name="acme-fleet")

    async def close(self) -> None:
        self._stop.set()
        for task in (self._task, self._follower, *self._adopting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.fleet is not None:
            self.fleet.close()

    def want(self, name: str) -> None:
        """A route for ``name`` was registered by a client allowed to serve it: obtain a
        certificate unless one is served already (from files or ACME)."""
        name = name.lower().rstrip(".")
        if name.startswith("*.") or name == "default" or self.store.has_file(name):
            return
        if name in self._states or name in self._wanted:
            return
        self._wanted.add(name)
        self._wake.set()

    def pending(self) -> set[str]:
        """Names waiting for a certificate (tests and the admin API)."""
        return set(self._wanted)

    def status(self) -> list[dict[str, object]]:
        """Per name: ``ordering`` (no certificate yet) or ``renewing``/``valid``, failures in a
        row, and when the next attempt or the renewal is due (``/api/certificates``)."""
        out: list[dict[str, object]] = []
        now = self.clock()
        for name in sorted(self._wanted | set(self._states)):
            state = self._states.get(name, _State())
            if name in self._wanted:
                phase, due = "ordering", state.next_try
            else:
                due = max(state.renew_at, state.next_try)
                phase = "renewing" if due <= now or state.failures else "valid"
            out.append(
                {
                    "name": name,
                    "state": phase,
                    "failures": state.failures,
                    "next_attempt": dt.datetime.fromtimestamp(max(due, now), dt.UTC).isoformat(timespec="seconds"),
                }
            )
        return out

    # ------------------------------------------------------------------ the fleet

    def _on_fleet(self, message: dict[str, Any]) -> None:
        """A message from the fleet's ACME channel (exit_server/acmefleet.py)."""
        kind, name = message.get("kind"), str(message.get("name", ""))
        if kind == "http":
            self.challenges.http[str(message["token"])] = (name, str(message["validation"]))
        elif kind == "alpn":
            self.challenges.alpn[name] = tls_alpn_context(name, str(message["validation"]))
            self.challenges.alpn_keys[name] = str(message["validation"])
        elif kind == "done":  # exactly what that order placed: a newer order's answers stay
            tokens, alpn = message.get("tokens", []), message.get("alpn", [])
            self.challenges.forget(name, [str(t) for t in tokens], [str(k) for k in alpn])
        elif kind in ("cert", "resync"):
            task = asyncio.get_running_loop().create_task(self._adopt(name if kind == "cert" else None))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    async def _adopt(self, name: str | None) -> None:
        """Serve what a peer stored for ``name`` (None: every stored name) when it is not what
        this server serves already."""
        assert self.fleet is not None
        fleet = self.fleet
        try:
            names = [name] if name is not None and await asyncio.to_thread(fleet.fetch, name) else []
            if name is None:
                names = await asyncio.to_thread(fleet.stored)
        except TunnelError as exc:
            log.warning("%s", exc)
            return
        for one in names:
            if self.store.has_file(one):
                continue
            try:
                served = load_pair(one, *self.files.paths(one), source="acme")
            except ConfigError as exc:
                log.warning("acme: the fleet's certificate for %s not served: %s", one, exc)
                continue
            current = self.store.lookup(one)
            if current is not None and current.source == "acme" and current.not_after >= served.not_after:
                continue
            self._wanted.discard(one)
            self._serve(served)
            self._wake.set()  # the schedule moved
            log.info("acme: serving the fleet's certificate for %s, valid until %s", one, f"{served.not_after:%F}")

    # ------------------------------------------------------------------ the task

    def _serve(self, served: Served) -> None:
        self.store.put(served)
        start = served.not_before or (served.not_after - dt.timedelta(days=90))
        self._states[served.name] = _State(renew_at=renew_at(start, served.not_after))

    def _due(self) -> tuple[list[str], float]:
        """Names to work on now, and seconds until the next one is due."""
        now = self.clock()
        due = []
        wait = _CHECK
        for name in sorted(self._wanted):
            state = self._states.get(name)
            if state is None or state.next_try <= now:
                due.append(name)
            else:
                wait = min(wait, state.next_try - now)
        for name, state in self._states.items():
            if name in self._wanted:
                continue
            when = max(state.renew_at, state.next_try)
            if when <= now:
                due.append(name)
            else:
                wait = min(wait, when - now)
        return due, max(wait, 0.0)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, wait = self._due()
            worked = False
            for name in due:
                if self.store.has_file(name):  # a file arrived meanwhile: it wins
                    self._wanted.discard(name)
                    self._states.pop(name, None)
                    continue
                hour_ago = self.clock() - 3600
                self._started = [t for t in self._started if t > hour_ago]
                if len(self._started) >= ORDERS_PER_HOUR:
                    log.warning("acme: %d orders in the last hour; %s waits", len(self._started), name)
                    wait = min(wait, 60.0)
                    break
                self._started.append(self.clock())
                await self._attempt(loop, name)
                worked = True
            else:
                if worked:
                    continue  # what it did moved the schedule (a new certificate's renewal): look again
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, _CHECK) * random.uniform(0.9, 1.0) if wait else 0.05):
                    await self._wake.wait()

    async def _attempt(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        state = self._states.setdefault(name, _State())
        renewal = name not in self._wanted
        self.attempts += 1
        log.info("acme: %s a certificate for %s (%s)", "renewing" if renewal else "ordering", name, self.challenge)
        try:
            ordered = await loop.run_in_executor(self._executor, self._order, name)
            served = load_pair(name, *self.files.paths(name), source="acme")
        except _PeerOrdering:
            # another server of the fleet holds the name's lock: its certificate arrives through
            # the store (_adopt); look again in a few seconds in case that server died
            self.attempts -= 1
            state.next_try = self.clock() + random.uniform(5.0, 10.0)
            log.info("acme: a peer is ordering %s; waiting for its certificate", name)
            return
        except (_Failed, ConfigError, OSError, TunnelError) as exc:
            state.failures += 1
            delay = retry_delay(state.failures, getattr(exc, "rate_limited", False))
            delay = max(delay, getattr(exc, "retry_after", None) or 0.0)
            state.next_try = self.clock() + delay
            self._on_result("failed")
            log.warning(
                "acme: %s for %s failed (attempt %d): %s; next try in %.0fs%s",
                "renewal" if renewal else "order",
                name,
                state.failures,
                exc,
                delay,
                "; the current certificate is served meanwhile" if renewal else "",
            )
            return
        self._wanted.discard(name)
        self._serve(served)
        if not ordered:
            log.info("acme: serving the certificate a peer stored for %s", name)
            return
        self._on_result("issued")
        log.info("acme: certificate for %s issued by %s, valid until %s", name, served.issuer, f"{served.not_after:%F}")

    # ------------------------------------------------------------------ in the worker thread

    def _account(self) -> client.ClientV2:
        if self._client is not None:
            return self._client
        key = self.files.account_key()
        self._key = JWKEC(key=key)
        net = self._net = _Network(self._key, alg=ES256, user_agent=f"backhaul/{version()}")
        if self.ca_file is not None:
            net.verify_ssl = str(self.ca_file)  # type: ignore[assignment]  # passed to requests' verify
        acme = client.ClientV2(client.ClientV2.get_directory(self.directory, net), net=net)
        url = self.files.account_url(self.directory)
        if url is not None:
            net.account = messages.RegistrationResource(uri=url, body=messages.Registration())
        else:
            registration = messages.NewRegistration.from_data(email=self.email, terms_of_service_agreed=True)
            try:
                regr = acme.new_account(registration)
            except errors.ConflictError as exc:  # the key has an account already
                regr = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
            net.account = regr
            self.files.save_account_url(self.directory, regr.uri)
            log.info("acme: account %s at %s", regr.uri, self.directory)
        self._client = acme
        return acme

    def _order(self, name: str) -> bool:
        """Obtain and store a certificate for ``name``; False when none was ordered because a
        peer of the fleet had stored a fresh one (served instead).

        Raises:
            _PeerOrdering: a peer holds the name's order lock.
            _Failed: the order failed.
            TunnelError: the fleet's store is unreachable.
        """
        fleet = self.fleet
        if fleet is None:
            try:
                self.files.save_cert(name, *self._obtain(name))
            finally:
                self._forget(name)
            return True
        lock = fleet.lock(name)
        if lock is None:
            raise _PeerOrdering(name)
        try:
            if fleet.fresh(name, self.clock()):
                return False
            self.files.save_cert(name, *self._obtain(name))
            return True
        finally:
            self._forget(name)  # before the lock goes: the next order's answers come after this
            fleet.unlock(name, lock)

    def _forget(self, name: str) -> None:
        """Withdraw the challenge answers this order placed, here and (fleet) on every server."""
        tokens, alpn = self._mine.pop(name, ([], []))
        self.challenges.forget(name, tokens, alpn)
        if self.fleet is not None and (tokens or alpn):
            self.fleet.withdraw(name, tokens, alpn)

    def _obtain(self, name: str) -> tuple[bytes, bytes]:
        """:meth:`_obtain_once`, again at once after a ``badNonce`` that the acme package's own
        single retry did not absorb (RFC 8555 section 6.5: the client should retry with a fresh
        nonce; pebble rejects 5 % of nonces on purpose), up to :data:`_NONCE_TRIES` times."""
        for attempt in range(1, _NONCE_TRIES + 1):
            try:
                return self._obtain_once(name)
            except _Failed as exc:
                if not exc.bad_nonce or attempt == _NONCE_TRIES:
                    raise
                log.info("acme: %s: %s; trying again with a fresh nonce", name, exc)
        raise AssertionError("unreachable")

    def _obtain_once(self, name: str) -> tuple[bytes, bytes]:
        """One order, start to finish (blocking: runs in the worker thread).

        Raises:
            _Failed: anything that went wrong, said in one line.
        """
        if self._net is not None:
            self._net.retry_after = None
        try:
            acme = self._account()
            assert self._key is not None
            key_pem = _pem(ec.generate_private_key(ec.SECP256R1()))
            order = acme.new_order(crypto_util.make_csr(key_pem, [name]))
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # reused (the CA remembers a recent validation)
                self._answer(acme, name, authz)
            deadline = dt.datetime.now() + dt.timedelta(seconds=_ORDER_DEADLINE)
            order = acme.poll_and_finalize(order, deadline)
            return order.fullchain_pem.encode(), key_pem
        except messages.Error as exc:
            wait = retry_after_seconds(self._net.retry_after if self._net else None, time.time())
            raise _Failed(
                f"{exc.typ}: {exc.detail}",
                rate_limited=exc.code == "rateLimited",
                retry_after=wait,
                bad_nonce=exc.code == "badNonce",
            ) from None
        except errors.ValidationError as exc:
            problems = "; ".join(
                f"{c.chall.typ}: {c.error.detail if c.error else c.status}"
                for authzr in exc.failed_authzrs
                for c in authzr.body.challenges
                if c.error is not None
            )
            raise _Failed(f"validation failed: {problems or exc}") from None
        except errors.TimeoutError:
            raise _Failed(f"order not ready within {_ORDER_DEADLINE:.0f}s") from None
        except (errors.Error, OSError, ValueError) as exc:  # requests' errors are OSErrors
            self._client = None  # a fresh directory and nonce next time
            raise _Failed(f"{type(exc).__name__}: {exc}") from None

    def _answer(self, acme: client.ClientV2, name: str, authz: messages.AuthorizationResource) -> None:
        assert self._key is not None
        for challb in authz.body.challenges:
            chall = challb.chall
            if self.challenge == "http-01" and isinstance(chall, challenges.HTTP01):
                response, validation = chall.response_and_validation(self._key)
                self.challenges.http[chall.encode("token")] = (name, validation)
                self._mine.setdefault(name, ([], []))[0].append(chall.encode("token"))
                if self.fleet is not None:  # the CA may reach any server of the fleet
                    self.fleet.share(
                        {"kind": "http", "token": chall.encode("token"), "name": name, "validation": validation}
                    )
                acme.answer_challenge(challb, response)
                return
            if self.challenge == "tls-alpn-01" and isinstance(chall, TLSALPN01):
                response, validation = chall.response_and_validation(self._key)
                self.challenges.alpn[name] = tls_alpn_context(name, validation)
                self.challenges.alpn_keys[name] = validation
                self._mine.setdefault(name, ([], []))[1].append(validation)
                if self.fleet is not None:
                    self.fleet.share({"kind": "alpn", "name": name, "validation": validation})
                acme.answer_challenge(challb, response)
                return
        offered = ", ".join(str(c.chall.to_partial_json().get("type")) for c in authz.body.challenges)
        raise _Failed(f"the CA offers no {self.challenge} challenge for {name} (only {offered})")
