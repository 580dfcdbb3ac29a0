"""Per-client credentials (``exit-server run --tokens FILE``).

The file is TOML and holds, per client, a salted scrypt hash of its token (never the token), the
hostname patterns it may register and the public TCP ports it may ask for::

    [clients.acme]
    token_id = "3f9a0c1d7e2b"          # public lookup id, the <id> in bh_<id>_<secret>
    hash = "scrypt$ln=14,r=8,p=1$...$..."
    hosts = ["app.acme.example", "*.acme.example"]   # exact, *.suffix, "default" or "*" (any)
    tcp_ports = [7000]
    created = "2025-01-01T00:00:00Z"
    revoked = false

Tokens look like ``bh_<id>_<secret>``: the server finds the entry by ``<id>`` and verifies
``<secret>`` against the hash, so one verification costs one scrypt whatever the number of
clients. Successful verifications are cached (keyed by an HMAC of the token under a per-process
key) until the file changes, so reconnect storms stay cheap. ``exit-server token`` manages the
file (``add``/``rotate`` print the new token once; writes are atomic, mode 0600).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared import challenge
from shared.awsiam import role_matches
from shared.errors import ConfigError

from .hashing import HashFormatError, hash_secret, parse_hash, verify_secret, waste_time

__all__ = [
    "Principal",
    "TokenEntry",
    "TokenRegistry",
    "format_token",
    "host_allowed",
    "load_entries",
    "parse_token",
    "save_entries",
    "validate_pattern",
]

log = logging.getLogger(__name__)

CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TOKEN = re.compile(r"^bh_([0-9a-f]{12})_([A-Za-z0-9_-]{32,128})$")
_PATTERN = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))*$")


def validate_pattern(pattern: str) -> str:
    """Normalise and check a hostname pattern: exact, ``*.suffix``, ``default`` or ``*``.

    Raises:
        ValueError: anything else.
    """
    value = pattern.strip().lower().rstrip(".")
    if value in ("*", "default") or (_PATTERN.match(value) and len(value) <= 253):
        return value
    raise ValueError(f"bad hostname pattern {pattern!r} (exact, *.example.com, default or *)")


def host_allowed(pattern: str, host: str) -> bool:
    """True when every host that route ``host`` can match is covered by ``pattern``.

    ``*.example.com`` covers ``a.example.com`` and ``*.a.example.com`` but not ``example.com``;
    ``default`` is covered only by ``default`` and ``*``.
    """
    if pattern == "*" or pattern == host:
        return True
    if pattern.startswith("*.") and host != "default":
        suffix = pattern[1:]
        return host.endswith(suffix) and len(host) > len(suffix)
    return False


@dataclass(frozen=True)
class Principal:
    """An authenticated client and what it may register.

    ``hosts``/``tcp_ports`` of None mean unrestricted (the shared-token mode). ``version``
    changes whenever the credential or the policy of this client changes in the file.
    """

    client_id: str
    hosts: tuple[str, ...] | None = None
    tcp_ports: frozenset[int] | None = None
    version: str = ""

    def route_refusal(self, host: str) -> str | None:
        """Why this client may not register ``host`` (None: allowed)."""
        if self.hosts is None or any(host_allowed(p, host) for p in self.hosts):
            return None
        return "hostname not allowed for this client's credentials"

    def port_refusal(self, port: int) -> str | None:
        """Why this client may not ask for public TCP ``port`` (None: allowed)."""
        if self.tcp_ports is None or port in self.tcp_ports:
            return None
        return "port not allowed for this client's credentials"


@dataclass
class TokenEntry:
    """One client in the tokens file."""

    client_id: str
    token_id: str
    hash: str
    hosts: list[str] = field(default_factory=list)
    tcp_ports: list[int] = field(default_factory=list)
    created: str = ""
    revoked: bool = False
    #: challenge authentication's verifier (shared/challenge.py): ``v1$STOREDKEY$SERVERKEY``,
    #: base64; empty for tokens made before it existed (rotate them to use --auth challenge)
    challenge: str = ""
    #: IAM role ARN patterns (``*``, ``?``) that authenticate as this client with --auth aws-iam
    #: (shared/awsiam.py); an entry with roles may have no token (token_id and hash empty)
    aws_roles: list[str] = field(default_factory=list)

    @property
    def has_token(self) -> bool:
        return bool(self.token_id)

    def challenge_keys(self) -> tuple[bytes, bytes] | None:
        version, _, rest = self.challenge.partition("$")
        stored, _, server = rest.partition("$")
        if version != "v1" or not stored or not server:
            return None
        return base64.b64decode(stored), base64.b64decode(server)

    def principal(self) -> Principal:
        digest = hashlib.sha256(
            repr(
                (self.token_id, self.hash, sorted(self.hosts), sorted(self.tcp_ports), self.revoked, self.aws_roles)
            ).encode()
        ).hexdigest()[:16]
        return Principal(self.client_id, tuple(self.hosts), frozenset(self.tcp_ports), digest)


def format_token(token_id: str, secret: str) -> str:
    return f"bh_{token_id}_{secret}"


def parse_token(token: str) -> tuple[str, str] | None:
    """Split ``bh_<id>_<secret>`` (None when the token is not of that form)."""
    match = _TOKEN.match(token)
    return (match.group(1), match.group(2)) if match else None


def new_secret() -> tuple[str, str]:
    """A fresh (token id, secret): 48 bits of public id, 256 bits of secret."""
    return secrets.token_hex(6), secrets.token_urlsafe(32)


# ---------------------------------------------------------------------------------------- file


def _entry(client_id: str, raw: Any) -> TokenEntry:
    if not CLIENT_ID.match(client_id):
        raise ValueError(f"bad client id {client_id!r} (letters, digits, . _ -; at most 64)")
    if not isinstance(raw, dict):
        raise ValueError(f"client {client_id}: expected a table")
    unknown = set(raw) - {"token_id", "hash", "hosts", "tcp_ports", "created", "revoked", "challenge", "aws_roles"}
    if unknown:
        raise ValueError(f"client {client_id}: unknown keys {sorted(unknown)}")
    roles = raw.get("aws_roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) and _ROLE_PATTERN.match(r) for r in roles):
        raise ValueError(f"client {client_id}: aws_roles must be IAM ARN patterns (arn:aws:iam::ACCOUNT:role/NAME)")
    token_id = raw.get("token_id", "")
    digest = raw.get("hash", "")
    if roles and not token_id and not digest:
        pass  # an IAM-only client
    else:
        if not isinstance(token_id, str) or not re.fullmatch(r"[0-9a-f]{12}", token_id):
            raise ValueError(f"client {client_id}: token_id must be 12 hex digits")
        try:
            parse_hash(digest if isinstance(digest, str) else "")
        except HashFormatError:
            raise ValueError(f"client {client_id}: hash is not scrypt$ln=N,r=R,p=P$SALT$HASH") from None
    hosts = raw.get("hosts", [])
    ports = raw.get("tcp_ports", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise ValueError(f"client {client_id}: hosts must be a list of strings")
    if not isinstance(ports, list) or not all(isinstance(p, int) and 1 <= p <= 65535 for p in ports):
        raise ValueError(f"client {client_id}: tcp_ports must be a list of ports 1-65535")
    revoked = raw.get("revoked", False)
    if not isinstance(revoked, bool):
        raise ValueError(f"client {client_id}: revoked must be true or false")
    verifier = raw.get("challenge", "")
    if not isinstance(verifier, str) or (
        verifier and not re.fullmatch(r"v1\$[A-Za-z0-9+/=]{44}\$[A-Za-z0-9+/=]{44}", verifier)
    ):
        raise ValueError(f"client {client_id}: challenge must be v1$STOREDKEY$SERVERKEY (base64)")
    return TokenEntry(
        client_id,
        token_id,
        str(digest),
        [validate_pattern(h) for h in hosts],
        list(ports),
        str(raw.get("created", "")),
        revoked,
        verifier,
        list(roles),
    )


#: An IAM ARN or ARN pattern: ``arn:PARTITION:iam::ACCOUNT:role/NAME`` (or sts assumed-role),
#: account and name may use ``*``/``?``; printable ASCII only.
_ROLE_PATTERN = re.compile(r"^arn:[a-z*?-]+:(iam|sts)::[0-9*?]{1,12}:[\x21-\x7e]{1,512}$")


def load_entries(path: Path) -> dict[str, TokenEntry]:
    """Read and validate a tokens file (client id -> entry).

    Raises:
        ConfigError: unreadable, not TOML, or an invalid entry (the message never holds a hash).
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--tokens: cannot read {path}: {exc.strerror}") from None
    return parse_entries(text, str(path))


