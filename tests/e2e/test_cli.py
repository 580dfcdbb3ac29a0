"""The command-line contract, with real processes: flags, environment, TOML, errors, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ports import free_port

from .helpers import TOKEN, Certs

BIN = Path(sys.executable).parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    full_env["BACKHAUL_ADMIN_ADDR"] = "127.0.0.1:0"  # never the fixed default port in tests
    full_env.update(env or {})
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=full_env, timeout=30)


@pytest.mark.parametrize("prog", ["exit-server", "tunnel-client"])
def test_help_explains_every_flag(prog: str) -> None:
    out = run_cli(prog, "run", "--help")
    assert out.returncode == 0
    for flag in (
        [
            "--public-addr",
            "--control-addr",
            "--tls-cert",
            "--tls-key",
            "--token-file",
            "--insecure-plaintext",
            "--upstream-timeout",
            "--drain-timeout",
        ]
        if prog == "exit-server"
        else ["--server", "--token-file", "--ca-file", "--upstream", "--drain-timeout"]
    ):
        assert flag in out.stdout
    assert "BACKHAUL_TOKEN_FILE" in out.stdout
    assert "--token " not in out.stdout  # the token itself is never a flag


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["exit-server", "run", "--public-addr", "nowhere", "--insecure-plaintext", "--control-addr", "127.0.0.1:0"],
            "--public-addr",
        ),
        (["exit-server", "run", "--upstream-timeout", "soon", "--insecure-plaintext"], "--upstream-timeout"),
        (["exit-server", "run", "--control-addr", "0.0.0.0:0", "--insecure-plaintext"], "loopback"),
        (["exit-server", "run", "--insecure-plaintext"], "token is required"),
        (["exit-server", "run", "--insecure-plaintext", "--acme-dir", "/tmp/x"], "--acme-dir needs --public-tls-addr"),
        (["exit-server", "run", "--insecure-plaintext", "--public-tls-addr", "127.0.0.1:0"], "--public-tls-addr"),
        (["exit-server", "run", "--insecure-plaintext", "--acme-domain", "bad name"], "--acme-domain"),
        (["exit-server", "run", "--insecure-plaintext", "--acme-challenge", "dns-01"], "--acme-challenge"),
        (["tunnel-client", "run", "--server", "wss://x:1", "--upstream", "bad host=http://x"], "--upstream"),
        (["tunnel-client", "run", "--server", "ftp://x", "--upstream", "default=http://x"], "--server"),
        (["tunnel-client", "run", "--server", "wss://x:1", "--upstream", "default=http://x"], "token is required"),
        (["tunnel-client", "run", "--config", "/nonexistent.toml"], "--config"),
    ],
)
def test_bad_values_exit_2_with_one_line(args: list[str], needle: str) -> None:
    out = run_cli(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0] and "Traceback" not in out.stderr


def test_gen_certs_writes_files_and_fingerprint(tmp_path: Path) -> None:
    out = run_cli(
        "exit-server", "gen-certs", "--out", str(tmp_path), "--hostname", "tunnel.example.com", "--ip", "127.0.0.1"
    )
    assert out.returncode == 0
    for name in ("ca.pem", "server.pem", "server-key.pem"):
        assert (tmp_path / name).stat().st_size > 0
    assert oct((tmp_path / "server-key.pem").stat().st_mode & 0o777) == "0o600"
    fingerprint = out.stdout.split("fingerprint:")[1].strip()
    assert len(fingerprint.split(":")) == 32
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "tunnel.example.com" in san.get_values_for_type(x509.DNSName)
    bad = run_cli("exit-server", "gen-certs", "--out", str(tmp_path), "--hostname", "x", "--ip", "not-an-ip")
    assert bad.returncode == 2 and "--ip" in bad.stderr


class Proc:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
        full_env["BACKHAUL_ADMIN_ADDR"] = "127.0.0.1:0"  # never the fixed default port in tests
        full_env.update(env)
        self.popen = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def stop(self) -> str:
        if self.popen.poll() is None:
            self.popen.kill()
        out, _ = self.popen.communicate(timeout=10)
        return out


@pytest.fixture
def upstream_proc(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    script = tmp_path / "up.py"
    script.write_text(
        "from aiohttp import web\n"
        "async def h(r):\n"
        "    return web.Response(text='cli upstream ' + r.host)\n"
        "app = web.Application(); app.router.add_get('/{t:.*}', h)\n"
        f"web.run_app(app, host='127.0.0.1', port={port}, print=None)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)])
    wait_port(port)
    yield port
    proc.kill()
    proc.wait()


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening")


def get(url: str, host: str, timeout: float = 5) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 (loopback only)
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_status(url: str, host: str, status: int, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        try:
            last = get(url, host)
        except OSError:
            pass
        if last[0] == status:
            return last[1]
        time.sleep(0.1)
    raise AssertionError(f"expected {status}, last {last}")


def test_processes_env_toml_and_signals(certs: Certs, tmp_path: Path, upstream_proc: int) -> None:
    public, control = free_port(), free_port()
    server_toml = tmp_path / "server.toml"
    # The file sets a wrong public port: the flag must win over it (flags > env > file).
    server_toml.write_text(
        f'public_addr = "127.0.0.1:1"\ncontrol_addr = "127.0.0.1:{control}"\n'
        f'tls_cert = "{certs.cert}"\ntls_key = "{certs.key}"\n'
    )
    server = Proc(
        [
            "exit-server",
            "run",
            "--config",
            str(server_toml),
            "--public-addr",
            f"127.0.0.1:{public}",
            "--drain-timeout",
            "5",
        ],
        {"BACKHAUL_TOKEN": TOKEN},
    )
    client_toml = tmp_path / "client.toml"
    client_toml.write_text(f'upstream = ["app.example.com=http://127.0.0.1:{upstream_proc}"]\nca_file = "{certs.ca}"\n')
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    client = Proc(
        ["tunnel-client", "run", "--config", str(client_toml), "--token-file", str(token_file)],
        {"BACKHAUL_SERVER": f"wss://localhost:{control}"},
    )
    try:
        wait_port(public)
        body = wait_status(f"http://127.0.0.1:{public}/x", "app.example.com", 200)
        assert body == "cli upstream app.example.com"
        assert TOKEN not in " ".join(client.popen.args)  # type: ignore[arg-type]
        client.popen.send_signal(signal.SIGTERM)
        assert client.popen.wait(10) == 0
        assert get(f"http://127.0.0.1:{public}/x", "app.example.com")[0] == 503
        server.popen.send_signal(signal.SIGTERM)
        assert server.popen.wait(10) == 0
    finally:
        client_log = client.stop()
        server_log = server.stop()
    assert "registered as session" in client_log
    assert "draining" in server_log
    assert TOKEN not in client_log + server_log


def test_second_signal_exits_at_once(certs: Certs, tmp_path: Path, upstream_proc: int) -> None:
    public, control = free_port(), free_port()
    slow_script = tmp_path / "slow.py"
    port = free_port()
    slow_script.write_text(
        "import asyncio\nfrom aiohttp import web\n"
        "async def h(r):\n    await asyncio.sleep(60)\n    return web.Response(text='late')\n"
        "app = web.Application(); app.router.add_get('/', h)\n"
        f"web.run_app(app, host='127.0.0.1', port={port}, print=None)\n"
    )
    slow = subprocess.Popen([sys.executable, str(slow_script)])
    server = Proc(
        [
            "exit-server",
            "run",
            "--public-addr",
            f"127.0.0.1:{public}",
            "--control-addr",
            f"127.0.0.1:{control}",
            "--tls-cert",
            str(certs.cert),
            "--tls-key",
            str(certs.key),
            "--drain-timeout",
            "60",
        ],
        {"BACKHAUL_TOKEN": TOKEN},
    )
    client = Proc(
        [
            "tunnel-client",
            "run",
            "--server",
            f"wss://localhost:{control}",
            "--ca-file",
            str(certs.ca),
            "--upstream",
            f"default=http://127.0.0.1:{port}",
        ],
        {"BACKHAUL_TOKEN": TOKEN},
    )
    try:
        wait_port(port)
        wait_port(public)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and get(f"http://127.0.0.1:{public}/nothing", "x", 2)[0] == 503:
            time.sleep(0.1)
        import threading

        threading.Thread(target=lambda: _quiet_get(f"http://127.0.0.1:{public}/"), daemon=True).start()
        time.sleep(0.5)  # deliberate: the slow request reaches the upstream (it answers after 60 s)
        server.popen.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # deliberate: a negative check (still draining, not exited)
        assert server.popen.poll() is None  # draining the slow request (drain timeout 60 s)
        t0 = time.monotonic()
        server.popen.send_signal(signal.SIGTERM)
        server.popen.wait(5)
        assert time.monotonic() - t0 < 5
    finally:
        server.stop()
        client.stop()
        slow.kill()
        slow.wait()


def _quiet_get(url: str) -> None:
    try:
        get(url, "x", timeout=30)
    except OSError:
        pass
