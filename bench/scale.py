"""Scale benchmark (run by ``make bench`` after bench/run.py unless --skip-scale).

    .venv/bin/python bench/scale.py [--requests 10000] [--tunnels 1000] [--doc docs/BENCHMARKS.md]

(i)  10,000 concurrent long-poll requests over one tunnel: exit-server + tunnel-client (real
     console scripts, TLS tunnel, --max-streams 20000 on both) in front of bench/upstream.py's
     ``/slow?ms=2000&gate=10000`` (each request is held until all 10,000 are parked, then 2 s).
     The load generator is an aiohttp client in this process (connector without a limit,
     connections opened in paced batches). Reports answers, the upstream's peak concurrency,
     and the exit server's RSS (target: peak < 300 MiB) and the client's.
(ii) 1,000 idle tunnels on one fresh exit server: 10 helper processes x 100 ``TunnelClient``s
     (bench/idle_tunnels.py, library API). Exit server RSS per tunnel =
     (RSS with 1,000 tunnels - RSS with 0) / 1,000 (target < 100 KiB).

All processes get a high RLIMIT_NOFILE (this launcher raises its own limit towards 65536, as far
as the hard limit allows; children inherit it). Results go to bench/results/scale-*.json and
into the "Scale" section of the report
(between the ``<!-- scale:begin -->`` / ``<!-- scale:end -->`` markers, appended if missing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

DOC = bl.ROOT / "docs" / "BENCHMARKS.md"
SCALE_BEGIN = "<!-- scale:begin -->"
SCALE_END = "<!-- scale:end -->"
T_SLOW_RSS_MIB = 300.0
T_TUNNEL_KIB = 100.0


# ---------------------------------------------------------------- (i) 10k slow requests


async def fire(public: int, n: int, hold_ms: int, batch: int, pause: float, timeout: float) -> dict[str, Any]:
    import aiohttp

    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    tmo = aiohttp.ClientTimeout(total=timeout)
    url = f"http://127.0.0.1:{public}/slow?ms={hold_ms}&gate={n}&gate_timeout=60"

    async with aiohttp.ClientSession(connector=connector, timeout=tmo) as http:

        async def one() -> None:
            t0 = time.monotonic()
            try:
                async with http.get(url, headers={"Host": "slow.localhost"}) as resp:
                    body = await resp.read()
                    key = str(resp.status) if resp.status != 200 or len(body) == 100 else "200-short-body"
            except Exception as exc:  # noqa: BLE001
                key = type(exc).__name__
            statuses[key] += 1
            latencies.append(time.monotonic() - t0)

        t0 = time.monotonic()
        tasks = []
        for start in range(0, n, batch):
            tasks += [asyncio.create_task(one()) for _ in range(min(batch, n - start))]
            await asyncio.sleep(pause)
        launched = time.monotonic() - t0
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
    latencies.sort()
    return {
        "statuses": dict(statuses),
        "elapsed_s": round(elapsed, 2),
        "launch_s": round(launched, 2),
        "latency_p50_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
        "latency_max_s": round(latencies[-1], 3) if latencies else None,
    }


def slow_requests(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    stack = bl.Stack(workdir / "slow")
    certs = bl.make_certs(workdir)
    try:
        up_port, public, control = bl.free_port(), bl.free_port(), bl.free_port()
        bl.start_upstream(stack, up_port)
        server = bl.start_exit_server(
            stack,
            certs,
            public,
            control,
            extra=[
                "--max-streams",
                str(2 * args.requests),
                "--max-streams-per-caller",
                "0",
                "--upstream-timeout",
                "120",
            ],
        )
        client = bl.start_tunnel_client(
            stack,
            certs,
            control,
            [f"default=http://127.0.0.1:{up_port}"],
            extra=["--max-streams", str(2 * args.requests)],
        )
        bl.wait_http(f"http://127.0.0.1:{public}/slow?ms=0", "slow.localhost", procs=[server.popen, client.popen])
        bl.http_get(f"http://127.0.0.1:{up_port}/stats?reset=1")
        time.sleep(1)
        before = {"server": bl.rss_kib(server.pid), "client": bl.rss_kib(client.pid)}
        fds = {"server": 0}
        bl.log(f"scale (i): {args.requests} concurrent long polls ({args.hold_ms} ms) over one tunnel")
        with bl.sampled_peak({"server": server.pid, "client": client.pid}) as peaks:
            import threading

            stop = threading.Event()

            def fd_loop() -> None:
                while not stop.is_set():
                    fds["server"] = max(fds["server"], bl.fd_count(server.pid))
                    stop.wait(0.25)

            th = threading.Thread(target=fd_loop, daemon=True)
            th.start()
            try:
                outcome = run_async(
                    fire(
                        public, args.requests, args.hold_ms, args.batch, args.batch_pause, timeout=args.request_timeout
                    )
                )
            finally:
                stop.set()
                th.join()
        _, stats_body = bl.http_get(f"http://127.0.0.1:{up_port}/stats")
        stats = json.loads(stats_body or b"{}")
        time.sleep(1)
        after = {"server": bl.rss_kib(server.pid), "client": bl.rss_kib(client.pid)}
        hwm = {"server": bl.status_kib(server.pid, "VmHWM"), "client": bl.status_kib(client.pid, "VmHWM")}
        alive = {"server": server.alive(), "client": client.alive()}
        ok200 = outcome["statuses"].get("200", 0)
        res = {
            "requests": args.requests,
            "hold_ms": args.hold_ms,
            **outcome,
            "answered_200": ok200,
            "upstream_peak_in_flight": stats.get("peak_in_flight"),
            "rss_before_kib": before,
            "rss_peak_kib": dict(peaks),
            "rss_after_kib": after,
            "vmhwm_kib": hwm,
            "server_peak_fds": fds["server"],
            "alive_after": alive,
        }
        bl.log(
            f"scale (i): {ok200}/{args.requests} answered 200 in {outcome['elapsed_s']} s, upstream peak "
            f"{stats.get('peak_in_flight')}, exit server RSS peak {peaks['server'] / 1024:.1f} MiB, client "
            f"{peaks['client'] / 1024:.1f} MiB, statuses {outcome['statuses']}"
        )
        return res
    except Exception as exc:  # noqa: BLE001
        bl.log(f"scale (i) failed: {exc}")
        return {"error": str(exc)}
    finally:
        stack.close()


def run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


# ---------------------------------------------------------------- (ii) idle tunnels


def idle_tunnels(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    stack = bl.Stack(workdir / "idle")
    certs = bl.make_certs(workdir)
    helpers: list[subprocess.Popen[str]] = []
    try:
        public, control = bl.free_port(), bl.free_port()
        server = bl.start_exit_server(stack, certs, public, control)
        time.sleep(args.settle)
        rss0 = bl.rss_kib(server.pid)
        per_proc = max(1, args.tunnels // args.procs)
        bl.log(
            f"scale (ii): {args.tunnels} idle tunnels ({args.procs} processes x {per_proc}); exit server RSS "
            f"with 0 tunnels {rss0 / 1024:.1f} MiB"
        )
        t0 = time.monotonic()
        logdir = stack.workdir / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        for k in range(args.procs):
            count = per_proc if k < args.procs - 1 else args.tunnels - per_proc * (args.procs - 1)
            cmd = [
                bl.venv_python(),
                str(bl.BENCH / "idle_tunnels.py"),
                *bl.tunnel_flags(certs, control),
                "--start",
                str(k * per_proc),
                "--count",
                str(count),
            ]
            err = open(logdir / f"idle-{k}.log", "w")  # noqa: SIM115
            helpers.append(
                subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    env=bl.clean_env(),
                    start_new_session=True,
                )
            )
            err.close()
        connected, helper_rss, problems = 0, [], []
        deadline = time.monotonic() + args.connect_timeout
        for k, proc in enumerate(helpers):
            assert proc.stdout is not None
            line = ""
            while time.monotonic() < deadline:
                line = _readline(proc, deadline - time.monotonic())
                if line or proc.poll() is not None:
                    break
            parts = line.split()
            if parts[:1] == ["READY"]:
                connected += int(parts[1])
                helper_rss.append(int(parts[2]))
            else:
                problems.append(f"helper {k}: {line.strip() or 'no answer'}")
        connect_s = time.monotonic() - t0
        time.sleep(args.settle)
        samples = []
        for _ in range(3):
            samples.append(bl.rss_kib(server.pid))
            time.sleep(1)
        rss1 = max(samples)
        # proof that the tunnels are routed: a registered host whose upstream refuses answers 502, not 503
        probe_hosts = [f"h{i}.example.com" for i in range(0, args.tunnels, max(1, args.tunnels // 20))]
        probes = Counter(bl.http_get(f"http://127.0.0.1:{public}/", h, timeout=10)[0] for h in probe_hosts)
        unknown = bl.http_get(f"http://127.0.0.1:{public}/", "nobody.example.com", timeout=10)[0]
        per_tunnel = (rss1 - rss0) / args.tunnels
        res = {
            "tunnels": args.tunnels,
            "processes": args.procs,
            "connected": connected,
            "connect_s": round(connect_s, 1),
            "rss0_kib": rss0,
            "rss1_kib": rss1,
            "rss1_samples_kib": samples,
            "per_tunnel_kib": round(per_tunnel, 1),
            "vmhwm_kib": bl.status_kib(server.pid, "VmHWM"),
            "server_fds": bl.fd_count(server.pid),
            "probe_statuses": {str(k): v for k, v in probes.items()},
            "unknown_host_status": unknown,
            "helper_rss_kib": helper_rss,
            "problems": problems,
        }
        bl.log(
            f"scale (ii): {connected} connected in {connect_s:.1f} s; RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} "
            f"MiB = {per_tunnel:.1f} KiB per tunnel; probes {dict(probes)}; {problems or ''}"
        )
        return res
    except Exception as exc:  # noqa: BLE001
        bl.log(f"scale (ii) failed: {exc}")
        return {"error": str(exc)}
    finally:
        for proc in helpers:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.close()
        for proc in helpers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        stack.close()


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if sel.select(max(0.0, timeout)):
            return proc.stdout.readline()
        return ""
    finally:
        sel.close()


# ---------------------------------------------------------------- report


def mark(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def section(args: argparse.Namespace, slow: dict[str, Any], idle: dict[str, Any], started: str, nofile: int) -> str:
    out = ["## Scale\n"]
    via = os.environ.get("BENCH_VIA", "")
    out.append(
        f"`{' '.join(['.venv/bin/python', 'bench/scale.py', *sys.argv[1:]])}`"
        f"{f' (run by `{via}` after bench/run.py)' if via else ''}, run {started}, not pinned "
        f"(both CPUs shared by everything). RLIMIT_NOFILE {nofile} for every process (the launcher raises its "
        "soft limit as far as the hard limit allows; the children inherit it).\n"
    )
    out.append("| test | figure | target | |")
    out.append("|---|---|---|---|")
    if "error" in slow:
        out.append(f"| {args.requests:,} concurrent long polls, one tunnel | failed: {slow['error']} | | **MISS** |")
    else:
        all_ok = slow["answered_200"] == slow["requests"]
        peak = slow["rss_peak_kib"]["server"] / 1024
        out.append(
            f"| {slow['requests']:,} concurrent long polls ({slow['hold_ms']} ms after all are parked), "
            f"one tunnel: answered 200 | {slow['answered_200']:,} of {slow['requests']:,} "
            f"({', '.join(f'{k}: {v}' for k, v in slow['statuses'].items())}) | all | {mark(all_ok)} |"
        )
        out.append(
            f"| same: exit server RSS peak | {peak:.1f} MiB (idle before: "
            f"{slow['rss_before_kib']['server'] / 1024:.1f} MiB, after: "
            f"{slow['rss_after_kib']['server'] / 1024:.1f} MiB) | < {T_SLOW_RSS_MIB:.0f} MiB | "
            f"{mark(peak < T_SLOW_RSS_MIB and all_ok)} |"
        )
        out.append(
            f"| same: tunnel client RSS peak | {slow['rss_peak_kib']['client'] / 1024:.1f} MiB (before: "
            f"{slow['rss_before_kib']['client'] / 1024:.1f} MiB) | - | |"
        )
        out.append(
            f"| same: concurrency reached at the upstream | {slow['upstream_peak_in_flight']} | "
            f"{slow['requests']:,} | |"
        )
        out.append(
            f"| same: wall time (launch in {slow['launch_s']} s, paced batches of {args.batch}) | "
            f"{slow['elapsed_s']} s; per-request latency p50 {slow['latency_p50_s']} s, max "
            f"{slow['latency_max_s']} s; exit server peak fds {slow['server_peak_fds']} | - | |"
        )
    if "error" in idle:
        out.append(f"| {args.tunnels:,} idle tunnels | failed: {idle['error']} | | **MISS** |")
    else:
        ok = idle["connected"] == idle["tunnels"] and not idle["problems"]
        out.append(
            f"| {idle['tunnels']:,} idle tunnels ({idle['processes']} helper processes): registered | "
            f"{idle['connected']:,} in {idle['connect_s']} s; probes of registered hosts: "
            f"{', '.join(f'{k} x{v}' for k, v in idle['probe_statuses'].items())} (502 = routed to the "
            f"tunnel, upstream refused); unknown host: {idle['unknown_host_status']} | all | {mark(ok)} |"
        )
        out.append(
            f"| same: exit server RSS per tunnel | ({idle['rss1_kib'] / 1024:.1f} - "
            f"{idle['rss0_kib'] / 1024:.1f} MiB) / {idle['tunnels']:,} = {idle['per_tunnel_kib']:.1f} KiB | "
            f"< {T_TUNNEL_KIB:.0f} KiB | {mark(ok and idle['per_tunnel_kib'] < T_TUNNEL_KIB)} |"
        )
        if idle["helper_rss_kib"]:
            per_client = sum(idle["helper_rss_kib"]) / max(1, idle["connected"])
            per_proc = idle["tunnels"] // idle["processes"]
            out.append(
                f"| same: client side, helper RSS per client (library, {per_proc} per process, incl. "
                f"interpreter) | {per_client:.0f} KiB | - | |"
            )
        if idle["problems"]:
            out.append(f"\nProblems: {'; '.join(idle['problems'])}")
    out.append("")
    return "\n".join(out)


def update_doc(doc: Path, text: str) -> None:
    bl.update_section(doc, SCALE_BEGIN, SCALE_END, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000, help="concurrent long polls (default 10000)")
    parser.add_argument("--hold-ms", type=int, default=2000, help="long-poll hold after all are parked (2000)")
    parser.add_argument("--batch", type=int, default=500, help="connections opened per batch (500)")
    parser.add_argument("--batch-pause", type=float, default=0.05, help="seconds between batches (0.05)")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="per-request timeout, s (120)")
    parser.add_argument("--tunnels", type=int, default=1000, help="idle tunnels (default 1000)")
    parser.add_argument("--procs", type=int, default=10, help="helper processes for the tunnels (10)")
    parser.add_argument("--connect-timeout", type=float, default=180.0, help="seconds for all tunnels to register")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to settle before reading RSS")
    parser.add_argument("--quick", action="store_true", help="shorter settle times (same counts)")
    parser.add_argument("--skip-slow", action="store_true")
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if args.quick:
        args.settle = min(args.settle, 2.0)
    if not 1 <= args.requests <= 30_000 or not 1 <= args.tunnels <= 5000:
        parser.error("--requests at most 30000, --tunnels at most 5000")
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))  # undo run.py --pin for this process tree
    limit = bl.raise_nofile(65536)
    if limit < args.requests + 1000:
        bl.log(f"warning: RLIMIT_NOFILE is only {limit}")
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-scale-"))
    try:
        slow = {"error": "skipped (--skip-slow)"} if args.skip_slow else slow_requests(args, workdir)
        idle = {"error": "skipped (--skip-idle)"} if args.skip_idle else idle_tunnels(args, workdir)
    finally:
        if os.environ.get("BENCH_KEEP_TMP"):
            bl.log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    bl.RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    payload = {"started": started, "args": {k: str(v) for k, v in vars(args).items()}, "slow": slow, "idle": idle}
    for name in (f"scale-{stamp}.json", "scale-latest.json"):
        (bl.RESULTS / name).write_text(json.dumps(payload, indent=2))
    text = section(args, slow, idle, started, limit)
    update_doc(args.doc, text)
    print(text)
    failed = [r for r in (slow, idle) if "error" in r and not str(r["error"]).startswith("skipped")]
    if idle.get("problems"):
        failed.append(idle)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
