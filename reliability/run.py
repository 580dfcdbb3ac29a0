"""``make reliability``: fault-injection scenarios against real Backhaul processes.

    .venv/bin/python reliability/run.py                      # every scenario, full length; writes docs/RELIABILITY.md
    .venv/bin/python reliability/run.py --short              # the CI lengths (tests/reliability runs these)
    .venv/bin/python reliability/run.py --scenario link-loss --scenario overload
    .venv/bin/python reliability/run.py --no-doc             # print only

Scenarios: kill-client, link-loss, server-restart, upstream-faults, degraded-link, overload, soak,
slow-readers
(reliability/rel_scenarios.py). The network is emulated in two network namespaces of our own
(nftables, tc) when running as root, else by reliability/linkproxy.py on loopback; set
RELIABILITY_NO_NETNS=1 to force the latter. RELIABILITY_KEEP=1 keeps each scenario's temporary
directory (process logs, load reports). RELIABILITY_SLOW_READERS=N sets how many slow readers
the slow-readers scenario starts (300 full, 60 short). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rel_lib import ROOT, NetnsLink, Result  # noqa: E402
from rel_scenarios import SCENARIOS, link_mode, soak  # noqa: E402

DOC = ROOT / "docs" / "RELIABILITY.md"

CLAIMS = {
    "kill-client": "Callers get 502, or an aborted body they can tell from a complete one, within 5 s; the exit "
    "server's streams, tasks and file descriptors return to their baseline.",
    "link-loss": "Both sides notice within 15 s; in-flight requests get 502/504; new requests get 503 at once; "
    "the client reconnects when the link heals.",
    "server-restart": "Every client is back within 5 s; with 20 clients the reconnect times are spread by jitter, "
    "not all within 100 ms.",
    "upstream-faults": "A hanging upstream gives 504 at the timeout, a refusing one 502 at once, one that resets "
    "mid-body an aborted body; nothing leaks.",
    "degraded-link": "About 200 ms latency with jitter, and a 2 Mbit/s limit: requests succeed and heartbeats "
    "cause no false disconnects.",
    "overload": "Ten times the configured stream limit at once gives fast 503s, never a hang, and memory stays "
    "bounded.",
    "soak": "Mixed load with reconnect churn: zero unexpected errors, RSS growth under 10%, no growth in file "
    "descriptors or tasks.",
    "slow-readers": "Callers reading a huge download slowly cost only their own streams: other callers on the "
    "same tunnel keep their p99 within 2x, and the memory comes back when the slow readers leave.",
}

HOW = {
    "kill-client": "One exit server (`--upstream-timeout 60`), one tunnel client, one upstream. Per cycle: 3 GETs "
    "and 2 POSTs (64 KiB body) waiting for a response head, 3 GETs in the middle of a streamed "
    "(chunked) body, 2 POSTs in the middle of a slow upload (16 KiB every 50 ms); then `SIGKILL` "
    "to the client, and one new request. The client is started again before the next cycle. "
    "Baseline and end: idle, one client connected.",
    "link-loss": "Exit server with the default heartbeat (`--heartbeat-interval 4 --heartbeat-timeout 12`, "
    "client `--heartbeat-timeout 12`). With 2 GETs and 1 POST waiting for a head and 2 GETs mid-body, "
    "the link goes silent; 2 s later one more request is sent into the dead link. Detection is timed "
    "from the exit server's `/metrics` (`backhaul_tunnels_connected`, polled every 100 ms) and "
    "from the client's log line. Then the link heals.",
    "server-restart": "20 `tunnel-client` processes with default backoff (`--backoff-base 1 --backoff-cap 30`, "
    "full jitter). The exit server (plain `exit-server run`) gets `SIGKILL` and is started "
    "again on the same ports at once. Reconnect times are the new server's `registered client "
    "... instance client-NN` log lines, from its own `exit server: public ...` line (the moment "
    "it listens) and from the kill.",
    "upstream-faults": "Routes to an upstream with `/hang` (never answers) and `/reset` (head, 100 000 bytes, then "
    "RST; with `Content-Length: 1 MiB` and chunked), and to a port where nothing listens. 5 of "
    "each at once per round, one kind of fault at a time, so that the objects each kind leaves "
    "for the cyclic GC can be counted (GC-tracked objects from the probe, no collection "
    "forced). The upstream counts hanging handlers, to show each 504 cancels the upstream "
    "call.",
    "degraded-link": "The client and its upstream in their own network namespace, reaching the exit server over a "
    "veth pair and the link proxy. The kernel here has no `netem`, so the 200 ms +- 50 ms "
    "(uniform, each way, order kept) delay is the link proxy's; the 2 Mbit/s limit is `tc tbf` "
    "on both veth ends. Load: two workers looping 100 B GET, 64 KiB download, 32 KiB upload "
    "(plus 256 KiB download at 2 Mbit/s), and a 3 s SSE stream in a loop. A monitor polls "
    "`backhaul_tunnels_connected` and the heartbeat RTT (`/api/tunnels`) every 0.5 s.",
    "overload": "`exit-server run --max-streams N`, bursts of 10 x N concurrent `GET /slow?ms=1500` from fresh "
    "connections. RSS of the exit server sampled every 50 ms.",
    "soak": "Exit server, upstream, two tunnel clients serving the same hostname: `client-steady` runs "
    "throughout, `client-churn` is restarted (`SIGTERM`, drain, start again with the same instance id) "
    "every period. A warm-up load runs first; the baseline is taken idle after it, the end idle after "
    "the soak. Exit server and client-steady sampled every few seconds (fds and RSS from /proc, tasks from "
    "the probe, streams from /metrics).",
    "slow-readers": "One exit server, one tunnel client, one upstream (all defaults). Ten probe callers fetch "
    "`/small` back to back for the phase length without slow readers (the baseline), then again while N "
    "callers each download `/download?n=1 GiB` through a 16 KiB receive buffer, reading 20 KiB/s (300 "
    "full, 60 short); every slow reader has its response head and 2 s to fill its buffers before the "
    "second phase. RSS of both processes sampled every 100 ms; the after figure is taken once the slow "
    "readers left and the exit server is idle, 30 s later (12 s short: the processes return freed "
    "heap every 10 s).",
}


FINDINGS = """\
## Findings

