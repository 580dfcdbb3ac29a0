"""Interleaved A/B of two builds of Backhaul (HTTP mode, or TCP mode) on one machine, in one run.

    .venv/bin/python bench/ab.py {REV | --a-dir DIR} [--b REV2 | --b-dir DIR] [--mode http|tcp]
                                 [--workload small50,big50,small1] [--duration 4] [--rounds 6]

A = the commit REV (checked out into a temporary git worktree and imported from there with
PYTHONPATH, ahead of the editable install), or with ``--a-dir DIR`` a tree imported the same
way (two compiled builds: ``scripts/compiled.py`` makes one per side), B = the working tree, or with ``--b REV2`` that
commit in a second worktree (to bisect a change between two commits), or with ``--b-dir DIR`` a
tree that is not a commit (an experiment: DIR is imported with PYTHONPATH, as A). One nginx (bench/benchlib.py,
serving the 100 B and 1 MiB files) is the upstream of both; each build runs its own exit server
and tunnel client on CPU 1, wrk runs on CPU 0 (as ``bench/run.py --pin``). Runs alternate
A, B, B, A, A, B, ... so that a machine whose speed drifts (this one is shared: the nginx
baselines of two ``make bench`` runs an hour apart differed by 2x on 1 MiB) moves both sides
alike; the report gives the median of each side and B/A.

Why it exists: a change worth 5 % cannot be seen by comparing two ``make bench`` runs on a
shared machine, but it can in CPU time per request measured side by side. The figures in
docs/BENCHMARKS.md ("Round 3") come from this script; every run is bounded (rounds x duration).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402
from run import WORKLOADS, start_http_mode, start_tcp_mode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def wrk(port: int, path: str, connections: int, duration: float) -> tuple[int, float, float, int]:
    """(requests, req/s, p50 in us, non-2xx count) of one wrk run on CPU 0."""
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "0",
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--latency",
            "--timeout",
            "10s",
            "-H",
            "Host: bench.localhost",
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"50%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    p50 = float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return requests, rps, p50, int(bad.group(1)) if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", nargs="?", help="the A side: a git revision (B is the working tree)")
    parser.add_argument(
        "--a-dir", type=Path, help="the A side: a source tree imported with PYTHONPATH, instead of REV (a compiled one)"
    )
    parser.add_argument(
        "--workload", default="small50,big50,small1", help="comma list of " + ", ".join(w.key for w in WORKLOADS)
    )
    side_b = parser.add_mutually_exclusive_group()
    side_b.add_argument("--b", dest="b_rev", help="the B side: a git revision (default: the working tree)")
    side_b.add_argument("--b-dir", type=Path, help="the B side: a source tree imported with PYTHONPATH (an experiment)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run (default 4)")
    parser.add_argument("--rounds", type=int, default=6, help="runs per side and workload (default 6)")
    parser.add_argument(
        "--mode", choices=("http", "tcp"), default="http", help="the tunnel mode measured (default http)"
    )
    args = parser.parse_args(argv)
    start = start_tcp_mode if args.mode == "tcp" else start_http_mode
    workloads = [w for w in WORKLOADS if w.key in args.workload.split(",")]
    if not workloads or not 1 <= args.rounds <= 50 or not 1 <= args.duration <= 60:
        parser.error("unknown workload, or rounds outside 1-50 / duration outside 1-60 s")
    if (args.rev is None) == (args.a_dir is None):
        parser.error("give the A side as REV or as --a-dir DIR (one of them)")
    for flag, given in (("--a-dir", args.a_dir), ("--b-dir", args.b_dir)):
        if given is not None and not (given / "exit_server").is_dir():
            parser.error(f"{flag} {given}: not a Backhaul source tree (no exit_server/)")
    bl.ensure_tools()
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-ab-"))
    tree = args.a_dir.resolve() if args.a_dir is not None else workdir / "a"
    if args.a_dir is None:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.rev],
            check=True,
            capture_output=True,
        )
    tree_b = workdir / "b" if args.b_rev else None
    b_path = str(args.b_dir.resolve()) if args.b_dir is not None else str(tree_b) if tree_b is not None else None
    if tree_b is not None:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree_b), args.b_rev],
            check=True,
            capture_output=True,
        )
    stack = bl.Stack(workdir)
    try:
        certs = bl.make_certs(workdir)
        nginx = bl.start_nginx(stack, cpu=1)
        os.environ["PYTHONPATH"] = str(tree)  # clean_env() copies it into A's processes only
        server_a, client_a, port_a = start(stack, certs, nginx, 1)
        if b_path is not None:
            os.environ["PYTHONPATH"] = b_path
        else:
            del os.environ["PYTHONPATH"]
        server_b, client_b, port_b = start(stack, certs, nginx, 1)
        os.environ.pop("PYTHONPATH", None)
        sides = {"A": (port_a, [server_a.pid, client_a.pid]), "B": (port_b, [server_b.pid, client_b.pid])}

        def short(rev: str) -> str:
            return subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True, check=True
            ).stdout.strip()

        a_side = str(tree) if args.a_dir is not None else f"{args.rev} ({short(args.rev)})"
        b_side = f"{args.b_rev} ({short(args.b_rev)})" if args.b_rev else b_path or "working tree"
        print(
            f"A = {a_side}, B = {b_side}; {args.mode} mode, {args.rounds} x {args.duration:g} s "
            "per side and "
            "workload, interleaved, pinned (wrk CPU 0, the rest CPU 1)",
            flush=True,
        )
        for wl in workloads:
            for port, _ in sides.values():
                wrk(port, wl.path, wl.connections, 1)  # warm-up, not counted
            rows: dict[str, list[tuple[float, float, float, float]]] = {"A": [], "B": []}
            for i in range(args.rounds):
                for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    port, pids = sides[side]
                    before = [bl.cpu_seconds(pid) for pid in pids]
                    requests, rps, p50, bad = wrk(port, wl.path, wl.connections, args.duration)
                    if bad:
                        raise RuntimeError(f"{side}: {bad} non-2xx answers in {wl.label}")
                    cpu = [(bl.cpu_seconds(pid) - b) / requests * 1e6 for pid, b in zip(pids, before, strict=True)]
                    rows[side].append((rps, p50, cpu[0], cpu[1]))
            med = {side: [statistics.median(r[k] for r in rows[side]) for k in range(4)] for side in rows}
            for side in ("A", "B"):
                rps, p50, cs, cc = med[side]
                print(
                    f"{wl.label:22s} {side}: {rps:9,.0f} req/s  p50 {p50 / 1000:7.3f} ms  "
                    f"CPU/req {cs + cc:7.0f} us (server {cs:.0f} + client {cc:.0f})",
                    flush=True,
                )
            ratio = (med["B"][2] + med["B"][3]) / (med["A"][2] + med["A"][3])
            print(f"{wl.label:22s} B/A: req/s {med['B'][0] / med['A'][0]:.3f}, CPU/req {ratio:.3f}", flush=True)
    finally:
        stack.close()
        for t in (None if args.a_dir is not None else tree, tree_b):
            if t is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(t)], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
