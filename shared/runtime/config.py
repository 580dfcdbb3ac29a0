"""Configuration loading shared by both command lines: flags > BACKHAUL_* environment > TOML
file given by ``--config`` (pydantic-settings). Validation errors become one clear line."""

from __future__ import annotations

import ipaddress
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from ..errors import ConfigError

__all__ = [
    "url_port",
    "BaseConfig",
    "describe_validation_error",
    "is_loopback_host",
    "load_settings",
    "optional_addr",
    "parse_addr",
    "read_secret",
    "split_list",
]

S = TypeVar("S", bound="BaseConfig")


#: The ``--config`` file :func:`load_settings` is reading, for :class:`BaseConfig`'s sources.
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("backhaul_config_file", default=None)


class BaseConfig(BaseSettings):
    """Base of both sides' settings: ``BACKHAUL_`` environment prefix, unknown keys refused.
    Sources, first wins: the arguments (flags), ``BACKHAUL_*``, the ``--config`` TOML file
    while :func:`load_settings` reads one."""

    model_config = SettingsConfigDict(env_prefix="BACKHAUL_", extra="forbid", frozen=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = _CONFIG_FILE.get()
        if config_file is None:
            return init_settings, env_settings
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=config_file)


def load_settings(cls: type[S], cli: dict[str, Any], config_file: Path | None = None) -> S:
    """Build settings from flags (``cli``), the environment and an optional TOML file.

    Raises:
        ConfigError: a value is invalid; the message names the setting.
    """
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"--config: no such file: {config_file}")

    # The file reaches the sources through a context variable, not a subclass made per call:
    # a subclass is a new pydantic model, its schema built again at every start (5 to 7 ms).
    token = _CONFIG_FILE.set(config_file)
    try:
        return cls(**cli)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    except ValueError as exc:  # TOML syntax errors
        raise ConfigError(f"--config: {exc}") from None
    finally:
        _CONFIG_FILE.reset(token)


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the first bad setting as its flag, without echoing secrets."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    flag = "--" + loc[0].replace("_", "-") if loc else "config"
    msg = str(first.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{flag}: {msg}"


def split_list(value: Any) -> Any:
    """Accept a list, or a comma/newline separated string (environment variables)."""
    if isinstance(value, str):
        return [item.strip() for item in value.replace("\n", ",").split(",") if item.strip()]
    return value


def parse_addr(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[V6]:PORT`` (port 0 picks a free port).

    Raises:
        ValueError: not of that form.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad port in {value!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, number


def url_port(url: str) -> int | None:
    """The explicit port of a URL (None when it has none), checked to be 1-65535.

    ``urllib`` would accept ``:97836`` at parse time and fail (or wrap) only when a connection
    is made, so every URL flag calls this at load.

    Raises:
        ValueError: a port that is not a number from 1 to 65535.
    """
    netloc = urlsplit(url).netloc
    host_port = netloc.rpartition("@")[2]
    host, sep, port = host_port.rpartition(":")
    if not sep or (host.startswith("[") is not host.endswith("]")) or "]" in port:
        return None  # no port, or the colon belongs to a bare IPv6 literal
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port out of range (1-65535) in {url!r}")
    return int(port)


def optional_addr(value: str | None) -> str | None:
    """Validator for an optional ``HOST:PORT`` setting; an empty value means off (None).

    Raises:
        ValueError: not of the form HOST:PORT.
    """
    if value:
        parse_addr(value)
    return value or None


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_secret(path: Path | None, value: SecretStr | None, what: str) -> str:
    """Resolve a secret from a file (first line) or a value; refuse an empty one.

    Raises:
        ConfigError: neither given, unreadable, or empty.
    """
    secret = ""
    if path is not None:
        try:
            secret = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--{what}-file: cannot read {path}: {exc.strerror}") from None
    elif value is not None:
        secret = value.get_secret_value().strip()
    if not secret:
        raise ConfigError(
            f"a {what} is required: --{what}-file FILE or BACKHAUL_{what.upper().replace('-', '_')} "
            f"(an empty {what} is refused)"
        )
    return secret
