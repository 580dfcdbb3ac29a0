"""Shared plumbing for the benchmark scripts (stdlib only): ports, processes, /proc readings,
dev certificates, and starting the real ``exit-server`` / ``tunnel-client`` console scripts.

Every process started here runs in its own session and is stopped by its own pid (never by
name). All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
VENV_BIN = ROOT / ".venv" / "bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20


def venv_bin(name: str) -> str:
    path = VENV_BIN / name
    if not path.exists():
        raise SystemExit(f"bench: {path} not found; run `make demo` or `make test` once to create .venv")
    return str(path)


def venv_python() -> str:
    return venv_bin("python")


def raise_nofile(want: int = 65536) -> int:
    """Raise this process's RLIMIT_NOFILE (children inherit it). Root may raise the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in ((max(want, soft), max(want, hard)), (min(max(want, soft), hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(n: int) -> int:
    """First port of ``n`` consecutive ports that are free right now (for --tcp-port-range)."""
    for _ in range(200):
        base = free_port()
        if base + n > 65000:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_port(port: int, timeout: float = 15, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before port {port} opened")
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open within {timeout}s")


def http_get(url: str, host: str | None = None, timeout: float = 5, cafile: Path | None = None) -> tuple[int, bytes]:
    headers = {"Host": host} if host else {}
    req = urllib.request.Request(url, headers=headers)
    context = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:  # noqa: S310 (loopback only)
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def wait_http(
    url: str,
    host: str | None = None,
    status: int = 200,
    timeout: float = 20,
    procs: Sequence[subprocess.Popen[bytes]] = (),
    cafile: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    last = 0
    while time.monotonic() < deadline:
        last, _ = http_get(url, host, timeout=2, cafile=cafile)
        if last == status:
            return
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{Path(str(proc.args[0] if isinstance(proc.args, list) else proc.args)).name} "
                    f"exited with {proc.returncode}"
                )
        time.sleep(0.1)
    raise RuntimeError(f"GET {url} (Host {host}) never answered {status} (last {last})")


# ---------------------------------------------------------------- /proc readings


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def machine_busy_seconds() -> float:
    """User + system CPU time of the whole machine (all CPUs), seconds, from /proc/stat. Interrupt
    and softirq time is left out: loopback traffic of the benchmark itself lands there."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system = (int(x) for x in fields[:3])
    return (user + nice + system) / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU time of this process's waited-for children (wrk runs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def status_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for {pid}")


def rss_kib(pid: int) -> int:
    return status_kib(pid, "VmRSS")


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            out.extend(int(x) for x in text)
    return out


# ---------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def tool_version(cmd: Sequence[str], pattern: str = r"[\d.]+[\w.+~-]*") -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def ensure_tools() -> None:
    """Run bench/setup.sh when nginx or wrk is missing (installs them from Debian, as root)."""
    if shutil.which("wrk") and (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()) and shutil.which("taskset"):
        return
    subprocess.run(["bash", str(BENCH / "setup.sh")], check=True)


def nginx_path() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


# ---------------------------------------------------------------- processes


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def pinned(cmd: Sequence[str], cpu: int | None) -> list[str]:
    """``taskset -c CPU cmd`` (taskset execs, so the pid is the command's own)."""
    return (["taskset", "-c", str(cpu)] if cpu is not None else []) + list(cmd)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(5)


def spawn(
    name: str, cmd: Sequence[str], logdir: Path, env: dict[str, str] | None = None, cpu: int | None = None, **kw: object
) -> Proc:
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"{name}.log"
    fh = open(log, "ab")  # noqa: SIM115 (the child owns it)
    popen = subprocess.Popen(
        pinned(cmd, cpu), stdout=fh, stderr=subprocess.STDOUT, env=env or clean_env(), start_new_session=True, **kw
    )  # type: ignore[call-overload]
    fh.close()
    return popen_proc(name, popen, log)


def popen_proc(name: str, popen: subprocess.Popen[bytes], log: Path) -> Proc:
    return Proc(name, popen, log)


@dataclass
class Stack:
    """Processes and temp files of one benchmark; ``close()`` stops them in reverse order."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, sig: int = signal.SIGTERM) -> None:
        proc.stop(sig)
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


@dataclass
class Certs:
    dir: Path
    ca: Path
    cert: Path
    key: Path
    token_file: Path


def make_certs(workdir: Path) -> Certs:
    certs = workdir / "certs"
    if not (certs / "server.pem").exists():
        subprocess.run(
            [venv_bin("exit-server"), "gen-certs", "--out", str(certs), "--hostname", "localhost", "--ip", "127.0.0.1"],
            check=True,
            capture_output=True,
            env=clean_env(),
            timeout=60,
        )
    token = workdir / "token"
    token.write_text(secrets.token_urlsafe(32) + "\n")
    token.chmod(0o600)
    return Certs(certs, certs / "ca.pem", certs / "server.pem", certs / "server-key.pem", token)


_HELP: dict[str, str] = {}


def help_text(script: str) -> str:
    if script in _HELP:
        return _HELP[script]
    try:
        out = subprocess.run(
            [venv_bin(script), "run", "--help"], capture_output=True, text=True, timeout=30, env=clean_env()
        )
        _HELP[script] = out.stdout + out.stderr
        return _HELP[script]
    except (OSError, subprocess.TimeoutExpired):
        return ""


def tcp_mode_available() -> tuple[bool, str]:
    """TCP mode needs ``tunnel-client run --tcp`` and ``exit-server run --tcp-port-range``."""
    client = re.search(r"--tcp\b(?!-)", help_text("tunnel-client")) is not None
    server = "--tcp-port-range" in help_text("exit-server")
    if client and server:
        return True, ""
    missing = [
        name
        for name, ok in (("tunnel-client run --tcp", client), ("exit-server run --tcp-port-range", server))
        if not ok
    ]
    return False, "not available (" + ", ".join(missing) + " missing)"


def quiet_flags(script: str) -> list[str]:
    """Flags that keep a benchmark instance to itself: newer builds open an admin listener on a
    fixed port by default (127.0.0.1:8690 / :8691), which would clash between instances."""
    return ["--admin-addr", ""] if "--admin-addr" in help_text(script) else []


def start_exit_server(
    stack: Stack,
    certs: Certs,
    public: int,
    control: int,
    cpu: int | None = None,
    extra: Sequence[str] = (),
    name: str = "exit-server",
) -> Proc:
    cmd = [
        venv_bin("exit-server"),
        "run",
        "--public-addr",
        f"127.0.0.1:{public}",
        "--control-addr",
        f"127.0.0.1:{control}",
        "--tls-cert",
        str(certs.cert),
        "--tls-key",
        str(certs.key),
        "--token-file",
        str(certs.token_file),
        "--drain-timeout",
        "2",
        "--log-level",
        "warning",
        *quiet_flags("exit-server"),
        *extra,
    ]
    proc = stack.add(spawn(name, cmd, stack.workdir / "logs", cpu=cpu))
    try:
        wait_port(public, proc=proc.popen)
        wait_port(control, proc=proc.popen)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{proc.tail()}") from None
    return proc


def tunnel_flags(certs: Certs, control: int) -> list[str]:
    """How a tunnel client (the command or bench/idle_tunnels.py) reaches the bench's exit
    server: its control port on localhost, the bench CA and the shared token."""
    return ["--server", f"wss://localhost:{control}", "--ca-file", str(certs.ca), "--token-file", str(certs.token_file)]


def start_tunnel_client(
    stack: Stack,
    certs: Certs,
    control: int,
    upstreams: Sequence[str] = (),
    cpu: int | None = None,
    extra: Sequence[str] = (),
    name: str = "tunnel-client",
) -> Proc:
    cmd = [
        venv_bin("tunnel-client"),
        "run",
        *tunnel_flags(certs, control),
        "--drain-timeout",
        "2",
        "--log-level",
        "warning",
        *quiet_flags("tunnel-client"),
    ]
    for spec in upstreams:
        cmd += ["--upstream", spec]
    cmd += list(extra)
    return stack.add(spawn(name, cmd, stack.workdir / "logs", cpu=cpu))


def start_upstream(stack: Stack, port: int, cpu: int | None = None) -> Proc:
    proc = stack.add(
        spawn(
            "upstream",
            [venv_python(), str(BENCH / "upstream.py"), "--port", str(port)],
            stack.workdir / "logs",
            cpu=cpu,
        )
    )
    wait_port(port, proc=proc.popen)
    return proc


# ---------------------------------------------------------------- nginx

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
user {user};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
worker_rlimit_nofile 65536;
events {{
    worker_connections 16384;
    use epoll;
}}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;

    # (a) direct: static files
    server {{
        listen 127.0.0.1:{direct} backlog=4096;
        root {tmp}/www;
        location / {{ }}
    }}

    # (b) one-hop reverse proxy to (a), keep-alive upstream
    upstream direct_pool {{
        server 127.0.0.1:{direct};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{proxy} backlog=4096;
        location / {{
            proxy_pass http://direct_pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            # stream through memory buffers, never spill 1 MiB bodies to temp files
            proxy_buffering on;
            proxy_buffer_size 64k;
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;
            proxy_max_temp_file_size 0;
        }}
    }}
{tls_block}}}
"""

# (e) nginx terminating TLS (the certificate Backhaul's public HTTPS listener serves), then the
# same one-hop proxy to (a) as (b): the baseline for Backhaul's public HTTPS rows.
NGINX_TLS_BLOCK = """
    server {{
        listen 127.0.0.1:{tls} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://direct_pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering on;
            proxy_buffer_size 64k;
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;
            proxy_max_temp_file_size 0;
        }}
    }}
"""


# HTTP/2 with prior knowledge (h2c), then the same one-hop proxy to (a): the baseline for
# Backhaul's public HTTP/2 rows (bench/h2.py). Cleartext on both sides, as Backhaul's --h2c row.
NGINX_H2C_BLOCK = """
    server {{
        listen 127.0.0.1:{h2c} http2 backlog=4096;
        http2_max_concurrent_streams 128;
        location / {{
            proxy_pass http://direct_pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering on;
            proxy_max_temp_file_size 0;
        }}
    }}
"""


@dataclass
class Nginx:
    proc: Proc
    direct: int
    proxy: int
    tls: int = 0  # (e), when started with certificates
    h2c: int = 0  # the h2c one-hop proxy, when asked for

    def worker_pid(self) -> int:
        kids = children(self.proc.pid)
        if not kids:
            raise RuntimeError("nginx has no worker process")
        return kids[0]


SMALL_FILE = "small.bin"  # 100 bytes
BIG_FILE = "big.bin"  # 1 MiB


def start_nginx(stack: Stack, cpu: int | None = None, certs: Certs | None = None, h2c: bool = False) -> Nginx:
    tmp = stack.workdir / "nginx"
    (tmp / "www").mkdir(parents=True, exist_ok=True)
    (tmp / "www" / SMALL_FILE).write_bytes(b"x" * 99 + b"\n")
    (tmp / "www" / BIG_FILE).write_bytes((bytes(range(256)) * 4096)[:MIB])
    direct, proxy = free_port(), free_port()
    tls = free_port() if certs is not None else 0
    tls_block = NGINX_TLS_BLOCK.format(tls=tls, cert=certs.cert, key=certs.key) if certs is not None else ""
    h2c_port = free_port() if h2c else 0
    if h2c:
        tls_block += NGINX_H2C_BLOCK.format(h2c=h2c_port)
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, direct=direct, proxy=proxy, user=user, tls_block=tls_block))
    cmd = [nginx_path(), "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx-error.log")]
    proc = stack.add(spawn("nginx", cmd, stack.workdir / "logs", cpu=cpu))
    wait_port(direct, proc=proc.popen)
    wait_port(proxy, proc=proc.popen)
    if tls:
        wait_port(tls, proc=proc.popen)
    if h2c_port:
        wait_port(h2c_port, proc=proc.popen)
    return Nginx(proc, direct, proxy, tls, h2c_port)


def update_section(doc: Path, begin: str, end: str, text: str) -> None:
    """Replace the ``begin``..``end`` block of ``doc`` with ``text`` (appended when absent)."""
    block = f"{begin}\n{text}\n{end}"
    current = doc.read_text() if doc.exists() else "# Backhaul benchmarks\n"
    if begin in current and end in current:
        head, _, rest = current.partition(begin)
        _, _, tail = rest.partition(end)
        current = head + block + tail
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(current)


@contextlib.contextmanager
def sampled_peak(pids: dict[str, int], interval: float = 0.2) -> Iterator[dict[str, int]]:
    """Samples VmRSS of ``pids`` in a thread; yields a dict name -> peak KiB (filled on exit)."""
    import threading

    peaks = {name: 0 for name in pids}
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for name, pid in pids.items():
                with contextlib.suppress(OSError, RuntimeError):
                    peaks[name] = max(peaks[name], rss_kib(pid))
            stop.wait(interval)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join()
        for name, pid in pids.items():
            with contextlib.suppress(OSError, RuntimeError):
                peaks[name] = max(peaks[name], rss_kib(pid))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
