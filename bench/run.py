"""Backhaul benchmark harness (``make bench``): wrk against nginx baselines and Backhaul, one run.

    .venv/bin/python bench/run.py [--pin] [--quick | --duration S] [--profile] [--skip-scale]

Targets, all on 127.0.0.1, measured in the same run:

    (a) direct       nginx (one worker) serving a 100-byte and a 1 MiB file
    (b) nginx proxy  a second nginx server block, one-hop reverse proxy to (a), keep-alive upstream
    (c) HTTP mode    exit-server + tunnel-client (real console scripts, uvloop, TLS tunnel),
                     upstream = (a), routed by Host (``default=``)
    (d) TCP mode     ``tunnel-client run --tcp PORT=127.0.0.1:(a)`` + ``exit-server --tcp-port-range``;
                     "not available" when ``tunnel-client run --help`` has no ``--tcp``
    (e) nginx TLS    the same nginx terminating TLS, one-hop proxy to (a) (the HTTPS baseline)
    (f) HTTPS        (c) with the exit server terminating public TLS (``--public-tls-addr``)

Workloads: 100 B GETs on 50 keep-alive connections, 1 MiB GETs on 50 connections, 100 B GETs on
one connection (latency); for (e) and (f), 100 B GETs on 50 keep-alive TLS connections and on
50 connections that each carry one request (``Connection: close``: new TLS connections per
second, a full handshake each). Each wrk run is bounded by --duration (10 s; --quick: 3 s) after a
short warm-up that is not counted.

Per run: req/s, p50/p99 latency, MiB/s (response bytes incl. headers / duration), CPU time per
request (utime+stime deltas from /proc/PID/stat over the measured interval / requests: exit
server + tunnel client for (c)/(d), the nginx worker for (a)/(b)), and RSS.

``--pin`` puts wrk (and py-spy) on CPU 0 and everything under test (nginx, exit-server,
tunnel-client) on CPU 1.

``--profile`` adds py-spy recordings of the exit server and the client during an extra (c)
100 B x50 run: raw collapsed stacks, a flame graph SVG and a speedscope JSON per process in
bench/results/, and the top 15 frames by self time in the report.

Writes docs/BENCHMARKS.md and bench/results/bench-*.json, then runs bench/scale.py (which adds
its section to docs/BENCHMARKS.md) unless --skip-scale, bench/h2.py (HTTP/2 with h2load beside
nginx, gRPC unary calls beside direct) unless --skip-h2, bench/fleet.py (a relayed request against
a local one) unless --skip-fleet, bench/relay_floor.py (bare uvloop relays, the floor under
any tunnel of this shape) unless --skip-floor, and bench/startup.py (start time, idle
RSS, import cost) unless --skip-startup.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

DOC = bl.ROOT / "docs" / "BENCHMARKS.md"
LUA = bl.BENCH / "wrk_report.lua"
SCALE_BEGIN = "<!-- scale:begin -->"
SCALE_END = "<!-- scale:end -->"
FLEET_BEGIN = "<!-- fleet:begin -->"
FLEET_END = "<!-- fleet:end -->"
H2_BEGIN = "<!-- h2:begin -->"
H2_END = "<!-- h2:end -->"
STARTUP_BEGIN = "<!-- startup:begin -->"
STARTUP_END = "<!-- startup:end -->"
FLOOR_BEGIN = "<!-- floor:begin -->"
FLOOR_END = "<!-- floor:end -->"
PROFILE_BEGIN = "<!-- profile:begin -->"
PROFILE_END = "<!-- profile:end -->"


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    path: str
    connections: int
    close: bool = False  # one request per connection (Connection: close)


WORKLOADS = [
    Workload("small50", "100 B GET, 50 conns", "/" + bl.SMALL_FILE, 50),
    Workload("big50", "1 MiB GET, 50 conns", "/" + bl.BIG_FILE, 50),
    Workload("small1", "100 B GET, 1 conn", "/" + bl.SMALL_FILE, 1),
]
#: The public HTTPS rows: keep-alive TLS, and a new TLS connection (full handshake) per request.
TLS_WORKLOADS = [
    WORKLOADS[0],
    Workload("handshake50", "new TLS connection per 100 B GET, 50 conns", "/" + bl.SMALL_FILE, 50, close=True),
]

TARGETS = {
    "direct": "(a) nginx direct",
    "proxy": "(b) nginx one-hop proxy",
    "http": "(c) Backhaul HTTP mode (TLS tunnel)",
    "tcp": "(d) Backhaul TCP mode (TLS tunnel)",
    "tls-proxy": "(e) nginx TLS termination + one-hop proxy",
    "https": "(f) Backhaul public HTTPS (exit server terminates TLS)",
    "http-defaults": "(g) Backhaul HTTP mode, default flags (access log, admin listeners)",
}
TLS_TARGETS = ("tls-proxy", "https")


def workloads_of(target: str) -> list[Workload]:
    if target == "http-defaults":
        return WORKLOADS[:1]  # beside (c)'s 100 B x50 row: what the flags users run cost
    return TLS_WORKLOADS if target in TLS_TARGETS else WORKLOADS


# Targets of the performance issue.
# The performance issue, round 2 (docs/BENCHMARKS.md "Targets"): ratios to this run's baselines.
T_CPU_BASELINE = "3d9815c"  # CPU per request at most half of this build's, judged by bench/ab.py
T_HTTP_RATIO = 0.30  # HTTP mode 100 B x50 req/s against the nginx one-hop proxy
T_LAT_EXTRA_MS = 0.25  # HTTP mode, one connection: p50 over direct
T_TCP_LAT_EXTRA_MS = 0.12  # TCP mode, one connection: p50 over direct
T_BIG_RATIO = 0.45  # 1 MiB x50 MiB/s against the nginx one-hop proxy, both modes

QUIET_CPU = 0.15  # CPU-seconds per second (all CPUs) that still counts as an idle machine
FOREIGN_NOTE_PCT = 10.0  # note a run when other processes used more than this share of one CPU

PEERS = """\
| target | 100 B req/s | CPU per request (server + client) | 1 MiB MiB/s |
|---|---|---|---|
| direct to nginx | 30,362 | - | 1,516 |
| nginx one-hop reverse proxy | 16,552 | 33 us | 894 |
| frp 0.38 TCP mode (yamux) | 8,351 | 88 us | 265 |
| chisel 1.8 (SSH over WebSocket) | 8,131 | 95 us | 113 |
| best Python tunnel found (L4, no TLS) | 5,609 | 145 us | 247 |
| frp 0.38 HTTP mode (routing by Host) | 1,480 | 593 us | 196 |
"""


@dataclass
class Result:
    target: str
    workload: str
    ok: bool = True
    note: str = ""
    requests: int = 0
    duration_s: float = 0.0
    rps: float = 0.0
    p50_us: float = 0.0
    p90_us: float = 0.0
    p99_us: float = 0.0
    mibps: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    cpu_us_per_req: float | None = None
    cpu_detail: dict[str, float] = field(default_factory=dict)  # name -> us/request
    rss_kib: dict[str, int] = field(default_factory=dict)
    wrk_cmd: str = ""
    foreign_cpu_pct: float = 0.0
    waited_s: float = 0.0
    attempts: int = 1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


# ---------------------------------------------------------------- wrk


class Runner:
    def __init__(self, args: argparse.Namespace, outdir: Path) -> None:
        self.args = args
        self.outdir = outdir
        self.wrk_cpu = 0 if args.pin else None
        self.sut_cpu = 1 if args.pin else None
        self.threads = args.threads or (1 if args.pin else 2)
        self.nginx_worker = 0

    def wait_quiet(self) -> float:
        """Wait (at most --quiet-wait s) until the machine is idle apart from us: other sessions'
        load would skew every figure. Returns the seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.args.quiet_wait:
            busy0 = bl.machine_busy_seconds()
            time.sleep(1.0)
            if (bl.machine_busy_seconds() - busy0) < QUIET_CPU:
                break
        waited = time.monotonic() - t0
        if waited > 1.5:
            bl.log(f"waited {waited:.0f} s for the machine to be quiet")
        return round(waited, 1)

    def wrk(
        self, url: str, connections: int, duration: float, tag: str | None = None, close: bool = False
    ) -> tuple[dict[str, Any], str]:
        threads = max(1, min(self.threads, connections))
        duration = max(1, int(round(duration)))  # wrk takes whole seconds
        cmd = bl.pinned(
            [
                "wrk",
                "-t",
                str(threads),
                "-c",
                str(connections),
                "-d",
                f"{duration:g}s",
                "--timeout",
                "10s",
                "--latency",
                *(["-H", "Connection: close"] if close else []),
                "-s",
                str(LUA),
                url,
            ],
            self.wrk_cpu,
        )
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        if tag:
            (self.outdir / "wrk").mkdir(parents=True, exist_ok=True)
            (self.outdir / "wrk" / f"{tag}.txt").write_text(shlex.join(cmd) + "\n\n" + out.stdout + out.stderr)
        match = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.M)
        if out.returncode != 0 or not match:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()[-300:] or out.stdout[-300:]}")
        return json.loads(match.group(1)), shlex.join(cmd)

    def measure(
        self, target: str, wl: Workload, url: str, cpu_pids: dict[str, int], rss_pids: dict[str, int]
    ) -> Result:
        """One measurement; repeated (--retries) when other load on the machine skewed it, keeping
        the attempt with the least other load."""
        best: Result | None = None
        for attempt in range(1 + max(0, self.args.retries)):
            res = self._measure_once(target, wl, url, cpu_pids, rss_pids)
            res.attempts = attempt + 1
            if best is None or (res.ok and (not best.ok or res.foreign_cpu_pct < best.foreign_cpu_pct)):
                best = res
            if not res.ok or res.foreign_cpu_pct <= FOREIGN_NOTE_PCT or attempt >= self.args.retries:
                break
            bl.log(f"{target} {wl.key}: other load {res.foreign_cpu_pct:.0f}% during the run, measuring again")
        assert best is not None
        best.attempts = res.attempts
        return best

    def _measure_once(
        self, target: str, wl: Workload, url: str, cpu_pids: dict[str, int], rss_pids: dict[str, int]
    ) -> Result:
        res = Result(target, wl.key)
        ours = dict(cpu_pids)
        if self.nginx_worker and self.nginx_worker not in ours.values():
            ours["nginx (upstream)"] = self.nginx_worker
        try:
            res.waited_s = self.wait_quiet()
            if self.args.warmup > 0:
                self.wrk(url, wl.connections, self.args.warmup, close=wl.close)
            before = {name: bl.cpu_seconds(pid) for name, pid in ours.items()}
            busy0, kids0 = bl.machine_busy_seconds(), bl.children_cpu_seconds()
            data, cmd = self.wrk(url, wl.connections, self.args.duration, tag=f"{target}-{wl.key}", close=wl.close)
            busy1, kids1 = bl.machine_busy_seconds(), bl.children_cpu_seconds()
            after = {name: bl.cpu_seconds(pid) for name, pid in ours.items()}
        except Exception as exc:  # noqa: BLE001 (report, keep going)
            res.ok = False
            res.note = f"failed: {exc}"
            bl.log(f"{target} {wl.key}: {res.note}")
            return res
        res.wrk_cmd = cmd
        res.requests = int(data["requests"])
        res.duration_s = data["duration_us"] / 1e6
        res.rps = res.requests / res.duration_s if res.duration_s else 0.0
        res.p50_us, res.p90_us, res.p99_us = float(data["p50"]), float(data["p90"]), float(data["p99"])
        res.mibps = data["bytes"] / bl.MIB / res.duration_s if res.duration_s else 0.0
        res.errors = {k: int(data[k]) for k in ("connect", "read", "write", "status", "timeout") if int(data[k])}
        if res.requests:
            res.cpu_detail = {name: (after[name] - before[name]) * 1e6 / res.requests for name in cpu_pids}
            res.cpu_us_per_req = sum(res.cpu_detail.values())
        # CPU used on the machine by anything but wrk, the processes under test and nginx: other tenants
        ours_s = sum(after[n] - before[n] for n in ours) + (kids1 - kids0)
        wall = max(res.duration_s, 1e-6)
        res.foreign_cpu_pct = max(0.0, round(100 * ((busy1 - busy0) - ours_s) / wall, 1))
        if res.foreign_cpu_pct > FOREIGN_NOTE_PCT:
            res.note = f"other load {res.foreign_cpu_pct:.0f}% of a CPU"
        for name, pid in rss_pids.items():
            with contextlib.suppress(OSError, RuntimeError):
                res.rss_kib[name] = bl.rss_kib(pid)
        if res.error_count:
            res.note = "; ".join(
                filter(None, [res.note, "errors: " + ", ".join(f"{k} {v}" for k, v in res.errors.items())])
            )
        bl.log(
            f"{target:6} {wl.key:8} {res.rps:10.0f} req/s  p50 {res.p50_us:7.0f} us  p99 {res.p99_us:7.0f} us  "
            f"{res.mibps:8.1f} MiB/s  cpu/req {fmt_us(res.cpu_us_per_req)}  {res.note}"
        )
        return res


