"""Plumbing for the reliability scenarios: real processes, their logs, /proc readings, Prometheus
scrapes, the probe, and the emulated network (namespaces of our own, nftables, tc).

Every process is started here in its own session and stopped by its own pid, never by name.
Traffic goes to 127.0.0.1, or to 10.211.0.0/24 inside two network namespaces this module
creates and deletes (NetnsLink).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
PY = sys.executable
TOKEN = "reliability-" + secrets.token_hex(12)
ADMIN_TOKEN = "reliability-admin-" + secrets.token_hex(12)
HOST = "app.rel.test"
_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


async def wait_for(predicate: Any, timeout: float, step: float = 0.05, what: str = "condition") -> float:
    """Poll ``predicate`` (sync or async) until true; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return loop.time() - t0
        if loop.time() - t0 > timeout:
            raise TimeoutError(f"{what} not reached within {timeout:.0f}s")
        await asyncio.sleep(step)


def log_time(line: str, arrival: float) -> float:
    """The wall-clock time of a log line: its own asctime (ms) when it has one, else its arrival."""
    m = _TIME.match(line)
    if not m:
        return arrival
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000


# ---------------------------------------------------------------- processes


class Proc:
    """A child process; its output goes to a log file, and is scanned line by line (with the
    time of each line) by a thread, so a scenario can wait for and time log events."""

    def __init__(
        self, name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None, netns: str | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.netns = netns
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKHAUL_", "RELIABILITY_"))}
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        cmd = (["ip", "netns", "exec", netns] if netns else []) + argv  # `ip netns exec` execs: same pid
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 (closed by the reader thread)
        self.popen = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
            text=True,
            errors="replace",
        )
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name=f"log-{name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        try:
            for line in self.popen.stdout:
                now = time.time()
                self._log.write(line)
                if " backhaul.access: " in line:
                    continue  # one per request: logged to the file only
                with self._lock:
                    self.lines.append((log_time(line, now), line.rstrip("\n")))
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                self.popen.stdout.close()
            self._log.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def command(self) -> str:
        return " ".join((["ip", "netns", "exec", self.netns] if self.netns else []) + [_short(a) for a in self.argv])

    def find(self, pattern: str, since: float = 0.0) -> list[tuple[float, str]]:
        rx = re.compile(pattern)
        with self._lock:
            return [(t, line) for t, line in self.lines if t >= since and rx.search(line)]

    async def wait_line(self, pattern: str, timeout: float, since: float = 0.0) -> tuple[float, str]:
        found: list[tuple[float, str]] = []

        def check() -> bool:
            found[:] = self.find(pattern, since)
            if not found and not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}): {self.tail()}")
            return bool(found)

        await wait_for(check, timeout, what=f"{self.name}: /{pattern}/")
        return found[0]

    def tail(self, n: int = 12) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def send(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def kill(self) -> None:
        self.send(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        self.send(sig)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.popen.wait(5)
        self._thread.join(5)
        return self.popen.returncode

    async def astop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        return await asyncio.to_thread(self.stop, sig, timeout)


def _short(arg: str) -> str:
    """Paths of the run's temporary directory shortened to $RUN in printed commands."""
    return re.sub(r"/tmp/backhaul-rel-[^/]+", "$RUN", arg).replace(str(ROOT) + "/", "")


# ---------------------------------------------------------------- /proc, metrics, probe


def proc_stats(pid: int) -> dict[str, int]:
    out = {"fds": -1, "rss_kib": -1, "threads": -1}
    with contextlib.suppress(OSError):
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_kib"] = int(line.split()[1])
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    return out


def fd_breakdown(pid: int, upstream_port: int) -> dict[str, int]:
    """Open fds of a process, and how many of them are TCP connections to ``upstream_port``
    (a tunnel client's keep-alive pool: tunnel_client/http1.py keeps idle upstream connections 30 s)."""
    inodes: dict[int, int] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                inodes[int(cols[9])] = int(cols[2].rsplit(":", 1)[1], 16)  # remote port
    total = pool = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            total += 1
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and inodes.get(int(link[8:-1])) == upstream_port:
                    pool += 1
    return {"fds": total, "upstream_conns": pool, "fds_other": total - pool}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name: sum over its label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


async def scrape(admin_port: int) -> dict[str, float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        async with http.get(f"http://127.0.0.1:{admin_port}/metrics") as r:
            return parse_metrics(await r.text())


async def probe(path: Path, query: str = "") -> dict[str, Any]:
    async with aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(path)), timeout=aiohttp.ClientTimeout(total=5)
    ) as http:
        async with http.get("http://probe/probe" + query) as r:
            data: dict[str, Any] = await r.json()
            return data


# ---------------------------------------------------------------- the stack

SESSION_TYPES = (
    "TunnelConnection,ServerConnection,ClientConnection,TunnelServerConnection,TunnelClientConnection,"
    "PinnedClientConnection,SSLObject"
)


async def live_sessions(path: Path) -> dict[str, int]:
    """Session objects still in memory (no collection forced): an ended session must be freed
    at once, not wait for Python's occasional full GC with its TLS buffers (~1 MiB under load)."""
    data = await probe(path, "?live=" + SESSION_TYPES)
    return {k: v for k, v in data["live"].items() if v}


@dataclass
class Server:
    proc: Proc
    public: int
    control: int
    admin: int
    probe_path: Path | None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.public}"

    async def metrics(self) -> dict[str, float]:
        return await scrape(self.admin)

    async def tunnels(self) -> int:
        return int((await self.metrics()).get("backhaul_tunnels_connected", 0))

    async def snapshot(self) -> dict[str, Any]:
        """fds, RSS, threads (from /proc), tasks (probe), streams and tunnels (/metrics)."""
        out: dict[str, Any] = dict(proc_stats(self.proc.pid))
        if self.probe_path is not None:
            p = await probe(self.probe_path)
            out["tasks"] = p["tasks"]
            out["task_names"] = p["task_names"]
            out["gc_objects"] = p["gc_objects"]
        m = await self.metrics()
        out["streams"] = int(m.get("backhaul_streams_in_flight", 0))
        out["tunnels"] = int(m.get("backhaul_tunnels_connected", 0))
        out["registrations"] = int(m.get("backhaul_tunnel_registrations_total", 0))
        return out


