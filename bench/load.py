"""``make load``: start a local Backhaul stack and run the locust test against it, headless.

    .venv/bin/python bench/load.py --locust .venv-load/bin/locust [--time 60s] [--users 50] [--spawn-rate 10]
    python3 bench/load.py --print-deps      # the `load` extra of pyproject.toml, one per line

Stack (all on 127.0.0.1): bench/upstream.py (/small, /upload, /download, /sse) <- tunnel-client
(``--upstream app.load.test=...``) <= TLS tunnel => exit-server (public port). Locust runs from its
own virtualenv (``.venv-load``; gevent and uvloop never share a process) with
tests/load/locustfile.py, sends ``Host: app.load.test``, and writes CSV + HTML reports to
bench/results/load/. The exit status is locust's: non-zero when failures exceed 0.1% or p95
exceeds the locustfile's limit (its ``quitting`` listener decides).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def print_deps() -> int:
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for dep in data["project"]["optional-dependencies"]["load"]:
        print(dep)
    return 0


def seconds(spec: str) -> int:
    """Locust's --run-time syntax (``90``, ``20s``, ``1m30s``, ``1h``) to seconds."""
    if spec.isdigit():
        return int(spec)
    parts = re.findall(r"(\d+)\s*([hms])", spec)
    if not parts or "".join(n + u for n, u in parts) != spec.replace(" ", ""):
        raise argparse.ArgumentTypeError(f"bad duration {spec!r} (e.g. 60s, 2m, 1m30s)")
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def main() -> int:
    if "--print-deps" in sys.argv[1:]:
        return print_deps()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchlib as bl

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--locust", default=str(ROOT / ".venv-load" / "bin" / "locust"))
    parser.add_argument("--time", default="60s", help="locust --run-time (default 60s; max 1h)")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--spawn-rate", type=float, default=10)
    parser.add_argument("--p95-ms", default="", help="override the locustfile's p95 limit (LOAD_P95_MS)")
    parser.add_argument("--out", type=Path, default=bl.RESULTS / "load")
    args = parser.parse_args()
    run_s = seconds(args.time)
    if not 1 <= run_s <= 3600:
        parser.error("--time must be between 1s and 1h")
    if not 1 <= args.users <= 2000:
        parser.error("--users must be between 1 and 2000")
    if not Path(args.locust).exists():
        parser.error(f"{args.locust} not found (make load creates .venv-load)")

    bl.raise_nofile()
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-load-"))
    stack = bl.Stack(workdir)
    host = "app.load.test"
    try:
        certs = bl.make_certs(workdir)
        up_port, public, control = bl.free_port(), bl.free_port(), bl.free_port()
        bl.start_upstream(stack, up_port)
        server = bl.start_exit_server(stack, certs, public, control)
        client = bl.start_tunnel_client(stack, certs, control, [f"{host}=http://127.0.0.1:{up_port}"])
        bl.wait_http(f"http://127.0.0.1:{public}/small", host, procs=[server.popen, client.popen])
        bl.log(
            f"stack up: public http://127.0.0.1:{public} (Host: {host}); locust {args.users} users, "
            f"spawn rate {args.spawn_rate:g}/s, {args.time}"
        )
        cpu0 = {"server": bl.cpu_seconds(server.pid), "client": bl.cpu_seconds(client.pid)}
        env = bl.clean_env({"LOAD_HOST_HEADER": host})
        if args.p95_ms:
            env["LOAD_P95_MS"] = args.p95_ms
        cmd = [
            args.locust,
            "-f",
            str(ROOT / "tests" / "load" / "locustfile.py"),
            "--headless",
            "--users",
            str(args.users),
            "--spawn-rate",
            f"{args.spawn_rate:g}",
            "--run-time",
            args.time,
            "--host",
            f"http://127.0.0.1:{public}",
            "--stop-timeout",
            "30",
            "--csv",
            str(args.out / "locust"),
            "--html",
            str(args.out / "report.html"),
            "--only-summary",
        ]
        t0 = time.monotonic()
        try:
            rc = subprocess.run(cmd, env=env, cwd=str(ROOT), timeout=run_s + 180).returncode
        except subprocess.TimeoutExpired:
            bl.log("locust did not finish in time")
            rc = 124
        elapsed = time.monotonic() - t0
        cpu = {
            "server": bl.cpu_seconds(server.pid) - cpu0["server"],
            "client": bl.cpu_seconds(client.pid) - cpu0["client"],
        }
        rss = {"server": bl.rss_kib(server.pid), "client": bl.rss_kib(client.pid)}
        alive = server.alive() and client.alive()
        summary = (
            f"locust exit status {rc} after {elapsed:.0f} s; exit server CPU {cpu['server']:.1f} s, client "
            f"{cpu['client']:.1f} s; RSS exit server {rss['server'] / 1024:.1f} MiB, client "
            f"{rss['client'] / 1024:.1f} MiB; processes {'alive' if alive else 'DIED'}\n"
            f"reports: {args.out.relative_to(ROOT)}/locust_stats.csv, report.html"
        )
        (args.out / "summary.txt").write_text(" ".join(cmd) + "\n" + summary + "\n")
        bl.log(summary)
        if not alive:
            bl.log(f"exit-server: {server.tail()}\ntunnel-client: {client.tail()}")
            rc = rc or 1
        return rc
    finally:
        stack.close()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