# ---------------------------------------------------------------- targets


def run_nginx_targets(runner: Runner, nginx: bl.Nginx, targets: list[str]) -> list[Result]:
    out = []
    worker = nginx.worker_pid()
    for target, base in (
        ("direct", f"http://127.0.0.1:{nginx.direct}"),
        ("proxy", f"http://127.0.0.1:{nginx.proxy}"),
        ("tls-proxy", f"https://localhost:{nginx.tls}"),
    ):
        if target not in targets:
            continue
        for wl in workloads_of(target):
            out.append(runner.measure(target, wl, base + wl.path, {"nginx": worker}, {"nginx": worker}))
    return out


def backhaul_pids(server: bl.Proc, client: bl.Proc) -> dict[str, int]:
    return {"server": server.pid, "client": client.pid}


def start_http_mode(stack: bl.Stack, certs: bl.Certs, nginx: bl.Nginx, cpu: int | None) -> tuple[bl.Proc, bl.Proc, int]:
    public, control = bl.free_port(), bl.free_port()
    server = bl.start_exit_server(stack, certs, public, control, cpu=cpu)
    client = bl.start_tunnel_client(stack, certs, control, [f"default=http://127.0.0.1:{nginx.direct}"], cpu=cpu)
    try:
        bl.wait_http(
            f"http://127.0.0.1:{public}/{bl.SMALL_FILE}", "bench.localhost", procs=[server.popen, client.popen]
        )
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\nexit-server: {server.tail()}\ntunnel-client: {client.tail()}") from None
    return server, client, public


