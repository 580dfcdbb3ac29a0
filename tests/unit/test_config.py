"""shared.runtime.config: flags > BACKHAUL_* environment > TOML file, and one-line errors naming the flag."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from exit_server.config import ServerConfig
from shared.errors import ConfigError
from shared.runtime.config import (
    BaseConfig,
    describe_validation_error,
    is_loopback_host,
    load_settings,
    parse_addr,
    read_secret,
    split_list,
)
from tunnel_client.config import ClientConfig

PLAIN = {"insecure_plaintext": True}
CLIENT = {"server": ["wss://exit.example.com:8443"], "upstream": ["app.example.com=http://127.0.0.1:8000"]}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No BACKHAUL_* variable of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("BACKHAUL_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "backhaul.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- precedence


def test_base_config() -> None:
    assert BaseConfig.model_config["env_prefix"] == "BACKHAUL_"
    assert BaseConfig.model_config["extra"] == "forbid"
    assert BaseConfig.model_config["frozen"] is True


def test_defaults() -> None:
    config = load_settings(ServerConfig, PLAIN)
    assert type(config).__name__ == "ServerConfig" and isinstance(config, ServerConfig)
    assert config.max_streams == 10_000 and config.public_addr == "127.0.0.1:8080"


def test_precedence_flags_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = toml(
        tmp_path, 'max_streams = 5\nupstream_timeout = 7.5\npublic_addr = "127.0.0.1:1111"\ninsecure_plaintext = true\n'
    )
    config = load_settings(ServerConfig, {}, path)
    assert (config.max_streams, config.upstream_timeout, config.public_addr) == (5, 7.5, "127.0.0.1:1111")
    monkeypatch.setenv("BACKHAUL_MAX_STREAMS", "6")
    monkeypatch.setenv("BACKHAUL_UPSTREAM_TIMEOUT", "8")
    config = load_settings(ServerConfig, {}, path)
    assert (config.max_streams, config.upstream_timeout, config.public_addr) == (6, 8.0, "127.0.0.1:1111")
    config = load_settings(ServerConfig, {"max_streams": "7"}, path)
    assert (config.max_streams, config.upstream_timeout, config.public_addr) == (7, 8.0, "127.0.0.1:1111")


def test_the_file_is_read_only_by_the_load_that_names_it(tmp_path: Path) -> None:
    """The settings class itself is built, not a subclass made per load (a new pydantic model,
    its schema built again at every start), and the file does not outlive its load: neither
    a later load without it, nor one that failed, nor a direct construction reads it."""
    path = toml(tmp_path, "max_streams = 5\n")
    assert type(load_settings(ServerConfig, PLAIN, path)) is ServerConfig
    assert load_settings(ServerConfig, PLAIN).max_streams == 10_000
    with pytest.raises(ConfigError):
        load_settings(ServerConfig, {**PLAIN, "max_streams": "x"}, path)
    assert ServerConfig(**PLAIN).max_streams == 10_000


def test_environment_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("backhaul_max_streams", "9")
    assert load_settings(ServerConfig, PLAIN).max_streams == 9


def test_unknown_environment_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKHAUL_NO_SUCH_SETTING", "1")
    assert load_settings(ServerConfig, PLAIN).max_streams == 10_000


def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKHAUL_TOKEN", "s3cret")
    config = load_settings(ServerConfig, PLAIN)
    assert isinstance(config.token, SecretStr) and config.token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(config)


def test_client_lists_from_each_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = toml(tmp_path, 'server = ["wss://file.example:1"]\nupstream = ["default=http://127.0.0.1:1"]\n')
    config = load_settings(ClientConfig, {}, path)
    assert config.server == ["wss://file.example:1"] and config.upstream == ["default=http://127.0.0.1:1"]
    monkeypatch.setenv("BACKHAUL_SERVER", "wss://a.example:1, wss://b.example:2,")
    monkeypatch.setenv("BACKHAUL_UPSTREAM", "app.example.com=http://127.0.0.1:8000\n*.example.com/api=https://10.0.0.2")
    monkeypatch.setenv("BACKHAUL_LABEL", "env=prod,team=a=b")
    config = load_settings(ClientConfig, {}, path)
    assert config.server == ["wss://a.example:1", "wss://b.example:2"]
    assert [u.host for u in config.upstreams] == ["app.example.com", "*.example.com"]
    assert config.upstreams[1].path_prefix == "/api" and config.upstreams[1].origin == "https://10.0.0.2"
    assert config.labels == {"env": "prod", "team": "a=b"}
    config = load_settings(ClientConfig, {"server": ["wss://flag.example:3"]}, path)
    assert config.server == ["wss://flag.example:3"]


def test_client_instance_id_defaults_to_random_hex() -> None:
    first, second = load_settings(ClientConfig, CLIENT), load_settings(ClientConfig, CLIENT)
    assert len(first.instance_id) == 16 and int(first.instance_id, 16) >= 0
    assert first.instance_id != second.instance_id


# ---------------------------------------------------------------- errors name the flag


@pytest.mark.parametrize(
    ("cls", "cli", "message"),
    [
        (ServerConfig, {**PLAIN, "max_streams": 0}, "--max-streams: Input should be greater than or equal to 1"),
        (ServerConfig, {**PLAIN, "public_addr": "nope"}, "--public-addr: expected HOST:PORT, got 'nope'"),
        (ServerConfig, {**PLAIN, "public_scheme": "ftp"}, "--public-scheme: "),
        (ServerConfig, {}, "config: --tls-cert and --tls-key are required"),
        (ServerConfig, {**PLAIN, "control_addr": "0.0.0.0:8443"}, "config: --insecure-plaintext is only allowed"),
        (ServerConfig, {**PLAIN, "heartbeat_timeout": 1}, "config: --heartbeat-timeout must exceed"),
        (ClientConfig, {}, "config: at least one --server is required"),
        (ClientConfig, {"server": CLIENT["server"]}, "config: at least one --upstream"),
        (ClientConfig, {**CLIENT, "upstream": ["Bad Host=http://x"]}, "--upstream: bad host pattern"),
        (ClientConfig, {**CLIENT, "upstream": ["a=ftp://x"]}, "--upstream: bad upstream URL"),
        (ClientConfig, {**CLIENT, "server": ["https://x"]}, "--server: bad server URL"),
        (ClientConfig, {**CLIENT, "server": ["ws://x.example:1"]}, "ws:// needs --insecure-plaintext"),
        (ClientConfig, {**CLIENT, "label": ["novalue"]}, "--label: expected KEY=VALUE"),
        (ClientConfig, {**CLIENT, "backoff_base": 5, "backoff_cap": 1}, "--backoff-cap must be at least"),
    ],
)
def test_errors_name_the_flag(cls: type[BaseConfig], cli: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(cls, cli)
    assert str(info.value).startswith(message) or message in str(info.value)
    assert "\n" not in str(info.value)


def test_environment_errors_name_the_flag_without_echoing_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKHAUL_MAX_STREAMS", "hunter2")
    with pytest.raises(ConfigError, match="^--max-streams: Input should be a valid integer") as info:
        load_settings(ServerConfig, PLAIN)
    assert "hunter2" not in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^--config: no such file: "):
        load_settings(ServerConfig, PLAIN, tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="^--config: no such file: "):
        load_settings(ServerConfig, PLAIN, tmp_path)  # a directory is not a file


def test_malformed_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^--config: "):
        load_settings(ServerConfig, PLAIN, toml(tmp_path, "max_streams = [\n"))


def test_unknown_key_in_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^--bogus-key: Extra inputs are not permitted"):
        load_settings(ServerConfig, PLAIN, toml(tmp_path, "bogus_key = 1\n"))


def test_describe_validation_error_without_location() -> None:
    class Model(BaseModel):
        x: int

    try:
        Model.model_validate("not a dict")
    except ValidationError as exc:
        assert describe_validation_error(exc).startswith("config: ")
    else:  # pragma: no cover
        raise AssertionError("no error")


# ---------------------------------------------------------------- helpers


def test_split_list() -> None:
    assert split_list("a, b,\nc,,") == ["a", "b", "c"]
    assert split_list("") == []
    assert split_list(["x"]) == ["x"]
    assert split_list(None) is None


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:443", ("::1", 443)),
        ("example.com:65535", ("example.com", 65535)),
    ],
)
def test_parse_addr(value: str, parsed: tuple[str, int]) -> None:
    assert parse_addr(value) == parsed


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("8080", "expected HOST:PORT"),
        (":8080", "expected HOST:PORT"),
        ("host:http", "bad port"),
        ("host:65536", "port out of range"),
        ("host:-1", "port out of range"),
    ],
)
def test_parse_addr_errors(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_addr(value)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("10.0.0.1", False),
        ("0.0.0.0", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_read_secret(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  from-file \n")
    assert read_secret(path, SecretStr("ignored"), "token") == "from-file"
    assert read_secret(None, SecretStr(" value "), "token") == "value"


def test_read_secret_refuses_empty_and_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^a token is required: --token-file FILE or BACKHAUL_TOKEN"):
        read_secret(None, None, "token")
    with pytest.raises(ConfigError, match="an empty admin_token is refused"):
        read_secret(None, SecretStr("   "), "admin_token")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="required"):
        read_secret(empty, None, "token")
    with pytest.raises(ConfigError, match="^--token-file: cannot read .*absent"):
        read_secret(tmp_path / "absent", None, "token")
