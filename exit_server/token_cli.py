"""``exit-server token add|rotate|revoke|list`` and ``exit-server hash-password``.

A new token is printed once, alone on stdout (so ``token add ... > client.token`` works); what
happened goes to stderr. Secrets are never read from argv: ``hash-password`` reads the password
from stdin (or prompts when stdin is a terminal).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from shared.errors import ConfigError

from .hashing import hash_secret
from .tokens import CLIENT_ID, TokenEntry, load_entries, new_entry, save_entries, validate_pattern

__all__ = ["add_commands", "run_command"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``token`` and ``hash-password`` sub-commands."""
    token = sub.add_parser(
        "token",
        help="manage per-client tokens (--tokens FILE)",
        description="Manage the per-client credentials file read by `run --tokens`. "
        "The file holds salted scrypt hashes only; add and rotate print the new token once.",
    )
    actions = token.add_subparsers(dest="token_action", required=True)
    for name, text in (
        ("add", "add a client and print its token"),
        ("rotate", "give a client a new token (the old one stops working; live sessions close)"),
        ("revoke", "revoke a client (its live sessions close within a second)"),
        ("list", "list clients (never tokens or hashes)"),
    ):
        p = actions.add_parser(name, help=text, description=text)
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--tokens", type=Path, metavar="FILE", help="the tokens file")
        where.add_argument(
            "--state",
            metavar="URL",
            help="the fleet's state store, redis://HOST:PORT[/DB] or rediss://: the change reaches every exit "
            "server within a second (password: --state-password-file or BACKHAUL_STATE_PASSWORD)",
        )
        p.add_argument("--state-password-file", type=Path, metavar="FILE", help="file holding the store's password")
        p.add_argument(
            "--state-ca-file", type=Path, metavar="FILE", help="CA bundle verifying a rediss:// store's certificate"
        )
        if name != "list":
            p.add_argument("--client", required=True, help="client id (letters, digits, . _ -)")
        if name == "add":
            p.add_argument(
                "--host",
                action="append",
                default=[],
                metavar="PATTERN",
                help="hostname the client may register: exact, *.suffix, default or * (repeatable)",
            )
            p.add_argument(
                "--tcp-port",
                action="append",
                default=[],
                type=int,
                metavar="PORT",
                help="public TCP port the client may ask for (repeatable)",
            )
            p.add_argument(
                "--aws-role",
                action="append",
                default=[],
                metavar="ARN_PATTERN",
                help="IAM role (arn:aws:iam::ACCOUNT:role/NAME, * and ? allowed) that authenticates as this client "
                "with `tunnel-client run --auth aws-iam`; the client then gets no token unless --with-token "
                "(repeatable)",
            )
            p.add_argument(
                "--with-token", action="store_true", help="with --aws-role: print a token as well (both work)"
            )
    access = sub.add_parser(
        "access",
        help="the fleet's access rules in the state store (--state)",
        description="Push or show the access rules (the TOML of an --access file) that every exit server of a "
        "fleet sharing --state enforces; a push is validated first and in force everywhere within a second.",
    )
    access_actions = access.add_subparsers(dest="access_action", required=True)
    for name, text in (
        ("push", "validate an access file and make it the fleet's rules"),
        ("show", "print the fleet's access rules"),
    ):
        p = access_actions.add_parser(name, help=text, description=text)
        p.add_argument("--state", required=True, metavar="URL", help="the fleet's state store, redis:// or rediss://")
        p.add_argument("--state-password-file", type=Path, metavar="FILE", help="file holding the store's password")
        p.add_argument(
            "--state-ca-file", type=Path, metavar="FILE", help="CA bundle verifying a rediss:// store's certificate"
        )
        if name == "push":
            p.add_argument("file", type=Path, metavar="FILE", help="the access file (TOML, see --access)")
    pw = sub.add_parser(
        "hash-password",
        help="hash a password or bearer token for --access (reads stdin)",
        description="Print the scrypt hash of a password (basic auth) or bearer token for the "
        "--access file. The secret is read from stdin, or prompted for on a terminal.",
    )
    pw.add_argument("--user", help="print USER:HASH instead of the hash alone")


def run_command(args: argparse.Namespace) -> int:
    """Run ``token ...`` or ``hash-password``.

    Raises:
        ConfigError: bad arguments or an unusable file (one line, exit status 2).
    """
    if args.command == "hash-password":
        return _hash_password(args.user)
    if args.command == "access":
        return _access_command(args)
    if args.state is not None:
        return _state_command(args)
    path: Path = args.tokens
    action = args.token_action
    entries = load_entries(path) if path.exists() else {}
    if action == "list":
        _print_list(entries)
        return 0
    client = args.client
    if not CLIENT_ID.match(client):
        raise ConfigError(f"--client: bad client id {client!r} (letters, digits, . _ -; at most 64)")
    if action != "add" and client not in entries:
        raise ConfigError(f"--client: no client {client} in {path}")
    entry, token = _changed_entry(args, entries, client, action)
    entries[client] = entry
    save_entries(path, entries)
    if action == "revoke":
        print(f"revoked client {client}; a running exit server closes its sessions within a second", file=sys.stderr)
        return 0
    if not token:
        print(
            f"added client {client}, authenticated by AWS IAM as {', '.join(entry.aws_roles)} (no token)",
            file=sys.stderr,
        )
        return 0
    print(
        f"{'added' if action == 'add' else 'rotated'} client {client} (token_id {entry.token_id}); "
        "the token is printed once below, store it now",
        file=sys.stderr,
    )
    print(token, flush=True)
    return 0