**0. Outside fault injection (issue 24): what did not hold, and where each fix is proven.**

1. *Unbounded response head in the client* (1 GiB header took 1 GiB): heads are bounded by
   `--max-response-head` (64 KiB) and `--max-response-fields` (256); past them 502 at once with a
   log line. `tests/e2e/test_client_upstream_faults.py`.
2. *A head the tunnel cannot carry* (a field over 64 KiB, status 099) was swallowed and the caller
   waited 60 s for 504: reset at once, 502, logged. Same file.
3. *An RST ending a close-delimited body* reached the caller as a clean 200: the body is now
   aborted (the caller sees a truncated transfer). Same file.
4. *Slow readers* (`slow-readers` below). The receiver returned connection credit on receipt
   only while the unconsumed bytes of all streams stayed within the 64 MiB buffer budget; past
   it, the credit of every further byte was withheld, so about 320 slow streams (64 MiB of
   their windows plus the 16 MiB connection window) could stop the whole tunnel. Now, past the
   budget, only the streams whose readers are behind stop getting *stream* credit (shared/mux.py,
   PROTOCOL.md 6.2); connection credit is withheld only past a hard limit of four times the
   budget. Each slow stream costs about 0.85 MiB on the exit server (its 256 KiB window plus
   what waits for the caller's socket) and about 1 MiB on the client (its upstream read-ahead,
   now 128 KiB instead of 512 KiB, plus a window in flight); per tunnel at most about
   `connection window + 256 MiB` waits unread inside the tunnel. Freed heap is returned every
   10 s (`malloc_trim`): after the slow readers left, RSS came back instead of staying
   +174 / +396 MiB.
5. *SIGTERM while connecting* let the client register after its drain and never exit: the
   connect is raced against the stop. `tests/e2e/test_stop_races.py`.
