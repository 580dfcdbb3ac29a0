"""The reliability scenarios, each against real processes (exit server, tunnel clients,
upstreams, link proxy, load generator), each returning a :class:`rel_lib.Result`.

``short=True`` is the CI version (tests/reliability); ``short=False`` is what ``make reliability``
runs and writes to docs/RELIABILITY.md. Every load loop here is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rel_lib import (
    ADMIN_TOKEN,
    HERE,
    HOST,
    PY,
    ROOT,
    Client,
    Env,
    NetnsLink,
    Result,
    Server,
    live_sessions,
    ms,
    pct,
    proc_stats,
    set_link,
    wait_for,
)

# ---------------------------------------------------------------- callers


@dataclass
class Call:
    label: str
    status: int = 0
    outcome: str = ""  # complete | short | aborted | error | hang
    error: str = ""
    retry_after: str | None = None
    nbytes: int = 0
    t_start: float = 0.0
    t_end: float = 0.0
    first_byte: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def seconds(self) -> float:
        return self.t_end - self.t_start


async def call(
    http: aiohttp.ClientSession,
    base: str,
    path: str,
    label: str = "",
    *,
    method: str = "GET",
    host: str = HOST,
    data: bytes | None = None,
    timeout: float = 60,
    marker: bytes | None = None,
) -> Call:
    """One request; tells a complete body from an aborted one (and, with ``marker``, from a
    body that ended cleanly but short)."""
    loop = asyncio.get_running_loop()
    c = Call(label or path, t_start=loop.time())
    try:
        async with asyncio.timeout(timeout):
            async with http.request(method, base + path, headers={"Host": host}, data=data) as r:
                c.status = r.status
                c.retry_after = r.headers.get("Retry-After")
                tail = b""
                while True:
                    chunk = await r.content.readany()
                    if not chunk:
                        break
                    c.nbytes += len(chunk)
                    tail = (tail + chunk)[-16:]
                    c.first_byte.set()
                c.outcome = "complete" if marker is None or tail.endswith(marker) else "short"
    except aiohttp.ClientPayloadError as exc:
        c.outcome, c.error = "aborted", f"{type(exc).__name__}: {exc}"[:200]
    except (aiohttp.ClientError, OSError) as exc:
        c.outcome, c.error = ("aborted" if c.status else "error"), f"{type(exc).__name__}: {exc}"[:200]
    except TimeoutError:
        c.outcome, c.error = "hang", f"no answer within {timeout:.0f}s"
    c.t_end = loop.time()
    return c


async def slow_body(seconds: float = 60, chunk: int = 16 * 1024, interval: float = 0.05) -> Any:
    """A request body that keeps coming: ``chunk`` bytes every ``interval`` s for ``seconds``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        yield b"u" * chunk
        await asyncio.sleep(interval)


def session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), auto_decompress=False)


async def warm(server: Server, n: int = 20, host: str = HOST) -> None:
    async with session() as http:
        for _ in range(n):
            c = await call(http, server.base, "/small", host=host, timeout=20)
            if c.status != 200:
                raise RuntimeError(f"warm-up request got {c.status} {c.outcome} {c.error}")


async def settle(
    server: Server, tunnels: int, like: dict[str, Any] | None = None, timeout: float = 15, quiet: float = 1.0
) -> dict[str, Any]:
    """Wait until no stream is in flight and ``tunnels`` are connected (and, given a baseline
    ``like``, until fds and tasks are back to it or the timeout passes); then a snapshot."""

    async def idle() -> bool:
        snap = await server.snapshot()
        return snap["streams"] == 0 and snap["tunnels"] == tunnels

    await wait_for(idle, timeout, 0.1, "idle exit server")
    await asyncio.sleep(quiet)
    snap = await server.snapshot()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (
        like is not None
        and loop.time() < deadline
        and (snap["fds"] > like["fds"] or snap.get("tasks", 0) > like.get("tasks", 0))
    ):
        await asyncio.sleep(0.25)
        snap = await server.snapshot()
    return snap


