"""``tunnel-client doctor``: the path to each exit server checked step by step, each with a
verdict and, when it fails, a hint; then the upstreams.

Per server, in order (a step after a failed one is skipped, since it cannot be reached):

1. ``proxy``: which proxy is used and why (``--proxy``, the environment, a ``NO_PROXY`` entry);
2. ``dns``: the first hop's name (the proxy's, or the server's when direct);
3. ``tcp``: a TCP connection to the first hop, with its time (the round trip it costs);
4. ``proxy-connect``: the CONNECT answer (and the login schemes a 407 offers) or the SOCKS5
   result; skipped when direct;
5. ``tls``: the handshake to the exit server through that connection, with the certificate
   seen; an issuer the trust store does not know, behind a proxy, is reported as likely TLS
   interception; ``--pin`` is checked against the key presented;
6. ``upgrade`` and ``auth``: the WebSocket upgrade carrying the token (the answer before any
   route is registered: 101 means the token was accepted; 401 means refused; any other status
   means something in between answered instead of the exit server);
7. ``clock``: the skew from the exit server's ``Date``; ``rtt``: a WebSocket ping's round trip.

Then ``upstream``: a TCP connection to each ``--upstream`` from this host (never through the
proxy). Steps 2-5 run on a blocking socket in a worker thread (an ``https://`` proxy is checked
by step 6 only: TLS inside TLS needs the asyncio path that ``run`` uses).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import os
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidProxyStatus, InvalidStatus, ProxyError

from shared import challenge
from shared.aio.tls import client_context
from shared.aio.wsclient import TunnelClientConnection
from shared.errors import ConfigError

from .config import ClientConfig
from .pinning import parse_pin, spki_digest, spki_pin
from .proxy import ProxyChoice, choose_proxy, credentials, with_credentials
from .proxyconnect import ConnectHandshake, ConnectRefused, spnego_available

__all__ = ["Check", "diagnose", "render"]

#: Seconds each network step may take.
STEP_TIMEOUT = 10.0
#: Clock skew beyond which certificates and AWS signatures start failing.
MAX_SKEW = 30.0


@dataclass
class Check:
    step: str
    target: str
    verdict: str  # "ok", "FAIL" or "skip"
    detail: str
    hint: str = ""

    @property
    def failed(self) -> bool:
        return self.verdict == "FAIL"


class _Steps:
    """Checks for one target; after a failure the rest are recorded as skipped."""

    def __init__(self, target: str, out: list[Check]) -> None:
        self.target = target
        self.out = out
        self.broken = False

    def ok(self, step: str, detail: str) -> None:
        self.out.append(Check(step, self.target, "ok", detail))

    def fail(self, step: str, detail: str, hint: str) -> None:
        self.out.append(Check(step, self.target, "FAIL", detail, hint))
        self.broken = True

    def skip(self, step: str, why: str = "an earlier step failed") -> None:
        self.out.append(Check(step, self.target, "skip", why))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(i[4][0]) for i in infos))


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > 65536:
            break
    return data


def _http_connect(
    sock: socket.socket, target: str, login: tuple[str, str] | None, proxy: tuple[str, int]
) -> tuple[socket.socket, int, str, str]:
    """CONNECT ``target`` with any login rounds (tunnel_client/proxyconnect.py, as ``run``
    does): the socket (a new one if the proxy closed between rounds), status, reason and
    the scheme used.

    Raises:
        ConnectRefused: refused (with the schemes offered).
        OSError, ValueError: the proxy closed, or its answer is not HTTP.
    """
    handshake = ConnectHandshake(target, login, proxy[0], "backhaul-doctor")
    while True:
        sock.sendall(handshake.request())
        answer = None
        while answer is None:
            data = sock.recv(65536)
            if not data:
                raise OSError("the proxy closed the connection")
            answer = handshake.receive(data)
        if handshake.next_step(answer):
            return sock, answer.status, answer.reason, handshake.scheme or "none"
        if not answer.keep_alive:
            sock.close()
            sock = socket.create_connection(proxy, timeout=STEP_TIMEOUT)
            handshake.restart()


def _path_to_server(
    steps: _Steps,
    url: str,
    choice: ProxyChoice,
    login: tuple[str, str] | None,
    ctx: ssl.SSLContext,
    pins: set[bytes],
    inside: bool = False,
) -> None:
    """Steps dns, tcp, proxy-connect and tls on a blocking socket (runs in a worker thread)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    proxy = urlsplit(choice.url) if choice.url else None
    hop_host, hop_port = (proxy.hostname or "", proxy.port or 1080) if proxy else (host, port)
    try:
        addresses = _resolve(hop_host, hop_port)
    except OSError as exc:
        what = "the proxy's name" if proxy else "the exit server's name"
        steps.fail("dns", f"{hop_host}: {exc}", f"{what} does not resolve on this host: check /etc/resolv.conf")
        for step in ("tcp", "proxy-connect", "tls"):
            steps.skip(step)
        return
    steps.ok("dns", f"{hop_host} -> {', '.join(addresses)}")
    t0 = time.monotonic()
    try:
        sock = socket.create_connection((hop_host, hop_port), timeout=STEP_TIMEOUT)
    except OSError as exc:
        what = f"proxy {choice.shown}" if proxy else "the exit server"
        steps.fail("tcp", f"{hop_host}:{hop_port}: {exc}", f"{what} is not reachable: a firewall, or the wrong port")
        for step in ("proxy-connect", "tls"):
            steps.skip(step)
        return
    with sock:
        steps.ok("tcp", f"{sock.getpeername()[0]}:{hop_port} in {_ms(time.monotonic() - t0)}")
        if proxy is None:
            steps.skip("proxy-connect", "direct: no proxy")
        elif proxy.scheme == "https":
            steps.skip("proxy-connect", "an https:// proxy is checked by the upgrade step")
            steps.skip("tls", "an https:// proxy is checked by the upgrade step")
            return
        elif proxy.scheme == "http":
            try:
                sock, status, reason, scheme = _http_connect(sock, f"{host}:{port}", login, (hop_host, hop_port))
            except ConnectRefused as exc:
                hint = {
                    407: "the proxy wants a login, or refused the one given: --proxy-auth-file (user:password)"
                    + (f"; it offers {', '.join(exc.offered)}" if exc.offered else "")
                    + (
                        " (NTLM and Negotiate need the ntlm extra: pip install 'backhaul[ntlm]')"
                        if {"NTLM", "Negotiate"} & set(exc.offered) and not spnego_available()
                        else ""
                    ),
                    403: f"the proxy's rules deny CONNECT to {host}:{port} (squid: http_access, SSL_ports)",
                }.get(exc.status, "see the proxy's own log")
                steps.fail("proxy-connect", f"CONNECT {host}:{port}: {exc}", hint)
                steps.skip("tls")
                return
            except (OSError, ValueError) as exc:
                steps.fail("proxy-connect", f"CONNECT {host}:{port}: {exc}", "is it an HTTP proxy (http://)?")
                steps.skip("tls")
                return
            login_used = "" if scheme == "none" else f" (login: {scheme})"
            steps.ok("proxy-connect", f"CONNECT {host}:{port}: {status} {reason}{login_used}".strip())
        else:  # socks5 / socks5h
            from python_socks import ProxyError as SocksError
            from python_socks import ProxyType
            from python_socks.sync import Proxy

            sock.close()
            socks = Proxy(
                ProxyType.SOCKS5,
                hop_host,
                hop_port,
                username=login[0] if login else None,
                password=login[1] if login else None,
                rdns=proxy.scheme == "socks5h",
            )
            try:
                sock = socks.connect(host, port, timeout=STEP_TIMEOUT)
            except (SocksError, OSError) as exc:
                steps.fail("proxy-connect", f"SOCKS5 to {host}:{port}: {exc}", "see the SOCKS proxy's rules and log")
                steps.skip("tls")
                return
            steps.ok("proxy-connect", f"SOCKS5 to {host}:{port}: granted")
        _tls(
            steps,
            sock,
            host,
            ctx,
            pins,
            behind_proxy=proxy is not None,
            again=lambda: _dial(url, choice, login),
            inside=inside,
        )