def _print_list(entries: dict[str, TokenEntry]) -> None:
    for e in sorted(entries.values(), key=lambda e: e.client_id):
        state = "revoked" if e.revoked else "active"
        host_list = ",".join(e.hosts) or "-"
        port_list = ",".join(map(str, e.tcp_ports)) or "-"
        roles = f"\taws_roles={','.join(e.aws_roles)}" if e.aws_roles else ""
        print(
            f"{e.client_id}\t{state}\ttoken_id={e.token_id or '-'}\thosts={host_list}\ttcp_ports={port_list}\t"
            f"created={e.created or '-'}{roles}"
        )


def _changed_entry(
    args: argparse.Namespace, entries: dict[str, TokenEntry], client: str, action: str
) -> tuple[TokenEntry, str]:
    """The entry ``action`` makes for ``client`` and its new token ("" for none).

    Raises:
        ConfigError: the action does not apply (an existing client added, an unknown one
            rotated or revoked, an IAM-only client rotated) or a bad argument.
    """
    if action == "add":
        if client in entries and not entries[client].revoked:
            raise ConfigError(f"--client: {client} exists already (use rotate for a new token)")
        try:
            hosts = [validate_pattern(h) for h in args.host]
        except ValueError as exc:
            raise ConfigError(f"--host: {exc}") from None
        if not hosts and not args.tcp_port:
            raise ConfigError("--host or --tcp-port: a client must be allowed at least one hostname or port")
        if any(not 1 <= p <= 65535 for p in args.tcp_port):
            raise ConfigError("--tcp-port: ports are 1-65535")
        if args.with_token and not args.aws_role:
            raise ConfigError("--with-token: only with --aws-role (a client without one always gets a token)")
        try:
            return new_entry(client, hosts, args.tcp_port, args.aws_role, token=not args.aws_role or args.with_token)
        except ValueError as exc:
            raise ConfigError(f"--aws-role: {exc}") from None
    old = entries.get(client)
    if old is None:
        raise ConfigError(f"--client: no client {client}")
    if action == "revoke":
        old.revoked = True
        return old, ""
    if not old.has_token:
        raise ConfigError(f"--client: {client} authenticates by AWS IAM only: there is no token to rotate")
    return new_entry(client, old.hosts, old.tcp_ports, old.aws_roles)


def _hash_password(user: str | None) -> int:
    if sys.stdin.isatty():
        secret = getpass.getpass("password: ")
        if getpass.getpass("again: ") != secret:
            raise ConfigError("the two entries differ")
    else:
        secret = sys.stdin.readline().rstrip("\r\n")
    if not secret:
        raise ConfigError("empty password")
    if user is not None and (":" in user or not user):
        raise ConfigError("--user: a user name cannot be empty or contain ':'")
    hashed = hash_secret(secret)
    print(f"{user}:{hashed}" if user is not None else hashed)
    return 0


def _store(args: argparse.Namespace) -> tuple[str, str | None, Path | None]:
    """The ``--state`` URL, the store's password (file or BACKHAUL_STATE_PASSWORD) and CA file.

    Raises:
        ConfigError: a malformed URL, or a password in it.
    """
    import os

    from pydantic import SecretStr

    from shared.runtime.config import read_secret

    url: str = args.state
    if not url.startswith(("redis://", "rediss://")) or "@" in url:
        raise ConfigError("--state: expected redis://HOST:PORT[/DB] or rediss://... (no password in the URL)")
    password = None
    if args.state_password_file is not None or os.environ.get("BACKHAUL_STATE_PASSWORD"):
        env = os.environ.get("BACKHAUL_STATE_PASSWORD")
        password = read_secret(args.state_password_file, SecretStr(env) if env else None, "state-password")
    ca_file: Path | None = args.state_ca_file
    if ca_file is not None and not url.startswith("rediss://"):
        raise ConfigError("--state-ca-file: needs --state rediss://... (the store's TLS)")
    return url, password, ca_file


def _access_command(args: argparse.Namespace) -> int:
    """``access push|show --state URL``: the fleet's access rules (exit_server/state.py)."""
    from .state import push_access, read_access

    url, password, ca_file = _store(args)
    if args.access_action == "show":
        text, version = read_access(url, password, ca_file)
        if text is None:
            print("no access rules in the store (every public hostname is open)", file=sys.stderr)
            return 0
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        print(f"access rules version {version}", file=sys.stderr)
        return 0
    path: Path = args.file
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"FILE: cannot read {path}: {exc.strerror}") from None
    version = push_access(url, password, text, ca_file)
    print(f"pushed {path} (access rules version {version}; every exit server within a second)", file=sys.stderr)
    return 0


def _state_command(args: argparse.Namespace) -> int:
    """``token ... --state URL``: the same actions on the fleet's store, each one atomic and
    acknowledged only once Redis has it (exit_server/state.py)."""
    from .state import read_state, update

    url, password, ca_file = _store(args)
    action = args.token_action
    if action == "list":
        entries, version = read_state(url, password, ca_file)
        _print_list(entries)
        print(f"state version {version}", file=sys.stderr)
        return 0
    client = args.client
    if not CLIENT_ID.match(client):
        raise ConfigError(f"--client: bad client id {client!r} (letters, digits, . _ -; at most 64)")
    made: dict[str, str] = {}

    def change(entries: dict[str, TokenEntry]) -> dict[str, TokenEntry]:
        entry, token = _changed_entry(args, entries, client, action)
        entries[client] = entry
        made["token"] = token
        made["token_id"] = entry.token_id
        return entries

    version = update(url, password, change, ca_file)
    verb = {"add": "added", "rotate": "rotated", "revoke": "revoked"}[action]
    print(f"{verb} client {client} (state version {version}; every exit server within a second)", file=sys.stderr)
    if made.get("token"):
        print("the token is printed once below, store it now", file=sys.stderr)
        print(made["token"], flush=True)
    return 0