def start_http_defaults(
    stack: bl.Stack, certs: bl.Certs, nginx: bl.Nginx, cpu: int | None
) -> tuple[bl.Proc, bl.Proc, int]:
    """(c) with what a user runs without tuning: the default log level (info: one access line
    per request, to the process's log file here) and both admin listeners open."""
    public, control = bl.free_port(), bl.free_port()
    defaults = ["--log-level", "info"]  # later flags win: these undo the bench's quiet ones
    server = bl.start_exit_server(
        stack,
        certs,
        public,
        control,
        cpu=cpu,
        name="exit-server-defaults",
        extra=[*defaults, "--admin-addr", f"127.0.0.1:{bl.free_port()}"],
    )
    client = bl.start_tunnel_client(
        stack,
        certs,
        control,
        [f"default=http://127.0.0.1:{nginx.direct}"],
        cpu=cpu,
        extra=[*defaults, "--admin-addr", f"127.0.0.1:{bl.free_port()}"],
        name="tunnel-client-defaults",
    )
    try:
        bl.wait_http(
            f"http://127.0.0.1:{public}/{bl.SMALL_FILE}", "bench.localhost", procs=[server.popen, client.popen]
        )
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\nexit-server: {server.tail()}\ntunnel-client: {client.tail()}") from None
    return server, client, public


def start_https_mode(
    stack: bl.Stack, certs: bl.Certs, nginx: bl.Nginx, cpu: int | None
) -> tuple[bl.Proc, bl.Proc, int]:
    """(c) plus the public HTTPS listener, serving the certificate (e) serves (name localhost)."""
    public, control, tls = bl.free_port(), bl.free_port(), bl.free_port()
    cert_dir = stack.workdir / "public-certs"
    cert_dir.mkdir(exist_ok=True)
    shutil.copyfile(certs.cert, cert_dir / "localhost.pem")
    shutil.copyfile(certs.key, cert_dir / "localhost-key.pem")
    server = bl.start_exit_server(
        stack,
        certs,
        public,
        control,
        cpu=cpu,
        name="exit-server-https",
        extra=["--public-tls-addr", f"127.0.0.1:{tls}", "--public-cert-dir", str(cert_dir)],
    )
    client = bl.start_tunnel_client(
        stack, certs, control, [f"default=http://127.0.0.1:{nginx.direct}"], cpu=cpu, name="tunnel-client-https"
    )
    try:
        bl.wait_port(tls, proc=server.popen)
        bl.wait_http(f"https://localhost:{tls}/{bl.SMALL_FILE}", procs=[server.popen, client.popen], cafile=certs.ca)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\nexit-server: {server.tail()}\ntunnel-client: {client.tail()}") from None
    return server, client, tls


def start_tcp_mode(stack: bl.Stack, certs: bl.Certs, nginx: bl.Nginx, cpu: int | None) -> tuple[bl.Proc, bl.Proc, int]:
    public, control = bl.free_port(), bl.free_port()
    tcp_port = bl.free_port_block(1)
    server = bl.start_exit_server(
        stack,
        certs,
        public,
        control,
        cpu=cpu,
        name="exit-server-tcp",
        extra=["--tcp-port-range", f"{tcp_port}-{tcp_port}"],
    )
    tcp_spec = ["--tcp", f"{tcp_port}=127.0.0.1:{nginx.direct}"]
    client = bl.start_tunnel_client(stack, certs, control, [], cpu=cpu, extra=tcp_spec, name="tunnel-client-tcp")
    time.sleep(1.0)
    if client.popen.poll() is not None:
        # This client version may still insist on an --upstream next to --tcp: give it a harmless one.
        stack.stop(client)
        client = bl.start_tunnel_client(
            stack,
            certs,
            control,
            [f"default=http://127.0.0.1:{nginx.direct}"],
            cpu=cpu,
            extra=tcp_spec,
            name="tunnel-client-tcp",
        )
    try:
        bl.wait_port(tcp_port, timeout=20, proc=client.popen)
        bl.wait_http(f"http://127.0.0.1:{tcp_port}/{bl.SMALL_FILE}", procs=[server.popen, client.popen])
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\nexit-server: {server.tail()}\ntunnel-client: {client.tail()}") from None
    return server, client, tcp_port


