"""``tunnel-client`` command line: ``run``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from shared.aio.runner import run_service
from shared.cli import add_model_flags, configure_logging, run_guarded, settings_from_args

from .config import ClientConfig

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunnel-client", description="Backhaul tunnel client: an outbound "
                                     "TLS WebSocket to the exit server that serves local upstreams.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="connect and serve",
                         description="Connect to every --server and serve the --upstream routes. Every flag "
                         "also reads BACKHAUL_<FLAG> and the --config TOML file (flags > env > file). The token "
                         "comes from --token-file or BACKHAUL_TOKEN, never from argv.")
    add_model_flags(run, ClientConfig)
    return parser


async def serve(config: ClientConfig, stop: asyncio.Event) -> int:
    from .client import TunnelClient

    client = TunnelClient(config)
    task = asyncio.create_task(client.run())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        await client.shutdown()
        await task
    stopper.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        config = settings_from_args(ClientConfig, args)
        configure_logging(config.log_level)
        from .client import TunnelClient

        TunnelClient(config)  # validate the token and TLS files up front
        return run_service(lambda stop: serve(config, stop))

    return run_guarded(command)


if __name__ == "__main__":
    sys.exit(main())