def parse_entries(text: str, path: str = "the state store") -> dict[str, TokenEntry]:
    """Validate the text of a tokens file (from a file or the state store).

    Raises:
        ConfigError: not TOML, or an invalid entry.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--tokens: {path} is not valid TOML: {exc}") from None
    unknown = set(data) - {"clients"}
    if unknown:
        raise ConfigError(f"--tokens: unknown top-level keys {sorted(unknown)} in {path}")
    if "clients" not in data:
        # An empty or truncated file (mid-rewrite, disk full) must not revoke everyone: "no
        # clients" takes an explicit empty [clients] table (issue 24 item 7).
        raise ConfigError(
            f"--tokens: {path} has no [clients] table (an empty file is refused; write [clients] for no clients)"
        )
    clients = data["clients"]
    if not isinstance(clients, dict):
        raise ConfigError(f"--tokens: [clients] must be a table in {path}")
    entries: dict[str, TokenEntry] = {}
    seen: set[str] = set()
    for client_id, raw in clients.items():
        try:
            entry = _entry(client_id, raw)
        except ValueError as exc:
            raise ConfigError(f"--tokens: {path}: {exc}") from None
        if entry.token_id and entry.token_id in seen:
            raise ConfigError(f"--tokens: {path}: token_id of client {client_id} is used twice")
        seen.add(entry.token_id)
        entries[client_id] = entry
    return entries


def _toml_str(value: str) -> str:
    # Client ids, hosts, hashes and dates are ASCII without control characters (validated).
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_entries(entries: dict[str, TokenEntry]) -> str:
    lines = [
        "# Backhaul client credentials, managed with `exit-server token add|rotate|revoke|list`.",
        "# Only salted scrypt hashes of the tokens are stored here, never a token. Replace the file",
        "# atomically (write a temporary file, then rename it); [clients] alone means no clients.",
        "",
        "[clients]",
        "",
    ]
    for entry in sorted(entries.values(), key=lambda e: e.client_id):
        lines += [
            f"[clients.{_toml_str(entry.client_id)}]",
            *(
                [f"token_id = {_toml_str(entry.token_id)}", f"hash = {_toml_str(entry.hash)}"]
                if entry.has_token
                else []
            ),
            "hosts = [" + ", ".join(_toml_str(h) for h in entry.hosts) + "]",
            "tcp_ports = [" + ", ".join(str(p) for p in entry.tcp_ports) + "]",
            f"created = {_toml_str(entry.created)}",
            f"revoked = {'true' if entry.revoked else 'false'}",
            *([f"challenge = {_toml_str(entry.challenge)}"] if entry.challenge else []),
            *(["aws_roles = [" + ", ".join(_toml_str(r) for r in entry.aws_roles) + "]"] if entry.aws_roles else []),
            "",
        ]
    return "\n".join(lines)


def save_entries(path: Path, entries: dict[str, TokenEntry]) -> None:
    """Write the file atomically (temporary file in the same directory, fsync, rename), 0600."""
    text = render_entries(entries)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def new_entry(
    client_id: str,
    hosts: list[str],
    ports: list[int],
    aws_roles: tuple[str, ...] | list[str] = (),
    token: bool = True,
) -> tuple[TokenEntry, str]:
    """A new entry and its token (to be shown once; "" for an IAM-only client).

    Raises:
        ValueError: a bad host pattern or role pattern.
    """
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for role in aws_roles:
        if not _ROLE_PATTERN.match(role):
            raise ValueError(f"bad IAM role pattern {role!r} (arn:aws:iam::ACCOUNT:role/NAME, * and ? allowed)")
    patterns = [validate_pattern(h) for h in hosts]
    if not token:
        return TokenEntry(client_id, "", "", patterns, sorted(set(ports)), created, aws_roles=list(aws_roles)), ""
    token_id, secret = new_secret()
    text = format_token(token_id, secret)
    entry = TokenEntry(
        client_id,
        token_id,
        hash_secret(secret),
        patterns,
        sorted(set(ports)),
        created,
        challenge=challenge_verifier(text),
        aws_roles=list(aws_roles),
    )
    return entry, text


def challenge_verifier(token: str) -> str:
    """What the tokens file keeps for challenge authentication: StoredKey and ServerKey, from
    which the token cannot be recovered (shared/challenge.py)."""
    keys = challenge.derive_keys(token)
    return f"v1${base64.b64encode(keys.stored_key).decode()}${base64.b64encode(keys.server_key).decode()}"


# ------------------------------------------------------------------------------ authenticator


class TokenRegistry:
    """Authenticator over a tokens file; reloadable (SIGHUP or a change of the file).

    Call it with a presented token: returns the client's :class:`Principal` or None.
    """

    #: scrypt verifications running at once (each takes ~0.1 s of CPU and 16 MiB).
    CONCURRENCY = 2

    def __init__(self, path: Path | None, text: str | None = None, shared: str | None = None) -> None:
        """``shared``: a shared token accepted beside the entries, as client ``default`` with no
        restriction (``--state`` with ``--token-file``: the fleet's quick start)."""
        #: the file (None: the entries come from the state store, exit_server/state.py)
        self.path = path if path is not None else Path("/nonexistent")
        self._file = path
        self._shared = shared.encode() if shared else None
        self._shared_principal = Principal("default", version="shared-token")
        self._key = secrets.token_bytes(32)
        self._entries: dict[str, TokenEntry] = {}
        self._by_token_id: dict[str, TokenEntry] = {}
        self._cache: dict[bytes, Principal] = {}
        self._limit: asyncio.Semaphore | None = None
        if path is not None:
            self.reload(strict=True)
        else:
            self.load_text(text or "[clients]\n", strict=True)

    @property
    def clients(self) -> dict[str, TokenEntry]:
        return dict(self._entries)

    def reload(self, strict: bool = False) -> bool:
        """Re-read the file. Returns True when it changed. A broken file keeps the previous
        credentials in force (and is logged), unless ``strict`` (start-up), where it raises.

        Raises:
            ConfigError: ``strict`` and the file is unreadable or invalid.
        """
        if self._file is None:
            return False
        try:
            entries = load_entries(self._file)
        except ConfigError as exc:
            if strict:
                raise
            log.error("tokens: reload failed, keeping the previous credentials: %s", exc)
            return False
        if strict:
            mode = self.path.stat().st_mode & 0o077
            if mode:
                log.warning(
                    "tokens: %s is readable by group/others (mode %o); chmod 600 it",
                    self.path,
                    self.path.stat().st_mode & 0o777,
                )
        return self._apply(entries, strict)

    def load_text(self, text: str, strict: bool = False) -> bool:
        """Take the entries from a tokens file's text (the state store's copy). A broken text
        keeps the previous credentials (logged), unless ``strict``.

        Raises:
            ConfigError: ``strict`` and the text is invalid.
        """
        try:
            entries = parse_entries(text)
        except ConfigError as exc:
            if strict:
                raise
            log.error("tokens: the state store's copy is invalid, keeping the previous credentials: %s", exc)
            return False
        return self._apply(entries, strict)

    def _apply(self, entries: dict[str, TokenEntry], strict: bool) -> bool:
        changed = {k: v.principal() for k, v in entries.items()} != {k: v.principal() for k, v in self._entries.items()}
        self._entries = entries
        self._by_token_id = {e.token_id: e for e in entries.values() if e.has_token}
        self._cache.clear()
        if changed and not strict:
            log.info(
                "tokens: reloaded %s (%d clients, %d revoked)",
                self.path,
                len(entries),
                sum(e.revoked for e in entries.values()),
            )
        return changed

    def current(self, principal: Principal) -> Principal | None:
        """The principal as the file has it now (None: revoked, removed or changed)."""
        if self._shared is not None and principal == self._shared_principal:
            return principal  # the shared token is changed by changing it everywhere
        entry = self._entries.get(principal.client_id)
        if entry is None or entry.revoked:
            return None
        now = entry.principal()
        return now if now.version == principal.version else None

    def challenge_keys(self, token_id: str) -> tuple[bytes, bytes, Principal] | None:
        """StoredKey, ServerKey and the principal of a token id for challenge authentication;
        None when unknown, revoked, or made before challenge verifiers existed."""
        if token_id == challenge.SHARED_ID and self._shared is not None:
            derived = challenge.derive_keys(self._shared.decode())
            return derived.stored_key, derived.server_key, self._shared_principal
        entry = self._by_token_id.get(token_id)
        keys = entry.challenge_keys() if entry is not None and not entry.revoked else None
        if entry is None or keys is None:
            return None
        return keys[0], keys[1], entry.principal()

    def for_role(self, arn: str) -> Principal | None:
        """The principal an IAM identity authenticates as (--auth aws-iam): the one client
        whose ``aws_roles`` match the ARN's role. None when none does, or when several do (an
        ambiguous file is refused and logged, never resolved by order)."""
        found = [e for e in self._entries.values() if not e.revoked and any(role_matches(p, arn) for p in e.aws_roles)]
        if len(found) > 1:
            log.error(
                "tokens: %s matches the aws_roles of several clients (%s): refused",
                arn,
                ", ".join(sorted(e.client_id for e in found)),
            )
            return None
        return found[0].principal() if found else None

    async def __call__(self, token: str) -> Principal | None:
        if self._shared is not None and hmac.compare_digest(token.encode(), self._shared):
            return self._shared_principal
        parts = parse_token(token)
        if parts is None:
            return None
        key = hmac.new(self._key, token.encode(), hashlib.sha256).digest()
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        token_id, secret = parts
        entry = self._by_token_id.get(token_id)
        if self._limit is None:
            self._limit = asyncio.Semaphore(self.CONCURRENCY)
        async with self._limit:
            ok = await asyncio.to_thread(self._verify, secret, entry)
        # The file may have been reloaded meanwhile: answer from what is in force now.
        current = self._by_token_id.get(token_id)
        if not ok or entry is None or current is None or current.hash != entry.hash or current.revoked:
            return None
        principal = current.principal()
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = principal
        return principal

    @staticmethod
    def _verify(secret: str, entry: TokenEntry | None) -> bool:
        if entry is None:
            waste_time(secret)
            return False
        try:
            return verify_secret(secret, entry.hash)
        except HashFormatError:
            return False
