"""Where memory goes: the probes behind docs/BENCHMARKS.md, round 10 (performance issue, target 4).

    .venv/bin/python bench/memprobe.py polls [--requests 2000] [--trace]
    .venv/bin/python bench/memprobe.py tunnels [--tunnels 300] [--trace [--by lineno]] [--ab REV]
    .venv/bin/python bench/memprobe.py idle [--tunnels 1000] [--seconds 20] [--ab REV --rounds 3]
    .venv/bin/python bench/memprobe.py floor [--conns 1000]
    .venv/bin/python bench/memprobe.py faults [--seconds 4]

* ``polls``: an exit server and a tunnel client (the real commands' code) in front of
  bench/upstream.py; ``--requests`` long polls parked at the upstream at once. Prints the
  client's RSS idle and parked, and per request. With ``--trace`` the client runs under
  tracemalloc and the largest allocation sites per request are listed (parked minus idle).
* ``tunnels``: a fresh exit server, then ``--tunnels`` idle tunnels (bench/idle_tunnels.py).
  Exit server RSS per tunnel; with ``--trace``, tracemalloc per tunnel by file (``--by lineno``
  or ``traceback`` for lines or call sites). ``--ab REV`` alternates fresh exit servers of REV
  (A, from a git worktree on PYTHONPATH) and this tree (B), ``--rounds`` each, and prints
  the medians.
* ``idle``: CPU of a fresh exit server and of ``--tunnels`` idle clients (one process) while
  only heartbeats move, in % of one core; ``--ab REV`` runs both processes from REV and from
  this tree, alternating.
* ``floor``: no Backhaul code: a uvloop TLS server that accepts ``--conns`` connections and
  holds them idle, once per glibc malloc setting (its defaults; mmap 4 MiB with trim 16 MiB,
  Backhaul's setting before round 10; mmap 256 KiB with trim 16 MiB, since). RSS per idle
  TLS connection: the floor under any tunnel.
* ``faults``: nginx, an exit server and a client pinned to CPU 1, wrk on CPU 0: 1 MiB GETs on 50
  connections for ``--seconds``; page faults a second in each process (``minflt`` in
  /proc/PID/stat) and wrk's req/s.

Every load is bounded (counts and timeouts); everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
import scale  # noqa: E402
import startup  # noqa: E402

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


# ---------------------------------------------------------------- tracemalloc in a child


def traced_main(command: str, snapdir: Path, argv: list[str]) -> int:
    """Run ``exit-server`` or ``tunnel-client`` (``command``) here, under tracemalloc (the
    caller passed -X tracemalloc); the file ``snapdir/trigN`` makes it dump snapshot N."""
    import gc
    import tracemalloc

    def watch() -> None:
        n = 0
        while True:
            if (snapdir / f"trig{n}").exists():
                gc.collect()
                tracemalloc.take_snapshot().dump(str(snapdir / f"snap{n}"))
                (snapdir / f"done{n}").write_text("ok")
                n += 1
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    if command == "exit-server":
        from exit_server.__main__ import main
    else:
        from tunnel_client.__main__ import main  # type: ignore[assignment]
    sys.argv = [command, *argv]
    return int(main() or 0)


class Snapshots:
    """Snapshot N of a traced child, on demand."""

    def __init__(self, snapdir: Path) -> None:
        self.dir = snapdir
        self.taken = 0

    def take(self, timeout: float = 60) -> None:
        (self.dir / f"trig{self.taken}").write_text("")
        deadline = time.monotonic() + timeout
        while not (self.dir / f"done{self.taken}").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("no snapshot from the traced process")
            time.sleep(0.05)
        self.taken += 1

    def report(self, per: int, key: str, top: int = 25) -> None:
        import tracemalloc

        before = tracemalloc.Snapshot.load(str(self.dir / "snap0"))
        after = tracemalloc.Snapshot.load(str(self.dir / "snap1"))
        stats = after.compare_to(before, key)
        print(f"tracemalloc: {sum(s.size_diff for s in stats) / per:.0f} B per unit in all; largest {key}s:")
        for s in stats[:top]:
            frames = list(reversed(s.traceback))  # the most recent first
            print(f"{s.size_diff / per:9.0f} B {s.count_diff / per:6.1f} objects  {frames[0]}")
            for frame in frames[1:5] if key == "traceback" else ():
                print(f"{'':28}<- {frame}")


def command(name: str, trace: bool, snapdir: Path, args: list[str]) -> list[str]:
    if not trace:
        return [bl.venv_bin(name), *args]
    return [bl.venv_python(), "-X", "tracemalloc=8", str(HERE), "_traced", name, str(snapdir), *args]


# ---------------------------------------------------------------- polls


def polls(args: argparse.Namespace, work: Path) -> None:
    stack = bl.Stack(work)
    certs = bl.make_certs(work)
    snaps = Snapshots(work)
    n = args.requests
    try:
        up, public, control = bl.free_port(), bl.free_port(), bl.free_port()
        bl.start_upstream(stack, up)
        bl.start_exit_server(
            stack,
            certs,
            public,
            control,
            extra=["--max-streams", str(2 * n), "--max-streams-per-caller", "0", "--upstream-timeout", "120"],
        )
        # startup.py's command (its own route and an admin listener on port 0) plus a default route
        client_args = [
            *startup.client_cmd(certs, control, up)[1:],
            "--upstream",
            f"default=http://127.0.0.1:{up}",
            "--max-streams",
            str(2 * n),
        ]
        client = stack.add(bl.spawn("client", command("tunnel-client", args.trace, work, client_args), work / "logs"))
        bl.wait_http(f"http://127.0.0.1:{public}/slow?ms=0", "slow.localhost", procs=[client.popen])
        time.sleep(1)  # a settling period before the first reading, not a synchronisation
        idle = bl.rss_kib(client.pid)
        if args.trace:
            snaps.take()
        hold = 15000 if args.trace else 6000  # long enough to read the parked state
        result: dict[str, Any] = {}
        loader = threading.Thread(
            target=lambda: result.update(scale.run_async(scale.fire(public, n, hold, 500, 0.05, 120)))
        )
        loader.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            _, body = bl.http_get(f"http://127.0.0.1:{up}/stats")
            if json.loads(body or b"{}").get("in_flight", 0) >= n:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"the {n} long polls were not all parked within 60 s")
        time.sleep(1)
        parked = bl.rss_kib(client.pid)
        if args.trace:
            snaps.take()
        loader.join(timeout=180)
        print(f"answers: {result.get('statuses')}")
        print(
            f"client RSS idle {idle / 1024:.1f} MiB, {n} parked {parked / 1024:.1f} MiB: "
            f"{(parked - idle) / n:.2f} KiB each"
        )
        if args.trace:
            snaps.report(n, "lineno")
    finally:
        stack.close()


# ---------------------------------------------------------------- tunnels


def tunnels(args: argparse.Namespace, work: Path) -> None:
    certs = bl.make_certs(work)
    n = args.tunnels
    if args.ab is None:
        tunnels_once(work, certs, n, args.trace, args.by, None)
        return
    if args.trace:
        raise SystemExit("--ab measures RSS only: drop --trace")
    with worktree(args.ab, work) as tree:
        per: dict[str, list[float]] = {"A": [], "B": []}
        idle: dict[str, list[float]] = {"A": [], "B": []}
        for i in range(args.rounds):
            for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
                kib, before = tunnels_once(work, certs, n, False, args.by, tree if side == "A" else None)
                per[side].append(kib)
                idle[side].append(before)
        for side, name in (("A", args.ab), ("B", "working tree")):
            print(
                f"{side} = {name}: {statistics.median(per[side]):.1f} KiB per tunnel "
                f"(runs {', '.join(f'{k:.1f}' for k in per[side])}), idle {statistics.median(idle[side]):.1f} MiB"
            )
        print(f"B/A per tunnel: {statistics.median(per['B']) / statistics.median(per['A']):.3f}")


@contextlib.contextmanager
def worktree(rev: str, work: Path) -> Iterator[Path]:
    """``rev`` checked out in a git worktree (the A side, imported through PYTHONPATH as
    bench/ab.py does); both it and this tree byte-compiled, as an installed wheel is."""
    tree = work / "a"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True)
    try:
        for root in (tree, ROOT):
            startup.compile_bytecode(root)
        yield tree
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def spawn_idle_clients(
    certs: bl.Certs, control: int, n: int, env: dict[str, str] | None = None, start: int = 0
) -> subprocess.Popen[str]:
    """``n`` idle tunnel clients in one process (bench/idle_tunnels.py), numbered from
    ``start``; it prints READY once every one is registered and ends when its stdin closes."""
    return subprocess.Popen(
        [
            bl.venv_python(),
            str(bl.BENCH / "idle_tunnels.py"),
            *bl.tunnel_flags(certs, control),
            "--start",
            str(start),
            "--count",
            str(n),
            "--stagger",
            "0.005",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def ready_line(helper: subprocess.Popen[str]) -> str:
    """The helper's ``READY`` line, once every client of it is registered.

    Raises:
        RuntimeError: it printed ``FAILED ...`` (or ended) instead.
    """
    assert helper.stdout is not None
    line = helper.stdout.readline().strip()
    if not line.startswith("READY"):
        raise RuntimeError(f"idle clients did not all register: {line or 'no output'}")
    return line


def stop_idle_clients(helper: subprocess.Popen[str]) -> None:
    assert helper.stdin is not None
    helper.stdin.close()
    helper.wait(60)


def tunnels_once(work: Path, certs: bl.Certs, n: int, trace: bool, by: str, tree: Path | None) -> tuple[float, float]:
    """One fresh exit server (the commit checked out in ``tree``, else this tree), one idle
    tunnel, then ``n`` more; prints and returns (RSS KiB per tunnel, idle RSS MiB).

    Per tunnel is counted from the server with its first tunnel: what the first session sets
    up once (about 0.8 MiB: code paths run for the first time, the first handshake's caches)
    is not a cost of each tunnel. The figure from no tunnel at all is printed too (rounds 10
    to 12 reported it).
    """
    stack = bl.Stack(work)
    snaps = Snapshots(work)
    try:
        public, control = bl.free_port(), bl.free_port()
        server_args = startup.exit_server_cmd(certs, public, control)[1:]
        env = bl.clean_env({"PYTHONPATH": str(tree)} if tree is not None else None)
        cmd = command("exit-server", trace, work, server_args)
        server = stack.add(bl.spawn("server", cmd, work / "logs", env=env))
        bl.wait_port(public, proc=server.popen)
        bl.wait_port(control, proc=server.popen)
        time.sleep(2)
        before = bl.rss_kib(server.pid)
        first = spawn_idle_clients(certs, control, 1, start=n)  # this tree's clients on both sides
        helper = None
        try:
            assert first.stdout is not None
            ready_line(first)
            time.sleep(2)
            if trace:
                snaps.take()  # the trace compares the server with one tunnel and with n + 1
            one = bl.rss_kib(server.pid)
            helper = spawn_idle_clients(certs, control, n)
            print(ready_line(helper))
            time.sleep(3)
            if trace:
                snaps.take()
            after = bl.rss_kib(server.pid)
        finally:
            for clients in (helper, first):
                if clients is not None:
                    stop_idle_clients(clients)
        print(
            f"exit server RSS {before / 1024:.1f} (no tunnel) -> {one / 1024:.1f} (one) -> {after / 1024:.1f} MiB "
            f"({n} more): {(after - one) / n:.1f} KiB per tunnel ({(after - before) / (n + 1):.1f} from no tunnel)",
            flush=True,
        )
        if trace:
            snaps.report(n, by, top=25 if by == "filename" else 40)
        return (after - one) / n, before / 1024
    finally:
        stack.close()


# ---------------------------------------------------------------- idle


def idle(args: argparse.Namespace, work: Path) -> None:
    """CPU of an exit server and of ``--tunnels`` idle clients while nothing but heartbeats
    moves, in % of one core over ``--seconds``; with ``--ab REV`` both processes from REV (A)
    and from this tree (B), fresh ones each round, alternating."""
    certs = bl.make_certs(work)
    sides: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    with contextlib.ExitStack() as stack:
        tree = stack.enter_context(worktree(args.ab, work)) if args.ab else None
        order = ("A", "B") if tree is not None else ("B",)
        for i in range(args.rounds):
            for side in order if i % 2 == 0 else tuple(reversed(order)):
                env = bl.clean_env({"PYTHONPATH": str(tree)} if side == "A" and tree is not None else None)
                sides[side].append(idle_once(work, certs, args.tunnels, args.seconds, env))
                server, clients = sides[side][-1]
                print(f"{side}: exit server {server:.2f} %, clients {clients:.2f} % of a core", flush=True)
    for side, name in (("A", args.ab), ("B", "working tree")):
        if sides[side]:
            server = statistics.median(s for s, _ in sides[side])
            clients = statistics.median(c for _, c in sides[side])
            print(f"{side} = {name}: exit server {server:.2f} %, clients {clients:.2f} % of a core (medians)")


def idle_once(work: Path, certs: bl.Certs, n: int, seconds: float, env: dict[str, str]) -> tuple[float, float]:
    stack = bl.Stack(work)
    try:
        public, control = bl.free_port(), bl.free_port()
        server = stack.add(bl.spawn("server", startup.exit_server_cmd(certs, public, control), work / "logs", env=env))
        bl.wait_port(control, proc=server.popen)
        helper = spawn_idle_clients(certs, control, n, env)
        try:
            ready_line(helper)
            time.sleep(5)  # the connects' aftermath settles
            s0, c0, t0 = bl.cpu_seconds(server.pid), bl.cpu_seconds(helper.pid), time.monotonic()
            time.sleep(seconds)
            s1, c1, t1 = bl.cpu_seconds(server.pid), bl.cpu_seconds(helper.pid), time.monotonic()
        finally:
            stop_idle_clients(helper)
        return 100 * (s1 - s0) / (t1 - t0), 100 * (c1 - c0) / (t1 - t0)
    finally:
        stack.close()


# ---------------------------------------------------------------- floor

MALLOC_SETTINGS = {
    "glibc defaults": {},
    "mmap 4 MiB, trim 16 MiB (before round 10)": {
        "MALLOC_MMAP_THRESHOLD_": str(4 << 20),
        "MALLOC_TRIM_THRESHOLD_": str(16 << 20),
    },
    "mmap 256 KiB, trim 16 MiB (now)": {
        "MALLOC_MMAP_THRESHOLD_": str(256 << 10),
        "MALLOC_TRIM_THRESHOLD_": str(16 << 20),
    },
}


def _rss_self() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def floor_server(cert: str, key: str) -> None:
    """Child: a uvloop TLS server whose protocol does nothing; prints its port and RSS, and its
    connection count and RSS after the first line on stdin."""
    import ssl

    import uvloop

    async def main() -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        held: list[asyncio.BaseTransport] = []

        class Idle(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                held.append(transport)

        loop = asyncio.get_running_loop()
        server = await loop.create_server(Idle, "127.0.0.1", 0, ssl=ctx)
        print(server.sockets[0].getsockname()[1], _rss_self(), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        print(len(held), _rss_self(), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)

    uvloop.run(main())


def floor(args: argparse.Namespace, work: Path) -> None:
    certs = bl.make_certs(work)
    for label, env in MALLOC_SETTINGS.items():
        kib = asyncio.run(_floor_once(certs, env, args.conns))
        print(f"{label}: {args.conns} idle TLS connections, {kib:.1f} KiB each")


async def _floor_once(certs: bl.Certs, env: dict[str, str], conns: int) -> float:
    """RSS per idle connection of one floor server run with the malloc settings ``env``."""
    import ssl

    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    server = subprocess.Popen(
        [bl.venv_python(), str(HERE), "_floor", str(certs.cert), str(certs.key)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env,
    )
    assert server.stdin is not None and server.stdout is not None
    writers: list[asyncio.StreamWriter] = []
    try:
        port, rss0 = map(int, server.stdout.readline().split())
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        for _ in range(conns):
            _, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 10
            )
            writer.write(b"hello")
            writers.append(writer)
        await asyncio.sleep(2)  # settling before the reading, not a synchronisation
        server.stdin.write("\n")
        server.stdin.flush()
        held, rss1 = map(int, server.stdout.readline().split())
        if held != conns:
            raise RuntimeError(f"the floor server holds {held} connections, not {conns}")
        server.stdin.write("\n")
        server.stdin.flush()
        return (rss1 - rss0) / conns
    finally:
        for writer in writers:
            writer.close()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


# ---------------------------------------------------------------- faults


def _minflt(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def faults(args: argparse.Namespace, work: Path) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("memprobe faults: wrk is not installed (bash bench/setup.sh)")
    stack = bl.Stack(work)
    certs = bl.make_certs(work)
    try:
        nginx = bl.start_nginx(stack, cpu=1)
        public, control = bl.free_port(), bl.free_port()
        server = bl.start_exit_server(stack, certs, public, control, cpu=1)
        client = bl.start_tunnel_client(stack, certs, control, [f"default=http://127.0.0.1:{nginx.direct}"], cpu=1)
        url = f"http://127.0.0.1:{public}/{bl.BIG_FILE}"
        bl.wait_http(url, "bench.localhost", procs=[server.popen, client.popen])
        wrk = ["taskset", "-c", "0", "wrk", "-t1", "-c50", "-H", "Host: bench.localhost"]
        subprocess.run([*wrk, "-d2s", url], capture_output=True, timeout=60)  # warm-up
        before = (_minflt(server.pid), _minflt(client.pid))
        started = time.monotonic()
        out = subprocess.run([*wrk, f"-d{args.seconds}s", url], capture_output=True, text=True, timeout=120).stdout
        elapsed = time.monotonic() - started
        after = (_minflt(server.pid), _minflt(client.pid))
        rate = next((line.split()[-1] for line in out.splitlines() if "Requests/sec" in line), "?")
        print(
            f"1 MiB x50 for {args.seconds} s: {rate} req/s; page faults a second: exit server "
            f"{(after[0] - before[0]) / elapsed:.0f}, client {(after[1] - before[1]) / elapsed:.0f}"
        )
    finally:
        stack.close()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_traced":
        return traced_main(sys.argv[2], Path(sys.argv[3]), sys.argv[4:])
    if len(sys.argv) > 1 and sys.argv[1] == "_floor":
        floor_server(sys.argv[2], sys.argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="probe", required=True)
    p = sub.add_parser("polls", help="client memory per long poll in flight")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--trace", action="store_true")
    p = sub.add_parser("tunnels", help="exit server memory per idle tunnel")
    p.add_argument("--tunnels", type=int, default=300)
    p.add_argument("--trace", action="store_true")
    p.add_argument("--by", choices=("filename", "lineno", "traceback"), default="filename", help="--trace: grouping")
    p.add_argument("--ab", metavar="REV", help="alternate fresh servers of REV (A) and this tree (B)")
    p.add_argument("--rounds", type=int, default=3, help="--ab: servers per side")
    p = sub.add_parser("idle", help="CPU of an exit server and idle clients while only heartbeats move")
    p.add_argument("--tunnels", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--ab", metavar="REV", help="alternate REV (A) and this tree (B), both processes")
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("floor", help="a bare uvloop TLS server's memory per idle connection")
    p.add_argument("--conns", type=int, default=1000)
    p = sub.add_parser("faults", help="page faults a second at 1 MiB downloads")
    p.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args()
    bl.raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="backhaul-memprobe-"))
    try:
        {"polls": polls, "tunnels": tunnels, "idle": idle, "floor": floor, "faults": faults}[args.probe](args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