async def settle_client(client: Client, like: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """A client's snapshot once its fds (besides the upstream pool) and tasks are back to
    ``like``, or after ``timeout``."""
    snap = await client.snapshot()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline and (
        snap.get("fds_other", snap["fds"]) > like.get("fds_other", like["fds"])
        or snap.get("tasks", 0) > like.get("tasks", 0)
    ):
        await asyncio.sleep(0.25)
        snap = await client.snapshot()
    return snap


def delta(label: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    parts = []
    for key, name, unit in (
        ("fds", "fds", ""),
        ("upstream_conns", "of which idle upstream keep-alive", ""),
        ("tasks", "tasks", ""),
        ("streams", "streams", ""),
        ("rss_kib", "rss", " KiB"),
    ):
        if key in before and key in after:
            parts.append(f"{name} {before[key]}->{after[key]}{unit}")
    return f"{label}: " + ", ".join(parts)


def same_resources(res: Result, who: str, before: dict[str, Any], after: dict[str, Any]) -> None:
    if "fds_other" in before:  # a tunnel client: its pooled upstream connections are not a leak
        res.check(
            f"{who}: file descriptors (besides its upstream keep-alive pool) back to baseline",
            after["fds_other"] <= before["fds_other"],
            f"{before['fds_other']} -> {after['fds_other']} (pool {before['upstream_conns']} -> "
            f"{after['upstream_conns']})",
        )
    else:
        res.check(
            f"{who}: file descriptors back to baseline",
            after["fds"] <= before["fds"],
            f"{before['fds']} -> {after['fds']}",
        )
    if "tasks" in before:
        res.check(
            f"{who}: asyncio tasks back to baseline",
            after["tasks"] <= before["tasks"],
            f"{before['tasks']} -> {after['tasks']}",
        )
    if "streams" in after:
        res.check(f"{who}: backhaul_streams_in_flight back to 0", after["streams"] == 0, after["streams"])


async def check_freed(res: Result, who: str, path: Path | None, connected: int) -> None:
    """An ended session's websocket and TLS objects (about 1 MiB of buffers under load) must be
    freed at once, not linger as garbage until Python's next full collection: counted without
    forcing a collection, they equal the sessions connected."""
    if path is None:
        return
    live = await live_sessions(path)
    ws = sum(
        live.get(name, 0)
        for name in (
            "ServerConnection",
            "ClientConnection",
            "TunnelServerConnection",
            "TunnelClientConnection",
            "PinnedClientConnection",
        )
    )
    tls = live.get("SSLObject", 0)
    res.check(
        f"{who}: ended sessions' websockets and TLS objects freed at once",
        ws == connected == tls,
        f"{ws} websockets, {tls} TLS objects in memory for {connected} connected "
        f"(TunnelConnection objects: {live.get('TunnelConnection', 0)})",
    )


def link_mode() -> tuple[bool, str]:
    ok, why = NetnsLink.available()
    if os.environ.get("RELIABILITY_NO_NETNS") == "1":
        ok, why = False, "RELIABILITY_NO_NETNS=1"
    return ok, why


# ---------------------------------------------------------------- 1. client killed mid-stream


async def kill_client(short: bool) -> Result:
    res = Result("kill-client", "Client killed mid-stream (SIGKILL)", "short" if short else "full")
    env = Env.create("kill")
    try:
        up = await env.upstream()
        srv = await env.exit_server("--upstream-timeout", "60")
        url = f"wss://localhost:{srv.control}"
        routes = [f"{HOST}=http://127.0.0.1:{up}"]
        await env.client(url, routes, name="client")
        await warm(srv)
        base = await settle(srv, 1)
        cycles = 2 if short else 5
        times: dict[str, list[float]] = {
            "waiting GET": [],
            "waiting POST": [],
            "mid-body GET": [],
            "mid-upload POST": [],
        }
        seen: dict[str, set[str]] = {k: set() for k in times}
        bad: list[str] = []
        refused: list[float] = []
        for cycle in range(cycles):
            client = next(p for p in reversed(env.procs) if p.name.startswith("client"))
            async with session() as http:
                calls = [asyncio.create_task(call(http, srv.base, "/slow?ms=60000", "waiting GET")) for _ in range(3)]
                calls += [
                    asyncio.create_task(
                        call(
                            http,
                            srv.base,
                            "/slowpost?ms=60000",
                            "waiting POST",
                            method="POST",
                            data=os.urandom(64 * 1024),
                        )
                    )
                    for _ in range(2)
                ]
                streams = [
                    call(http, srv.base, "/stream?seconds=60&interval_ms=50", "mid-body GET", marker=b"end\n")
                    for _ in range(3)
                ]
                stream_tasks = [asyncio.create_task(s) for s in streams]
                calls += stream_tasks
                calls += [
                    asyncio.create_task(
                        call(http, srv.base, "/upload", "mid-upload POST", method="POST", data=slow_body())
                    )
                    for _ in range(2)
                ]
                await wait_for(lambda: _upstream_busy(up, 10), 10, 0.05, "10 requests at the upstream")
                await asyncio.sleep(0.3)  # the streams have sent a few lines
                loop = asyncio.get_running_loop()
                t_kill = loop.time()
                client.kill()
                done = await asyncio.wait_for(asyncio.gather(*calls), 30)
                after = await call(http, srv.base, "/small", "new request")
                refused.append(after.seconds)
                if after.status != 503:
                    bad.append(f"cycle {cycle}: new request after the kill got {after.status} {after.outcome}")
            for c in done:
                times[c.label].append(c.t_end - t_kill)
                seen[c.label].add(f"{c.status or 'no response'} {c.outcome}")
                if c.label.startswith("waiting"):
                    want_ok = c.status == 502 and c.outcome == "complete"
                elif c.label == "mid-upload POST":  # 502, or the connection cut under the body being sent
                    want_ok = (c.status == 502 and c.outcome == "complete") or (c.status == 0 and c.outcome == "error")
                else:
                    want_ok = c.status == 200 and c.outcome == "aborted"
                if not want_ok:
                    bad.append(f"cycle {cycle}: {c.label} -> {c.status} {c.outcome} {c.error}")
            await client.astop(signal.SIGKILL)
            await env.client(url, routes, name=f"client-{cycle + 1}", instance="client")
        end = await settle(srv, 1, like=base)
        res.fig(
            "kill cycles",
            f"{cycles} (each: 3 GETs and 2 POSTs waiting for a head, 3 GETs mid-body, 2 POSTs mid-upload)",
        )
        for label, values in times.items():
            res.fig(
                f"{label}: caller sees / after the kill (max, median)",
                f"{', '.join(sorted(seen[label]))} / {ms(max(values))}, {ms(pct(values, 0.5))}",
            )
        res.fig("new request after the kill (no tunnel): answered in", f"max {ms(max(refused))}")
        res.fig("exit server before -> after", delta("", base, end).lstrip(": "))
        res.check(
            "callers waiting for a head get 502; mid-body callers get an aborted body (never a complete one); "
            "mid-upload callers get 502 or a cut connection",
            not bad,
            "; ".join(bad) or f"{sum(len(v) for v in times.values())} calls as expected",
        )
        worst = max(max(v) for v in times.values())
        res.check("every caller has its answer within 5 s of the kill", worst < 5, ms(worst))
        res.check("a new request after the kill gets 503 at once", not bad and max(refused) < 1, ms(max(refused)))
        same_resources(res, "exit server", base, end)
        await check_freed(res, f"exit server, after {cycles} killed sessions", srv.probe_path, 1)
        res.check(
            "exit server: RSS back near baseline (< +5 MiB)",
            end["rss_kib"] - base["rss_kib"] < 5 * 1024,
            f"{base['rss_kib']} -> {end['rss_kib']} KiB",
        )
    finally:
        res.commands = env.commands
        await env.close()
    return res


def _upstream_busy(port: int, n: int) -> bool:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=2) as r:  # noqa: S310 (loopback)
        return int(json.loads(r.read())["in_flight"]) >= n


def _upstream_stats(port: int) -> dict[str, int]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=2) as r:  # noqa: S310 (loopback)
        data: dict[str, int] = json.loads(r.read())
        return data


# ---------------------------------------------------------------- 2. silent link loss


