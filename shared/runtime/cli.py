"""Command-line plumbing shared by ``exit-server`` and ``tunnel-client``: flags generated from
the settings model (so a flag, its ``BACKHAUL_*`` variable and its TOML key never drift apart),
one-line errors with exit status 2, and logging setup."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import typing
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings

from ..errors import ConfigError, TunnelError
from .config import load_settings
from .textsafe import escape_controls

__all__ = [
    "EscapingFormatter",
    "add_model_flags",
    "add_version_flag",
    "announce",
    "configure_logging",
    "die",
    "rfc3339",
    "run_guarded",
    "settings_from_args",
]

#: Settings never accepted on argv (LESSONS 8: secrets visible in ps).
SECRET_FIELDS = frozenset({"token", "admin_token", "state_password"})


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return True
    return any(_is_list(a) for a in typing.get_args(annotation)) if origin is not None else False


class _VersionAction(argparse.Action):
    """``--version``: the installed version is read (distribution metadata, about 2 ms) when
    the flag is given, not while every start builds the parser."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> typing.NoReturn:
        from .version import version

        sys.stdout.write(f"{parser.prog} {version()}\n")  # stdout, as argparse's own action
        parser.exit()


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """``--version`` on ``parser`` (``PROG VERSION`` on stdout, status 0)."""
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseSettings]) -> None:
    """Add ``--flag`` for every field of ``model`` except secrets. Defaults stay unset so
    that only flags actually given override the environment and the file."""
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML file with settings (lowest precedence)")
    for name, field in model.model_fields.items():
        if name in SECRET_FIELDS:
            continue
        flag = "--" + name.replace("_", "-")
        env = "BACKHAUL_" + name.upper()
        default = "" if field.default is None or _is_list(field.annotation) else f" (default: {field.default})"
        help_text = f"{field.description or name}{default} [env {env}]"
        if field.annotation is bool:
            parser.add_argument(
                flag, dest=name, action="store_const", const=True, default=argparse.SUPPRESS, help=help_text
            )
        elif _is_list(field.annotation):
            parser.add_argument(
                flag,
                dest=name,
                action="append",
                default=argparse.SUPPRESS,
                metavar="VALUE",
                help=help_text + " (repeatable)",
            )
        else:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar="VALUE", help=help_text)


def settings_from_args(model: type[Any], args: argparse.Namespace) -> Any:
    """Load settings with precedence flags > environment > ``--config`` file."""
    cli = {k: v for k, v in vars(args).items() if k in model.model_fields}
    return load_settings(model, cli, getattr(args, "config", None))


def die(message: str, code: int = 2) -> typing.NoReturn:
    """Print one line to stderr and exit."""
    prog = Path(sys.argv[0]).name or "backhaul"
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def rfc3339(created: float) -> str:
    """A log record's time as RFC 3339 UTC with milliseconds (``2026-12-02T16:01:44.523Z``)."""
    stamp = time.gmtime(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", stamp) + f".{int(created * 1000) % 1000:03d}Z"


class EscapingFormatter(logging.Formatter):
    """The text formatter: RFC 3339 UTC times, and control characters in each message escaped
    (issue 15 item 7): a caller's ``%0d%0a`` in a path can no longer forge a log line, nor
    ``%1b`` reach a terminal. Tracebacks keep their own line breaks."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return rfc3339(record.created)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def _json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    class Rfc3339JsonFormatter(JsonFormatter):
        def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
            return rfc3339(record.created)

    return Rfc3339JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger", "asctime": "time"},
    )


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Logs on stderr, as text lines or as JSON objects (python-json-logger) through the
    standard logging module, so library log lines come out in the same format. Times are
    RFC 3339 UTC in both."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_json_formatter())
    else:
        handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def announce(text: str, fmt: str, logger: str, **fields: object) -> None:
    """A start-up line on stdout (ports chosen, ...): plain text, or one JSON object in JSON
    log mode with the keys every JSON log line has, so that a JSON log pipeline sees no plain
    line and no line without a logger."""
    if fmt == "json":
        line = {"time": rfc3339(time.time()), "level": "INFO", "logger": logger, "message": text, **fields}
        print(json.dumps(line), flush=True)
    else:
        print(text, flush=True)


def _leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups: TaskGroup wraps what failed."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def run_guarded(func: typing.Callable[[], int]) -> int:
    """Run a command. A ConfigError (even inside a TaskGroup's exception group) becomes one
    line and exit status 2; any other failure one line and status 1 (the traceback is logged at
    debug level), so a supervisor with restart-on-failure always sees a failure."""
    try:
        return func()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 (the process boundary: everything becomes one line)
        leaf = _leaf(exc)
        if isinstance(leaf, ConfigError):
            die(str(leaf))
        if isinstance(leaf, TunnelError):  # our own errors say what happened in one line
            die(str(leaf), 1)
        logging.getLogger("backhaul").debug("command failed", exc_info=exc)
        detail = str(leaf) or type(leaf).__name__
        die(f"{detail} ({type(leaf).__name__}; --log-level debug shows where)", 1)