@dataclass
class Client:
    proc: Proc
    instance: str
    probe_path: Path | None
    upstream_port: int = 0

    async def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(proc_stats(self.proc.pid))
        if self.upstream_port:
            out.update(fd_breakdown(self.proc.pid, self.upstream_port))
        if self.probe_path is not None:
            p = await probe(self.probe_path)
            out["tasks"] = p["tasks"]
            out["task_names"] = p["task_names"]
            out["gc_objects"] = p["gc_objects"]
        return out


@dataclass
class Env:
    """One scenario's world: a temporary directory, dev certificates, and every process and
    namespace it started (all stopped/deleted by ``close``)."""

    workdir: Path
    certs: Path
    procs: list[Proc] = field(default_factory=list)
    links: list[NetnsLink] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, tag: str) -> Env:
        workdir = Path(tempfile.mkdtemp(prefix=f"backhaul-rel-{tag}-"))
        certs = workdir / "certs"
        out = subprocess.run(
            [
                str(BIN / "exit-server"),
                "gen-certs",
                "--out",
                str(certs),
                "--hostname",
                "localhost",
                "--ip",
                "127.0.0.1",
                "--ip",
                NetnsLink.GW_ADDR,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"gen-certs failed: {out.stderr}")
        return cls(workdir, certs)

    def spawn(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        netns: str | None = None,
        record: bool = True,
    ) -> Proc:
        proc = Proc(name, argv, self.workdir, env, netns)
        self.procs.append(proc)
        if record and proc.command() not in self.commands:
            self.commands.append(proc.command())
        return proc

    # -- parts

    async def upstream(self, name: str = "upstream", netns: str | None = None) -> int:
        port = free_port() if netns is None else 18080
        proc = self.spawn(name, [PY, str(HERE / "upstream.py"), "--port", str(port)], netns=netns)
        await proc.wait_line("upstream: listening", 15)
        return port

    async def exit_server(
        self, *extra: str, name: str = "exit-server", probe: bool = True, ports: tuple[int, int, int] | None = None
    ) -> Server:
        public, control, admin = ports or (free_port(), free_port(), free_port())
        probe_path = self.workdir / f"{name}.probe" if probe else None
        argv = ([PY, str(HERE / "probe.py"), "exit-server"] if probe else [str(BIN / "exit-server")]) + [
            "run",
            "--public-addr",
            f"127.0.0.1:{public}",
            "--control-addr",
            f"127.0.0.1:{control}",
            "--admin-addr",
            f"127.0.0.1:{admin}",
            "--tls-cert",
            str(self.certs / "server.pem"),
            "--tls-key",
            str(self.certs / "server-key.pem"),
            *extra,
        ]
        env = {"BACKHAUL_TOKEN": TOKEN, "BACKHAUL_ADMIN_TOKEN": ADMIN_TOKEN}
        if probe_path is not None:
            env["RELIABILITY_PROBE"] = str(probe_path)
            if os.environ.get("RELIABILITY_NO_UVLOOP"):
                env["RELIABILITY_NO_UVLOOP"] = os.environ["RELIABILITY_NO_UVLOOP"]
        proc = self.spawn(name, argv, env)
        await proc.wait_line(r"exit server: public http://", 20)
        await wait_for(lambda: port_open(admin), 10, what="admin port")
        if probe_path is not None:
            await wait_for(probe_path.exists, 10, what="probe socket")
        return Server(proc, public, control, admin, probe_path)

    async def client(
        self,
        server_url: str,
        upstreams: Iterable[str],
        *extra: str,
        name: str = "client",
        instance: str | None = None,
        probe: bool = False,
        netns: str | None = None,
        wait: bool = True,
    ) -> Client:
        instance = instance or name
        probe_path = self.workdir / f"{name}.probe" if probe else None
        argv = ([PY, str(HERE / "probe.py"), "tunnel-client"] if probe else [str(BIN / "tunnel-client")]) + [
            "run",
            "--server",
            server_url,
            "--ca-file",
            str(self.certs / "ca.pem"),
            "--admin-addr",
            "127.0.0.1:0",
            "--instance-id",
            instance,
        ]
        for up in upstreams:
            argv += ["--upstream", up]
        argv += list(extra)
        env = {"BACKHAUL_TOKEN": TOKEN}
        if probe_path is not None:
            env["RELIABILITY_PROBE"] = str(probe_path)
        proc = self.spawn(name, argv, env, netns=netns)
        if wait:
            await proc.wait_line("registered as session", 20)
        ports = [p for p in (u.rsplit(":", 1)[1].split("/")[0] for u in upstreams) if p.isdigit()]
        return Client(proc, instance, probe_path, int(ports[0]) if ports else 0)

    async def link(self) -> NetnsLink:
        link = NetnsLink(secrets.token_hex(2))
        await asyncio.to_thread(link.setup)
        self.links.append(link)
        return link

    async def linkproxy(
        self, target_port: int, link: NetnsLink | None, control: dict[str, Any] | None = None, name: str = "linkproxy"
    ) -> tuple[Proc, int, Path]:
        control_path = self.workdir / f"{name}.json"
        control_path.write_text(json.dumps(control or {}))
        port_file = self.workdir / f"{name}.port"
        listen = f"{NetnsLink.GW_ADDR}:0" if link is not None else "127.0.0.1:0"
        argv = [
            PY,
            str(HERE / "linkproxy.py"),
            "--listen",
            listen,
            "--target",
            f"127.0.0.1:{target_port}",
            "--control",
            str(control_path),
            "--port-file",
            str(port_file),
        ]
        if link is not None:
            argv += ["--netns", link.gw]
        proc = self.spawn(name, argv)
        await proc.wait_line("linkproxy: .* -> ", 10)
        return proc, int(port_file.read_text()), control_path

    async def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.alive():
                proc.kill()
        for proc in self.procs:
            await proc.astop(signal.SIGKILL, 5)
        for link in self.links:
            await asyncio.to_thread(link.teardown)
        self.links.clear()
        if os.environ.get("RELIABILITY_KEEP") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)


