"""Exit-server settings (flags > BACKHAUL_* environment > TOML file)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from shared.forwarding import parse_networks
from shared.routing import HOST_PATTERN
from shared.runtime.config import BaseConfig, is_loopback_host, optional_addr, parse_addr, split_list
from shared.sizes import DEFAULT_STREAM_WINDOW

__all__ = ["ServerConfig"]


class ServerConfig(BaseConfig):
    """Every setting of ``exit-server run``; the field names are the flags without dashes."""

    public_addr: str = Field("127.0.0.1:8080", description="public HTTP listener, HOST:PORT")
    control_addr: str = Field("127.0.0.1:8443", description="tunnel (WebSocket) listener, HOST:PORT")
    tls_cert: Path | None = Field(None, description="PEM certificate chain for the control listener")
    tls_key: Path | None = Field(None, description="PEM private key for the control listener")
    token_file: Path | None = Field(None, description="file holding the shared client token")
    token: SecretStr | None = Field(None, description="the shared client token (environment/TOML only)")
    insecure_plaintext: bool = Field(False, description="serve ws:// without TLS (loopback only)")
    public_scheme: Literal["http", "https"] = Field(
        "http", description="scheme reported in X-Forwarded-Proto (https behind a TLS load balancer)"
    )
    public_tls_addr: str | None = Field(
        None, description="public HTTPS listener HOST:PORT, certificates chosen per SNI name (off by default)"
    )
    public_cert_dir: Path | None = Field(
        None, description="directory of HOST.pem / HOST-key.pem pairs for the public HTTPS listener (*.DOMAIN allowed)"
    )
    acme_dir: Path | None = Field(
        None, description="turns ACME on: account key and issued certificates are kept here (files 0600)"
    )
    acme_directory: str = Field(
        "https://acme-v02.api.letsencrypt.org/directory", description="ACME directory URL (Let's Encrypt by default)"
    )
    acme_email: str | None = Field(None, description="contact address for the ACME account")
    acme_domain: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="names (or *.DOMAIN patterns) ACME may issue for when a client registers them; with --tokens, "
        "a client's grant admits its own names too",
    )
    acme_challenge: Literal["http-01", "tls-alpn-01"] = Field(
        "http-01", description="ACME challenge: http-01 (public HTTP port 80) or tls-alpn-01 (public TLS port 443)"
    )
    acme_ca_file: Path | None = Field(None, description="CA bundle to trust for the ACME directory's own TLS")
    control_hostname: str | None = Field(
        None,
        description="on the public TLS listener, send connections whose SNI is this name to the tunnel endpoint "
        "(clients then need outbound 443 only)",
    )
    redirect_http: bool = Field(
        False, description="answer plain-HTTP requests with 308 to https (needs --public-tls-addr)"
    )
    hsts: int = Field(
        0, ge=0, description="Strict-Transport-Security max-age in seconds on HTTPS answers (0: no header)"
    )
    state: str | None = Field(
        None,
        description="fleet state on Redis, redis://HOST:PORT/DB or rediss:// (TLS): the credentials every exit "
        "server shares (clients, access rules, ACME), replacing --tokens and --access (`exit-server token|access "
        "... --state` changes them); a shared --token-file/BACKHAUL_TOKEN may stand beside it as client default; "
        "no password in the URL",
    )
    state_password_file: Path | None = Field(
        None, description="file holding the state store's password (or BACKHAUL_STATE_PASSWORD)"
    )
    state_password: SecretStr | None = Field(None, description="the state store's password (environment/TOML only)")
    state_ca_file: Path | None = Field(
        None, description="CA bundle that verifies a rediss:// state store's certificate (default: the system's CAs)"
    )
    state_resync: float = Field(
        5.0, gt=0, le=300, description="seconds between full re-reads of the state (a lost change message is repaired)"
    )
    peer_url: str | None = Field(
        None,
        description="with --state: the URL of this server's public listener as the fleet's other exit servers "
        "reach it (http://PRIVATE-IP:PORT); they relay requests here for hostnames only this server has sessions for",
    )
    aws_server_id: str | None = Field(
        None,
        description="turn on AWS IAM authentication of tunnel clients (--auth aws-iam): the id clients sign "
        "into their request (default on the client: the --server host name); needs --tokens with aws_roles",
    )
    aws_sts_endpoint: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="STS endpoint URL a signed request may name (repeatable; default: https://sts.amazonaws.com/ "
        "and every https://sts.REGION.amazonaws.com/)",
    )
    aws_max_age: float = Field(
        300.0, ge=10, le=3600, description="seconds a client's signed AWS request stays acceptable (either side of now)"
    )
    h2c: bool = Field(
        False, description="accept HTTP/2 with prior knowledge (h2c) on the plain public listener, beside HTTP/1.1"
    )
    no_http2: bool = Field(False, description="offer only HTTP/1.1 by ALPN on the public TLS listener (no h2)")
    h2_max_streams: int = Field(100, ge=1, le=10_000, description="concurrent HTTP/2 streams per public connection")
    h2_max_header_list: int = Field(
        64 * 1024, ge=4096, le=1 << 20, description="bytes of HTTP/2 header list per request (decoded, HPACK included)"
    )
    h2_max_requests: int = Field(
        10_000, ge=1, description="HTTP/2 requests per public connection, then GOAWAY (the caller reconnects)"
    )
    h2_max_resets: int = Field(
        100, ge=1, description="RST_STREAM a caller may send per second on one connection (Rapid Reset; then GOAWAY)"
    )
    h2_max_control_frames: int = Field(
        500,
        ge=10,
        description="SETTINGS/PING/PRIORITY/empty DATA frames per second per connection (then GOAWAY)",
    )
    upstream_timeout: float = Field(60.0, gt=0, description="seconds to wait for a response head (504)")
    drain_timeout: float = Field(30.0, ge=0, description="seconds to finish in-flight requests on SIGTERM")
    shutdown_delay: float = Field(
        0.0,
        ge=0,
        description="seconds to keep serving after SIGTERM while /readyz "
        "reports 503, so a load balancer stops sending traffic first",
    )
    min_ready_tunnels: int = Field(
        0,
        ge=0,
        description="/readyz reports 503 while fewer tunnel sessions are "
        "registered, so a restarted server joins the load balancer once its clients "
        "are back",
    )
    max_streams: int = Field(10_000, ge=1, description="concurrent streams per tunnel (503 beyond)")
    max_body: int | None = Field(None, ge=0, description="largest request body in bytes (413 beyond)")
    tokens: Path | None = Field(
        None, description="TOML file of per-client tokens, replaces --token-file (see `exit-server token`)"
    )
    access: Path | None = Field(
        None, description="TOML file of access rules for public hostnames (IP allow-lists, basic/bearer auth)"
    )
    client_ca: Path | None = Field(
        None, description="require tunnel client certificates signed by this CA (mutual TLS)"
    )
    header_timeout: float = Field(10.0, gt=0, description="seconds for a public request head to arrive (408 beyond)")
    body_timeout: float = Field(15.0, gt=0, description="seconds a public request body may stay idle (408 beyond)")
    body_min_rate: float = Field(
        1024.0,
        ge=0,
        description="bytes/s a request body must average after its first --body-timeout seconds (408 below; 0: off)",
    )
    max_streams_per_caller: int = Field(
        1000, ge=0, description="concurrent requests from one caller address or IPv6 /64 (429 beyond; 0: no limit)"
    )
    max_routes_per_client: int = Field(
        1000, ge=1, description="distinct routes one client id may serve over all its sessions (refused beyond)"
    )
    keepalive_timeout: float = Field(
        75.0, gt=0, description="seconds an idle public keep-alive connection is kept open (nginx's default)"
    )
    send_timeout: float = Field(
        30.0, gt=0, description="seconds a public caller may take nothing of a response before it is dropped"
    )
    stream_idle_timeout: float = Field(
        0.0,
        ge=0,
        description="seconds a WebSocket or TCP stream may pass no byte either way before it is closed (0: no limit)",
    )
    handshake_timeout: float = Field(
        10.0, gt=0, description="seconds for a tunnel client to send its ClientHello, finish TLS and say hello (each)"
    )
    heartbeat_interval: float = Field(4.0, gt=0, description="seconds between heartbeat pings")
    heartbeat_timeout: float = Field(12.0, gt=0, description="silence after which a tunnel is dead")
    stream_window: int = Field(DEFAULT_STREAM_WINDOW, ge=16 * 1024, description="per-stream flow-control window")
    connection_window: int = Field(16 << 20, ge=1 << 20, description="per-tunnel flow-control window")
    tcp_port_range: str | None = Field(None, description="public TCP ports clients may ask for, LO-HI (none: TCP off)")
    admin_addr: str | None = Field(
        "127.0.0.1:8690", description="admin listener HOST:PORT (health, metrics, API); empty to disable"
    )
    admin_token_file: Path | None = Field(None, description="file holding the admin API token")
    admin_token: SecretStr | None = Field(None, description="the admin API token (environment/TOML only)")
    log_format: Literal["text", "json"] = Field("text", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDRs of load balancers in front: their X-Forwarded-For/-Proto and PROXY v2 headers are believed",
    )

    @field_validator("public_addr", "control_addr")
    @classmethod
    def _addr(cls, value: str) -> str:
        parse_addr(value)
        return value

    _admin_addr = field_validator("admin_addr")(optional_addr)
    _public_tls_addr = field_validator("public_tls_addr")(optional_addr)

    @field_validator("control_hostname")
    @classmethod
    def _hostname(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        name = value.strip().lower().rstrip(".")
        if not all(label and len(label) <= 63 for label in name.split(".")):
            raise ValueError(f"expected a host name, got {value!r}")
        if any(not (c.isascii() and (c.isalnum() or c in "-.")) for c in name):
            raise ValueError(f"expected a host name, got {value!r}")
        return name

    _split = field_validator("trusted_proxies", "acme_domain", "aws_sts_endpoint", mode="before")(split_list)

    @field_validator("acme_domain")
    @classmethod
    def _acme_domains(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            name = item.strip().lower().rstrip(".")
            if not re.match(HOST_PATTERN, name):
                raise ValueError(f"expected host names or *.DOMAIN, got {item!r}")
            out.append(name)
        return out

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        parse_networks(value)
        return value

    @field_validator("tcp_port_range")
    @classmethod
    def _range(cls, value: str | None) -> str | None:
        if value is not None:
            lo, sep, hi = value.partition("-")
            if not sep or not lo.strip().isdigit() or not hi.strip().isdigit() or not 1 <= int(lo) <= int(hi) <= 65535:
                raise ValueError(f"expected LO-HI within 1-65535, got {value!r}")
        return value

    @property
    def tcp_ports(self) -> range:
        """The allowed public TCP ports (empty when TCP tunnels are off)."""
        if self.tcp_port_range is None:
            return range(0)
        lo, _, hi = self.tcp_port_range.partition("-")
        return range(int(lo), int(hi) + 1)

    @model_validator(mode="after")
    def _tls(self) -> ServerConfig:
        if self.insecure_plaintext:
            host, _ = parse_addr(self.control_addr)
            if not is_loopback_host(host):
                raise ValueError("--insecure-plaintext is only allowed on a loopback control address")
        elif self.tls_cert is None or self.tls_key is None:
            raise ValueError("--tls-cert and --tls-key are required (or --insecure-plaintext on loopback)")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("--heartbeat-timeout must exceed --heartbeat-interval")
        if self.tokens is not None and (self.token_file is not None or self.token is not None):
            raise ValueError("--tokens replaces the shared token: give either --tokens or --token-file/BACKHAUL_TOKEN")
        if self.state is not None:
            if not re.fullmatch(r"rediss?://[^/@\s]+(/\d{1,2})?", self.state):
                raise ValueError("--state: expected redis://HOST:PORT[/DB] or rediss://... (no password in the URL)")
            if self.tokens is not None:
                raise ValueError("--state holds the clients' credentials: not with --tokens")
            if self.access is not None:
                raise ValueError("--state holds the access rules: not with --access (exit-server access push --state)")
        if self.state_ca_file is not None and (self.state is None or not self.state.startswith("rediss://")):
            raise ValueError("--state-ca-file: needs --state rediss://... (the store's TLS)")
        if self.peer_url is not None and (self.state is None or not re.fullmatch(r"https?://[^/\s]+/?", self.peer_url)):
            raise ValueError("--peer-url: needs --state, and is http(s)://HOST:PORT")
        if self.aws_server_id is not None and self.tokens is None and self.state is None:
            raise ValueError("--aws-server-id needs --tokens or --state (their aws_roles map IAM roles to clients)")
        if self.aws_server_id is not None and not re.fullmatch(r"[\x21-\x7e]{1,256}", self.aws_server_id):
            raise ValueError("--aws-server-id must be 1-256 printable ASCII characters")
        for url in self.aws_sts_endpoint:
            if not re.fullmatch(r"https?://[^/\s]+/?", url):
                raise ValueError(f"--aws-sts-endpoint {url!r}: expected http(s)://HOST[:PORT]/")
        if self.public_tls_addr is not None and self.public_cert_dir is None and self.acme_dir is None:
            raise ValueError("--public-tls-addr needs --public-cert-dir or --acme-dir (the certificates to serve)")
        if self.acme_dir is not None and self.public_tls_addr is None:
            raise ValueError("--acme-dir needs --public-tls-addr (where the certificates are served)")
        if self.control_hostname is not None:
            if self.public_tls_addr is None:
                raise ValueError("--control-hostname needs --public-tls-addr")
            if self.insecure_plaintext:
                raise ValueError("--control-hostname needs TLS on the control endpoint (not --insecure-plaintext)")
        if (self.redirect_http or self.hsts) and self.public_tls_addr is None:
            raise ValueError("--redirect-http and --hsts need --public-tls-addr")
        if self.client_ca is not None and self.insecure_plaintext:
            raise ValueError("--client-ca needs TLS (not --insecure-plaintext)")
        return self
