"""``exit-server`` command line: ``run`` and ``gen-certs``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from shared.errors import ConfigError
from shared.runtime import gcpause
from shared.runtime.cli import (
    add_model_flags,
    add_version_flag,
    announce,
    configure_logging,
    run_guarded,
    settings_from_args,
)
from shared.runtime.fdlimit import DescriptorAlarm, raise_nofile
from shared.runtime.runner import run_service

from .config import ServerConfig
from .token_cli import add_commands as add_token_commands
from .token_cli import run_command as run_token_command

__all__ = ["main"]

log = logging.getLogger("exit_server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exit-server",
        description="Backhaul exit server: public HTTP ingress routed by Host through authenticated tunnels.",
    )
    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="serve public traffic and tunnels",
        description="Serve public HTTP and accept tunnel clients. Every flag also reads "
        "BACKHAUL_<FLAG> and the --config TOML file (flags > env > file). The token comes "
        "from --token-file or BACKHAUL_TOKEN (per-client tokens: --tokens FILE), never from argv. "
        "SIGHUP re-reads --tokens and --access.",
    )
    add_model_flags(run, ServerConfig)
    status = sub.add_parser("status", help="print the connected tunnels (from the admin API)")
    status.add_argument(
        "--admin-addr",
        default=None,
        metavar="HOST:PORT",
        help="admin listener (default: BACKHAUL_ADMIN_ADDR or 127.0.0.1:8690)",
    )
    status.add_argument(
        "--admin-token-file", type=Path, default=None, help="file with the admin token (default: BACKHAUL_ADMIN_TOKEN)"
    )
    status.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    certs = sub.add_parser("gen-certs", help="write a development CA and server certificate")
    certs.add_argument("--out", type=Path, required=True, help="directory for ca.pem, server.pem, server-key.pem")
    certs.add_argument("--hostname", required=True, help="DNS name the clients will connect to")
    certs.add_argument("--ip", action="append", default=[], help="IP address to include (repeatable)")
    add_token_commands(sub)  # token add|rotate|revoke|list, hash-password
    return parser


async def serve(config: ServerConfig, stop: asyncio.Event) -> int:
    from .server import ExitServer

    soft, _ = raise_nofile()
    server = ExitServer(config)
    await server.start()
    gcpause.settle()  # serving: the collector back on, start-up's objects frozen
    DescriptorAlarm(server.metrics.descriptors.labels("emfile").inc).install(asyncio.get_running_loop())
    log.debug("open-file limit %d", soft)
    with contextlib.suppress(NotImplementedError, AttributeError):  # SIGHUP re-reads --tokens and --access
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, server.reload, "SIGHUP")
    admin = f", admin port {server.admin_port}" if server.admin_port else ""
    announce(
        f"exit-server: public port {server.public_port}, control port {server.control_port}{admin}",
        config.log_format,
        "exit_server",
        public_port=server.public_port,
        control_port=server.control_port,
        admin_port=server.admin_port,
    )
    await stop.wait()
    await server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        if args.command in ("token", "hash-password", "access"):
            return run_token_command(args)
        if args.command == "status":
            from .status import print_status

            return print_status(args.admin_addr, args.admin_token_file, args.json)
        if args.command == "gen-certs":
            from .certs import generate_certs

            try:
                fingerprint = generate_certs(args.out, args.hostname, args.ip)
            except ValueError as exc:
                raise ConfigError(f"--ip: {exc}") from None
            print(f"wrote {args.out}/ca.pem, server.pem, server-key.pem")
            print(f"CA SHA-256 fingerprint: {fingerprint}")
            return 0
        config = settings_from_args(ServerConfig, args)
        configure_logging(config.log_level, config.log_format)
        if config.log_format == "text":  # access lines without the logging module's per-line cost
            from shared.runtime.accesslog import AccessWriter

            from . import observe

            observe.ACCESS_WRITER = AccessWriter(sys.stderr)
        from .server import ExitServer

        ExitServer(config)  # validate secrets and TLS files before daemonising
        return run_service(lambda stop: serve(config, stop))

    return run_guarded(command)


if __name__ == "__main__":
    sys.exit(main())