def set_link(control_path: Path, proxy: Proc, **values: Any) -> None:
    """Change the link proxy's delay/jitter/rate/blackhole (re-read on SIGHUP)."""
    control_path.write_text(json.dumps(values))
    proxy.send(signal.SIGHUP)


# ---------------------------------------------------------------- network namespaces


def _run(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20, input=input)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out


class NetnsLink:
    """Two network namespaces of our own joined by a veth pair:

    * ``cli`` (10.211.0.2): tunnel client and its upstream;
    * ``gw`` (10.211.0.1): the link proxy's listening socket (the proxy relays to the exit
      server's control port on the host's 127.0.0.1).

    ``blackhole()`` drops every packet between them in ``gw`` with nftables (no FIN, no RST: the
    client's packets vanish, nothing comes back); ``rate()`` puts a tc token-bucket filter on
    both ends of the veth.
    """

    CLI_ADDR = "10.211.0.2"
    GW_ADDR = "10.211.0.1"

    def __init__(self, tag: str) -> None:
        self.cli = f"bhrel-{tag}-c"
        self.gw = f"bhrel-{tag}-g"
        self.cli_if = f"bhr{tag}c"
        self.gw_if = f"bhr{tag}g"

    @staticmethod
    def available() -> tuple[bool, str]:
        """(usable, why not): root, iproute2, namespaces, veth."""
        if os.geteuid() != 0:
            return False, "not root"
        if shutil.which("ip") is None:
            return False, "no iproute2"
        probe = NetnsLink(secrets.token_hex(2))
        try:
            probe.setup()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            return False, f"network namespaces unavailable: {exc}"
        finally:
            probe.teardown()
        return True, ""

    @staticmethod
    def has_nft() -> bool:
        return shutil.which("nft") is not None

    @staticmethod
    def has_tbf() -> bool:
        return shutil.which("tc") is not None

    def setup(self) -> None:
        _run("ip", "netns", "add", self.cli)
        _run("ip", "netns", "add", self.gw)
        for ns in (self.cli, self.gw):
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run(
            "ip",
            "-n",
            self.cli,
            "link",
            "add",
            self.cli_if,
            "type",
            "veth",
            "peer",
            "name",
            self.gw_if,
            "netns",
            self.gw,
        )
        _run("ip", "-n", self.cli, "addr", "add", f"{self.CLI_ADDR}/24", "dev", self.cli_if)
        _run("ip", "-n", self.gw, "addr", "add", f"{self.GW_ADDR}/24", "dev", self.gw_if)
        _run("ip", "-n", self.cli, "link", "set", self.cli_if, "up")
        _run("ip", "-n", self.gw, "link", "set", self.gw_if, "up")

    def teardown(self) -> None:
        for ns in (self.cli, self.gw):
            _run("ip", "netns", "del", ns, check=False)

    def blackhole(self, on: bool) -> None:
        if on:
            rules = (
                f"table inet bhrel {{\n chain in {{ type filter hook input priority 0; "
                f"ip saddr {self.CLI_ADDR} drop; }}\n chain out {{ type filter hook output priority 0; "
                f"ip daddr {self.CLI_ADDR} drop; }}\n}}\n"
            )
            _run("ip", "netns", "exec", self.gw, "nft", "-f", "-", input=rules)
        else:
            _run("ip", "netns", "exec", self.gw, "nft", "delete", "table", "inet", "bhrel", check=False)

    def rate(self, kbit: int | None) -> None:
        for ns, dev in ((self.cli, self.cli_if), (self.gw, self.gw_if)):
            if kbit:
                _run(
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "qdisc",
                    "replace",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    f"{kbit}kbit",
                    "burst",
                    "16kb",
                    "latency",
                    "400ms",
                )
            else:
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)

    def describe(self) -> str:
        return (
            f"namespaces {self.cli} ({self.CLI_ADDR}) and {self.gw} ({self.GW_ADDR}) joined by veth "
            f"{self.cli_if}/{self.gw_if}"
        )


# ---------------------------------------------------------------- results


@dataclass
class Result:
    """What a scenario measured and whether each claim held."""

    key: str
    title: str
    mode: str
    figures: list[tuple[str, str]] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)

    def fig(self, label: str, value: Any) -> None:
        self.figures.append((label, str(value)))

    def check(self, claim: str, ok: bool, measured: Any) -> bool:
        self.checks.append((claim, bool(ok), str(measured)))
        return bool(ok)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def summary(self) -> str:
        lines = [f"[{'PASS' if self.passed else 'FAIL'}] {self.key}: {self.title} ({self.seconds:.1f}s, {self.mode})"]
        lines += [f"    {label}: {value}" for label, value in self.figures]
        lines += [f"    {'ok  ' if ok else 'FAIL'} {claim}: {measured}" for claim, ok, measured in self.checks]
        lines += [f"    note: {n}" for n in self.notes]
        return "\n".join(lines)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"
