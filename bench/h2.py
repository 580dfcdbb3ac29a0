"""HTTP/2 and gRPC through the tunnel against baselines in the same run (``make bench`` runs it
after bench/run.py's rows).

    .venv/bin/python bench/h2.py [--quick] [--pin] [--doc docs/BENCHMARKS.md]

* **HTTP/2 GETs**: ``h2load -c 10 -m 5`` (50 concurrent streams over 10 connections) of a
  100-byte file, with prior knowledge (h2c) on both sides: nginx with ``listen ... http2`` as a
  one-hop proxy to an nginx serving the file, beside Backhaul (``exit-server --h2c``, the
  tunnel client proxying to the same nginx). Rounds alternate nginx and Backhaul; each row is
  the median round. CPU/request counts the exit server and client (Backhaul) or the nginx
  worker (both blocks run in it).
* **gRPC unary calls**: bench/grpc_peer.py's caller (grpc.aio, one channel, 50 concurrent
  calls) against its echo server directly, and through Backhaul (h2c public listener, ``h2c://``
  upstream), for a fixed time each.

Writes its section of docs/BENCHMARKS.md between ``<!-- h2:begin -->`` and ``<!-- h2:end -->``
and bench/results/h2-*.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

DOC = bl.ROOT / "docs" / "BENCHMARKS.md"
BEGIN = "<!-- h2:begin -->"
END = "<!-- h2:end -->"
GRPC_HOST = "grpc.bench"


#: CPU the load generators run on with --pin (the processes under test get CPU 1).
LOAD_CPU: int | None = None


def h2load(url: str, requests: int) -> dict[str, float]:
    cmd = bl.pinned(["h2load", "-n", str(requests), "-c", "10", "-m", "5", url], LOAD_CPU)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    counts = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    if rate is None or counts is None:
        raise RuntimeError(f"h2load output not understood:\n{out}")
    return {
        "rate": float(rate.group(1)),
        "succeeded": int(counts.group(2)),
        "failed": int(counts.group(3)),
        "mean_request": mean.group(1) if mean else "",
    }


def measured(pids: list[int], run: Any) -> tuple[dict[str, Any], float]:
    before = sum(bl.cpu_seconds(p) for p in pids)
    result = run()
    return result, sum(bl.cpu_seconds(p) for p in pids) - before


def grpc_load(target: str, authority: str, seconds: float) -> dict[str, float]:
    cmd = bl.pinned(
        [bl.venv_python(), str(bl.BENCH / "grpc_peer.py"), "load", target, authority, str(seconds), "50"], LOAD_CPU
    )
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests and shorter gRPC runs")
    parser.add_argument("--pin", action="store_true", help="the processes under test on CPU 1, load on CPU 0")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        print("bench/h2.py: h2load missing (Debian nghttp2-client; bench/setup.sh installs it)", file=sys.stderr)
        return 1
    global LOAD_CPU
    cpu = 1 if args.pin else None
    LOAD_CPU = 0 if args.pin else None
    requests = 20_000 if args.quick else 100_000
    rounds = 3
    grpc_seconds = 3.0 if args.quick else 10.0
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-h2-"))
    stack = bl.Stack(workdir)
    try:
        certs = bl.make_certs(workdir)
        nginx = bl.start_nginx(stack, cpu=cpu, h2c=True)
        grpc_port = bl.free_port()
        grpc_server = stack.add(
            bl.spawn("grpc-upstream", [bl.venv_python(), str(bl.BENCH / "grpc_peer.py"), "serve", str(grpc_port)],
                     workdir / "logs", cpu=cpu)
        )  # fmt: skip
        bl.wait_port(grpc_port, proc=grpc_server.popen)
        public, control = bl.free_port(), bl.free_port()
        server = bl.start_exit_server(
            stack, certs, public, control, cpu=cpu, extra=["--h2c", "--h2-max-requests", str(requests)]
        )
        client = bl.start_tunnel_client(
            stack,
            certs,
            control,
            [f"default=http://127.0.0.1:{nginx.direct}", f"{GRPC_HOST}=h2c://127.0.0.1:{grpc_port}"],
            cpu=cpu,
        )
        bl.wait_http(f"http://127.0.0.1:{public}/{bl.SMALL_FILE}", procs=[server.popen, client.popen])
        ours = [server.pid, client.pid]
        worker = nginx.worker_pid()
        rows: dict[str, list[tuple[dict[str, Any], float]]] = {"nginx": [], "backhaul": []}
        h2load(f"http://127.0.0.1:{public}/{bl.SMALL_FILE}", 2000)  # warm-up both
        h2load(f"http://127.0.0.1:{nginx.h2c}/{bl.SMALL_FILE}", 2000)
        for _ in range(rounds):
            for name, url, pids in (
                ("nginx", f"http://127.0.0.1:{nginx.h2c}/{bl.SMALL_FILE}", [worker]),
                ("backhaul", f"http://127.0.0.1:{public}/{bl.SMALL_FILE}", ours),
            ):
                bl.log(f"h2load {name}")
                rows[name].append(measured(pids, lambda url=url: h2load(url, requests)))  # type: ignore[misc]
        grpc: dict[str, dict[str, float]] = {}
        grpc_cpu: dict[str, float] = {}
        for name, target, authority in (
            ("direct", f"127.0.0.1:{grpc_port}", ""),
            ("backhaul", f"127.0.0.1:{public}", GRPC_HOST),
        ):
            bl.log(f"gRPC unary {name}")
            pids = ours if name == "backhaul" else [grpc_server.pid]
            result, used = measured(pids, lambda t=target, a=authority: grpc_load(t, a, grpc_seconds))  # type: ignore[misc]
            grpc[name] = result
            grpc_cpu[name] = used
        rss = {"exit-server": bl.rss_kib(server.pid), "tunnel-client": bl.rss_kib(client.pid)}
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)

    def median(name: str) -> tuple[dict[str, Any], float]:
        ordered = sorted(rows[name], key=lambda r: r[0]["rate"])
        return ordered[len(ordered) // 2]

    (n, n_cpu), (b, b_cpu) = median("nginx"), median("backhaul")
    failed = sum(r["failed"] for rs in rows.values() for r, _ in rs)
    h2load_version = bl.tool_version(["h2load", "--version"], r"nghttp2/[\d.]+")
    lines = [
        "## HTTP/2 and gRPC\n",
        f"Run {started} by `{' '.join(['.venv/bin/python', 'bench/h2.py', *(argv or sys.argv[1:])])}` "
        f"(`make bench` runs it after the HTTP rows); {h2load_version}, "
        f"{rounds} alternating rounds of {requests:,} requests each, the median round shown.\n",
        "| h2c GET 100 B, 10 connections x 5 streams | req/s | CPU per request | failed |",
        "|---|---:|---:|---:|",
        f"| nginx http2 one-hop proxy | {n['rate']:,.0f} | {n_cpu / requests * 1e6:.0f} us | {n['failed']} |",
        f"| Backhaul `--h2c` (exit server + tunnel client) | {b['rate']:,.0f} | {b_cpu / requests * 1e6:.0f} us "
        f"| {b['failed']} |",
        f"| **ratio Backhaul / nginx** | **{b['rate'] / n['rate']:.2f}** | {b_cpu / max(n_cpu, 1e-9):.1f}x | |",
        "",
        f"Failed requests over all rounds: {failed}.",
        "",
        f"| gRPC unary, 100 B, 50 concurrent calls, {grpc_seconds:.0f} s | calls/s | p50 | CPU per call |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (("direct", "caller -> grpcio server (direct)"), ("backhaul", "caller -> Backhaul -> server")):
        r = grpc[name]
        per = grpc_cpu[name] / max(r["calls"], 1) * 1e6
        who = "server" if name == "direct" else "exit server + client"
        lines.append(f"| {label} | {r['rate']:,.0f} | {r['p50_ms']:.2f} ms | {per:.0f} us ({who}) |")
    lines += [
        f"| **ratio through Backhaul / direct** | **{grpc['backhaul']['rate'] / grpc['direct']['rate']:.2f}** | | |",
        "",
        f"RSS after the run: exit server {rss['exit-server'] / 1024:.1f} MiB, tunnel client "
        f"{rss['tunnel-client'] / 1024:.1f} MiB. The gRPC caller is one Python process (grpc.aio): "
        "both rows share its ceiling, so the ratio says what the tunnel adds to one such caller. On a "
        f"{os.cpu_count()}-CPU machine the caller, the gRPC server, the exit server and the client share "
        "the CPUs: CPU per call is the figure that carries over to a larger one.",
    ]
    text = "\n".join(lines)
    bl.update_section(args.doc, BEGIN, END, text)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    payload = {"started": started, "http2": rows, "grpc": grpc, "grpc_cpu": grpc_cpu, "rss_kib": rss}
    bl.RESULTS.mkdir(parents=True, exist_ok=True)
    for name in (f"h2-{stamp}.json", "h2-latest.json"):
        (bl.RESULTS / name).write_text(json.dumps(payload, indent=2, default=str))
    print(text)
    return 0 if failed == 0 and grpc["backhaul"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
