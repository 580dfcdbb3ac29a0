"""Access control on public routes (``exit-server run --access FILE``), checked before a stream
opens, so a refused caller never reaches the tunnel.

The file is TOML; each ``[[site]]`` covers some hostnames (exact, ``*.suffix`` or ``*``; the
most specific match wins, as in routing) and may combine::

    [[site]]
    hosts = ["app.example.com", "*.staging.example.com"]
    allow_ips = ["203.0.113.0/24", "2001:db8::/32"]   # others: 403
    realm = "app"
    basic = ["alice:scrypt$ln=14,r=8,p=1$...$..."]     # `exit-server hash-password --user alice`
    bearer = ["ci:scrypt$ln=14,r=8,p=1$...$..."]       # NAME:HASH of a bearer token

IP allow-list first (403), then credentials when ``basic`` or ``bearer`` is set (401 with
``WWW-Authenticate``). Failed credentials count against a per-source limiter (429 with
``Retry-After`` after 10). The ``Authorization`` header of a site with credentials is consumed
here and not forwarded to the upstream. Verified credentials are cached (HMAC under a
per-process key) until the file changes, so only the first request of a caller pays for scrypt.
The peer address is the TCP peer: ``X-Forwarded-For`` is never trusted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import secrets
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.heads import RequestHead

from .h1 import Request, Response
from .hashing import HashFormatError, parse_hash, verify_secret, waste_time
from .limits import FailureLimiter, SourceGate
from .tokens import validate_pattern

__all__ = ["AccessRules", "Site", "load_sites"]

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Site:
    """The rules for a group of hostnames."""

    hosts: list[str]
    allow_ips: list[IPNetwork] = field(default_factory=list)
    realm: str = "backhaul"
    basic: dict[str, str] = field(default_factory=dict)  # user -> hash
    bearer: dict[str, str] = field(default_factory=dict)  # name -> hash

    @property
    def needs_credentials(self) -> bool:
        return bool(self.basic or self.bearer)

    def ip_allowed(self, remote: str | None) -> bool:
        if not self.allow_ips:
            return True
        try:
            ip = ipaddress.ip_address(remote or "")
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allow_ips)

    def challenge(self) -> str:
        schemes = []
        if self.basic:
            schemes.append(f'Basic realm="{self.realm}", charset="UTF-8"')
        if self.bearer:
            schemes.append(f'Bearer realm="{self.realm}"')
        return ", ".join(schemes)


def _named_hashes(site_no: int, key: str, raw: Any) -> dict[str, str]:
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise ValueError(f'site {site_no}: {key} must be a list of "NAME:HASH" strings')
    out: dict[str, str] = {}
    for item in raw:
        name, sep, digest = item.partition(":")
        if not sep or not name:
            raise ValueError(f"site {site_no}: {key} entries are NAME:HASH")
        try:
            parse_hash(digest)
        except HashFormatError:
            raise ValueError(
                f"site {site_no}: {key} entry {name!r} is not a hash from `exit-server hash-password`"
            ) from None
        out[name] = digest
    return out


def _site(site_no: int, raw: Any) -> Site:
    if not isinstance(raw, dict):
        raise ValueError(f"site {site_no}: expected a table")
    unknown = set(raw) - {"hosts", "allow_ips", "realm", "basic", "bearer"}
    if unknown:
        raise ValueError(f"site {site_no}: unknown keys {sorted(unknown)}")
    hosts = raw.get("hosts")
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        raise ValueError(f"site {site_no}: hosts must be a non-empty list of hostname patterns")
    nets = raw.get("allow_ips", [])
    if not isinstance(nets, list):
        raise ValueError(f"site {site_no}: allow_ips must be a list of CIDRs")
    try:
        allow = [ipaddress.ip_network(str(n), strict=False) for n in nets]
    except ValueError as exc:
        raise ValueError(f"site {site_no}: allow_ips: {exc}") from None
    realm = raw.get("realm", "backhaul")
    if not isinstance(realm, str) or not realm.isprintable() or '"' in realm or "\\" in realm:
        raise ValueError(f"site {site_no}: realm must be printable text without quotes")
    patterns = [validate_pattern(h) for h in hosts]
    if "default" in patterns:
        raise ValueError(f'site {site_no}: use "*" rather than "default" for every host')
    site = Site(
        patterns,
        allow,
        realm,
        _named_hashes(site_no, "basic", raw.get("basic", [])),
        _named_hashes(site_no, "bearer", raw.get("bearer", [])),
    )
    if not site.allow_ips and not site.needs_credentials:
        raise ValueError(f"site {site_no}: set allow_ips, basic or bearer (a site without rules is open)")
    return site


def load_sites(path: Path) -> list[Site]:
    """Read and validate an access file.

    Raises:
        ConfigError: unreadable, not TOML, or an invalid site (never echoes a hash).
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--access: cannot read {path}: {exc.strerror}") from None
    return parse_sites(text, path)