def _dial(url: str, choice: ProxyChoice, login: tuple[str, str] | None) -> socket.socket:
    """A second connection along the same path, quietly (to read a certificate that failed
    verification)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    proxy = urlsplit(choice.url) if choice.url else None
    if proxy is None:
        return socket.create_connection((host, port), timeout=STEP_TIMEOUT)
    if proxy.scheme == "http":
        hop = (proxy.hostname or "", proxy.port or 1080)
        return _http_connect(socket.create_connection(hop, timeout=STEP_TIMEOUT), f"{host}:{port}", login, hop)[0]
    from python_socks import ProxyType
    from python_socks.sync import Proxy

    socks = Proxy(
        ProxyType.SOCKS5,
        proxy.hostname or "",
        proxy.port or 1080,
        username=login[0] if login else None,
        password=login[1] if login else None,
        rdns=proxy.scheme == "socks5h",
    )
    return socks.connect(host, port, timeout=STEP_TIMEOUT)


def _presented(sock: socket.socket, host: str) -> str:
    """Who issued the certificate the far end presents (no verification: for the report only)."""
    from cryptography import x509

    loose = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    loose.check_hostname = False
    loose.verify_mode = ssl.CERT_NONE
    with sock, loose.wrap_socket(sock, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True) or b""
    cert = x509.load_der_x509_certificate(der)
    return f"certificate {cert.subject.rfc4514_string()} issued by {cert.issuer.rfc4514_string()}"


def _tls(
    steps: _Steps,
    sock: socket.socket,
    host: str,
    ctx: ssl.SSLContext,
    pins: set[bytes],
    behind_proxy: bool,
    again: Callable[[], socket.socket],
    inside: bool = False,
) -> None:
    try:
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True) or b""
            version = tls.version()
    except ssl.SSLCertVerificationError as exc:
        try:
            seen = "; the far end presents " + _presented(again(), host)
        except (OSError, ssl.SSLError, ValueError):
            seen = ""
        hint = "the exit server's certificate is not signed by a CA in --ca-file (or the system store)"
        if behind_proxy:
            hint = (
                "a certificate from a CA this client does not trust, behind a proxy: likely TLS interception; "
                "exempt the exit server from inspection, or give --ca-file the proxy's CA (see docs/PROTOCOL.md)"
            )
        steps.fail("tls", f"{exc.verify_message}{seen}", hint)
        return
    except (ssl.SSLError, OSError) as exc:
        steps.fail("tls", str(exc), "is this the exit server's control port (--control-addr)?")
        return
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    subject, issuer = cert.subject.rfc4514_string(), cert.issuer.rfc4514_string()
    if pins and spki_digest(der) not in pins and inside:
        steps.ok(
            "tls",
            f"{version}, certificate {subject} issued by {issuer}: not the --pin key, so TLS is intercepted; "
            "--auth challenge checks the exit server's key inside the WebSocket (next steps)",
        )
        return
    if pins and spki_digest(der) not in pins:
        steps.fail(
            "tls",
            f"{version}, certificate {subject} issued by {issuer}, key {spki_pin(der)}",
            "the key is not one of --pin: a different server, or one in between (TLS interception)",
        )
        return
    steps.ok("tls", f"{version}, certificate {subject} issued by {issuer}" + (", pin matches" if pins else ""))


async def _upgrade(
    steps: _Steps,
    url: str,
    token: str,
    ctx: ssl.SSLContext,
    proxy: str | None,
    pins: frozenset[bytes] | None,
    aws: ClientConfig | None = None,
) -> None:
    """The upgrade and the token: bearer, or with ``pins`` challenge authentication, or with
    ``aws`` (the configuration of --auth aws-iam) the signed AWS identity (as run)."""
    t0 = time.monotonic()
    cnonce = secrets.token_bytes(challenge.NONCE_BYTES)
    token_id = challenge.token_id_of(token)
    if aws is not None:
        from shared.awsiam import ENVELOPE_HEADER

        from .awsiam import AwsSigner, require_botocore

        try:
            require_botocore()
            signer = AwsSigner(aws.aws_sts_endpoint, aws.aws_region)
            server_id = aws.aws_server_id or urlsplit(url).hostname or ""
            headers = {ENVELOPE_HEADER: await signer.envelope(server_id)}
        except Exception as exc:  # botocore's credential chain raises many kinds
            steps.fail("upgrade", f"cannot sign the AWS identity request: {exc}", "check the task or instance role")
            for step in ("auth", "clock", "rtt"):
                steps.skip(step)
            return
    elif pins is None:
        headers = {"Authorization": f"Bearer {token}"}
    else:
        headers = {challenge.HEADER: challenge.format_header(id=token_id, cnonce=cnonce)}
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            ws = await connect(
                url,
                ssl=ctx if url.startswith("wss:") else None,
                additional_headers=headers,
                user_agent_header="backhaul-doctor",
                proxy=proxy,
                open_timeout=STEP_TIMEOUT,
                create_connection=TunnelClientConnection,
            )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 401 and aws is not None:
            steps.ok("upgrade", "the exit server answered the WebSocket upgrade")
            steps.fail(
                "auth",
                "401: the AWS identity was refused",
                "the role must match one client's aws_roles in the exit server's --tokens, and --aws-server-id "
                "must be what this client signs (its --server host name unless --aws-server-id)",
            )
        elif status == 503 and aws is not None:
            steps.ok("upgrade", "the exit server answered the WebSocket upgrade")
            steps.fail("auth", "503: the exit server cannot reach STS now (or is draining)", "retry; check its egress")
        elif status == 401:
            steps.ok("upgrade", "the exit server answered the WebSocket upgrade")
            steps.fail("auth", "401: the token was refused", "check --token-file / BACKHAUL_TOKEN and its revocation")
        else:
            steps.fail(
                "upgrade",
                f"answered {status} instead of 101",
                "something between this host and the exit server answered (a proxy stripping Upgrade?), "
                "or the URL is not the control endpoint",
            )
            steps.skip("auth")
        for step in ("clock", "rtt"):
            steps.skip(step)
        return
    except (ProxyError, InvalidProxyStatus, OSError, TimeoutError, ssl.SSLError, Exception) as exc:  # noqa: BLE001
        steps.fail("upgrade", f"{type(exc).__name__}: {exc}", "see the steps above")
        for step in ("auth", "clock", "rtt"):
            steps.skip(step)
        return
    try:
        steps.ok("upgrade", f"101 in {_ms(time.monotonic() - t0)}")
        if pins is not None:
            from .client import prove_token

            assert isinstance(ws, TunnelClientConnection)
            failure, _ = await prove_token(ws, token, token_id, cnonce, pins, STEP_TIMEOUT)
            if failure is not None:
                steps.fail(
                    "auth", failure, "--auth challenge: check --pin and that the token was made or rotated recently"
                )
                for step in ("clock", "rtt"):
                    steps.skip(step)
                return
            steps.ok("auth", "challenge authentication: the server proved the --pin key, the token was proven")
        else:
            steps.ok("auth", "the token was accepted (no route registered)")
        assert ws.response is not None
        date = ws.response.headers.get("Date")
        if date:
            skew = time.time() - email.utils.parsedate_to_datetime(date).timestamp()
            if abs(skew) > MAX_SKEW:
                steps.fail("clock", f"this host is {skew:+.0f} s off the exit server", "run NTP (chrony, timesyncd)")
            else:
                steps.ok("clock", f"{skew:+.1f} s from the exit server (its Date has 1 s resolution)")
        else:
            steps.skip("clock", "the exit server sent no Date")
        t1 = time.monotonic()
        pong = await ws.ping()
        async with asyncio.timeout(STEP_TIMEOUT):
            await pong
        steps.ok("rtt", f"WebSocket ping {_ms(time.monotonic() - t1)}")
    finally:
        await ws.close(1000, "doctor done")


def _upstream(out: list[Check], spec_host: str, scheme: str, host: str, port: int) -> None:
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=STEP_TIMEOUT):
            pass
    except OSError as exc:
        out.append(
            Check(
                "upstream",
                spec_host,
                "FAIL",
                f"{scheme}://{host}:{port}: {exc}",
                "the app is not listening there, or not reachable from this host/container "
                "(bridge mode: use the linked container's name)",
            )
        )
        return
    out.append(
        Check(
            "upstream", spec_host, "ok", f"{scheme}://{host}:{port} accepts connections in {_ms(time.monotonic() - t0)}"
        )
    )


async def diagnose(config: ClientConfig, token: str, environ: Mapping[str, str] | None = None) -> list[Check]:
    """Every check, in order (module docstring)."""
    environ = os.environ if environ is None else environ
    out: list[Check] = []
    upstreams = config.upstreams
    out.append(
        Check(
            "configuration",
            "-",
            "ok",
            f"{len(config.server)} server(s), {len(upstreams)} upstream(s), {len(config.tcp_targets)} TCP target(s)",
        )
    )
    ctx = client_context(config.ca_file, config.client_cert, config.client_key)
    pins = {parse_pin(p) for p in config.pin}
    login: tuple[str, str] | None = None
    if config.proxy_auth_file is not None:
        user, _, password = config.proxy_auth_file.read_text().strip().partition(":")
        login = (user, password)
    for url in config.server:
        steps = _Steps(url, out)
        try:
            choice = choose_proxy(url, config.proxy, environ)
        except ValueError as exc:
            steps.fail("proxy", str(exc), "fix the proxy variable or give --proxy")
            continue
        proxy_login = login or (credentials(choice.url) if choice.url else None)
        proxy_url = with_credentials(choice.url, *proxy_login) if choice.url and proxy_login else choice.url
        steps.ok("proxy", f"{'via ' + choice.shown if choice.url else 'direct'} ({choice.why})")
        if url.startswith("wss:"):
            # with --auth challenge the pin is checked inside the WebSocket (the TLS key may be an
            # inspecting proxy's), so the TLS step reports interception instead of failing
            inside = config.auth == "challenge"
            await asyncio.to_thread(_path_to_server, steps, url, choice, proxy_login, ctx, pins, inside)
        if steps.broken:
            for step in ("upgrade", "auth", "clock", "rtt"):
                steps.skip(step)
            continue
        await _upgrade(
            steps,
            url,
            token,
            ctx,
            proxy_url,
            frozenset(pins) if config.auth == "challenge" else None,
            config if config.auth == "aws-iam" else None,
        )
    for upstream in upstreams:
        scheme, host, port = upstream.address
        await asyncio.to_thread(_upstream, out, upstream.host + upstream.path_prefix.rstrip("/"), scheme, host, port)
    for target in config.tcp_targets:
        await asyncio.to_thread(_upstream, out, f"tcp:{target.public_port}", "tcp", target.host, target.port)
    return out


def render(checks: list[Check], as_json: bool, write: Callable[[str], Any] = print) -> None:
    if as_json:
        write(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
        return
    target = None
    for c in checks:
        if c.target != target:
            target = c.target
            write(f"{target}:" if target != "-" else "tunnel-client doctor")
        line = f"  {c.verdict:<5} {c.step:<14} {c.detail}"
        write(line + (f"\n        hint: {c.hint}" if c.hint else ""))
    failed = [c for c in checks if c.failed]
    write(f"{len(failed)} check(s) failed" if failed else "all checks passed")


def config_failure(exc: ConfigError | ValueError) -> list[Check]:
    return [Check("configuration", "-", "FAIL", str(exc), "tunnel-client run --help lists every flag")]