async def _stack_over_link(
    env: Env, res: Result, srv: Server, *client_extra: str, proxy_control: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Upstream + tunnel client behind an emulated link: in a network namespace of our own
    when possible (client -> veth -> link proxy -> exit server), else behind the link proxy
    on loopback."""
    netns_ok, why = link_mode()
    link = await env.link() if netns_ok else None
    up = await env.upstream(netns=link.cli if link else None)
    proxy, port, control = await env.linkproxy(srv.control, link, proxy_control)
    host = NetnsLink.GW_ADDR if link else "localhost"
    client = await env.client(
        f"wss://{host}:{port}",
        [f"{HOST}=http://127.0.0.1:{up}"],
        *client_extra,
        netns=link.cli if link else None,
        probe=True,
    )
    if link is not None:
        res.notes.append(
            f"link: {link.describe()}; the client reaches the exit server through "
            "reliability/linkproxy.py, whose listening socket lives in the gateway namespace"
        )
    else:
        res.notes.append(f"link: reliability/linkproxy.py on 127.0.0.1 (no network namespaces here: {why})")
    return {"link": link, "proxy": proxy, "control": control, "client": client, "upstream": up}


async def link_loss(short: bool) -> Result:
    res = Result("link-loss", "Silent link loss (no FIN, no RST), then the link heals", "short" if short else "full")
    env = Env.create("linkloss")
    try:
        srv = await env.exit_server(name="exit-server")
        parts = await _stack_over_link(env, res, srv)
        link: NetnsLink | None = parts["link"]
        use_nft = link is not None and NetnsLink.has_nft()
        how = (
            "nftables drop rules in the gateway namespace (input from and output to the client)"
            if use_nft
            else "the link proxy swallowing every byte while keeping both connections open"
        )
        res.notes.append(f"blackhole: {how}")
        client = parts["client"].proc
        await warm(srv)
        base = await settle(srv, 1)
        base_cl = await parts["client"].snapshot()
        rounds = 1 if short else 2
        for rnd in range(rounds):
            tag = f"round {rnd + 1}: " if rounds > 1 else ""
            async with session() as http:
                inflight = [
                    asyncio.create_task(call(http, srv.base, "/slow?ms=120000", "waiting GET")) for _ in range(2)
                ]
                inflight.append(
                    asyncio.create_task(
                        call(http, srv.base, "/slowpost?ms=120000", "waiting POST", method="POST", data=b"p" * 4096)
                    )
                )
                streamers = [
                    asyncio.create_task(
                        call(http, srv.base, "/stream?seconds=120&interval_ms=100", "mid-body GET", marker=b"end\n")
                    )
                    for _ in range(2)
                ]
                await asyncio.sleep(1.5)  # heads sent, streams flowing
                loop = asyncio.get_running_loop()
                t0, wall0 = loop.time(), time.time()
                if use_nft:
                    assert link is not None
                    await asyncio.to_thread(link.blackhole, True)
                else:
                    set_link(parts["control"], parts["proxy"], blackhole=True)
                await asyncio.sleep(2)
                during = asyncio.create_task(call(http, srv.base, "/small", "sent into the dead link"))

                async def server_gone() -> bool:
                    return await srv.tunnels() == 0

                await wait_for(server_gone, 40, 0.1, "exit server noticing")
                t_server = loop.time() - t0
                new = await call(http, srv.base, "/small", "new request")
                t_client_wall, line = await client.wait_line(r"session \S+ ended|no data from peer", 40, wall0)
                t_client = t_client_wall - wall0
                results = await asyncio.wait_for(asyncio.gather(*inflight, *streamers, during), 60)
                if use_nft:
                    assert link is not None
                    await asyncio.to_thread(link.blackhole, False)
                else:
                    set_link(parts["control"], parts["proxy"], blackhole=False)

                async def back() -> bool:
                    return await srv.tunnels() == 1

                t_back = await wait_for(back, 60, 0.1, "client back after heal")
                ok = await call(http, srv.base, "/small", "after heal")
            res.fig(f"{tag}exit server noticed the dead link after", f"{t_server:.1f} s")
            res.fig(
                f"{tag}tunnel client noticed the dead link after", f"{t_client:.1f} s ({line.split(': ', 1)[-1][:90]})"
            )
            res.check(
                f"{tag}both sides notice within 15 s",
                t_server < 15 and t_client < 15,
                f"server {t_server:.1f} s, client {t_client:.1f} s",
            )
            summary = ", ".join(f"{c.label} -> {c.status or '-'} {c.outcome} at {c.t_end - t0:.1f} s" for c in results)
            res.fig(f"{tag}in-flight requests", summary)
            ok_inflight = all(
                (c.status in (502, 504) and c.outcome == "complete")
                if c.label != "mid-body GET"
                else (c.status == 200 and c.outcome == "aborted")
                for c in results
            )
            res.check(
                f"{tag}in-flight requests get 502/504 (waiting for a head) or an aborted body (mid-body)",
                ok_inflight,
                summary,
            )
            res.check(
                f"{tag}a new request once the loss is noticed gets 503 at once",
                new.status == 503 and new.seconds < 0.5,
                f"{new.status} in {ms(new.seconds)}",
            )
            res.fig(f"{tag}link healed -> client registered again", f"{t_back:.1f} s")
            res.check(
                f"{tag}the client reconnects when the link heals (within 30 s), requests succeed",
                t_back < 30 and ok.status == 200,
                f"{t_back:.1f} s, then {ok.status}",
            )
        end = await settle(srv, 1, like=base)
        end_cl = await settle_client(parts["client"], base_cl)
        res.fig("exit server before the loss -> after the reconnect", delta("", base, end).lstrip(": "))
        res.fig("tunnel client before the loss -> after the reconnect", delta("", base_cl, end_cl).lstrip(": "))
        same_resources(res, "exit server", base, end)
        same_resources(res, "tunnel client", base_cl, end_cl)
        await check_freed(res, "exit server", srv.probe_path, 1)
        await check_freed(res, "tunnel client", parts["client"].probe_path, 1)
    finally:
        res.commands = env.commands
        await env.close()
    return res


# ---------------------------------------------------------------- 3. exit server killed and restarted


#: Time allowed, past the backoff cap, for 20 clients' TLS handshakes and registrations with a
#: freshly started exit server on a loaded 2-core machine (measured: under 1 s).
RESTART_REGISTER_MARGIN = 3.0


async def server_restart(short: bool) -> Result:
    res = Result(
        "server-restart", "Exit server killed (SIGKILL) and restarted, 20 clients", "short" if short else "full"
    )
    env = Env.create("restart")
    try:
        from rel_lib import free_port

        ports = (free_port(), free_port(), free_port())
        up = await env.upstream()
        srv = await env.exit_server(probe=False, ports=ports, name="exit-server-0")
        n = 20
        url = f"wss://localhost:{srv.control}"
        # The bound on "back after the restart" follows from the backoff: a client that failed
        # while the server was down sleeps at most --backoff-cap before its next attempt, which
        # then succeeds. With the default cap (30 s) that bound says little, and the attempts a
        # client makes while the server is down are random (full jitter), so the scenario sets
        # the cap explicitly and checks against it (issue 16 item 7: a fixed 5 s failed 3 of 4
        # runs on a 2-core machine).
        cap = 4.0
        bound = cap + RESTART_REGISTER_MARGIN
        backoff = ("--backoff-base", "1", "--backoff-cap", f"{cap:g}")
        clients = [
            await env.client(
                url, [f"{HOST}=http://127.0.0.1:{up}"], *backoff, name=f"client-{i:02d}", wait=False, probe=i == 0
            )
            for i in range(n)
        ]

        async def all_back(server: Server = srv) -> bool:
            return await server.tunnels() == n

        await wait_for(all_back, 60, 0.2, f"{n} clients registered")
        await warm(srv, n)
        await asyncio.sleep(1)
        base_cl = await clients[0].snapshot()
        res.notes.append(
            f"clients run with --backoff-base 1 --backoff-cap {cap:g} (full jitter); each is back within the cap "
            f"plus {RESTART_REGISTER_MARGIN:g} s for the TLS handshake and registration of 20 clients on 2 cores"
        )
        rounds = 1 if short else 3
        spreads, worst_listen, worst_kill = [], [], []
        for rnd in range(rounds):
            t_kill = time.time()
            srv.proc.kill()
            await srv.proc.astop(signal.SIGKILL)
            srv = await env.exit_server(probe=False, ports=ports, name=f"exit-server-{rnd + 1}")
            t_listen = srv.proc.find(r"exit server: public http://")[0][0]

            async def back(server: Server = srv) -> bool:
                return await server.tunnels() == n

            await wait_for(back, 60, 0.1, "every client back")
            first: dict[str, float] = {}
            for t, line in srv.proc.find(r"registered client \S+ instance client-\d+"):
                inst = line.rsplit("instance ", 1)[1].split()[0]
                first.setdefault(inst, t)
            times = sorted(first.values())
            from_listen = [t - t_listen for t in times]
            from_kill = [t - t_kill for t in times]
            spread = times[-1] - times[0]
            crowd = max(sum(1 for u in times if t <= u < t + 0.1) for t in times)
            spreads.append(spread)
            worst_listen.append(max(from_listen))
            worst_kill.append(max(from_kill))
            tag = f"round {rnd + 1}: " if rounds > 1 else ""
            res.fig(f"{tag}new exit server listening after the kill", f"{t_listen - t_kill:.2f} s")
            res.fig(
                f"{tag}reconnect times from the restart (min / median / p90 / max)",
                " / ".join(
                    f"{v:.2f} s"
                    for v in (from_listen[0], pct(from_listen, 0.5), pct(from_listen, 0.9), from_listen[-1])
                ),
            )
            res.fig(f"{tag}reconnect times from the kill (min / max)", f"{from_kill[0]:.2f} s / {from_kill[-1]:.2f} s")
            buckets = [0] * 10
            for v in from_listen:
                buckets[min(9, max(0, int(v / 0.5)))] += 1
            res.fig(f"{tag}clients back per 0.5 s after the restart", " ".join(str(b) for b in buckets))
            res.fig(f"{tag}spread (last - first) / most clients in any 100 ms", f"{spread:.2f} s / {crowd}")
            res.check(f"{tag}all {n} clients back", len(first) == n, f"{len(first)}")
            res.check(
                f"{tag}every client back within the backoff cap + {RESTART_REGISTER_MARGIN:g} s ({bound:g} s) "
                "of the restart",
                max(from_listen) < bound,
                f"max {max(from_listen):.2f} s after the new server listened ({max(from_kill):.2f} s after the kill)",
            )
            res.check(
                f"{tag}reconnects spread by jitter, not all within 100 ms",
                spread > 0.1 and crowd < n,
                f"spread {spread:.2f} s, at most {crowd} of {n} in one 100 ms window",
            )
        async with session() as http:
            c = await call(http, srv.base, "/small")
        res.check("requests succeed after the restart", c.status == 200, c.status)
        end_cl = await settle_client(clients[0], base_cl)
        res.fig("client-00 before the first kill -> after the last reconnect", delta("", base_cl, end_cl).lstrip(": "))
        same_resources(res, "client-00", base_cl, end_cl)
        await check_freed(res, f"client-00, after {rounds} lost sessions", clients[0].probe_path, 1)
    finally:
        res.commands = env.commands
        await env.close()
    return res


# ---------------------------------------------------------------- 4. upstream faults


async def upstream_faults(short: bool) -> Result:
    res = Result("upstream-faults", "Upstream hangs, refuses, resets mid-body", "short" if short else "full")
    env = Env.create("faults")
    try:
        from rel_lib import free_port

        timeout = 3 if short else 5
        up = await env.upstream()
        dead = free_port()  # nothing listens there
        srv = await env.exit_server("--upstream-timeout", str(timeout))
        cl = await env.client(
            f"wss://localhost:{srv.control}",
            [f"{HOST}=http://127.0.0.1:{up}", f"refused.rel.test=http://127.0.0.1:{dead}"],
            probe=True,
        )
        await warm(srv)
        base = await settle(srv, 1)
        base_cl = await cl.snapshot()
        rounds = 2 if short else 5
        per = 5
        got: dict[str, list[Call]] = {"hang": [], "refused": [], "reset (Content-Length)": [], "reset (chunked)": []}
        plans: dict[str, list[tuple[str, str, str]]] = {  # kind -> [(path, label, host)]
            "hang": [("/hang", "hang", HOST)],
            "refused": [("/small", "refused", "refused.rel.test")],
            "reset": [
                ("/reset?n=100000", "reset (Content-Length)", HOST),
                ("/reset?n=100000&chunked=1", "reset (chunked)", HOST),
            ],
        }
        garbage: dict[str, tuple[int, int, int]] = {}  # kind -> (failed, server objects, client objects)
        for kind, plan in plans.items():  # one kind at a time, so garbage is counted per kind
            before_s, before_c = await srv.snapshot(), await cl.snapshot()
            n = 0
            for _ in range(rounds):
                async with session() as http:
                    tasks = [
                        call(http, srv.base, path, label, host=host, timeout=timeout + 20)
                        for path, label, host in plan
                        for _ in range(per)
                    ]
                    for c in await asyncio.gather(*tasks):
                        got[c.label].append(c)
                        n += 1
            await settle(srv, 1, quiet=0.5)
            after_s, after_c = await srv.snapshot(), await cl.snapshot()
            garbage[kind] = (
                n,
                after_s["gc_objects"] - before_s["gc_objects"],
                after_c["gc_objects"] - before_c["gc_objects"],
            )
        hang, refused = got["hang"], got["refused"]
        resets = got["reset (Content-Length)"] + got["reset (chunked)"]
        hs = [c.seconds for c in hang]
        res.fig("--upstream-timeout", f"{timeout} s")
        res.fig(
            "hanging upstream: status / time (min-max)",
            f"{sorted({c.status for c in hang})} / {min(hs):.2f}-{max(hs):.2f} s",
        )
        res.check(
            "a hanging upstream gives 504 at the timeout",
            all(c.status == 504 for c in hang) and timeout <= min(hs) and max(hs) < timeout + 1.5,
            f"{len(hang)} x {sorted({c.status for c in hang})} in {min(hs):.2f}-{max(hs):.2f} s",
        )
        rs = [c.seconds for c in refused]
        res.fig("refusing upstream: status / time (max)", f"{sorted({c.status for c in refused})} / {ms(max(rs))}")
        res.check(
            "a refusing upstream gives 502 at once",
            all(c.status == 502 for c in refused) and max(rs) < 0.5,
            f"{len(refused)} x {sorted({c.status for c in refused})}, max {ms(max(rs))}",
        )
        outcomes = sorted({f"{c.status} {c.outcome}" for c in resets})
        res.fig(
            "upstream reset mid-body: caller sees",
            f"{outcomes}; bytes before the abort "
            f"{min(c.nbytes for c in resets)}-{max(c.nbytes for c in resets)} of 1 MiB announced / chunked",
        )
        res.check(
            "an upstream reset mid-body gives an aborted body (never presented as complete)",
            all(c.status == 200 and c.outcome == "aborted" for c in resets),
            outcomes,
        )

        def hanging_gone() -> bool:
            return _upstream_stats(up)["hanging"] == 0

        try:
            t_cancel = await wait_for(hanging_gone, 10, 0.1, "upstream calls cancelled")
            res.check(
                "the upstream call is cancelled after a 504 (upstream sees the caller leave)",
                True,
                f"0 hanging at the upstream {t_cancel:.1f} s after the last 504",
            )
        except TimeoutError:
            res.check(
                "the upstream call is cancelled after a 504 (upstream sees the caller leave)",
                False,
                f"{_upstream_stats(up)['hanging']} still hanging",
            )
        end = await settle(srv, 1, like=base)
        end_cl = await cl.snapshot()
        for _ in range(40):
            if end_cl["fds_other"] <= base_cl["fds_other"] and end_cl["tasks"] <= base_cl["tasks"]:
                break
            await asyncio.sleep(0.25)
            end_cl = await cl.snapshot()
        res.fig("exit server before -> after", delta("", base, end).lstrip(": "))
        res.fig("tunnel client before -> after", delta("", base_cl, end_cl).lstrip(": "))
        same_resources(res, "exit server", base, end)
        same_resources(res, "tunnel client", base_cl, end_cl)
        res.fig(
            "objects left for the cyclic GC per failed request (exit server / tunnel client)",
            ", ".join(f"{kind} {s / n:+.1f} / {c / n:+.1f}" for kind, (n, s, c) in garbage.items()),
        )
        for kind, (n, s, c) in garbage.items():
            bound = 50 if kind == "refused" else 5  # refused: see the note
            res.check(
                f"{kind}: failed requests leave no garbage cycles (GC-tracked objects, no collection forced,"
                f" < {bound} per request)",
                s < bound * n and c < bound * n,
                f"exit server {s:+d}, tunnel client {c:+d} after {n} requests",
            )
        res.notes.append(
            "refused: about 30 objects per request stay for the cyclic GC in the tunnel client, all in "
            "aiohttp's connector and aiohappyeyeballs (the connect errors are kept in lists their own "
            "tracebacks reference; python/cpython#124858 is the same pattern in asyncio); no Backhaul "
            "frame is among them since tunnel_client/upstream.py drops its exception's traceback"
        )
        for who, b, e in (("exit server", base, end), ("tunnel client", base_cl, end_cl)):
            res.check(
                f"{who}: RSS back near baseline (< +4 MiB)",
                e["rss_kib"] - b["rss_kib"] < 4096,
                f"{b['rss_kib']} -> {e['rss_kib']} KiB",
            )
    finally:
        res.commands = env.commands
        await env.close()
    return res


# ---------------------------------------------------------------- 5. degraded link


async def degraded_link(short: bool) -> Result:
    res = Result(
        "degraded-link", "Degraded link: 200 ms +- 50 ms each way, then also 2 Mbit/s", "short" if short else "full"
    )
    env = Env.create("degraded")
    try:
        srv = await env.exit_server(name="exit-server")
        parts = await _stack_over_link(env, res, srv)
        link: NetnsLink | None = parts["link"]
        client = parts["client"].proc
        await warm(srv)
        seconds = 6 if short else 70
        use_tbf = link is not None and NetnsLink.has_tbf()
        phases = [
            ("latency", {"delay_ms": 200, "jitter_ms": 50}, None),
            ("latency + 2 Mbit/s", {"delay_ms": 200, "jitter_ms": 50}, 2000),
        ]
        regs0 = int((await srv.metrics()).get("backhaul_tunnel_registrations_total", 0))
        wall0 = time.time()
        for name, delay, kbit in phases:
            set_link(parts["control"], parts["proxy"], **delay, **({"rate_kbit": kbit} if kbit and not use_tbf else {}))
            if kbit and use_tbf:
                assert link is not None
                await asyncio.to_thread(link.rate, kbit)
            how = ("tc tbf on both veth ends" if use_tbf else "the link proxy's token bucket") if kbit else ""
            res.fig(
                f"{name}: emulation",
                f"delay {delay['delay_ms']} +- {delay['jitter_ms']} ms each way in the "
                f"link proxy" + (f", {kbit} kbit/s by {how}" if kbit else ""),
            )
            stats = await _degraded_phase(srv, seconds, big=bool(kbit))
            res.fig(f"{name}: requests over {seconds} s", stats["summary"])
            res.fig(f"{name}: heartbeat RTT seen by the exit server", stats["rtt"])
            if kbit:
                res.fig(f"{name}: 256 KiB download throughput (median)", stats["throughput"])
            res.check(
                f"{name}: every request succeeds",
                stats["failed"] == 0 and stats["ok"] > 0,
                f"{stats['ok']} ok, {stats['failed']} failed {stats['errors'][:3]}",
            )
            res.check(
                f"{name}: the tunnel stays up the whole time (polled every 0.5 s)",
                stats["min_tunnels"] == 1,
                f"min tunnels_connected {stats['min_tunnels']}",
            )
        if use_tbf and link is not None:
            await asyncio.to_thread(link.rate, None)
        regs = int((await srv.metrics()).get("backhaul_tunnel_registrations_total", 0))
        ended = client.find(r"session \S+ ended|no data from peer|reconnecting", wall0)
        res.check(
            "no false disconnects: no new registration, no session end in the client's log",
            regs == regs0 and not ended,
            f"registrations {regs0} -> {regs}, client log: {len(ended)} lines",
        )
    finally:
        res.commands = env.commands
        await env.close()
    return res


async def _degraded_phase(srv: Server, seconds: float, big: bool) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    lat: dict[str, list[float]] = {}
    errors: list[str] = []
    ok = 0
    min_tunnels = 99
    rtts: list[float] = []
    throughput: list[float] = []
    upload = os.urandom(32 * 1024)
    plan = [("small", "/small", 100), ("64 KiB", "/download?n=65536", 65536)]
    if big:
        plan.append(("256 KiB", "/download?n=262144", 262144))

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal ok
        i = 0
        while loop.time() < end and i < 10_000:
            i += 1
            for label, path, size in plan + [("upload 32 KiB", "POST", 0)]:
                if loop.time() >= end:
                    break
                if path == "POST":
                    c = await call(http, srv.base, "/upload", label, method="POST", data=upload, timeout=60)
                    good = c.status == 200 and c.outcome == "complete"
                else:
                    c = await call(http, srv.base, path, label, timeout=60)
                    good = c.status == 200 and c.outcome == "complete" and c.nbytes == size
                if good:
                    ok += 1
                    lat.setdefault(label, []).append(c.seconds)
                    if size == 262144:
                        throughput.append(size / c.seconds)
                else:
                    errors.append(f"{label}: {c.status} {c.outcome} {c.error}")

    async def sse(http: aiohttp.ClientSession) -> None:
        nonlocal ok
        while loop.time() < end - 3:
            t0 = loop.time()
            c = await call(
                http, srv.base, "/sse?seconds=3&interval_ms=100", "sse 3 s", timeout=60, marker=b"data: {}\n\n"
            )
            if c.status == 200 and c.outcome == "complete":
                ok += 1
                lat.setdefault("sse 3 s", []).append(loop.time() - t0)
            else:
                errors.append(f"sse: {c.status} {c.outcome} {c.error}")

    async def monitor() -> None:
        nonlocal min_tunnels
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as admin:
            while loop.time() < end:
                min_tunnels = min(min_tunnels, await srv.tunnels())
                with contextlib.suppress(aiohttp.ClientError, KeyError, IndexError, TypeError):
                    async with admin.get(f"http://127.0.0.1:{srv.admin}/api/tunnels", headers=headers) as r:
                        rtt = (await r.json())["tunnels"][0]["rtt_ms"]
                        if rtt is not None:
                            rtts.append(float(rtt))
                await asyncio.sleep(0.5)

    async with session() as http:
        await asyncio.gather(worker(http), worker(http), sse(http), monitor())
    summary = ", ".join(f"{k} {len(v)} (p50 {ms(pct(v, 0.5))}, p95 {ms(pct(v, 0.95))})" for k, v in lat.items())
    return {
        "ok": ok,
        "failed": len(errors),
        "errors": errors,
        "min_tunnels": min_tunnels,
        "summary": f"{ok} ok, {len(errors)} failed; {summary}",
        "rtt": (f"{min(rtts):.0f}-{max(rtts):.0f} ms (median {statistics.median(rtts):.0f} ms)" if rtts else "n/a"),
        "throughput": (f"{statistics.median(throughput) * 8 / 1000:.0f} kbit/s" if throughput else "n/a"),
    }


# ---------------------------------------------------------------- 6. overload


async def overload(short: bool) -> Result:
    res = Result("overload", "Overload: ten times the stream limit at once", "short" if short else "full")
    env = Env.create("overload")
    try:
        limit = 10 if short else 20
        burst = 10 * limit
        bursts = 3 if short else 10
        up = await env.upstream()
        srv = await env.exit_server("--max-streams", str(limit))
        await env.client(f"wss://localhost:{srv.control}", [f"{HOST}=http://127.0.0.1:{up}"])
        await warm(srv)
        base = await settle(srv, 1)
        peak = base["rss_kib"]
        sampling = True

        async def sampler() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, proc_stats(srv.proc.pid)["rss_kib"])
                await asyncio.sleep(0.05)

        sample_task = asyncio.create_task(sampler())
        after: list[int] = []
        fast: list[float] = []
        slow: list[float] = []
        bad: list[str] = []
        counts = {"200": 0, "503": 0}
        for b in range(bursts):
            async with session() as http:
                calls = await asyncio.gather(*(call(http, srv.base, "/slow?ms=1500", timeout=20) for _ in range(burst)))
            n200 = sum(c.status == 200 for c in calls)
            refused = [c for c in calls if c.status == 503]
            counts["200"] += n200
            counts["503"] += len(refused)
            fast += [c.seconds for c in refused]
            slow += [c.seconds for c in calls if c.status == 200]
            if n200 != limit or len(refused) != burst - limit:
                bad.append(
                    f"burst {b}: {n200} x 200, {len(refused)} x 503, {sorted({(c.status, c.outcome) for c in calls})}"
                )
            if any(c.retry_after is None for c in refused):
                bad.append(f"burst {b}: a 503 without Retry-After")
            await settle(srv, 1, quiet=0.3)
            after.append(proc_stats(srv.proc.pid)["rss_kib"])
        sampling = False
        await sample_task
        end = await settle(srv, 1, like=base)
        res.fig("--max-streams / requests at once / bursts", f"{limit} / {burst} / {bursts}")
        res.fig("answers", f"{counts['200']} x 200 (after the upstream's 1.5 s), {counts['503']} x 503")
        res.fig("503 latency p50 / p99 / max", f"{ms(pct(fast, 0.5))} / {ms(pct(fast, 0.99))} / {ms(max(fast))}")
        res.fig("200 latency max", ms(max(slow)))
        res.fig(
            "exit server RSS: baseline / peak / after each burst (KiB)",
            f"{base['rss_kib']} / {peak} / {' '.join(map(str, after))}",
        )
        res.check(
            "exactly the limit is served, the rest get 503 with Retry-After",
            not bad,
            "; ".join(bad) or f"{bursts} bursts as expected",
        )
        res.check("the 503s are fast (p99 < 500 ms)", pct(fast, 0.99) < 0.5, ms(pct(fast, 0.99)))
        res.check(
            "never a hang (every request answered, the slowest within 5 s)",
            max(fast + slow) < 5 and counts["200"] + counts["503"] == burst * bursts,
            ms(max(fast + slow)),
        )
        growth = after[-1] - after[0]
        res.check(
            "memory bounded: peak < baseline + 64 MiB, no growth from the first burst to the last (< 4 MiB)",
            peak - base["rss_kib"] < 64 * 1024 and growth < 4096,
            f"peak +{(peak - base['rss_kib']) / 1024:.1f} MiB, first->last burst {growth:+d} KiB",
        )
        same_resources(res, "exit server", base, end)
    finally:
        res.commands = env.commands
        await env.close()
    return res


# ---------------------------------------------------------------- 7. soak

LOCUST = ROOT / ".venv-load" / "bin" / "locust"


async def soak(short: bool, load: str = "auto") -> Result:
    duration = 32 if short else 600
    period = 15 if short else 60
    warmup = 5 if short else 30
    use_locust = load == "locust" or (load == "auto" and not short and LOCUST.exists())
    res = Result(
        "soak",
        f"Soak: {duration // 60 if duration >= 60 else duration}{' min' if duration >= 60 else ' s'} "
        f"of mixed load, a client restarted every {period} s",
        "short" if short else "full",
    )
    env = Env.create("soak")
    try:
        up = await env.upstream()
        srv = await env.exit_server()
        url = f"wss://localhost:{srv.control}"
        routes = [f"{HOST}=http://127.0.0.1:{up}"]
        steady = await env.client(url, routes, "--drain-timeout", "10", name="client-steady", probe=True)
        churn = await env.client(
            url, routes, "--drain-timeout", "10", name="client-churn-0", instance="churn", probe=True
        )
        warm_out = env.workdir / "warmup.json"
        proc = env.spawn(
            "loadgen-warmup",
            [
                PY,
                str(HERE / "loadgen.py"),
                "--url",
                srv.base,
                "--host",
                HOST,
                "--concurrency",
                "8",
                "--duration",
                str(warmup),
                "--out",
                str(warm_out),
            ],
            record=False,
        )
        await asyncio.to_thread(proc.popen.wait, warmup + 60)
        base = await settle(srv, 2)
        base_steady = await steady.snapshot()
        res.fig(
            "load",
            (
                "locust (.venv-load) with tests/load/locustfile.py: 100 B GET, 100 KiB upload, "
                "1 MiB download, 2 s SSE, WebSocket session (10 echoed messages), every answer checked; "
                "20 users"
            )
            if use_locust
            else "reliability/loadgen.py in its own process (100 B GET, 100 KiB upload, 1 MiB download, 2 s SSE; "
            "16 workers)",
        )
        out = env.workdir / "soak.json"
        if use_locust:
            prefix = env.workdir / "locust"
            load_proc = env.spawn(
                "locust",
                [
                    str(LOCUST),
                    "-f",
                    str(ROOT / "tests/load/locustfile.py"),
                    "--headless",
                    "-u",
                    "20",
                    "-r",
                    "10",
                    "--run-time",
                    f"{duration}s",
                    "--stop-timeout",
                    "10",
                    "--host",
                    srv.base,
                    "--csv",
                    str(prefix),
                    "--only-summary",
                ],
                env={"LOAD_HOST_HEADER": HOST, "LOAD_P95_MS": "60000", "LOAD_FAIL_RATIO": "0"},
            )
        else:
            load_proc = env.spawn(
                "loadgen",
                [
                    PY,
                    str(HERE / "loadgen.py"),
                    "--url",
                    srv.base,
                    "--host",
                    HOST,
                    "--concurrency",
                    "16",
                    "--duration",
                    str(duration),
                    "--out",
                    str(out),
                ],
            )
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        series: list[dict[str, Any]] = []
        restarts: list[str] = []
        step = 2 if short else 5

        async def sample() -> None:
            while load_proc.alive() and loop.time() - t0 < duration + 120:
                snap = await srv.snapshot()
                st = await steady.snapshot()
                series.append(
                    {
                        "t": round(loop.time() - t0, 1),
                        "rss": snap["rss_kib"],
                        "fds": snap["fds"],
                        "tasks": snap["tasks"],
                        "streams": snap["streams"],
                        "tunnels": snap["tunnels"],
                        "steady_rss": st["rss_kib"],
                        "steady_fds": st["fds"],
                        "steady_pool": st["upstream_conns"],
                        "steady_tasks": st["tasks"],
                    }
                )
                await asyncio.sleep(step)

        async def churner() -> None:
            nonlocal churn
            n = 0
            while (n + 1) * period < duration and n < 100:
                await asyncio.sleep(max(0.0, t0 + (n + 1) * period - loop.time()))
                n += 1
                t_stop = loop.time()
                code = await churn.proc.astop(signal.SIGTERM, 30)
                drained = loop.time() - t_stop
                churn = await env.client(
                    url, routes, "--drain-timeout", "10", name=f"client-churn-{n}", instance="churn", probe=True
                )
                restarts.append(
                    f"{loop.time() - t0:.0f}s: exit {code} after {drained:.1f}s drain, "
                    f"back after {loop.time() - t_stop:.1f}s"
                )

        sampler = asyncio.create_task(sample())
        await churner()
        await asyncio.to_thread(load_proc.popen.wait, duration + 120)
        await sampler
        end = await settle(srv, 2, like=base)
        end_steady = await steady.snapshot()
        for _ in range(20):
            if end_steady["fds_other"] <= base_steady["fds_other"] and end_steady["tasks"] <= base_steady["tasks"]:
                break
            await asyncio.sleep(0.25)
            end_steady = await steady.snapshot()
        if use_locust:
            load_result = _locust_result(env.workdir / "locust", load_proc.popen.returncode)
        else:
            load_result = json.loads(out.read_text())
        res.data = {"series": series, "load": {k: v for k, v in load_result.items() if k != "errors"}}
        res.fig("duration / restarts of client-churn", f"{duration} s / {len(restarts)} (SIGTERM, drain, start again)")
        res.fig("restarts", "; ".join(restarts))
        res.fig(
            "requests",
            f"{load_result['requests']} ({load_result['requests'] / duration:.0f}/s), {load_result['failed']} failed",
        )
        if load_result.get("by_kind"):
            res.fig(
                "latency p50 / p95 per kind",
                ", ".join(
                    f"{k} {v['p50_ms']}/{v['p95_ms']} ms" for k, v in load_result["by_kind"].items() if v.get("p50_ms")
                ),
            )
        rss_growth = (end["rss_kib"] - base["rss_kib"]) / base["rss_kib"]
        st_growth = (end_steady["rss_kib"] - base_steady["rss_kib"]) / base_steady["rss_kib"]
        under = [s for s in series if s["t"] > 5]
        res.fig("exit server idle before -> after", delta("", base, end).lstrip(": "))
        res.fig("client-steady idle before -> after", delta("", base_steady, end_steady).lstrip(": "))
        if under:
            res.fig(
                "exit server under load: RSS min-max (KiB) / fds min-max / tasks min-max",
                f"{min(s['rss'] for s in under)}-{max(s['rss'] for s in under)} / "
                f"{min(s['fds'] for s in under)}-{max(s['fds'] for s in under)} / "
                f"{min(s['tasks'] for s in under)}-{max(s['tasks'] for s in under)}",
            )
            third = max(1, len(under) // 3)
            first_rss = statistics.mean(s["rss"] for s in under[:third])
            last_rss = statistics.mean(s["rss"] for s in under[-third:])
            res.fig(
                "exit server RSS under load: mean of first third -> last third",
                f"{first_rss:.0f} -> {last_rss:.0f} KiB ({(last_rss - first_rss) / first_rss:+.1%})",
            )
        errors = load_result.get("errors", [])
        res.check(
            "zero unexpected errors",
            load_result["failed"] == 0 and load_result["requests"] > 0,
            f"{load_result['failed']} of {load_result['requests']} {errors[:3]}",
        )
        res.check("client restarts happened", len(restarts) >= (2 if short else 9), len(restarts))
        res.check(
            "exit server RSS growth under 10% (idle after warm-up -> idle after the soak)",
            rss_growth < 0.10,
            f"{base['rss_kib']} -> {end['rss_kib']} KiB ({rss_growth:+.1%})",
        )
        res.check(
            "client-steady RSS growth under 10%",
            st_growth < 0.10,
            f"{base_steady['rss_kib']} -> {end_steady['rss_kib']} KiB ({st_growth:+.1%})",
        )
        same_resources(res, "exit server", base, end)
        same_resources(res, "client-steady", base_steady, end_steady)
        await check_freed(res, f"exit server, after {len(restarts)} client restarts", srv.probe_path, 2)
        if not short:  # the pool empties after aiohttp's 30 s keep-alive: then the total count is back too
            await asyncio.sleep(35)
            later = await steady.snapshot()
            res.fig(
                "client-steady 35 s later (upstream keep-alive expired)",
                f"fds {later['fds']}, of which upstream keep-alive {later['upstream_conns']} (idle baseline "
                f"before the soak: {base_steady['fds']}, of which {base_steady['upstream_conns']})",
            )
    finally:
        res.commands = env.commands
        await env.close()
    return res


def _locust_result(prefix: Path, code: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"requests": 0, "failed": 0, "errors": [], "by_kind": {}, "locust_exit": code}
    with open(f"{prefix}_stats.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["Name"] == "Aggregated":
                out["requests"] = int(row["Request Count"])
                out["failed"] = int(row["Failure Count"])
            elif row["Type"] != "SSE":
                out["by_kind"][row["Name"]] = {"p50_ms": row["50%"], "p95_ms": row["95%"]}
    with contextlib.suppress(OSError), open(f"{prefix}_failures.csv", newline="") as fh:
        out["errors"] = [f"{r['Method']} {r['Name']}: {r['Error']} x{r['Occurrences']}" for r in csv.DictReader(fh)]
    return out


# ---------------------------------------------------------------- 8. slow readers


async def _slow_reader(port: int, rate: int, stop: asyncio.Event, got_head: list[int]) -> int:
    """Download 1 GiB at ``rate`` bytes/s through a small receive buffer until ``stop``."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
    total = 0
    try:
        writer.write(f"GET /download?n={1 << 30} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        got_head.append(int(head.split(b" ", 2)[1]))
        step, tick = rate // 10, 0.1
        while not stop.is_set():
            data = await reader.read(step)
            if not data:
                break
            total += len(data)
            await asyncio.sleep(tick)  # the pace of a slow caller, not a synchronisation
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.transport.abort()
    return total


async def _probe_latencies(srv: Server, workers: int, seconds: float) -> tuple[list[float], int]:
    """``workers`` callers fetching /small back to back for ``seconds``: latencies, failures."""
    latencies: list[float] = []
    failures = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def worker() -> None:
        nonlocal failures
        async with session() as http:
            while loop.time() < end:
                c = await call(http, srv.base, "/small", timeout=30)
                if c.status == 200 and c.outcome == "complete":
                    latencies.append(c.seconds)
                else:
                    failures += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return latencies, failures


async def slow_readers(short: bool) -> Result:
    """Issue 24 item 4: callers reading a 1 GiB download at 20 KiB/s must cost only their own
    streams; other callers on the same tunnel keep their latency."""
    res = Result("slow-readers", "Slow readers on one tunnel beside normal callers", "short" if short else "full")
    env = Env.create("slow-readers")
    readers = int(os.environ.get("RELIABILITY_SLOW_READERS", 60 if short else 300))
    phase = 5.0 if short else 20.0
    after_wait = 12.0 if short else 30.0  # the processes look at their free heap every 10 s
    rate = 20 * 1024
    try:
        up = await env.upstream()
        srv = await env.exit_server()
        client = await env.client(f"wss://localhost:{srv.control}", [f"{HOST}=http://127.0.0.1:{up}"])
        await warm(srv)
        base_srv = await settle(srv, 1)
        base_cli = proc_stats(client.proc.pid)
        baseline, base_fail = await _probe_latencies(srv, 10, phase)
        stop = asyncio.Event()
        heads: list[int] = []
        slow = [asyncio.create_task(_slow_reader(srv.public, rate, stop, heads)) for _ in range(readers)]
        await wait_for(lambda: len(heads) >= readers, 60, 0.1, "every slow reader has its response head")
        await asyncio.sleep(2.0)  # let every slow stream fill its buffers: the state under test
        peak_srv = peak_cli = 0
        sampling = True

        async def sampler() -> None:
            nonlocal peak_srv, peak_cli
            while sampling:
                peak_srv = max(peak_srv, proc_stats(srv.proc.pid)["rss_kib"])
                peak_cli = max(peak_cli, proc_stats(client.proc.pid)["rss_kib"])
                await asyncio.sleep(0.1)

        sample_task = asyncio.create_task(sampler())
        during, during_fail = await _probe_latencies(srv, 10, phase)
        sampling = False
        await sample_task
        stop.set()
        read = await asyncio.gather(*slow)
        end_srv = await settle(srv, 1, timeout=30, quiet=after_wait)
        end_cli = proc_stats(client.proc.pid)
        p99_base, p99_during = pct(baseline, 0.99), pct(during, 0.99)
        res.fig("slow readers (1 GiB each, read at 20 KiB/s) / probe callers", f"{readers} / 10")
        res.fig(
            "probe latency p50 / p99 without slow readers",
            f"{ms(pct(baseline, 0.5))} / {ms(p99_base)} ({len(baseline)} requests)",
        )
        res.fig(
            "probe latency p50 / p99 / max beside them",
            f"{ms(pct(during, 0.5))} / {ms(p99_during)} / {ms(max(during))} ({len(during)} requests)",
        )
        res.fig("bytes the slow readers took", f"{sum(read) / readers / 1024:.0f} KiB each on average")
        mib = 1024.0
        res.fig(
            "exit server RSS: before / peak with slow readers / after (MiB)",
            f"{base_srv['rss_kib'] / mib:.1f} / {peak_srv / mib:.1f} / {end_srv['rss_kib'] / mib:.1f}",
        )
        res.fig(
            "client RSS: before / peak with slow readers / after (MiB)",
            f"{base_cli['rss_kib'] / mib:.1f} / {peak_cli / mib:.1f} / {end_cli['rss_kib'] / mib:.1f}",
        )
        per_srv = (peak_srv - base_srv["rss_kib"]) / readers
        per_cli = (peak_cli - base_cli["rss_kib"]) / readers
        res.fig("memory per slow stream: exit server / client (KiB)", f"{per_srv:.0f} / {per_cli:.0f}")
        res.check("every probe answered 200", not base_fail and not during_fail, f"{base_fail} + {during_fail} failed")
        res.check(
            "probe p99 beside slow readers within 2x the baseline (floor 20 ms)",
            p99_during <= 2 * max(p99_base, 0.010),
            f"{ms(p99_during)} vs {ms(p99_base)}",
        )
        res.check(
            "memory after the slow readers left: within 32 MiB of before, both processes",
            end_srv["rss_kib"] - base_srv["rss_kib"] < 32 * 1024
            and end_cli["rss_kib"] - base_cli["rss_kib"] < 32 * 1024,
            f"exit server {(end_srv['rss_kib'] - base_srv['rss_kib']) / mib:+.1f} MiB, "
            f"client {(end_cli['rss_kib'] - base_cli['rss_kib']) / mib:+.1f} MiB",
        )
    finally:
        res.commands = env.commands
        await env.close()
    return res


SCENARIOS: dict[str, Callable[[bool], Awaitable[Result]]] = {
    "kill-client": kill_client,
    "link-loss": link_loss,
    "server-restart": server_restart,
    "upstream-faults": upstream_faults,
    "degraded-link": degraded_link,
    "overload": overload,
    "soak": soak,
    "slow-readers": slow_readers,
}