6. *Shutdown overran its deadline* with frozen clients: sessions are closed together within
   what is left of the drain. Same file.
7. *An empty tokens file revoked everyone*: refused like an invalid file, previous credentials
   kept (explicit `[clients]` for none). `test_empty_or_truncated_tokens_file_keeps_the_credentials`.
8. *Descriptor exhaustion was silent*: soft limit raised to the hard one, a reserve kept for the
   admin port and tunnels (503 past it, counted, logged once per 10 s), `--keepalive-timeout`
   75 s. `tests/e2e/test_descriptors.py` (a real exit server under `ulimit -n 256`).
9. *A full disk stopped the audit log for good*: fail closed by default (streams refused,
   `/healthz` 503), retried every second, resumed with the chain whole.
   `test_audit_log_that_cannot_be_written_refuses_streams_then_resumes` (a real client process
   whose file-size limit is lowered, then lifted with `prlimit`).

**1. An ended tunnel session kept its websocket and TLS buffers until Python's next full garbage
collection (fixed in `shared/aio/connection.py`, `TunnelConnection.run`).**

- *Symptom.* The first full run of the soak failed its memory check: exit server RSS +19.7 % in
  10 minutes (60 112 -> 71 936 KiB, idle to idle; +13.9 % from the first to the last third under
  load), with 9 client restarts, 0 errors, and flat fds and tasks. Taken apart with
  `reliability/probe.py`: load without restarts stayed flat (60.3-61.0 MiB for 3 minutes at about
  80 requests/s); restarts without load cost about 120 KiB each; restarts under load about 1 MiB
  each, linearly (57 -> 107 MiB after 44 restarts, 3 s apart), the same on plain asyncio, and not
  at all with `--insecure-plaintext`. `tracemalloc` and the object count after a collection stayed
  flat: the memory was garbage not yet collected.
- *Cause.* Each ended session stayed alive as cyclic garbage: `TunnelConnection` keeps its
  `on_control`/`on_goaway` callbacks, closures over the connection itself
  (`exit_server/control.py` `handle`, `tunnel_client/client.py` `_one_session`); and when a
  session ends with streams in flight, they fail with the session's stored `SessionClosed`, whose
  traceback holds a `TunnelStream.read`/`response` frame, that stream, and its connection. The
  connection holds the websocket, its SSL protocol, the `SSLObject` and its memory BIOs (about
  1 MiB after traffic). Only a full (generation 2) collection frees such cycles, and those are
  rare, rarer still with `gc.set_threshold(50_000, 20, 20)` in `shared/runtime/runner.py`.
- *Fix.* When `run()` ends, the connection drops its callbacks and its reference to the websocket
  (`close()`, `abort()` and `_flush_now()` accept it gone). The small `TunnelConnection`/`Session`
  objects of a session that ended abruptly may still wait for a collection; the websocket and TLS
  objects are freed at once.
- *After.* 19 restarts under load: 61.0 -> 63.0 MiB (before: 63 -> 80 MiB); the soak below. Every
  scenario that ends sessions now checks it: websocket and TLS objects in memory, counted without
  forcing a collection, equal the sessions connected (the check fails without the fix: 3 of each
  for 1 connected after 2 killed clients).

**2. A failed request left a reference cycle holding its buffers, in both processes (fixed in
`shared/aio/connection.py` and `tunnel_client/upstream.py`).**

- *Symptom.* In the first full run, upstream-faults left RSS +7 MiB in both the exit server and
  the client after 100 faulty requests (the scenario had no memory check then). Taken apart:
  each upstream reset mid-body left about 60 GC-tracked objects and 120 KiB of RSS in each
  process (200 of them: exit server 56 -> 80 MiB, client 65 -> 88 MiB), growing with the bytes
  sent before the reset; a 504 left about 88 objects in the client, a refused upstream about
  100. Run with the default GC thresholds, the same 200 requests cost 6 MiB (exit server) and
  3 MiB (client): `gc.set_threshold(50_000, 20, 20)` in `shared/runtime/runner.py` lets about 70
  times more garbage pile up between collections, and the heap does not shrink afterwards.
