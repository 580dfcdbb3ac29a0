"""A relayed request against a local one (issue: a fleet of exit servers): what relaying to the
peer that has the session costs (``make bench`` runs it after bench/h2.py).

    .venv/bin/python bench/fleet.py [--quick] [--pin] [--doc docs/BENCHMARKS.md]

A real ``redis-server`` (Debian) holds the fleet state; two exit servers with ``--state`` and
``--peer-url``; one tunnel client linked to server A only, proxying to nginx (100 B file).
wrk (on CPU 0 with --pin) sends 100 B GETs to A (local session) and to B (relayed to A) in
alternating rounds, on 1 connection (latency) and 50 connections (rate, CPU per request over
both exit servers and the client). Writes its section between ``<!-- fleet:begin -->`` and
``<!-- fleet:end -->`` and bench/results/fleet-*.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

DOC = bl.ROOT / "docs" / "BENCHMARKS.md"
BEGIN = "<!-- fleet:begin -->"
END = "<!-- fleet:end -->"
HOST = "bench.localhost"


def wrk(port: int, connections: int, duration: float, cpu: int | None) -> tuple[int, float, float]:
    """(requests, req/s, p50 in us) of one wrk run."""
    cmd = bl.pinned(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "--timeout", "10s", "-H",
         f"Host: {HOST}", f"http://127.0.0.1:{port}/{bl.SMALL_FILE}"],
        cpu,
    )  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise RuntimeError(f"wrk saw {bad.group(1)} failed responses:\n{out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"50%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return requests, rps, float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--pin", action="store_true", help="wrk on CPU 0, the rest on CPU 1")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None or shutil.which("wrk") is None:
        print("bench/fleet.py: needs redis-server and wrk (scripts/ci-deps.sh, bench/setup.sh)", file=sys.stderr)
        return 1
    cpu, load_cpu = (1, 0) if args.pin else (None, None)
    duration = 3.0 if args.quick else 8.0
    rounds = 3
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-fleet-"))
    stack = bl.Stack(workdir)
    try:
        certs = bl.make_certs(workdir)
        nginx = bl.start_nginx(stack, cpu=cpu)
        redis_port = bl.free_port()
        redis = stack.add(
            bl.spawn("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(workdir)], workdir / "logs", cpu=cpu)
        )  # fmt: skip
        bl.wait_port(redis_port, proc=redis.popen)
        state = f"redis://127.0.0.1:{redis_port}/0"
        add = subprocess.run(
            [bl.venv_bin("exit-server"), "token", "add", "--state", state, "--client", "bench", "--host", "*"],
            capture_output=True, text=True, check=True, env=bl.clean_env(), timeout=60,
        )  # fmt: skip
        token_file = workdir / "client-token"
        token_file.write_text(add.stdout.strip() + "\n")
        token_file.chmod(0o600)
        ports = {}
        servers = []
        for name in ("a", "b"):
            public, control = bl.free_port(), bl.free_port()
            ports[name] = (public, control)
            cmd = [
                bl.venv_bin("exit-server"), "run", "--public-addr", f"127.0.0.1:{public}", "--control-addr",
                f"127.0.0.1:{control}", "--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--state", state,
                "--peer-url", f"http://127.0.0.1:{public}", "--log-level", "warning", "--admin-addr", "",
            ]  # fmt: skip
            proc = stack.add(bl.spawn(f"exit-server-{name}", cmd, workdir / "logs", cpu=cpu))
            bl.wait_port(public, proc=proc.popen)
            bl.wait_port(control, proc=proc.popen)
            servers.append(proc)
        client = stack.add(
            bl.spawn(
                "tunnel-client",
                [bl.venv_bin("tunnel-client"), "run", "--server", f"wss://localhost:{ports['a'][1]}", "--ca-file",
                 str(certs.ca), "--token-file", str(token_file), "--upstream",
                 f"default=http://127.0.0.1:{nginx.direct}", "--log-level", "warning", "--admin-addr", ""],
                workdir / "logs",
                cpu=cpu,
            )
        )  # fmt: skip
        for name in ("a", "b"):  # b answers once its directory names a
            bl.wait_http(
                f"http://127.0.0.1:{ports[name][0]}/{bl.SMALL_FILE}", procs=[client.popen], host=HOST, timeout=30
            )
        pids = [p.pid for p in servers] + [client.pid]
        results: dict[str, dict[str, list[float]]] = {
            k: {"p50": [], "rps": [], "cpu": []} for k in ("local", "relayed")
        }
        for _ in range(rounds):
            for kind, name in (("local", "a"), ("relayed", "b")):
                port = ports[name][0]
                results[kind]["p50"].append(wrk(port, 1, duration, load_cpu)[2])
                before = sum(bl.cpu_seconds(p) for p in pids)
                n, rps, _ = wrk(port, 50, duration, load_cpu)
                results[kind]["rps"].append(rps)
                results[kind]["cpu"].append((sum(bl.cpu_seconds(p) for p in pids) - before) / n * 1e6)
                bl.log(f"{kind}: {rps:,.0f} req/s")
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in results.items()}
    lines = [
        "## A relayed request against a local one (fleet)\n",
        f"Run {started} by `.venv/bin/python bench/fleet.py {' '.join(argv or sys.argv[1:])}` (`make bench` runs "
        f"it); two exit servers sharing a redis-server, one client linked to A; {rounds} alternating rounds of "
        f"{duration:g} s per row, medians. CPU per request: both exit servers and the client.\n",
        "| 100 B GET | p50, 1 connection | req/s, 50 connections | CPU per request |",
        "|---|---:|---:|---:|",
        f"| to A (local session) | {med['local']['p50'] / 1000:.3f} ms | {med['local']['rps']:,.0f} | "
        f"{med['local']['cpu']:.0f} us |",
        f"| to B (relayed to A) | {med['relayed']['p50'] / 1000:.3f} ms | {med['relayed']['rps']:,.0f} | "
        f"{med['relayed']['cpu']:.0f} us |",
        f"| **relaying adds** | **{(med['relayed']['p50'] - med['local']['p50']) / 1000:+.3f} ms** | "
        f"{med['relayed']['rps'] / med['local']['rps']:.2f}x | "
        f"**{med['relayed']['cpu'] - med['local']['cpu']:+.0f} us** |",
    ]
    text = "\n".join(lines)
    bl.update_section(args.doc, BEGIN, END, text)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    bl.RESULTS.mkdir(parents=True, exist_ok=True)
    for name in (f"fleet-{stamp}.json", "fleet-latest.json"):
        (bl.RESULTS / name).write_text(json.dumps({"started": started, "results": results}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
