"""A TCP relay standing in for the network between a tunnel client and the exit server.

    python reliability/linkproxy.py --listen HOST:PORT --target 127.0.0.1:PORT [--netns NAME]
                                    [--control FILE] [--port-file FILE]

* ``--netns NAME``: the listening socket is created inside that network namespace (one of ours,
  see rel_lib.NetnsLink), the connections to ``--target`` in the namespace the relay was started
  in. So a client in another namespace reaches a loopback-only exit server across a veth pair
  that ``nft`` and ``tc`` can act on.
* ``--control FILE``: JSON re-read on SIGHUP, every key optional:
  ``{"delay_ms": 200, "jitter_ms": 50, "rate_kbit": 2000, "blackhole": false}``.
  ``delay_ms``/``jitter_ms``: every chunk is held ``delay +- uniform(jitter)`` ms, in order, in
  both directions (the kernel here has no netem). ``rate_kbit``: a token bucket per direction.
  ``blackhole``: stop forwarding silently (no FIN, no RST; new connections are accepted and then
  ignored); turning it off forgets (resets) every connection that lived through the blackhole,
  as a NAT that lost its state would, and forwards new ones again.

Buffering is bounded per direction (256 KiB plus one bandwidth-delay product), so the relay
never hides backpressure from the sender.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import signal
import socket
from collections import deque
from pathlib import Path

CLONE_NEWNET = 0x40000000


class Params:
    delay_ms = 0.0
    jitter_ms = 0.0
    rate_kbit = 0.0
    blackhole = False


P = Params()


def listen_socket(host: str, port: int, netns: str | None) -> socket.socket:
    """A listening socket, created inside ``netns`` when given (setns on this thread, then back)."""
    if netns is None:
        sock = socket.create_server((host, port), reuse_port=False, backlog=512)
        sock.setblocking(False)
        return sock
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
        try:
            sock = socket.create_server((host, port), backlog=512)
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)
    sock.setblocking(False)
    return sock


class Pair:
    """One relayed connection: two directions, each with its own delay line."""

    def __init__(self, relay: Relay, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        self.relay = relay
        self.down_r, self.down_w = down_r, down_w
        self.up_w: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.stale = P.blackhole  # born during a blackhole: never forwarded

    def abort(self) -> None:
        for w in (self.down_w, self.up_w):
            if w is not None:
                w.transport.abort()
        for t in self.tasks:
            t.cancel()

    async def run(self, target: tuple[str, int]) -> None:
        if self.stale:
            return  # held open, silent, until heal() resets it
        try:
            up_r, self.up_w = await asyncio.open_connection(*target)
        except OSError:
            self.down_w.transport.abort()
            return
        loop = asyncio.get_running_loop()
        self.tasks = [
            loop.create_task(self._direction(self.down_r, self.up_w)),
            loop.create_task(self._direction(up_r, self.down_w)),
        ]
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _direction(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: deque[tuple[float, bytes]] = deque()
        queued = 0
        ready = asyncio.Event()
        room = asyncio.Event()
        room.set()
        eof = False

        def limit() -> int:
            bdp = int(P.rate_kbit * 125 * (P.delay_ms + P.jitter_ms) / 1000) if P.rate_kbit else 0
            return 256 * 1024 + bdp

        async def reader() -> None:
            nonlocal queued, eof
            last = 0.0
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    if P.blackhole:
                        self.stale = True
                        continue  # swallowed
                    jitter = random.uniform(-P.jitter_ms, P.jitter_ms) if P.jitter_ms else 0.0
                    release = max(last, loop.time() + max(0.0, P.delay_ms + jitter) / 1000)
                    last = release
                    queue.append((release, data))
                    queued += len(data)
                    ready.set()
                    if queued > limit():
                        room.clear()
                        await room.wait()
            except (ConnectionError, OSError):
                pass
            eof = True
            ready.set()

        read_task = loop.create_task(reader())
        tokens = 0.0
        stamp = loop.time()
        try:
            while True:
                if not queue:
                    if eof:
                        break
                    ready.clear()
                    await ready.wait()
                    continue
                release, data = queue[0]
                wait = release - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if P.rate_kbit:
                    rate = P.rate_kbit * 125.0  # bytes per second
                    now = loop.time()
                    tokens = min(tokens + (now - stamp) * rate, 16 * 1024)
                    stamp = now
                    if tokens < len(data):
                        await asyncio.sleep((len(data) - tokens) / rate)
                        tokens = 0.0
                        stamp = loop.time()
                    else:
                        tokens -= len(data)
                else:
                    stamp = loop.time()
                queue.popleft()
                queued -= len(data)
                if queued <= limit():
                    room.set()
                if P.blackhole or self.stale:
                    self.stale = True
                    continue
                dst.write(data)
                await dst.drain()
            if not (P.blackhole or self.stale):
                with contextlib.suppress(OSError, RuntimeError):
                    dst.write_eof()
        except (ConnectionError, OSError):
            if not (P.blackhole or self.stale):
                self.abort()
        finally:
            read_task.cancel()


class Relay:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.pairs: set[Pair] = set()

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pair = Pair(self, reader, writer)
        self.pairs.add(pair)
        try:
            await pair.run(self.target)
            if pair.stale:
                await asyncio.Event().wait()  # keep it open until heal() aborts it
        finally:
            self.pairs.discard(pair)
            if not pair.stale:
                writer.close()

    def heal(self) -> None:
        for pair in list(self.pairs):
            if pair.stale:
                pair.abort()


def load_control(path: Path | None, relay: Relay) -> None:
    if path is None or not path.exists():
        return
    data = json.loads(path.read_text() or "{}")
    was_blackhole = P.blackhole
    P.delay_ms = float(data.get("delay_ms", 0))
    P.jitter_ms = float(data.get("jitter_ms", 0))
    P.rate_kbit = float(data.get("rate_kbit", 0))
    P.blackhole = bool(data.get("blackhole", False))
    if P.blackhole:
        for pair in relay.pairs:
            pair.stale = True
    elif was_blackhole:
        relay.heal()
    print(
        f"linkproxy: delay {P.delay_ms:g}+-{P.jitter_ms:g} ms, rate {P.rate_kbit:g} kbit/s, blackhole {P.blackhole}",
        flush=True,
    )


async def main_async(args: argparse.Namespace) -> None:
    host, _, port = args.listen.rpartition(":")
    thost, _, tport = args.target.rpartition(":")
    if thost not in ("127.0.0.1", "localhost"):
        raise SystemExit("linkproxy: the target must be on loopback")
    relay = Relay((thost, int(tport)))
    control = Path(args.control) if args.control else None
    load_control(control, relay)
    sock = listen_socket(host, int(port), args.netns)
    server = await asyncio.start_server(relay.accept, sock=sock)
    bound = sock.getsockname()[1]
    if args.port_file:
        Path(args.port_file).write_text(str(bound))
    print(f"linkproxy: {host}:{bound}{' in netns ' + args.netns if args.netns else ''} -> {args.target}", flush=True)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, load_control, control, relay)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    for pair in list(relay.pairs):
        pair.abort()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--netns")
    parser.add_argument("--control")
    parser.add_argument("--port-file")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