- *Causes.* (a) `TunnelStream.read()`, `write()`, `response()` and `send_reply()` raised the
  stream's stored error object itself, so its traceback held the raising frames
  (`PublicHandler._relay_response`, with the request, the response and the last chunk), which
  hold the stream, which holds the error; the same through the reply future. (b) In the client,
  aiohttp keeps a payload error on the response (and aiohappyeyeballs keeps connect errors);
  their tracebacks held `Forwarder._proxy`'s frame (the response, the last chunk). (c) A stream
  handler cancelled by the exit server (504, caller gone) kept its `CancelledError` in the task,
  whose traceback held `_run_stream`'s frame, which holds the stream, whose `_task` is the task.
- *Fix.* Raise a copy of a stored error (`_fresh`) and drop the traceback of the one awaited
  from the reply future; clear `stream._task` when the handler ends; drop the traceback of the
  aiohttp errors caught in `Forwarder._proxy`.
- *After.* 200 resets mid-body: exit server 56.4 -> 58.5 MiB, client 64.7 -> 66.7 MiB (before:
  80 and 88 MiB); objects left per failed request: reset about 0 on both sides, hang about 0,
  refused about 30 in the client, all in aiohttp/aiohappyeyeballs frames (see upstream-faults).
  Upstream-faults now counts them per kind of fault, and checks RSS.

**Observations, not changed.**

- `gc.set_threshold(50_000, 20, 20)` (`shared/runtime/runner.py`, for the hot path) assumes
  per-request objects are acyclic; error paths and third-party code (aiohttp's connector,
  aiohappyeyeballs) still make cycles, which now live about 70 times longer and keep what they
  reference. Worth keeping in mind when changing error paths; the scenarios above count it.

- The first full soak with WebSocket sessions in the locust mix (2026-11-27) failed on memory:
  exit server RSS +18.8 %, client +14.8 %, with zero failed requests. Each WebSocket session left
  about 80 objects in reference cycles on the exit server and 20 on the client, for the cyclic
  GC. The pump's new idle check referred to itself, and its `except CancelledError` kept the
  current task in a local of a frame that is in the exception's own traceback. Fixed in
  `shared/aio/pump.py`; `test_websocket_sessions_leave_no_reference_cycles` checks that 40
  sessions leave no frame, traceback, exception or Backhaul object for the GC.
- Each 503 for the stream limit used to write a WARNING line (1 800 lines in the overload
  scenario below). Since 2026-11-27 the line is throttled to one per tunnel per 10 s, saying how
  many more were refused (`exit_server/observe.py`, `LogThrottle`);
  `backhaul_rejected_requests{reason="stream_limit"}` counts every one.
- A request sent into a link that died silently waits for the heartbeat deadline (about 12 s)
  and then gets 502 (link-loss below), as do requests in flight; `--heartbeat-timeout` bounds it.
- Over a 2 Mbit/s link the heartbeat RTT seen by the exit server reaches about 2 s (the pings
  queue behind data), far below the 12 s deadline: no false disconnect.
- The kernel here has no `netem`: latency and jitter come from `reliability/linkproxy.py`.
- The tunnel client keeps idle upstream connections for 30 s (aiohttp keep-alive): its fd checks
  leave that pool out, and report it.
