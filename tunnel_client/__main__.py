"""``tunnel-client`` command line: ``run``, ``doctor``, ``healthcheck``, ``audit``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from shared.runtime import gcpause
from shared.runtime.cli import add_model_flags, add_version_flag, configure_logging, run_guarded, settings_from_args
from shared.runtime.fdlimit import DescriptorAlarm, raise_nofile
from shared.runtime.runner import run_service

from .audit import add_audit_parser, audit_command
from .config import DEFAULT_ADMIN_ADDR, ClientConfig

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnel-client",
        description="Backhaul tunnel client: an outbound TLS WebSocket to the exit server that serves local upstreams.",
    )
    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="connect and serve",
        description="Connect to every --server and serve the --upstream routes. Every flag "
        "also reads BACKHAUL_<FLAG> and the --config TOML file (flags > env > file). The token "
        "comes from --token-file or BACKHAUL_TOKEN, never from argv.",
    )
    add_model_flags(run, ClientConfig)
    doctor = sub.add_parser(
        "doctor",
        help="check the path to each exit server and to the upstreams, step by step",
        description="Take the same flags, environment and --config as run, and check in order: the "
        "configuration; which proxy is used and why; DNS; TCP; the proxy's CONNECT or SOCKS answer; "
        "the TLS handshake and certificate (interception, --pin); the WebSocket upgrade and the "
        "token (no route is registered); clock skew; round-trip time; each upstream. Each check "
        "prints a verdict and, on failure, a hint. Exit status 1 when any check fails.",
    )
    add_model_flags(doctor, ClientConfig)
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    health = sub.add_parser(
        "healthcheck",
        help="exit 0 when the local client is connected and registered",
        description="Ask the local client's admin listener for /healthz: exit 0 when at least "
        "one session is connected and registered, 1 otherwise (for ECS healthCheck and Docker "
        "HEALTHCHECK).",
    )
    health.add_argument(
        "--admin-addr",
        default=None,
        metavar="HOST:PORT",
        help="the client's admin listener (default: BACKHAUL_ADMIN_ADDR, else every local client's run file, "
        "else 127.0.0.1:8691)",
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default 3)")
    add_audit_parser(sub)
    return parser


def healthcheck(admin_addr: str | None, timeout: float) -> int:
    """Exit status 0 when the client's /healthz answers 200.

    Without ``--admin-addr`` (or ``BACKHAUL_ADMIN_ADDR``) it asks every client whose run file it
    finds (tunnel_client/adminaddr.py; a client whose default port was taken listens elsewhere),
    and all of them must be healthy; with no run file, the default address."""
    import os
    import urllib.error
    import urllib.request

    from .adminaddr import live_admin_addrs

    explicit = admin_addr or os.environ.get("BACKHAUL_ADMIN_ADDR")
    addrs = [explicit] if explicit else (live_admin_addrs() or [DEFAULT_ADMIN_ADDR])
    healthy = True
    for addr in addrs:
        try:
            with urllib.request.urlopen(f"http://{addr}/healthz", timeout=timeout) as resp:  # noqa: S310 (local)
                ok = resp.status == 200
        except urllib.error.HTTPError as exc:
            ok = exc.code == 200
        except (urllib.error.URLError, OSError) as exc:
            print(f"tunnel-client: unhealthy: {addr}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
            healthy = False
            continue
        healthy = healthy and ok
        if not ok:
            print(f"tunnel-client: unhealthy: {addr}", file=sys.stderr)
    print("healthy" if healthy else "unhealthy")
    return 0 if healthy else 1


async def serve(config: ClientConfig, stop: asyncio.Event) -> int:
    from .client import TunnelClient

    raise_nofile()  # upstream connections and streams are descriptors too (shared/runtime/fdlimit.py)
    client = TunnelClient(config)
    DescriptorAlarm().install(asyncio.get_running_loop())
    client.killswitch.install_signal_handler(asyncio.get_running_loop())  # SIGUSR1 toggles the kill switch
    task = asyncio.create_task(client.run())
    gcpause.settle()  # started: the collector back on, start-up's objects frozen
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await client.shutdown()
    finally:
        stopper.cancel()
    await task  # raises what run() failed with (a busy --admin-addr, ...): never exit 0 on failure
    return 0


def doctor_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from shared.errors import ConfigError
    from shared.runtime.config import read_secret

    from .doctor import config_failure, diagnose, render

    try:
        config = settings_from_args(ClientConfig, args)
        token = "" if config.auth == "aws-iam" else read_secret(config.token_file, config.token, "token")
    except (ConfigError, ValidationError, ValueError) as exc:
        render(config_failure(exc), args.json)
        return 2
    checks = asyncio.run(diagnose(config, token))
    render(checks, args.json)
    return 1 if any(c.failed for c in checks) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        if args.command == "healthcheck":
            return healthcheck(args.admin_addr, args.timeout)
        if args.command == "audit":
            return audit_command(args)
        if args.command == "doctor":
            return doctor_command(args)
        config = settings_from_args(ClientConfig, args)
        configure_logging(config.log_level, config.log_format)
        from .client import TunnelClient

        TunnelClient(config)  # validate the token and TLS files up front
        return run_service(lambda stop: serve(config, stop))

    return run_guarded(command)


if __name__ == "__main__":
    sys.exit(main())
