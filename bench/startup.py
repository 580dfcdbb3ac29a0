"""Start time, idle memory and import cost of both processes (``make bench`` runs it last;
the performance issue's targets 4 and 5).

    .venv/bin/python bench/startup.py [--starts 10] [--pin] [--doc docs/BENCHMARKS.md]
    .venv/bin/python bench/startup.py --ab REV [--starts 10] [--pin]     (REV against the tree)

* **exit-server start**: from spawning ``exit-server run`` to both its public and control
  ports accepting; the median of ``--starts``.
* **tunnel-client start**: with an exit server and an upstream running, from spawning
  ``tunnel-client run`` to the first request answered 200 through it (a GET polled every
  2 ms); the median of ``--starts``. Before each start the previous client is stopped and its
  route seen gone (503).
* **idle RSS**: VmRSS of each process 2 s after its first start, one tunnel registered,
  admin listeners on (as by default, on port 0).
* **imports**: ``python -X importtime`` of each command's module: the cumulative import time
  of the heaviest top-level packages.

Writes its section of docs/BENCHMARKS.md between ``<!-- startup:begin -->`` and
``<!-- startup:end -->`` and bench/results/startup-*.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

DOC = bl.ROOT / "docs" / "BENCHMARKS.md"
BEGIN = "<!-- startup:begin -->"
END = "<!-- startup:end -->"
HOST = "bench.localhost"

T_START_S = 0.3
T_RSS_SERVER_MIB = 35.0
T_RSS_CLIENT_MIB = 25.0


def exit_server_cmd(certs: bl.Certs, public: int, control: int) -> list[str]:
    return [
        bl.venv_bin("exit-server"),
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
        "--admin-addr",
        "127.0.0.1:0",
        "--log-level",
        "warning",
    ]


def client_cmd(certs: bl.Certs, control: int, upstream: int) -> list[str]:
    return [
        bl.venv_bin("tunnel-client"),
        "run",
        *bl.tunnel_flags(certs, control),
        "--upstream",
        f"{HOST}=http://127.0.0.1:{upstream}",
        "--admin-addr",
        "127.0.0.1:0",
        "--log-level",
        "warning",
    ]


def time_server_starts(
    stack: bl.Stack,
    certs: bl.Certs,
    n: int,
    cpu: int | None,
    env: dict[str, str] | None = None,
    idle: bool = True,
) -> tuple[list[float], int]:
    """Start times in seconds, and the idle RSS (KiB) 2 s after the first start (``env``: the
    processes' environment, for another build's PYTHONPATH)."""
    times: list[float] = []
    rss = 0
    for i in range(n):
        public, control = bl.free_port(), bl.free_port()
        t0 = time.perf_counter()
        proc = stack.add(
            bl.spawn(
                f"exit-server-start-{i}",
                exit_server_cmd(certs, public, control),
                stack.workdir / "logs",
                env=env,
                cpu=cpu,
            )
        )
        deadline = t0 + 30
        while not (bl.port_open(public) and bl.port_open(control)):
            if proc.popen.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"exit-server did not start: {proc.tail()}")
            time.sleep(0.002)  # polling the ports of a process that is starting
        times.append(time.perf_counter() - t0)
        if i == 0 and idle:
            time.sleep(2.0)  # idle, as measured
            rss = bl.rss_kib(proc.pid)
        stack.stop(proc)
    return times, rss


def time_client_starts(
    stack: bl.Stack,
    certs: bl.Certs,
    n: int,
    cpu: int | None,
    env: dict[str, str] | None = None,
    idle: bool = True,
) -> tuple[list[float], int, int]:
    """Client start times (to the first request served), and the idle RSS (KiB) of the client
    and of the exit server with its one tunnel, 2 s after the first start."""
    up = bl.free_port()
    bl.start_upstream(stack, up, cpu=cpu)
    public, control = bl.free_port(), bl.free_port()
    server = bl.start_exit_server(stack, certs, public, control, cpu=cpu)
    url = f"http://127.0.0.1:{public}/healthz"
    times: list[float] = []
    client_rss = server_rss = 0
    for i in range(n):
        t0 = time.perf_counter()
        proc = stack.add(
            bl.spawn(
                f"tunnel-client-start-{i}", client_cmd(certs, control, up), stack.workdir / "logs", env=env, cpu=cpu
            )
        )
        deadline = t0 + 30
        while bl.http_get(url, HOST, timeout=1)[0] != 200:
            if proc.popen.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"tunnel-client did not serve: {proc.tail()}\n{server.tail()}")
            time.sleep(0.002)  # polling the first request through a client that is starting
        times.append(time.perf_counter() - t0)
        if i == 0 and idle:
            time.sleep(2.0)
            client_rss, server_rss = bl.rss_kib(proc.pid), bl.rss_kib(server.pid)
        stack.stop(proc)
        bl.wait_http(url, HOST, status=503, timeout=30, procs=[server.popen])
    return times, client_rss, server_rss


def compare(rev: str, n: int, cpu: int | None) -> str:
    """Start times and idle RSS of the build at ``rev`` (A, from a git worktree on PYTHONPATH)
    against the working tree (B), starts alternating A, B, B, A, ... so that a machine whose
    speed drifts moves both alike. Returns the report (not written to the document)."""
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-startup-ab-"))
    tree = workdir / "a"
    subprocess.run(
        ["git", "-C", str(bl.ROOT), "worktree", "add", "--detach", str(tree), rev], check=True, capture_output=True
    )
    sides: dict[str, dict[str, str] | None] = {"A": bl.clean_env({"PYTHONPATH": str(tree)}), "B": None}
    times: dict[str, dict[str, list[float]]] = {side: {"server": [], "client": []} for side in sides}
    rss: dict[str, tuple[float, float]] = {}
    try:
        compile_bytecode(tree)
        certs = bl.make_certs(workdir)
        for i in range(n):
            for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
                stack = bl.Stack(workdir)
                try:
                    (server,), srss = time_server_starts(stack, certs, 1, cpu, sides[side], idle=side not in rss)
                    (client,), crss, _ = time_client_starts(stack, certs, 1, cpu, sides[side], idle=side not in rss)
                finally:
                    stack.close()
                times[side]["server"].append(server)
                times[side]["client"].append(client)
                if side not in rss:
                    rss[side] = (srss / 1024, crss / 1024)
    finally:
        subprocess.run(["git", "-C", str(bl.ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    lines = [
        f"A = {rev}, B = working tree; {n} starts per side, alternating; medians",
        "",
        "| figure | A | B | B/A |",
        "|---|---:|---:|---:|",
    ]
    for key, label in (("server", "exit-server run to accepting"), ("client", "tunnel-client run to first request")):
        a, b = statistics.median(times["A"][key]), statistics.median(times["B"][key])
        lines.append(f"| {label} | {a:.3f} s | {b:.3f} s | {b / a:.2f} |")
    for idx, label in ((0, "exit server idle RSS"), (1, "tunnel client idle RSS")):
        a, b = rss["A"][idx], rss["B"][idx]
        lines.append(f"| {label} | {a:.1f} MiB | {b:.1f} MiB | {b / a:.2f} |")
    return "\n".join(lines)


def compile_bytecode(root: Path = bl.ROOT) -> None:
    """Byte-compile the project's packages, as ``pip install`` does for an installed wheel (and
    so the container image): the editable install here never gets its .pyc written when the
    environment sets PYTHONDONTWRITEBYTECODE, and compiling the sources on every start would
    add about 0.1 s that no user's start pays. A tree on PYTHONPATH (the compiled build `make
    bench` measures) is what the processes import: it is compiled too."""
    roots = [root, *(Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    for tree in dict.fromkeys(roots):
        if (tree / "exit_server").is_dir():
            subprocess.run(
                [bl.venv_python(), "-m", "compileall", "-q", "exit_server", "tunnel_client", "shared"],
                cwd=tree,
                check=True,
                timeout=300,
            )


def import_times(module: str, top: int = 12, runs: int = 3) -> dict[str, float]:
    """Milliseconds spent importing each top-level package's modules (the sum of their own
    times in ``python -X importtime``), the median of ``runs`` runs, the ``top`` largest, and
    ``(all)``."""
    samples: list[dict[str, float]] = []
    for _ in range(runs):
        out = subprocess.run(
            # -P: not the working directory first on sys.path, so PYTHONPATH's build is timed
            [bl.venv_python(), "-P", "-X", "importtime", "-c", f"import {module}"],
            capture_output=True,
            text=True,
            timeout=120,
            env=bl.clean_env(),
        )
        run: dict[str, float] = {}
        for line in out.stderr.splitlines():
            match = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
            if match:
                package = match.group(2).partition(".")[0]
                run[package] = run.get(package, 0.0) + int(match.group(1)) / 1000
        samples.append(run)
    totals = {name: statistics.median(r.get(name, 0.0) for r in samples) for name in set().union(*samples)}
    largest = dict(sorted(totals.items(), key=lambda kv: -kv[1])[:top])
    largest["(all)"] = statistics.median(sum(r.values()) for r in samples)
    return largest


def mark(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def section(result: dict[str, Any]) -> str:
    s, c = result["server_starts"], result["client_starts"]
    srv_rss, cli_rss = result["server_idle_kib"] / 1024, result["client_idle_kib"] / 1024
    out = [
        "## Start time, idle memory and imports\n",
        f"`.venv/bin/python bench/startup.py --starts {len(s)}{' --pin' if result.get('pin') else ''}` "
        f"(run by `make bench` last), {result['started']}. "
        "Start: from spawning the command to its ports accepting (exit server) or to the first request "
        "answered through it (client), median of the starts, the project's packages byte-compiled first "
        "(as `pip install` leaves them). Idle RSS 2 s after start, admin listeners on.\n",
        "| figure | measured | target | |",
        "|---|---|---|---|",
        f"| exit-server run to accepting, median (min-max) | {statistics.median(s):.3f} s ({min(s):.3f}-{max(s):.3f}) "
        f"| ≤ {T_START_S} s | {mark(statistics.median(s) <= T_START_S)} |",
        f"| tunnel-client run to the first request served, median (min-max) | {statistics.median(c):.3f} s "
        f"({min(c):.3f}-{max(c):.3f}) | ≤ {T_START_S} s | {mark(statistics.median(c) <= T_START_S)} |",
        f"| exit server idle RSS (no tunnel) | {srv_rss:.1f} MiB | ≤ {T_RSS_SERVER_MIB:.0f} MiB "
        f"| {mark(srv_rss <= T_RSS_SERVER_MIB)} |",
        f"| tunnel client idle RSS (one tunnel) | {cli_rss:.1f} MiB | ≤ {T_RSS_CLIENT_MIB:.0f} MiB "
        f"| {mark(cli_rss <= T_RSS_CLIENT_MIB)} |",
        f"| exit server RSS with that tunnel | {result['server_with_tunnel_kib'] / 1024:.1f} MiB | - | |",
        "",
        "Import time (`python -X importtime`): milliseconds spent in each top-level package's own "
        "modules, the largest ones:\n",
        "| package | `import exit_server.__main__` | `import tunnel_client.__main__` |",
        "|---|---:|---:|",
    ]
    imports_s, imports_c = result["imports"]["exit_server.__main__"], result["imports"]["tunnel_client.__main__"]
    names = sorted(set(imports_s) | set(imports_c), key=lambda n: -(max(imports_s.get(n, 0), imports_c.get(n, 0))))
    for name in names:
        cells = [f"{d[name]:.0f}" if name in d else "(not in its top 12)" for d in (imports_s, imports_c)]
        out.append(f"| {name} | {cells[0]} | {cells[1]} |")
    out.append("")
    return "\n".join(out)


def update_doc(doc: Path, text: str) -> None:
    bl.update_section(doc, BEGIN, END, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=10, help="starts per command (default 10)")
    parser.add_argument("--pin", action="store_true", help="the processes under test on CPU 1")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument(
        "--ab", metavar="REV", help="compare the build at REV (A) with the working tree (B); no document written"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.starts <= 100:
        parser.error("--starts must be in 1..100")
    cpu = 1 if args.pin else None
    if args.ab:
        compile_bytecode()
        print(compare(args.ab, args.starts, cpu))
        return 0
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    compile_bytecode()
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-startup-"))
    stack = bl.Stack(workdir)
    try:
        certs = bl.make_certs(workdir)
        server_starts, server_idle = time_server_starts(stack, certs, args.starts, cpu)
        client_starts, client_idle, server_with = time_client_starts(stack, certs, args.starts, cpu)
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "started": started,
        "pin": args.pin,
        "server_starts": server_starts,
        "client_starts": client_starts,
        "server_idle_kib": server_idle,
        "client_idle_kib": client_idle,
        "server_with_tunnel_kib": server_with,
        "imports": {m: import_times(m) for m in ("exit_server.__main__", "tunnel_client.__main__")},
    }
    bl.RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (f"startup-{stamp}.json", "startup-latest.json"):
        (bl.RESULTS / name).write_text(json.dumps(result, indent=2))
    text = section(result)
    update_doc(args.doc, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