def uses_uvloop(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "uvloop" in Path(f"/proc/{pid}/maps").read_text()
    return False


def run_backhaul_target(
    runner: Runner, stack: bl.Stack, certs: bl.Certs, nginx: bl.Nginx, target: str, info: dict[str, Any], profile: bool
) -> list[Result]:
    starter = {
        "http": start_http_mode,
        "tcp": start_tcp_mode,
        "https": start_https_mode,
        "http-defaults": start_http_defaults,
    }[target]
    workloads = workloads_of(target)
    base = "https://localhost:{}" if target == "https" else "http://127.0.0.1:{}"
    try:
        server, client, port = starter(stack, certs, nginx, runner.sut_cpu)
    except Exception as exc:  # noqa: BLE001
        note = f"failed to start: {str(exc).splitlines()[0]}"
        bl.log(f"{target}: {exc}")
        return [Result(target, wl.key, ok=False, note=note) for wl in workloads]
    info.setdefault("uvloop_loaded", {})[target] = {
        "server": uses_uvloop(server.pid),
        "client": uses_uvloop(client.pid),
    }
    info.setdefault("commands", {})[target] = {
        "exit-server": shlex.join(map(str, server.popen.args)),
        "tunnel-client": shlex.join(map(str, client.popen.args)),
    }
    pids = backhaul_pids(server, client)
    results = []
    try:
        for wl in workloads:
            results.append(runner.measure(target, wl, base.format(port) + wl.path, pids, pids))
            if not server.alive() or not client.alive():
                bl.log(f"{target}: a process died\n{server.tail()}\n{client.tail()}")
                break
        if profile and target == "http" and server.alive() and client.alive():
            wl = next(w for w in WORKLOADS if w.key == runner.args.profile_workload)
            info["profile"] = run_profile(runner, f"http://127.0.0.1:{port}{wl.path}", wl, pids)
    finally:
        stack.stop(client)
        stack.stop(server)
    done = {r.workload for r in results}
    results += [
        Result(target, wl.key, ok=False, note="not run (process died)") for wl in workloads if wl.key not in done
    ]
    return results


#: The default-flags target: stacks of each kind, and runs of each stack, alternating.
DEFAULTS_PAIR_STACKS = 2
DEFAULTS_PAIR_ROUNDS = 3


def run_defaults_pair(
    runner: Runner,
    stack: bl.Stack,
    certs: bl.Certs,
    nginx: bl.Nginx,
    stacks: int = DEFAULTS_PAIR_STACKS,
    rounds: int = DEFAULTS_PAIR_ROUNDS,
) -> dict[str, list[dict[str, float]]]:
    """Target 6 compares two rows, and on this shared machine two rows measured one after the
    other moved by 10 to 20 % against each other between runs (the defaults read 0.93x and 1.13x
    the tuned row's CPU per request in two runs of the same build); two identically started
    stacks, measured alternately, differed by 9 % (round 11). So ``stacks`` stacks of each kind
    run side by side and 100 B x50 is measured ``rounds`` times on each, alternating forwards
    and backwards (as bench/ab.py does); the target is judged on the medians of all runs of each
    kind. Returns kind -> [{rps, cpu}] per run."""
    wl = next(w for w in WORKLOADS if w.key == "small50")
    runs: dict[str, list[dict[str, float]]] = {"tuned": [], "defaults": []}
    started: list[tuple[str, bl.Proc, bl.Proc, int]] = []
    try:
        for _ in range(stacks):
            started.append(("tuned", *start_http_mode(stack, certs, nginx, runner.sut_cpu)))
            started.append(("defaults", *start_http_defaults(stack, certs, nginx, runner.sut_cpu)))
        for i in range(rounds):
            for kind, server, client, port in started if i % 2 == 0 else started[::-1]:
                pids = backhaul_pids(server, client)
                res = runner.measure(f"pair-{kind}", wl, f"http://127.0.0.1:{port}{wl.path}", pids, pids)
                if res.ok and res.requests and res.cpu_us_per_req and res.error_count <= 0.001 * res.requests:
                    runs[kind].append({"rps": res.rps, "cpu": res.cpu_us_per_req})
    except Exception as exc:  # noqa: BLE001 (report, keep going: the target is then judged on the rows)
        bl.log(f"defaults pair: {exc}")
        return {"tuned": [], "defaults": []}
    finally:
        for _, server, client, _ in reversed(started):
            stack.stop(client)
            stack.stop(server)
    return runs


# ---------------------------------------------------------------- profile


def ensure_py_spy() -> str:
    path = bl.VENV_BIN / "py-spy"
    if not path.exists():
        bl.log("installing py-spy into .venv")
        subprocess.run([bl.venv_python(), "-m", "pip", "install", "-q", "py-spy"], check=True, timeout=600)
    return str(path)


PROFILE_PASSES = (
    # (label, py-spy format, native?, file suffix)
    ("raw-native", "raw", True, "native.txt"),
    ("raw-python", "raw", False, "python.txt"),
    ("flamegraph", "flamegraph", True, "svg"),
    ("speedscope", "speedscope", True, "speedscope.json"),
)


def run_profile(runner: Runner, url: str, wl: Workload, pids: dict[str, int]) -> dict[str, Any]:
    """Extra runs of one workload (100 B x50 unless --profile-workload) of (c) with py-spy attached
    to both processes, one pass per output:
    raw collapsed stacks with native frames and Python-only (both summarised here), a flame graph
    SVG and a speedscope JSON. One py-spy per process at a time (blocking sampling, exact)."""
    try:
        pyspy = ensure_py_spy()
    except Exception as exc:  # noqa: BLE001
        return {"error": f"py-spy unavailable: {exc}"}
    dur = max(2, int(round(runner.args.profile_duration or min(runner.args.duration, 10))))
    profdir = bl.RESULTS
    profdir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, dict[str, str]] = {name: {} for name in pids}
    errors: list[str] = []
    native_ok = not runner.args.profile_no_native
    for label, fmt, native, suffix in PROFILE_PASSES:
        native = native and native_ok
        if label == "raw-python" and not native_ok:
            continue  # raw-native already was Python-only
        procs = {}
        for name, pid in pids.items():
            out = profdir / f"profile-{name}-{wl.key}.{suffix}"
            cmd = [
                pyspy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(dur),
                "--rate",
                str(runner.args.profile_rate),
                "--format",
                fmt,
                "--output",
                str(out),
                "--function",
                "--full-filenames",
            ]
            if native:
                cmd.append("--native")
            procs[name] = (
                subprocess.Popen(
                    bl.pinned(cmd, runner.wrk_cpu), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                ),
                out,
            )
        time.sleep(0.5)
        try:
            runner.wrk(url, wl.connections, dur + 2, tag=f"profile-{label}")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"wrk during {label}: {exc}")
        for name, (proc, out) in procs.items():
            try:
                text, _ = proc.communicate(timeout=dur + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                text, _ = proc.communicate()
            if proc.returncode != 0 or not out.exists():
                errors.append(f"py-spy {label} {name}: rc {proc.returncode}: {text.strip()[-300:]}")
            else:
                outputs[name][label] = str(out.relative_to(bl.ROOT))
    summary: dict[str, dict[str, Any]] = {}
    for name in pids:
        for label in ("raw-native", "raw-python"):
            raw = outputs[name].get(label)
            if raw:
                view = "python" if label == "raw-python" or not native_ok else "native"
                summary.setdefault(name, {})[view] = summarise_raw(bl.ROOT / raw)
    return {
        "duration_s": dur,
        "rate": runner.args.profile_rate,
        "native": native_ok,
        "workload": wl.label,
        "files": outputs,
        "summary": summary,
        "errors": errors,
    }


_IDLE_LEAF = re.compile(r"^(epoll_wait|epoll_pwait2?|__GI_epoll_wait|__GI_epoll_pwait2?) ")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short_file(path: str) -> str:
    path = path.replace(str(bl.ROOT) + "/", "")
    path = re.sub(r"^.*?/site-packages/", "", path)
    path = re.sub(r"^.*/lib/python3\.\d+/", "<stdlib>/", path)
    path = re.sub(r"^/(usr/)?lib(64)?/[^ ]*/(lib[^/]+\.so[.\d]*)$", r"\3", path)
    path = re.sub(r"^/tmp/python-build[^/]*/", "", path)
    path = re.sub(r"^/project/build/(libuv)[^/]*/", r"\1/", path)
    path = re.sub(r"^/project/(src/)?", "", path)
    path = re.sub(r"^/opt/_internal/(cpython)[^/]*/", r"\1/", path)
    path = re.sub(r"^.*/(libpython[^/]+)$", r"\1", path)
    return path


def frame_group(file: str) -> str:
    """Coarse area of a leaf frame, to see where self time goes."""
    if file.startswith(("shared/", "exit_server/", "tunnel_client/")):
        return "backhaul"
    for name in ("aiohttp", "websockets", "yarl", "multidict", "propcache", "pydantic"):
        if file.startswith(name + "/") or f"/{name}/" in file:
            return name
    if "uvloop" in file or "libuv" in file:
        return "uvloop/libuv"
    if "libssl" in file or "libcrypto" in file or "_ssl.c" in file or file.startswith("<stdlib>/ssl"):
        return "TLS (OpenSSL + ssl)"
    if "libc.so" in file:
        return "libc (syscalls)"
    if file.startswith("<stdlib>/asyncio/") or "_asynciomodule" in file:
        return "asyncio"
    if file.startswith("<stdlib>/"):
        return "stdlib (other)"
    if "libpython" in file or "cpython" in file.lower() or "Python-3" in file or file.endswith((".c", ".h")):
        return "CPython runtime"
    return "other"


def summarise_raw(path: Path, top: int = 15) -> dict[str, Any]:
    """Top frames by self time (leaf frame of each sample) and by inclusive time."""
    self_counts: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = []
        for raw in stack.split(";"):
            m = _FRAME.match(raw.strip())
            if m:
                frames.append(f"{m.group('func')} ({short_file(m.group('file'))})")
            else:
                frames.append(raw.strip())
        frames = [f for f in frames if not f.startswith(("process ", "thread "))] or frames
        if _IDLE_LEAF.match(frames[-1]):
            idle += count  # native view: blocked in the event loop's poll, not CPU
            continue
        total += count
        self_counts[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
        leaf_file = re.search(r"\(([^()]*)\)$", frames[-1])
        groups[frame_group(leaf_file.group(1) if leaf_file else "")] += count

    def pct(n: int) -> float:
        return round(100.0 * n / total, 1) if total else 0.0

    return {
        "samples": total,
        "idle_samples": idle,
        "self": [(f, n, pct(n)) for f, n in self_counts.most_common(top)],
        "inclusive": [(f, n, pct(n)) for f, n in incl.most_common(top)],
        "groups": [(g, n, pct(n)) for g, n in groups.most_common()],
    }


def profile_text(profile: dict[str, Any]) -> str:
    lines = []
    if "error" in profile:
        return f"Profile not taken: {profile['error']}\n"
    lines.append(
        f"py-spy {'' if not profile['native'] else '(native frames: `--native`) '}record at "
        f"{profile['rate']} Hz for {profile['duration_s']} s per pass, `--function`, during extra (c) "
        f"{profile.get('workload', '100 B GET, 50 conns')} runs (their figures are not in the table). "
        "Self time = samples whose innermost frame "
        "it is. The native view shows where the CPU really is (syscalls, OpenSSL, the uvloop/libuv "
        "loop, CPython); the Python-only view charges C work to the Python function that called it "
        "(`Runner.run` there = time inside uvloop's C loop: libuv, socket I/O, callbacks' C parts). "
        "Samples blocked in `epoll_pwait` (the loop waiting, not CPU) are left out of the native view "
        "and counted separately. Files: "
        + ", ".join(f"`{p}`" for files in profile["files"].values() for p in files.values())
        + "."
    )
    for name, views in profile["summary"].items():
        who = "exit server" if name == "server" else "tunnel client"
        for view, summ in views.items():
            lines.append("")
            idle = f" (+{summ['idle_samples']} idle in epoll, excluded)" if summ.get("idle_samples") else ""
            lines.append(
                f"**{who}, {'native' if view == 'native' else 'Python-only'} view** — {summ['samples']} "
                f"samples{idle}; self time by area: " + ", ".join(f"{g} {p}%" for g, _, p in summ["groups"])
            )
            lines.append("")
            lines.append("| # | frame (self time) | samples | % |")
            lines.append("|---|---|---:|---:|")
            for i, (frame, n, p) in enumerate(summ["self"], 1):
                lines.append(f"| {i} | `{frame}` | {n} | {p} |")
    for err in profile.get("errors", []):
        lines.append(f"\nProfile problem: {err}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- report


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us:.0f} us" if us < 1000 else f"{us / 1000:.2f} ms"


def fmt_lat(us: float) -> str:
    return f"{us / 1000:.3f} ms"


def fmt_rss(kib: dict[str, int]) -> str:
    if not kib:
        return "-"
    return " / ".join(f"{v / 1024:.1f}" for v in kib.values()) + " MiB"


def machine_info() -> dict[str, str]:
    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    versions = {}
    for mod in ("aiohttp", "websockets"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = "?"
    git = subprocess.run(["git", "-C", str(bl.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(bl.ROOT), "status", "--porcelain", "--", "shared", "exit_server", "tunnel_client"],
        capture_output=True,
        text=True,
    )
    return {
        "cpu": bl.cpu_model(),
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "uvloop": uv,
        "aiohttp": versions["aiohttp"],
        "websockets": versions["websockets"],
        "nginx": bl.tool_version([bl.nginx_path(), "-v"]).replace("nginx version: ", ""),
        "wrk": bl.tool_version(["wrk", "--version"]).split(" Copyright")[0],
        "commit": (git.stdout.strip() or "?")
        + (" + uncommitted changes in the packages" if dirty.stdout.strip() else ""),
        "build": build_under_test(),
    }


def build_under_test() -> str:
    """Which build the Backhaul processes import (they inherit PYTHONPATH through clean_env):
    the compiled one from a scripts/compiled.py tree (what `make bench` builds first, and what
    the container image ships), or the pure-Python checkout."""
    probe = "import shared.mux, exit_server.h1; print(shared.mux.__file__, exit_server.h1.__file__)"
    done = subprocess.run([sys.executable, "-P", "-c", probe], capture_output=True, text=True, env=bl.clean_env())
    files = done.stdout.split()
    if done.returncode != 0 or len(files) != 2:
        return "? (" + (done.stderr.strip().splitlines() or ["no output"])[-1] + ")"
    if all(f.endswith(".py") for f in files):
        return "pure Python"
    return f"compiled (mypyc), from {Path(files[0]).parent.parent}"


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.platform()


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**PASS**" if ok else "**MISS**")


def evaluate(
    results: list[Result], pair: dict[str, list[dict[str, float]]] | None = None
) -> list[tuple[str, str, str]]:
    """(target text, figure, PASS/MISS/n/a) for each goal of the performance issue (round 2)
    that this run can judge; CPU against 3d9815c is judged by bench/ab.py, start time and idle
    memory by bench/startup.py."""
    get = {(r.target, r.workload): r for r in results}

    def valid(r: Result | None) -> bool:
        return r is not None and r.ok and r.requests > 0 and r.error_count <= 0.001 * r.requests

    def bad(a: Result | None, b: Result | None) -> str:
        return note_of(a if not valid(a) else b)

    rows = []
    p, d = get.get(("proxy", "small50")), get.get(("direct", "small1"))
    for mode, key in (("HTTP", "http"), ("TCP", "tcp")):
        r = get.get((key, "small50"))
        if r is None:
            continue
        if valid(r) and r.cpu_us_per_req is not None:
            rows.append(
                (
                    f"{mode} mode, 100 B x50: CPU per request (server + client), half of {T_CPU_BASELINE}'s "
                    f"in a same-run A/B (bench/ab.py {T_CPU_BASELINE})",
                    fmt_us(r.cpu_us_per_req),
                    mark(None),
                )
            )
    h = get.get(("http", "small50"))
    goal = f"HTTP mode, 100 B x50: req/s ≥ {T_HTTP_RATIO:.2f}x nginx one-hop proxy"
    if valid(h) and valid(p):
        assert h is not None and p is not None
        ratio = h.rps / p.rps
        rows.append((goal, f"{h.rps:,.0f} / {p.rps:,.0f} = {ratio:.2f}x", mark(ratio >= T_HTTP_RATIO)))
    else:
        rows.append((goal, bad(h, p), mark(False)))
    for mode, key, limit in (("HTTP", "http", T_LAT_EXTRA_MS), ("TCP", "tcp", T_TCP_LAT_EXTRA_MS)):
        r1 = get.get((key, "small1"))
        goal = f"{mode} mode, 1 connection: p50 ≤ direct p50 + {limit:g} ms"
        if valid(r1) and valid(d):
            assert r1 is not None and d is not None
            extra = (r1.p50_us - d.p50_us) / 1000
            rows.append((goal, f"{fmt_lat(r1.p50_us)} - {fmt_lat(d.p50_us)} = +{extra:.3f} ms", mark(extra <= limit)))
        elif r1 is not None:
            rows.append((goal, bad(r1, d), mark(False)))
    pb = get.get(("proxy", "big50"))
    for mode, key in (("HTTP", "http"), ("TCP", "tcp")):
        rb = get.get((key, "big50"))
        goal = f"{mode} mode, 1 MiB x50: MiB/s ≥ {T_BIG_RATIO:.2f}x nginx one-hop proxy"
        if valid(rb) and valid(pb):
            assert rb is not None and pb is not None
            ratio = rb.mibps / pb.mibps
            rows.append((goal, f"{rb.mibps:,.0f} / {pb.mibps:,.0f} = {ratio:.2f}x", mark(ratio >= T_BIG_RATIO)))
        elif rb is not None:
            rows.append((goal, bad(rb, pb), mark(False)))
    g = get.get(("http-defaults", "small50"))
    defaults_goal = "HTTP mode with the default flags within 10 % of the tuned row (100 B x50)"
    if pair and pair.get("tuned") and pair.get("defaults"):
        n = min(len(pair["tuned"]), len(pair["defaults"])) // DEFAULTS_PAIR_STACKS
        med = {side: {k: statistics.median(r[k] for r in runs) for k in ("rps", "cpu")} for side, runs in pair.items()}
        rps, cpu = med["defaults"]["rps"] / med["tuned"]["rps"], med["defaults"]["cpu"] / med["tuned"]["cpu"]
        rows.append(
            (
                defaults_goal,
                f"{rps:.2f}x the req/s, {cpu:.2f}x the CPU per request (medians of {n} alternating runs on each "
                f"of {DEFAULTS_PAIR_STACKS} stacks of each kind: "
                f"{med['defaults']['rps']:,.0f} / {med['tuned']['rps']:,.0f} req/s, "
                f"{med['defaults']['cpu']:.0f} / {med['tuned']['cpu']:.0f} us)",
                mark(rps >= 0.9 and cpu <= 1.1),
            )
        )
    elif valid(g) and valid(h) and g is not None and h is not None and g.cpu_us_per_req and h.cpu_us_per_req:
        rows.append(
            (
                defaults_goal,
                f"{g.rps / h.rps:.2f}x the req/s, {g.cpu_us_per_req / h.cpu_us_per_req:.2f}x the CPU per request",
                mark(g.rps >= 0.9 * h.rps and g.cpu_us_per_req <= 1.1 * h.cpu_us_per_req),
            )
        )
    elif g is not None:
        ok = valid(g)
        rows.append((defaults_goal, "(c) not in this run" if ok else note_of(g), mark(None if ok else False)))
    return rows


def note_of(r: Result | None) -> str:
    if r is None:
        return "not measured"
    if not r.ok:
        return r.note
    if r.error_count:
        return f"{r.note} of {r.requests} requests"
    return "no data"


#: Where the hand-written part of the report starts: everything from here to the end (A/B
#: rounds, the performance log) is kept when the generated part is written again.
HAND_WRITTEN = "## Hot path: before and after (hand-written, not generated)"


def hand_written(doc: Path) -> str:
    """The hand-written tail of an existing report ("" when there is none)."""
    current = doc.read_text() if doc.exists() else ""
    at = current.find(HAND_WRITTEN)
    return "\n" + current[at:] if at >= 0 else ""


#: The report's sections other scripts fill: (the --skip flag's attribute, the script, its title,
#: its markers). write_doc leaves each one pending (or says it was skipped) in this order.
_SECTIONS = (
    ("skip_scale", "scale.py", "Scale", SCALE_BEGIN, SCALE_END),
    ("skip_h2", "h2.py", "HTTP/2 and gRPC", H2_BEGIN, H2_END),
    ("skip_fleet", "fleet.py", "A relayed request against a local one (fleet)", FLEET_BEGIN, FLEET_END),
    ("skip_startup", "startup.py", "Start time, idle memory and imports", STARTUP_BEGIN, STARTUP_END),
    ("skip_floor", "relay_floor.py", "The floor under a tunnel: a bare uvloop relay with TLS", FLOOR_BEGIN, FLOOR_END),
)


def write_doc(
    args: argparse.Namespace,
    command: str,
    info: dict[str, str],
    results: list[Result],
    extra: dict[str, Any],
    started: str,
) -> str:
    get = {(r.target, r.workload): r for r in results}
    out: list[str] = []
    out.append("# Backhaul benchmarks\n")
    via = os.environ.get("BENCH_VIA", "")
    out.append(
        f"Command: `{command}`{f' (run by `{via}`)' if via else ''}. Run started {started}, "
        f"{args.duration:g} s per measurement after a {args.warmup:g} s warm-up"
        f"{' (--quick)' if args.quick else ''}"
        f"{'; wrk on CPU 0, everything under test on CPU 1 (--pin)' if args.pin else '; not pinned'}.\n"
    )
    out.append(
        "Generated by `bench/run.py` (and `bench/scale.py` for the scale section); do not edit by hand. "
        "Raw wrk output and JSON results are in `bench/results/` (gitignored).\n"
    )
    out.append("## Machine\n")
    out.append("| | |\n|---|---|")
    for key, label in (
        ("cpu", "CPU"),
        ("cores", "cores (os.cpu_count)"),
        ("kernel", "kernel"),
        ("os", "OS"),
        ("python", "Python"),
        ("uvloop", "uvloop"),
        ("aiohttp", "aiohttp"),
        ("websockets", "websockets"),
        ("nginx", "nginx"),
        ("wrk", "wrk"),
        ("commit", "Backhaul commit"),
        ("build", "Backhaul build"),
    ):
        out.append(f"| {label} | {info[key]} |")
    uv = extra.get("uvloop_loaded", {})
    if uv:
        out.append(
            "| uvloop loaded in the processes | "
            + ", ".join(
                f"{t}: server {'yes' if v['server'] else 'no'}, client {'yes' if v['client'] else 'no'}"
                for t, v in uv.items()
            )
            + " |"
        )
    out.append("")
    out.append("## What is measured\n")
    out.append(
        "- **(a) nginx direct**: nginx 1 worker, `access_log off`, `sendfile on`, serving `small.bin` "
        "(100 B) and `big.bin` (1 MiB) from a temp dir on 127.0.0.1."
    )
    out.append(
        "- **(b) nginx one-hop proxy**: a second server block of the same nginx worker, `proxy_pass` to (a) "
        "over a keep-alive upstream pool (`keepalive 128`, HTTP/1.1)."
    )
    out.append(
        "- **(c) Backhaul HTTP mode**: `.venv/bin/exit-server run` + `.venv/bin/tunnel-client run "
        "--upstream default=http://127.0.0.1:<(a)>`, TLS on the tunnel (certs from `exit-server gen-certs`), "
        "both on uvloop, `--log-level warning`; wrk talks to the exit server's public port."
    )
    out.append(
        "- **(d) Backhaul TCP mode**: `exit-server run --tcp-port-range P-P` + `tunnel-client run --tcp "
        "P=127.0.0.1:<(a)>`; wrk talks to port P. Marked *not available* when `tunnel-client run --help` "
        "does not list `--tcp`."
    )
    out.append(
        "- **(e) nginx TLS**: a third server block of the same nginx worker terminating TLS 1.2/1.3 with the "
        "certificate (f) serves (ECDSA P-256 from `exit-server gen-certs`, name `localhost`), then the same "
        "one-hop proxy to (a) as (b)."
    )
    out.append(
        "- **(f) Backhaul public HTTPS**: (c) with `--public-tls-addr` and `--public-cert-dir` holding that "
        "certificate: the exit server reads the ClientHello's SNI, terminates TLS and routes by Host. "
        "Workloads for (e)/(f): 100 B GETs on 50 keep-alive TLS connections, and 100 B GETs with "
        "`Connection: close` on 50 connections (each request a new TCP connection and full TLS handshake: "
        "req/s = handshakes/s; wrk does not resume sessions)."
    )
    out.append(
        "- **(g) Backhaul HTTP mode, default flags**: (c) as a user runs it untuned: `--log-level info` (one "
        "access line per request, to the process's log file) and both admin listeners open; 100 B x50 only, "
        "against (c)'s row (the performance issue's target 6: within 10 %). The target is judged on "
        f"{DEFAULTS_PAIR_STACKS} more stacks of each kind running side by side, {DEFAULTS_PAIR_ROUNDS} "
        "alternating runs on each (single rows moved by 10 to 20 % against each other between runs, "
        "and two identical stacks differed by 9 %)."
    )
    threads = args.threads or (1 if args.pin else 2)
    out.append(
        f"- wrk 4.1 with `--latency`, {threads} thread{'s' if threads > 1 else ''}"
        ", `--timeout 10s`, HTTP/1.1 keep-alive. Workloads: 100 B GETs on 50 connections, 1 MiB GETs on 50 "
        "connections, 100 B GETs on 1 connection (latency)."
    )
    out.append(
        "- **CPU/req**: utime+stime deltas from `/proc/PID/stat` over the measured wrk run divided by the "
        "requests: exit server + tunnel client for (c)/(d) (the upstream nginx is not included), the nginx "
        "worker (which serves both (a) and (b)) for (a)/(b). **MiB/s** counts response bytes "
        "(headers included) over the run. **RSS** is VmRSS after the run (server / client, or the nginx "
        "worker)."
    )
    out.append(
        f"- **Other load**: this machine is shared. Before each run the harness waits up to "
        f"{args.quiet_wait:g} s for it to be idle; *notes* flags a run during which processes other than "
        f"wrk, nginx and Backhaul used more than {FOREIGN_NOTE_PCT:.0f}% of a CPU (user+system time from "
        f"/proc/stat) even after {args.retries} repeat(s), since that skews its figures.\n"
    )
    out.append("## Results\n")
    out.append("| target | workload | req/s | p50 | p99 | MiB/s | CPU/req | CPU/req split | RSS | notes |")
    out.append("|---|---|---:|---:|---:|---:|---:|---|---|---|")
    for t, tlabel in TARGETS.items():
        for wl in workloads_of(t):
            r = get.get((t, wl.key))
            if r is None:
                continue
            if not r.ok:
                out.append(f"| {tlabel} | {wl.label} | - | - | - | - | - | - | - | {r.note} |")
                continue
            split = ", ".join(f"{k} {v:.0f} us" for k, v in r.cpu_detail.items()) if len(r.cpu_detail) > 1 else ""
            out.append(
                f"| {tlabel} | {wl.label} | {r.rps:,.0f} | {fmt_lat(r.p50_us)} | {fmt_lat(r.p99_us)} | "
                f"{r.mibps:,.1f} | {fmt_us(r.cpu_us_per_req)} | {split} | {fmt_rss(r.rss_kib)} | {r.note} |"
            )
    out.append("")
    out.append("## Ratios against the baselines of this run\n")
    out.append(
        "| workload | HTTP req/s ÷ nginx proxy | HTTP p50 − direct p50 | TCP req/s ÷ nginx proxy | "
        "TCP p50 − direct p50 |"
    )
    out.append("|---|---:|---:|---:|---:|")
    for wl in WORKLOADS:
        cells = []
        p, d = get.get(("proxy", wl.key)), get.get(("direct", wl.key))
        for t in ("http", "tcp"):
            r = get.get((t, wl.key))
            if r and r.ok and p and p.ok and p.rps:
                cells.append(f"{r.rps / p.rps:.2f}x")
            else:
                cells.append("-")
            if r and r.ok and d and d.ok:
                cells.append(f"+{(r.p50_us - d.p50_us) / 1000:.3f} ms")
            else:
                cells.append("-")
        out.append(f"| {wl.label} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("### Public HTTPS against nginx terminating TLS, same run\n")
    out.append("| workload | Backhaul HTTPS req/s | nginx TLS req/s | ratio | Backhaul CPU/req | nginx CPU/req |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for wl in TLS_WORKLOADS:
        r, n = get.get(("https", wl.key)), get.get(("tls-proxy", wl.key))
        if r and r.ok and n and n.ok and n.rps:
            out.append(
                f"| {wl.label} | {r.rps:,.0f} | {n.rps:,.0f} | {r.rps / n.rps:.2f}x | "
                f"{fmt_us(r.cpu_us_per_req)} | {fmt_us(n.cpu_us_per_req)} |"
            )
        else:
            out.append(f"| {wl.label} | - | - | - | - | - |")
    out.append("")
    out.append("## Targets (performance issue)\n")
    out.append("| target | measured | |")
    out.append("|---|---|---|")
    for text, fig, m in evaluate(results, extra.get("defaults_pair")):
        out.append(f"| {text} | {fig} | {m} |")
    out.append("\nA figure from a run with more than 0.1% errors counts as MISS.\n")
    if "profile" in extra:
        wl_label = extra["profile"].get("workload", "100 B GET, 50 conns")
        out.append(f"## Profile: Backhaul HTTP mode, {wl_label}\n")
        out.append(PROFILE_BEGIN)
        out.append(profile_text(extra["profile"]))
        out.append(PROFILE_END + "\n")
    out.append("## Reference: peer figures measured elsewhere (not in this run)\n")
    out.append(
        'From `LESSONS.md`, "Speed, measured on this kind of machine" (2 vCPU, everything on loopback, '
        "pinned to one core). Different hardware and day: compare ratios, not absolute numbers. frp's "
        "HTTP mode is the like-for-like peer of Backhaul's HTTP mode; its TCP mode, of ours.\n"
    )
    out.append(PEERS)
    out.append("## How to run\n")
    out.append(
        "- `make bench` = `bench/setup.sh` (nginx + wrk from Debian when missing, as root) then "
        "`.venv/bin/python bench/run.py --pin`, which runs `bench/scale.py`, `bench/h2.py`, `bench/fleet.py`, "
        "`bench/relay_floor.py` and `bench/startup.py` at the end. "
        "`make bench BENCH_ARGS='--pin --quick --profile'` passes other flags; `--skip-scale` leaves the "
        "scale test out, `--skip-floor` the bare relays, `--skip-startup` the start-time one; `--only http,tcp` "
        "measures a subset (the report then lacks the baselines)."
    )
    out.append(
        "- `--profile`: py-spy (installed into .venv when missing) on the exit server and the client during "
        "extra HTTP-mode 100 B x50 runs; outputs in `bench/results/profile-*` (`.svg` flame graphs, "
        "`.speedscope.json` for https://www.speedscope.app, raw collapsed stacks `.native.txt`/`.python.txt`)."
    )
    out.append(
        "- `make load` (`LOAD_TIME=20s`, `LOAD_USERS`, `LOAD_SPAWN_RATE`): locust from `.venv-load` with "
        "`tests/load/locustfile.py` against a local stack (`bench/load.py`, upstream `bench/upstream.py`); "
        "reports in `bench/results/load/`.\n"
    )
    if "commands" in extra:
        out.append("## Processes under test\n")
        for t, cmds in extra["commands"].items():
            for name, cmd in cmds.items():
                cmd = re.sub(r"/tmp/[^ ]*/", "$TMP/", cmd).replace(str(bl.ROOT) + "/", "")
                out.append(f"- {TARGETS[t]}, {name}: `{cmd}`")
        out.append("")
    for i, (skip, script, title, begin, end) in enumerate(_SECTIONS):
        out += [""] if i else []
        out += [begin, f"## {title}\n"]
        if getattr(args, skip):
            flag = "--" + skip.replace("_", "-")
            out.append(f"Not run (`{flag}`). Run `.venv/bin/python bench/{script}` to fill this section.\n")
        else:
            out.append(f"Pending: `bench/{script}` fills this section.\n")
        out.append(end)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run (default 10)")
    parser.add_argument("--quick", action="store_true", help="3 s per run, 1 s warm-up")
    parser.add_argument("--warmup", type=int, default=None, help="seconds of uncounted warm-up (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=0, help="wrk threads (default 1 with --pin, else 2)")
    parser.add_argument("--pin", action="store_true", help="wrk on CPU 0, everything under test on CPU 1")
    parser.add_argument("--only", default=",".join(TARGETS), help="comma list of targets (default all)")
    parser.add_argument("--profile", action="store_true", help="py-spy the exit server and client (HTTP 100 B x50)")
    parser.add_argument(
        "--profile-duration", type=float, default=0, help="seconds per py-spy pass (default min(duration, 10))"
    )
    parser.add_argument(
        "--profile-workload",
        choices=[w.key for w in WORKLOADS],
        default="small50",
        help="the workload the profile runs (default small50; small1 = the latency path)",
    )
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second (default 250)")
    parser.add_argument("--profile-no-native", action="store_true", help="py-spy without --native (no C frames)")
    parser.add_argument("--skip-scale", action="store_true", help="do not run bench/scale.py")
    parser.add_argument("--skip-startup", action="store_true", help="do not run bench/startup.py")
    parser.add_argument("--skip-h2", action="store_true", help="do not run bench/h2.py (HTTP/2 and gRPC)")
    parser.add_argument("--skip-fleet", action="store_true", help="do not run bench/fleet.py (relayed requests)")
    parser.add_argument("--skip-floor", action="store_true", help="do not run bench/relay_floor.py (bare relays)")
    parser.add_argument(
        "--retries", type=int, default=2, help="repeat a run up to N times when other load skewed it (default 2)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each run, wait up to this many "
        "seconds for other load on the machine to stop (default 60; 0 = never wait)",
    )
    parser.add_argument("--doc", type=Path, default=DOC, help="report to write (default docs/BENCHMARKS.md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 3
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.duration <= 0 or args.duration > 120:
        parser.error("--duration must be in (0, 120]")
    targets = [t.strip() for t in args.only.split(",") if t.strip()]
    if not set(targets) <= set(TARGETS):
        parser.error(f"--only: choose from {', '.join(TARGETS)}")
    if args.pin and (os.cpu_count() or 1) < 2:
        parser.error("--pin needs 2 CPUs")

    command = shlex.join([".venv/bin/python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    bl.ensure_tools()
    bl.raise_nofile()
    if args.pin:
        os.sched_setaffinity(0, {0})  # keep this orchestrator off the CPU under test
    bl.RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    bl.log(
        f"machine: {info['cpu']}, {info['cores']} cores, kernel {info['kernel']}, Python {info['python']}, "
        f"uvloop {info['uvloop']}; Backhaul build: {info['build']}"
    )
    runner = Runner(args, bl.RESULTS)
    results: list[Result] = []
    extra: dict[str, Any] = {}
    tcp_ok, tcp_note = bl.tcp_mode_available()
    extra["tcp_available"] = tcp_ok
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-bench-"))
    stack = bl.Stack(workdir)
    try:
        certs = bl.make_certs(workdir)
        nginx = bl.start_nginx(stack, cpu=runner.sut_cpu, certs=certs)
        runner.nginx_worker = nginx.worker_pid()
        if {"direct", "proxy", "tls-proxy"} & set(targets):
            results += run_nginx_targets(runner, nginx, targets)
        if "http" in targets:
            results += run_backhaul_target(runner, stack, certs, nginx, "http", extra, args.profile)
        if "https" in targets:
            results += run_backhaul_target(runner, stack, certs, nginx, "https", extra, False)
        if "http-defaults" in targets:
            results += run_backhaul_target(runner, stack, certs, nginx, "http-defaults", extra, False)
            if "http" in targets:
                extra["defaults_pair"] = run_defaults_pair(runner, stack, certs, nginx)
        if "tcp" in targets:
            if tcp_ok:
                results += run_backhaul_target(runner, stack, certs, nginx, "tcp", extra, False)
            else:
                bl.log(f"tcp: {tcp_note}")
                results += [Result("tcp", wl.key, ok=False, note=tcp_note) for wl in WORKLOADS]
    finally:
        stack.close()
        if os.environ.get("BENCH_KEEP_TMP"):
            bl.log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    payload = {
        "command": command,
        "started": started,
        "machine": info,
        "args": vars(args) | {"doc": str(args.doc)},
        "results": [asdict(r) for r in results],
        "extra": extra,
        "targets": evaluate(results, extra.get("defaults_pair")),
    }
    for name in (f"bench-{stamp}.json", "bench-latest.json"):
        (bl.RESULTS / name).write_text(json.dumps(payload, indent=2, default=str))
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(write_doc(args, command, info, results, extra, started) + hand_written(args.doc))
    bl.log(f"wrote {args.doc.relative_to(bl.ROOT) if args.doc.is_relative_to(bl.ROOT) else args.doc}")
    for text, fig, m in evaluate(results, extra.get("defaults_pair")):
        print(f"  {m.strip('*'):4}  {text}: {fig}")
    if "profile" in extra:
        print()
        print(profile_text(extra["profile"]))

    rc = 0
    # The report's other sections, each its own script: (skipped, script, flags it takes, timeout).
    for skipped, script, flags, timeout in (
        (args.skip_scale, "scale.py", ("--quick",), 1800),
        (args.skip_h2, "h2.py", ("--quick", "--pin"), 1800),
        (args.skip_fleet, "fleet.py", ("--quick", "--pin"), 1800),
        (args.skip_floor, "relay_floor.py", ("--quick",), 1800),
        (args.skip_startup, "startup.py", ("--pin",), 900),
    ):
        if skipped:
            continue
        cmd = [sys.executable, str(bl.BENCH / script)]
        if args.doc.resolve() != DOC.resolve():
            cmd += ["--doc", str(args.doc)]
        cmd += [flag for flag in flags if getattr(args, flag[2:])]
        bl.log(f"running bench/{script}")
        code = subprocess.run(cmd, timeout=timeout).returncode
        if code != 0:
            bl.log(f"bench/{script} exited with {code}")
            rc = rc or code
    return rc


if __name__ == "__main__":
    sys.exit(main())
