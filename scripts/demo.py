"""`make demo`: an exit server, a demo upstream and a tunnel client on loopback, one request
through the tunnel, then wait for Ctrl-C and stop everything cleanly.

    python scripts/demo.py          # interactive (Ctrl-C to stop)
    python scripts/demo.py --once   # exit after the first request (used by the tests)
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import typing
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

#: The demo's upstream: binds a free port itself and prints it, then serves.
UPSTREAM = """
import socket
from aiohttp import web
async def hello(request):
    return web.Response(text=f"Hello from the on-prem container! You asked for {request.path_qs} "
                             f"on {request.host} (via {request.headers.get('X-Forwarded-For', '?')})\\n")
app = web.Application()
app.router.add_route("*", "/{tail:.*}", hello)
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(128)  # connections queue from here on; run_app serves them
print(f"upstream port {sock.getsockname()[1]}", flush=True)
web.run_app(app, sock=sock, print=None)
"""

#: The exit server's start-up line (exit_server/__main__.py) with the ports it bound.
ANNOUNCED = re.compile(r"public port (\d+), control port (\d+), admin port (\d+)")


def ports_of(proc: subprocess.Popen[str], pattern: re.Pattern[str], what: str, timeout: float = 30) -> list[int]:
    """The ports ``proc`` printed on its stdout (each process binds port 0 and says what it
    got: no port is picked here and released for another process to take). The rest of its
    stdout is passed on to ours."""
    assert proc.stdout is not None
    found: list[list[int]] = []
    done = threading.Event()

    def pump(stream: typing.IO[str]) -> None:
        for line in stream:
            match = pattern.search(line)
            if match and not found:
                found.append([int(group) for group in match.groups()])
                done.set()
            print(line, end="", flush=True)
        done.set()

    threading.Thread(target=pump, args=(proc.stdout,), daemon=True).start()
    done.wait(timeout)
    if not found:
        raise SystemExit(f"demo: {what} did not start (exit status {proc.poll()})")
    return found[0]


def fetch(url: str, host: str) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310 (loopback)
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after the first request")
    args = parser.parse_args()
    work = ROOT / ".demo"
    certs = work / "certs"
    work.mkdir(exist_ok=True)
    if not (certs / "server.pem").exists():
        subprocess.run(
            [
                str(BIN / "exit-server"),
                "gen-certs",
                "--out",
                str(certs),
                "--hostname",
                "localhost",
                "--ip",
                "127.0.0.1",
            ],
            check=True,
        )
    token = work / "token"
    token.write_text(secrets.token_urlsafe(32) + "\n")
    token.chmod(0o600)
    admin_token = work / "admin-token"
    admin_token.write_text(secrets.token_urlsafe(24) + "\n")
    admin_token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    procs: list[subprocess.Popen[typing.Any]] = []
    try:
        upstream = subprocess.Popen(
            [sys.executable, "-c", UPSTREAM], env=env, start_new_session=True, stdout=subprocess.PIPE, text=True
        )
        procs.append(upstream)
        (up_port,) = ports_of(upstream, re.compile(r"upstream port (\d+)"), "the demo upstream")
        server = subprocess.Popen(
            [
                str(BIN / "exit-server"),
                "run",
                "--public-addr",
                "127.0.0.1:0",
                "--control-addr",
                "127.0.0.1:0",
                "--tls-cert",
                str(certs / "server.pem"),
                "--tls-key",
                str(certs / "server-key.pem"),
                "--token-file",
                str(token),
                "--drain-timeout",
                "5",
                "--admin-addr",
                "127.0.0.1:0",
                "--admin-token-file",
                str(admin_token),
            ],
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(server)
        public, control, admin = ports_of(server, ANNOUNCED, "the exit server")
        procs.append(
            subprocess.Popen(
                [
                    str(BIN / "tunnel-client"),
                    "run",
                    "--server",
                    f"wss://localhost:{control}",
                    "--ca-file",
                    str(certs / "ca.pem"),
                    "--token-file",
                    str(token),
                    "--upstream",
                    f"app.localhost=http://127.0.0.1:{up_port}",
                    "--drain-timeout",
                    "5",
                    "--admin-addr",
                    "127.0.0.1:0",
                ],
                env=env,
                start_new_session=True,
            )
        )
        url = f"http://127.0.0.1:{public}/hello?from=demo"
        deadline = time.monotonic() + 15
        status, body = 0, ""
        while time.monotonic() < deadline:
            status, body = fetch(url, f"app.localhost:{public}")  # what curl and browsers send for the printed URL
            if status == 200:
                break
            time.sleep(0.2)
        print()
        # *.localhost resolves to loopback in browsers and curl (RFC 6761), so this URL works as
        # printed; the bare 127.0.0.1 address would carry no routed Host and answer 503.
        print(f"Public URL:  http://app.localhost:{public}/")
        print(f"Try:         curl 'http://app.localhost:{public}/hello?from=demo'")
        print(f"  or:        curl -H 'Host: app.localhost' '{url}'")
        print(f"Answer ({status}): {body.strip()}")
        print(f"Dashboard:   http://127.0.0.1:{admin}/#token={admin_token.read_text().strip()}")
        print(f"Metrics:     http://127.0.0.1:{admin}/metrics")
        if status != 200:
            return 1
        if args.once:
            return 0
        print("\nRunning; press Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        print("demo: stopped exit server, tunnel client and upstream.")


if __name__ == "__main__":
    # The children run in their own sessions, so Ctrl-C reaches only this script, which then
    # stops them with one SIGTERM each (a graceful drain). SIGTERM to the script does the same.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