def parse_sites(text: str, path: Path | str = "the state store's access rules") -> list[Site]:
    """Validate an access file's text (``path`` names it in errors).

    Raises:
        ConfigError: not TOML, or an invalid site (never echoes a hash).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--access: {path} is not valid TOML: {exc}") from None
    if set(data) - {"site"}:
        raise ConfigError(f"--access: unknown top-level keys {sorted(set(data) - {'site'})} in {path}")
    if "site" not in data:
        # An empty or truncated file would open every protected site (issue 24 item 7): no
        # sites takes an explicit ``site = []``.
        raise ConfigError(f"--access: {path} has no [[site]] (an empty file is refused; write site = [] for none)")
    raw_sites = data["site"]
    if not isinstance(raw_sites, list):
        raise ConfigError(f"--access: use [[site]] tables in {path}")
    sites: list[Site] = []
    seen: set[str] = set()
    for number, raw in enumerate(raw_sites, 1):
        try:
            site = _site(number, raw)
        except ValueError as exc:
            raise ConfigError(f"--access: {path}: {exc}") from None
        for host in site.hosts:
            if host in seen:
                raise ConfigError(f"--access: {path}: host {host} appears in two sites")
            seen.add(host)
        sites.append(site)
    return sites


_TEXT = {401: "unauthorized\n", 403: "forbidden\n", 429: "too many requests\n"}


def _deny(status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(status=status, text=_TEXT[status], headers=headers)


class AccessRules:
    """The loaded access file: look-up by host, checks, reload."""

    CONCURRENCY = 2

    def __init__(self, path: Path | None, limiter: FailureLimiter | None = None) -> None:
        """``path`` None: the rules come from the fleet's store (:meth:`load_text`); none until then."""
        self.path = path if path is not None else Path("/nonexistent")
        self._file = path
        self.limiter = limiter or FailureLimiter()
        self.gate = SourceGate()
        self._key = secrets.token_bytes(32)
        self._exact: dict[str, Site] = {}
        self._wild: dict[str, Site] = {}
        self._any: Site | None = None
        self._cache: set[bytes] = set()
        self._limit: asyncio.Semaphore | None = None
        self.denied = 0
        if path is not None:
            self.reload(strict=True)

    def reload(self, strict: bool = False) -> bool:
        """Re-read the file (True when it changed); a broken file keeps the previous rules.

        Raises:
            ConfigError: ``strict`` (start-up) and the file is invalid.
        """
        if self._file is None:
            return False
        try:
            sites = load_sites(self._file)
        except ConfigError as exc:
            if strict:
                raise
            log.error("access: reload failed, keeping the previous rules: %s", exc)
            return False
        return self._apply(sites, strict, str(self._file))

    def load_text(self, text: str, strict: bool = False) -> bool:
        """Take the rules from an access file's text (the fleet's store); a broken text keeps
        the previous rules (logged) unless ``strict``.

        Raises:
            ConfigError: ``strict`` and the text is invalid.
        """
        try:
            sites = parse_sites(text)
        except ConfigError as exc:
            if strict:
                raise
            log.error("access: the state store's rules are invalid, keeping the previous rules: %s", exc)
            return False
        return self._apply(sites, strict, "the state store")

    def _apply(self, sites: list[Site], strict: bool, where: str) -> bool:
        exact: dict[str, Site] = {}
        wild: dict[str, Site] = {}
        anyone: Site | None = None
        for site in sites:
            for host in site.hosts:
                if host == "*":
                    anyone = site
                elif host.startswith("*."):
                    wild[host[2:]] = site
                else:
                    exact[host] = site
        changed = (exact, wild, anyone) != (self._exact, self._wild, self._any)
        self._exact, self._wild, self._any = exact, wild, anyone
        self._cache.clear()
        if changed and not strict:
            log.info("access: reloaded %s (%d sites)", where, len(sites))
        return changed

    def site_for(self, host: str) -> Site | None:
        """The most specific site for a (normalised) host: exact, longest ``*.suffix``, ``*``."""
        site = self._exact.get(host)
        if site is not None:
            return site
        if self._wild:
            rest = host
            while "." in rest:
                rest = rest.split(".", 1)[1]
                site = self._wild.get(rest)
                if site is not None:
                    return site
        return self._any

    def strip(self, head: RequestHead, host: str) -> RequestHead:
        """Drop ``Authorization`` when this edge consumed it (never forwarded upstream)."""
        site = self.site_for(host)
        if site is None or not site.needs_credentials:
            return head
        return replace(head, headers=tuple(h for h in head.headers if h[0].lower() != "authorization"))

    async def check(self, request: Request, host: str, remote: str) -> Response | None:
        """None when the request may go on; else the 401/403/429 response to send.

        Args:
            host: the normalized authority the request is routed on.
            remote: the caller's address as the edge decided it (``--trusted-proxies``).
        """
        site = self.site_for(host)
        if site is None:
            return None
        if not site.ip_allowed(remote):
            self.denied += 1
            log.info("access: %s refused for %s (address not allowed)", host, remote or "-")
            return _deny(403)
        if not site.needs_credentials:
            return None
        retry = self.limiter.attempt(remote)  # charged when it starts, refunded on success
        if retry is not None:
            self.denied += 1
            return _deny(429, {"Retry-After": str(retry)})
        presented = request.headers.get("Authorization", "")
        if presented:
            async with self.gate.hold(remote):  # one verification per source at a time
                ok = await self._verify(site, presented)
            if ok:
                self.limiter.success(remote)
                return None
        self.denied += 1
        log.info(
            "access: %s refused for %s (%s)",
            host,
            remote or "-",
            "no credentials" if not presented else "invalid credentials",
        )
        return _deny(401, {"WWW-Authenticate": site.challenge()})

    async def _verify(self, site: Site, presented: str) -> bool:
        key = hmac.new(self._key, f"{id(site)}\0{presented}".encode(), hashlib.sha256).digest()
        if key in self._cache:
            return True
        scheme, _, value = presented.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        candidates: list[tuple[str, str]] = []  # (secret, hash)
        if scheme == "basic" and site.basic:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            digest = site.basic.get(user) if sep else None
            if not password:
                return False
            if digest is None:  # unknown user: spend the same time, so users cannot be probed
                await asyncio.to_thread(waste_time, password)
                return False
            candidates = [(password, digest)]
        elif scheme == "bearer" and site.bearer and value:
            candidates = [(value, digest) for digest in site.bearer.values()]
        if not candidates:
            return False
        if self._limit is None:
            self._limit = asyncio.Semaphore(self.CONCURRENCY)
        async with self._limit:
            ok = await asyncio.to_thread(lambda: any([verify_secret(s, d) for s, d in candidates]))
        if ok:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache.add(key)
        return ok