"""


def machine() -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio"
    return f"{os.cpu_count()} vCPU ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, {loop}"


def git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def write_doc(results: list[Result], argv: list[str], started: float, total: float, short: bool) -> None:
    netns_ok, why = link_mode()
    cmd = "make reliability" if argv == [] else ".venv/bin/python reliability/run.py " + shlex.join(argv)
    lines = [
        "# Reliability",
        "",
        "What happens to callers, tunnels and resources when things break: a client killed, a link gone",
        "silent, the exit server killed, upstreams misbehaving, a slow link, overload, a soak with",
        "reconnect churn, and slow readers beside normal callers. Every figure below comes from real",
        "processes (`exit-server`, `tunnel-client`, aiohttp upstreams, a load generator) on one machine,",
        "and was written by:",
        "",
        "```sh",
        cmd,
        "```",
        "",
        f"- run: {datetime.datetime.fromtimestamp(started).strftime('%Y-%m-%d %H:%M')}, "
        f"{total / 60:.1f} min, revision `{git_rev()}`, {'short (CI) lengths' if short else 'full lengths'}",
        f"- machine: {machine()}",
        "- network emulation: "
        + (
            "two network namespaces of our own joined by a veth pair "
            f"(nftables {'present' if NetnsLink.has_nft() else 'absent'}, tc tbf); "
            "`reliability/linkproxy.py` relays from the gateway namespace to the exit "
            "server's control port and adds delay (no `netem` in this kernel)"
            if netns_ok
            else f"`reliability/linkproxy.py` on loopback ({why})"
        ),
        "- the exit server (and the clients where tasks are counted) run through `reliability/probe.py`, which "
        "calls the packages' own `main()` and adds a Unix-socket probe answering the asyncio task count; fds "
        "and RSS come from `/proc/PID`, streams in flight from `/metrics`",
        "- CI runs a short version of each scenario: `pytest tests/reliability` (part of `make test`)",
        "",
        "| scenario | result | time |",
        "|---|---|---|",
    ]
    for r in results:
        lines.append(f"| [{r.title}](#{r.key}) | {'pass' if r.passed else '**FAIL**'} | {r.seconds:.0f} s |")
    lines += ["", FINDINGS]
    for i, r in enumerate(results, 1):
        lines += [
            f'<a id="{r.key}"></a>',
            f"## {i}. {r.title}",
            "",
            f"**Claim.** {CLAIMS.get(r.key, '')}",
            "",
            f"**How.** {HOW.get(r.key, '')}",
            "",
        ]
        lines += [
            f"Only this scenario: `.venv/bin/python reliability/run.py --scenario {r.key}"
            f"{' --short' if short else ''} --no-doc`",
            "",
        ]
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {label} | {_cell(value)} |" for label, value in r.figures]
        lines += ["", "| check | measured | |", "|---|---|---|"]
        lines += [
            f"| {claim} | {_cell(measured)} | {'pass' if ok else '**FAIL**'} |" for claim, ok, measured in r.checks
        ]
        if r.notes:
            lines += [""] + [f"- {n}" for n in r.notes]
        lines += [
            "",
            "<details><summary>processes (ports as in this run; $RUN is the scenario's temporary directory)</summary>",
            "",
            "```sh",
        ]
        lines += r.commands
        lines += ["```", "", "</details>", ""]
    DOC.write_text("\n".join(lines))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


async def main_async(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    for key in args.scenario or list(SCENARIOS):
        print(f"== {key} ({'short' if args.short else 'full'}) ...", flush=True)
        t0 = time.monotonic()
        try:
            if key == "soak":
                result = await soak(args.short, args.load)
            else:
                result = await SCENARIOS[key](args.short)
        except Exception as exc:  # noqa: BLE001 (a scenario that crashes is a failed scenario, the others still run)
            result = Result(key, key, "short" if args.short else "full")
            result.check("scenario ran to the end", False, f"{type(exc).__name__}: {exc}")
        result.seconds = time.monotonic() - t0
        print(result.summary(), flush=True)
        results.append(result)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="CI lengths")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="run only these (repeatable)")
    parser.add_argument(
        "--load",
        choices=["auto", "locust", "aiohttp"],
        default="auto",
        help="soak load generator (auto: locust from .venv-load when present, full length only)",
    )
    parser.add_argument("--no-doc", action="store_true", help=f"do not write {DOC.relative_to(ROOT)}")
    args = parser.parse_args()
    started = time.time()
    results = asyncio.run(main_async(args))
    total = time.time() - started
    write = not args.no_doc and args.scenario is None
    if write:
        write_doc(results, sys.argv[1:], started, total, args.short)
        print(f"wrote {DOC.relative_to(ROOT)}")
    failed = [r.key for r in results if not r.passed]
    print(
        f"reliability: {len(results) - len(failed)} of {len(results)} scenarios passed in {total / 60:.1f} min"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
