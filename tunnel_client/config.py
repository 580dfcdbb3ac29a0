"""Tunnel-client settings (flags > BACKHAUL_* environment > TOML file)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from shared.messages import MAX_ROUTES, MAX_TCP
from shared.runtime.config import BaseConfig, is_loopback_host, optional_addr, split_list, url_port

from .guard import parse_allow_paths

__all__ = ["DEFAULT_ADMIN_ADDR", "ClientConfig", "TcpTarget", "Upstream", "parse_tcp", "parse_upstream"]

_HOST_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-.*")


@dataclass(frozen=True, slots=True)
class Upstream:
    """``HOST[/PREFIX]=URL``: where requests for a host (and path prefix) go."""

    host: str
    path_prefix: str
    scheme: str
    netloc: str
    base_path: str

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    #: (scheme, host, port) to connect to, IPv6 literals without brackets (set once, not per request)
    address: tuple[str, str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        host, sep, port = self.netloc.rpartition(":")
        if not sep or not port.isdigit() or host.count(":") and not host.endswith("]"):
            host, port = self.netloc, ("443" if self.scheme == "https" else "80")
        object.__setattr__(self, "address", (self.scheme, host.strip("[]"), int(port)))


def parse_upstream(spec: str) -> Upstream:
    """Parse ``HOST[/PREFIX]=URL``; HOST is exact, ``*.example.com`` or ``default``.

    Raises:
        ValueError: malformed host, prefix or URL.
    """
    left, sep, url = spec.partition("=")
    if not sep or not left or not url:
        raise ValueError(f"expected HOST=URL, got {spec!r}")
    host, slash, prefix = left.partition("/")
    host = host.lower()
    prefix = "/" + prefix if slash else "/"
    bad_wildcard = "*" in host[2:] or ("*" in host and not host.startswith("*."))
    if host != "default" and (not set(host) <= _HOST_CHARS or bad_wildcard):
        raise ValueError(f"bad host pattern {host!r} (exact, *.example.com or default)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "h2c") or not parts.netloc:
        raise ValueError(f"bad upstream URL {url!r} (http://, https:// or h2c:// with a host)")
    url_port(url)
    return Upstream(host, prefix.rstrip("/") or "/", parts.scheme, parts.netloc, parts.path.rstrip("/"))


@dataclass(frozen=True, slots=True)
class TcpTarget:
    """``PUBLIC_PORT=HOST:PORT``: a public TCP port on the exit server forwarded to HOST:PORT."""

    public_port: int
    host: str
    port: int


def parse_tcp(spec: str) -> TcpTarget:
    """Parse ``PUBLIC_PORT=HOST:PORT``.

    Raises:
        ValueError: malformed spec or port out of range.
    """
    left, sep, right = spec.partition("=")
    host, colon, port = right.rpartition(":")
    if not sep or not colon or not left.isdigit() or not port.isdigit() or not host:
        raise ValueError(f"expected PUBLIC_PORT=HOST:PORT, got {spec!r}")
    public, target = int(left), int(port)
    if not (1 <= public <= 65535 and 1 <= target <= 65535):
        raise ValueError(f"port out of range in {spec!r}")
    return TcpTarget(public, host.strip("[]"), target)


#: The client's admin listener unless --admin-addr says otherwise (falls back to a free port when
#: taken: tunnel_client/adminaddr.py). Not 9090/9091 (Prometheus, Pushgateway).
DEFAULT_ADMIN_ADDR = "127.0.0.1:8691"


class ClientConfig(BaseConfig):
    """Every setting of ``tunnel-client run``; the field names are the flags without dashes."""

    server: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="exit server control URL, wss://HOST:PORT"
    )
    token_file: Path | None = Field(None, description="file holding the client token")
    token: SecretStr | None = Field(None, description="the client token (environment/TOML only)")
    ca_file: Path | None = Field(None, description="CA bundle to verify the exit server (default: system store)")
    pin: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="sha256:BASE64 of the exit server's public key (SPKI); refuse others"
    )
    client_cert: Path | None = Field(
        None, description="PEM client certificate for mutual TLS (--client-ca on the server)"
    )
    client_key: Path | None = Field(None, description="PEM key of --client-cert (default: in the same file)")
    auth: Literal["bearer", "challenge", "aws-iam"] = Field(
        "bearer",
        description="bearer: the token in the upgrade request; challenge: never send the token, prove it "
        "(challenge-response) after the exit server proves its --pin key inside the WebSocket: safe through "
        "TLS-inspecting proxies (needs --pin); aws-iam: no token, the AWS identity of the task or instance "
        "(a signed sts:GetCallerIdentity the exit server has STS check; the aws extra)",
    )
    aws_server_id: str | None = Field(
        None, description="with --auth aws-iam: the exit server's --aws-server-id (default: the --server host name)"
    )
    aws_sts_endpoint: str | None = Field(
        None, description="with --auth aws-iam: the STS endpoint to sign for (default: the region's, else global)"
    )
    aws_region: str | None = Field(None, description="with --auth aws-iam: the region (default: botocore's)")
    proxy: str | None = Field(
        None,
        description="reach the exit server through this proxy: http://, https://, socks5:// or socks5h:// "
        "URL ('direct': ignore HTTPS_PROXY/ALL_PROXY); default: HTTPS_PROXY/ALL_PROXY unless NO_PROXY matches",
    )
    proxy_auth_file: Path | None = Field(
        None, description="file holding the proxy login as user:password on one line (never logged)"
    )
    upstream: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="route HOST[/PREFIX]=URL; HOST exact, *.example.com or default"
    )
    tcp: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="TCP tunnel PUBLIC_PORT=HOST:PORT (the exit server listens on PUBLIC_PORT)"
    )
    proxy_protocol: bool = Field(False, description="send a PROXY protocol v2 header to TCP upstreams")
    allow_path: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="only these paths on a route: HOST[/PREFIX]=/exact,/prefix/* (else 403)"
    )
    audit_log: Path | None = Field(None, description="append a hash-chained JSON line per stream served to FILE")
    audit_failure: Literal["closed", "open"] = Field(
        "closed",
        description="while the audit log cannot be written: refuse streams (closed) or serve them unaudited (open)",
    )
    kill_switch_file: Path | None = Field(None, description="withdraw the tunnel while this file exists")
    label: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="label KEY=VALUE sent at registration"
    )
    insecure_plaintext: bool = Field(False, description="allow ws:// to a loopback exit server")
    instance_id: str = Field(
        default_factory=lambda: secrets.token_hex(8), description="stable id of this client instance"
    )
    drain_timeout: float = Field(30.0, ge=0, description="seconds to finish in-flight requests on SIGTERM")
    max_response_head: int = Field(
        64 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="bytes an upstream's response head may take (502 beyond)",
    )
    max_response_fields: int = Field(
        256,
        ge=8,
        le=1024,
        description="fields an upstream's response head may have (502 beyond; the tunnel carries 1,024)",
    )
    exit_on_auth_failure: bool = Field(
        False,
        description="exit (status 1) when the exit server refuses the token (401) before the first "
        "registration, instead of retrying: fail fast in CI and containers",
    )
    connect_timeout: float = Field(10.0, gt=0, description="seconds to open the tunnel")
    max_connection_age: float = Field(
        0.0,
        ge=0,
        description="seconds after which a session is renewed (a new one first, then the old drains): set it "
        "below a proxy's or firewall's connection-age limit; 0: never",
    )
    upstream_connect_timeout: float = Field(10.0, gt=0, description="seconds to connect to an upstream")
    upstream_ca: Path | None = Field(
        None, description="PEM CA bundle that https:// upstreams are verified against (default: the system's)"
    )
    max_streams: int = Field(10_000, ge=1, description="concurrent streams this client accepts")
    heartbeat_timeout: float = Field(12.0, gt=0, description="silence after which the tunnel is dead")
    backoff_base: float = Field(1.0, gt=0, description="first reconnect delay ceiling, seconds")
    backoff_cap: float = Field(30.0, gt=0, description="largest reconnect delay ceiling, seconds")
    health_path: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="health check HOST[/PREFIX]=/PATH for that upstream (2xx/3xx = healthy)"
    )
    health_interval: float = Field(5.0, gt=0, description="seconds between upstream health checks")
    health_timeout: float = Field(2.0, gt=0, description="seconds per health check")
    health_rise: int = Field(2, ge=1, description="good checks before an unhealthy route comes back")
    health_fall: int = Field(3, ge=1, description="bad checks before a route is withdrawn")
    upstream_from_ecs: bool = Field(False, description="add routes from sibling ECS containers' backhaul.* labels")
    upstream_from_host: bool = Field(
        False,
        description="daemon mode: publish every task on this host whose containers carry backhaul.* labels "
        "(ECS agent introspection and Docker APIs), following tasks as they start, move and stop",
    )
    ecs_agent_uri: str = Field("http://127.0.0.1:51678", description="the ECS agent's introspection API (daemon mode)")
    docker_host: str = Field(
        "unix:///var/run/docker.sock", description="the Docker Engine API, unix:// or tcp:// (daemon mode)"
    )
    discovery_interval: float = Field(1.0, gt=0, le=60, description="seconds between daemon-mode polls")
    discovery_drain: float = Field(
        10.0, ge=0, description="seconds a withdrawn daemon-mode route still serves requests already sent to it"
    )
    admin_addr: str | None = Field(
        DEFAULT_ADMIN_ADDR,
        description="admin listener HOST:PORT (/healthz, /metrics; when the default is taken, a free port); "
        "empty to disable",
    )
    log_format: Literal["text", "json"] = Field("text", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    _split = field_validator("server", "upstream", "label", "tcp", "health_path", mode="before")(split_list)

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, value: str | None) -> str | None:
        from .proxy import DIRECT, parse_proxy_url

        if value is None or value.strip().lower() == DIRECT:
            return value
        return parse_proxy_url(value.strip())

    @field_validator("health_path")
    @classmethod
    def _health_paths(cls, value: list[str]) -> list[str]:
        from .health import parse_health_path

        for spec in value:
            parse_health_path(spec)
        return value

    _split_allow = field_validator("allow_path", mode="before")(split_list)

    @field_validator("allow_path")
    @classmethod
    def _allow_paths(cls, value: list[str]) -> list[str]:
        parse_allow_paths(value)
        return value

    @model_validator(mode="after")
    def _check_allow_routes(self) -> ClientConfig:
        # A typo in --allow-path must not silently leave a route open.
        routes = {(u.host, u.path_prefix) for u in self.upstreams}
        for host, prefix in parse_allow_paths(self.allow_path):
            if (host, prefix) not in routes and not getattr(self, "upstream_from_ecs", False):
                raise ValueError(f"--allow-path names {host}{'' if prefix == '/' else prefix}, not an --upstream route")
        return self

    @field_validator("tcp")
    @classmethod
    def _tcps(cls, value: list[str]) -> list[str]:
        ports = [parse_tcp(spec).public_port for spec in value]
        if len(set(ports)) != len(ports):
            raise ValueError("a public port appears twice")
        if len(ports) > MAX_TCP:
            raise ValueError(f"at most {MAX_TCP} TCP tunnels per client, got {len(ports)}")
        return value

    @field_validator("upstream")
    @classmethod
    def _upstreams(cls, value: list[str]) -> list[str]:
        routes = set()
        for spec in value:
            up = parse_upstream(spec)
            routes.add((up.host, up.path_prefix))
        if len(routes) > MAX_ROUTES:
            raise ValueError(f"at most {MAX_ROUTES} routes per client, got {len(routes)} (run another client)")
        return value

    _admin_addr = field_validator("admin_addr")(optional_addr)

    _split_pin = field_validator("pin", mode="before")(split_list)

    @field_validator("pin")
    @classmethod
    def _pins(cls, value: list[str]) -> list[str]:
        from .pinning import parse_pin

        for pin in value:
            parse_pin(pin)
        return value

    @model_validator(mode="after")
    def _check_client_cert(self) -> ClientConfig:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("--client-key needs --client-cert")
        return self

    @field_validator("label")
    @classmethod
    def _labels(cls, value: list[str]) -> list[str]:
        for item in value:
            if "=" not in item or not item.partition("=")[0]:
                raise ValueError(f"expected KEY=VALUE, got {item!r}")
        return value

    @field_validator("server")
    @classmethod
    def _servers(cls, value: list[str]) -> list[str]:
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in ("ws", "wss") or not parts.hostname:
                raise ValueError(f"bad server URL {url!r} (wss://HOST:PORT)")
            url_port(url)
        return value

    @model_validator(mode="after")
    def _check(self) -> ClientConfig:
        if not self.server:
            raise ValueError("at least one --server is required")
        if not self.upstream and not self.tcp and not self.upstream_from_ecs and not self.upstream_from_host:
            raise ValueError("at least one --upstream, --tcp, --upstream-from-ecs or --upstream-from-host is required")
        if not self.docker_host.startswith(("unix:///", "tcp://", "http://")):
            raise ValueError(f"--docker-host {self.docker_host!r}: expected unix:///PATH or tcp://HOST:PORT")
        for url in self.server:
            parts = urlsplit(url)
            if parts.scheme == "ws":
                if not self.insecure_plaintext:
                    raise ValueError(f"{url}: ws:// needs --insecure-plaintext (and a loopback server)")
                if not is_loopback_host(parts.hostname or ""):
                    raise ValueError(f"{url}: ws:// is only allowed to a loopback address")
        if self.auth == "challenge" and not self.pin:
            raise ValueError("--auth challenge needs --pin (the exit server's key it checks inside the WebSocket)")
        if self.backoff_cap < self.backoff_base:
            raise ValueError("--backoff-cap must be at least --backoff-base")
        if self.health_path:
            from .health import parse_health_path, route_key

            h2c = {route_key(u) for u in self.upstreams if u.scheme == "h2c"}
            for spec in self.health_path:
                if parse_health_path(spec)[0] in h2c:
                    raise ValueError(f"--health-path {spec}: h2c:// upstreams are not checked over HTTP/1.1")
        return self

    @property
    def upstreams(self) -> list[Upstream]:
        return [parse_upstream(spec) for spec in self.upstream]

    @property
    def allow_paths(self) -> dict[tuple[str, str], tuple[str, ...]]:
        """``{(host, prefix): path patterns}`` from ``--allow-path``."""
        return parse_allow_paths(self.allow_path)

    @property
    def tcp_targets(self) -> list[TcpTarget]:
        return [parse_tcp(spec) for spec in self.tcp]

    @property
    def labels(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.label)
