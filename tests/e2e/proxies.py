"""Real proxies for the tests, on loopback ports: squid (HTTP CONNECT, optionally with Basic
login from an htpasswd file, optionally denying CONNECT) and dante (SOCKS5). Debian packages,
installed by scripts/ci-deps.sh. Each runs in the foreground in a private directory owned by
the user the daemon drops to; ``restart()`` stops it and starts it again on the same port."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.ports import free_port

PROXY_USER = "svc-tunnel"
PROXY_PASSWORD = "pr0xy pass:word"  # a space and a colon: percent-encoding must hold


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}: {text}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling a port that is not open yet
    raise RuntimeError(f"{process.args[0]} not listening on {port} within {timeout}s")


@dataclass
class RunningProxy:
    kind: str  # "squid" or "dante"
    port: int
    url: str  # without credentials
    directory: Path
    command: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)
    stop_signal: int = signal.SIGKILL  # mitmdump: SIGINT, so that it writes out its flows
    ca_file: Path | None = None  # an intercepting proxy's CA (the client's --ca-file)
    ready_file: Path | None = None  # started when this exists too

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, cwd=self.directory, start_new_session=True
            )
        self.starts += 1
        _wait_listening(self.port, self.process, self.log)
        deadline = time.monotonic() + 20
        while self.ready_file is not None and not self.ready_file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind}: {self.ready_file} not written")
            time.sleep(0.05)  # polling a file the daemon writes at start

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, self.stop_signal)  # squid's and dante's children go with it
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def connections(self) -> str:
        """What the proxy logged about the connections it carried."""
        logs = [self.directory / "access.log", self.log]
        return "".join(p.read_text(errors="replace") for p in logs if p.exists())


def _private_dir(prefix: str, owner: str) -> Path:
    """A directory the daemon's unprivileged user owns (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    entry = pwd.getpwnam(owner)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(0o755)
    return path


SQUID_CONF = """\
http_port 127.0.0.1:{port}
pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log stdio:{dir}/access.log
cache deny all
cache_mem 8 MB
coredump_dir {dir}
shutdown_lifetime 0 seconds
dns_v4_first on
acl CONNECT method CONNECT
acl tunnel_ports port {ports}
{auth}
http_access deny CONNECT !tunnel_ports
{rules}
http_access deny all
"""


@contextmanager
def squid(
    server_ports: list[int], *, login: bool = False, deny: bool = False, ntlm: bool = False
) -> Iterator[RunningProxy]:
    """squid as a CONNECT proxy to ``server_ports`` (squid's default ACL allows only 443);
    ``login``: Basic with PROXY_USER / PROXY_PASSWORD; ``ntlm``: NTLM offered first (squid's
    ``ntlm_fake_auth`` helper runs the real three-message exchange and accepts any user);
    ``deny``: every CONNECT gets 403."""
    if shutil.which("squid") is None:
        raise RuntimeError("squid is not installed: run scripts/ci-deps.sh (Debian package squid)")
    directory = _private_dir("backhaul-squid-", "proxy")
    port = free_port()
    auth, rules = "", "http_access allow CONNECT"
    if login:
        passwd = directory / "passwd"
        subprocess.run(
            ["htpasswd", "-b", "-c", "-m", str(passwd), PROXY_USER, PROXY_PASSWORD], check=True, capture_output=True
        )
        passwd.chmod(0o644)
        auth = (
            f"auth_param basic program /usr/lib/squid/basic_ncsa_auth {passwd}\n"
            "auth_param basic realm backhaul-test\n"
            "acl logged_in proxy_auth REQUIRED"
        )
        rules = "http_access allow CONNECT logged_in"
    if ntlm:
        auth = "auth_param ntlm program /usr/lib/squid/ntlm_fake_auth\nauth_param ntlm children 2\n" + (
            auth or "acl logged_in proxy_auth REQUIRED"
        )
        rules = "http_access allow CONNECT logged_in"
    if deny:
        rules = "http_access deny CONNECT"
    conf = directory / "squid.conf"
    conf.write_text(
        SQUID_CONF.format(port=port, dir=directory, ports=" ".join(map(str, server_ports)), auth=auth, rules=rules)
    )
    proxy = RunningProxy(
        "squid", port, f"http://127.0.0.1:{port}", directory, ["squid", "-N", "-f", str(conf)], directory / "squid.out"
    )
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.stop()
        shutil.rmtree(directory, ignore_errors=True)


DANTE_CONF = """\
logoutput: {dir}/danted.log
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    log: connect disconnect error
}}
socks pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: connect
    log: connect disconnect error
}}
socks block {{
    from: 0.0.0.0/0 to: 0.0.0.0/0
    log: connect error
}}
"""


@contextmanager
def dante() -> Iterator[RunningProxy]:
    """dante as a SOCKS5 proxy (no login: dante's username method checks system accounts),
    reaching loopback destinations only."""
    if shutil.which("danted") is None:
        raise RuntimeError("danted is not installed: run scripts/ci-deps.sh (Debian package dante-server)")
    directory = _private_dir("backhaul-dante-", "nobody")
    port = free_port()
    conf = directory / "danted.conf"
    conf.write_text(DANTE_CONF.format(port=port, dir=directory))
    command = ["danted", "-f", str(conf), "-p", str(directory / "danted.pid"), "-N", "1"]
    proxy = RunningProxy("dante", port, f"socks5h://127.0.0.1:{port}", directory, command, directory / "danted.out")
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.stop()
        shutil.rmtree(directory, ignore_errors=True)


MITMDUMP = Path(os.environ.get("BACKHAUL_MITMDUMP", Path(__file__).resolve().parents[2] / ".venv-mitm/bin/mitmdump"))


@contextmanager
def mitmproxy(server_ca: Path) -> Iterator[RunningProxy]:
    """mitmproxy (PyPI, installed by `make test` into .venv-mitm) as an HTTP proxy that
    intercepts TLS with its own CA (``ca_file``), trusting ``server_ca`` upstream and
    recording every flow to ``directory / "flows.mitm"`` (written out when it stops)."""
    if not MITMDUMP.exists():
        raise RuntimeError(f"mitmdump not found at {MITMDUMP}: `make test` installs it into .venv-mitm")
    directory = Path(tempfile.mkdtemp(prefix="backhaul-mitm-"))
    port = free_port()
    command = [
        str(MITMDUMP),
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--set",
        f"confdir={directory}",
        "--set",
        f"ssl_verify_upstream_trusted_ca={server_ca}",
        "--set",
        "connection_strategy=lazy",
        "-w",
        f"+{directory / 'flows.mitm'}",  # appended to across restarts
    ]
    ca = directory / "mitmproxy-ca-cert.pem"
    proxy = RunningProxy(
        "mitmproxy",
        port,
        f"http://127.0.0.1:{port}",
        directory,
        command,
        directory / "mitmdump.out",
        stop_signal=signal.SIGINT,
        ca_file=ca,
        ready_file=ca,
    )
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.stop()
        shutil.rmtree(directory, ignore_errors=True)
