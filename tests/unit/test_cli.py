"""shared.runtime.cli: flags generated from the settings model, one-line errors, logging setup."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import Field, SecretStr

from exit_server.config import ServerConfig
from shared.errors import ConfigError
from shared.runtime.cli import SECRET_FIELDS, add_model_flags, configure_logging, die, run_guarded, settings_from_args
from shared.runtime.config import BaseConfig


class Sample(BaseConfig):
    name: str = Field("n", description="a name")
    count: int = 3
    items: list[str] = Field(default_factory=list, description="items")
    maybe: list[str] | None = None
    numbers: tuple[int, ...] = ()
    path: Path | None = None
    enabled: bool = False
    token: SecretStr | None = None


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("BACKHAUL_"):
            monkeypatch.delenv(name)


def parser_for(model: type[BaseConfig]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    add_model_flags(parser, model)
    return parser


def test_flags_follow_the_model() -> None:
    parser = parser_for(Sample)
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(flags) == {"config", "name", "count", "items", "maybe", "numbers", "path", "enabled"}
    assert SECRET_FIELDS == {"token", "admin_token", "state_password"}  # never on argv (visible in ps)
    assert flags["items"].option_strings == ["--items"]
    assert isinstance(flags["items"], argparse._AppendAction)
    assert isinstance(flags["maybe"], argparse._AppendAction)
    assert isinstance(flags["numbers"], argparse._AppendAction)
    assert isinstance(flags["enabled"], argparse._StoreConstAction)
    assert isinstance(flags["path"], argparse._StoreAction)
    assert flags["name"].help == "a name (default: n) [env BACKHAUL_NAME]"
    assert flags["count"].help == "count (default: 3) [env BACKHAUL_COUNT]"
    assert flags["items"].help == "items [env BACKHAUL_ITEMS] (repeatable)"
    assert flags["path"].help == "path [env BACKHAUL_PATH]"


def test_only_given_flags_are_set() -> None:
    args = parser_for(Sample).parse_args(["--enabled", "--items", "a", "--items", "b", "--config", "x.toml"])
    assert vars(args) == {"config": Path("x.toml"), "enabled": True, "items": ["a", "b"]}


def test_settings_from_args_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text("max_streams = 5\nupstream_timeout = 3.0\n")
    monkeypatch.setenv("BACKHAUL_UPSTREAM_TIMEOUT", "4")
    parser = parser_for(ServerConfig)
    args = parser.parse_args(["--insecure-plaintext", "--max-streams", "7", "--config", str(path)])
    config = settings_from_args(ServerConfig, args)
    assert (config.max_streams, config.upstream_timeout, config.insecure_plaintext) == (7, 4.0, True)
    args = parser.parse_args(["--insecure-plaintext"])
    assert settings_from_args(ServerConfig, args).max_streams == 10_000


def test_settings_from_args_without_config_attribute() -> None:
    config = settings_from_args(Sample, argparse.Namespace(count="9"))
    assert config.count == 9


def test_die(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["/usr/bin/exit-server", "run"])
    with pytest.raises(SystemExit) as info:
        die("--max-streams: bad")
    assert info.value.code == 2
    assert capsys.readouterr().err == "exit-server: error: --max-streams: bad\n"
    monkeypatch.setattr("sys.argv", [""])
    with pytest.raises(SystemExit) as info:
        die("boom", code=3)
    assert info.value.code == 3
    assert capsys.readouterr().err == "backhaul: error: boom\n"


def test_run_guarded(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["tunnel-client"])
    assert run_guarded(lambda: 0) == 0

    def bad() -> int:
        raise ConfigError("--server: bad server URL")

    with pytest.raises(SystemExit) as info:
        run_guarded(bad)
    assert info.value.code == 2
    assert capsys.readouterr().err == "tunnel-client: error: --server: bad server URL\n"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    others = {name: logging.getLogger(name).level for name in ("websockets", "aiohttp.access")}
    root.handlers = []
    try:
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers = handlers
        root.setLevel(level)
        for name, value in others.items():
            logging.getLogger(name).setLevel(value)


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging() -> None:
    configure_logging("debug")
    root = logging.getLogger()
    assert root.level == logging.DEBUG
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    assert handler.formatter is not None and "%(name)s" in (handler.formatter._fmt or "")
    assert logging.getLogger("websockets").level == logging.WARNING
    assert logging.getLogger("aiohttp.access").level == logging.WARNING
    configure_logging("nonsense")
    assert root.level == logging.INFO


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_json() -> None:
    import json

    configure_logging("warning", "json")
    root = logging.getLogger()
    assert root.level == logging.WARNING
    (handler,) = root.handlers
    assert handler.formatter is not None
    record = logging.LogRecord("backhaul.test", logging.WARNING, __file__, 1, "session %s: %s", ("s1", "hi"), None)
    line = json.loads(handler.formatter.format(record))
    assert line["level"] == "WARNING" and line["logger"] == "backhaul.test" and line["message"] == "session s1: hi"
    assert "time" in line


@pytest.mark.parametrize("command", ["exit_server", "tunnel_client"])
def test_version_is_read_when_asked_not_at_every_start(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--version`` reads the distribution's metadata (about 2 ms) only when it is given."""
    import importlib

    import shared.runtime.version

    calls: list[int] = []

    def counting() -> str:
        calls.append(1)
        return "9.8.7"

    main = importlib.import_module(f"{command}.__main__")  # the client's import reads it: it says so in Hello
    monkeypatch.setattr(shared.runtime.version, "version", counting)
    parser = main.build_parser()
    assert calls == []
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--version"])
    assert exited.value.code == 0 and calls == [1]
    prog = command.replace("_", "-")
    assert capsys.readouterr().out == f"{prog} 9.8.7\n"


def test_exit_server_reads_its_version_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    import exit_server
    import shared.runtime.version

    monkeypatch.setattr(shared.runtime.version, "version", lambda: "1.2.3")
    assert exit_server.__version__ == "1.2.3"
    with pytest.raises(AttributeError, match="no_such"):
        exit_server.no_such  # noqa: B018
