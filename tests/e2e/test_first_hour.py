"""What a new user hits in the first hour (issue 16): failures exit non-zero with one line,
busy listen addresses name their flag, default admin ports fall back, ports are validated."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import BIN, TOKEN, Certs, retrying_client_args


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    env["BACKHAUL_RUN_DIR"] = str(tmp_path / "run")
    env.update(extra)
    return env


@pytest.fixture
def busy() -> Iterator[socket.socket]:
    """A listening socket on a free loopback port (what "address in use" needs)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock
    finally:
        sock.close()


def _addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"{host}:{port}"


def _one_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


@pytest.mark.parametrize("flag", ["--public-addr", "--control-addr", "--admin-addr"])
def test_exit_server_busy_address_is_one_line(flag: str, busy: socket.socket, tmp_path: Path) -> None:
    addrs = {"--public-addr": "127.0.0.1:0", "--control-addr": "127.0.0.1:0", "--admin-addr": "127.0.0.1:0"}
    addrs[flag] = _addr(busy)
    args = [str(BIN / "exit-server"), "run", "--insecure-plaintext", "--log-level", "warning"]
    for name, value in addrs.items():
        args += [name, value]
    out = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(tmp_path, BACKHAUL_TOKEN=TOKEN),
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 2
    line = _one_line(out)
    assert f"{flag} {_addr(busy)}: cannot listen" in line


def test_client_busy_explicit_admin_addr_fails(certs: Certs, busy: socket.socket, tmp_path: Path) -> None:
    out = subprocess.run(
        retrying_client_args(certs, "--admin-addr", _addr(busy)),
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(tmp_path, BACKHAUL_TOKEN=TOKEN),
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 2, out.stderr
    line = _one_line(out)
    assert f"--admin-addr {_addr(busy)}: cannot listen" in line


def _wait_for_run_files(
    run_dir: Path, count: int, procs: list[subprocess.Popen[str]], timeout: float = 20
) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(run_dir.glob("tunnel-client.*.admin")) if run_dir.exists() else []
        texts = [f.read_text().strip() for f in files]
        if len(files) >= count and all(texts):
            return texts
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    raise AssertionError(f"no {count} run files in {run_dir}")


def test_two_clients_with_default_admin_address(certs: Certs, busy: socket.socket, tmp_path: Path) -> None:
    """The default admin address taken (by another client, or anything else): the client
    listens on a free port, says so, and `tunnel-client healthcheck` finds it."""
    default = _addr(busy)  # stands in for the default: the second client of a host sees it busy
    env = _env(tmp_path, BACKHAUL_TOKEN=TOKEN)
    code = (
        "import sys, tunnel_client.config as c, tunnel_client.__main__ as m;"
        f"c.ClientConfig.model_fields['admin_addr'].default = {default!r};"
        "c.ClientConfig.model_rebuild(force=True);"  # the validator holds the default it was built with
        f"m.DEFAULT_ADMIN_ADDR = {default!r};"
        "sys.argv[0] = 'tunnel-client'; sys.exit(m.main())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *retrying_client_args(certs)[1:]],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        addrs = _wait_for_run_files(tmp_path / "run", 2, procs)
        assert len(set(addrs)) == 2 and default not in addrs
        # Not connected (no exit server): unhealthy, but each admin listener answered.
        health = subprocess.run(
            [str(BIN / "tunnel-client"), "healthcheck"], capture_output=True, text=True, timeout=30, env=env
        )
        assert health.returncode == 1
        assert all(addr in health.stderr for addr in addrs), health.stderr
        assert "Connection refused" not in health.stderr
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        errors = [proc.communicate(timeout=30)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert any("is taken" in err for err in errors), errors
    assert not list((tmp_path / "run").glob("tunnel-client.*.admin"))  # removed on exit


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--upstream", "h=http://127.0.0.1:97836"], "--upstream"),
        (["--upstream", "h=http://127.0.0.1:99999"], "--upstream"),
        (["--upstream", "h=http://127.0.0.1:0"], "--upstream"),
        (["--upstream", "h=http://[::1]:70000"], "--upstream"),
        (["--server", "wss://127.0.0.1:65536/tunnel"], "--server"),
        (["--admin-addr", "127.0.0.1:65536"], "--admin-addr"),
        # issue 15 item 9: more routes than a session may announce crashed at 3d9815c (exit 0)
        ([f"--upstream=h{i}.example=http://127.0.0.1:{8000 + i}" for i in range(300)], "--upstream"),
        ([f"--tcp={20000 + i}=127.0.0.1:{8000 + i}" for i in range(65)], "--tcp"),
    ],
)
def test_client_ports_validated_at_load(certs: Certs, tmp_path: Path, args: list[str], needle: str) -> None:
    out = subprocess.run(
        retrying_client_args(certs, *args),
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(tmp_path, BACKHAUL_TOKEN=TOKEN),
    )
    assert out.returncode == 2, out.stderr
    assert needle in _one_line(out)


def test_exit_server_bad_trusted_proxies_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BIN / "exit-server"), "run", "--insecure-plaintext", "--trusted-proxies", "10.0.0.0/8,10.0.0.0/33"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(tmp_path, BACKHAUL_TOKEN=TOKEN),
    )
    assert out.returncode == 2, out.stderr
    assert "--trusted-proxies" in _one_line(out) and "10.0.0.0/33" in _one_line(out)


@pytest.mark.asyncio
async def test_process_build_and_certificate_metrics(certs: Certs, tmp_path: Path) -> None:
    """Both admin listeners export process_*, backhaul_build_info and the seconds until the
    control (server) and client certificates expire."""
    import aiohttp
    import trustme

    from exit_server.control import SharedTokenAuth
    from exit_server.server import ExitServer
    from shared.runtime.version import version
    from tunnel_client import TunnelClient

    from .helpers import client_config, server_config

    client_ca = trustme.CA()
    client_ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
    client_ca.issue_cert("tunnel-client.example").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "client.pem")
    )
    server = ExitServer(server_config(certs, client_ca=tmp_path / "client-ca.pem"), auth=SharedTokenAuth(TOKEN))
    await server.start()
    client = TunnelClient(
        client_config(certs, server, ["default=http://127.0.0.1:9"], client_cert=tmp_path / "client.pem"), token=TOKEN
    )
    task = asyncio.create_task(client.run())
    try:
        await client.wait_connected(10)
        async with aiohttp.ClientSession() as session:
            for port, cert in ((server.admin_port, "control"), (client.admin_port, "client")):
                async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = await resp.text()
                assert "process_resident_memory_bytes" in text and "process_open_fds" in text
                assert 'backhaul_build_info{component="' in text and f'version="{version()}"' in text
                line = next(
                    x for x in text.splitlines() if x.startswith(f'backhaul_tls_cert_expiry_seconds{{cert="{cert}"')
                )
                assert float(line.split()[-1]) > 86400  # trustme certificates last years
    finally:
        await client.shutdown(0)
        await task
        await server.close()


def test_json_logs_are_json_with_rfc3339_utc_times(tmp_path: Path) -> None:
    """Every line of a JSON-mode exit server, stdout and stderr, is a JSON object; times are
    RFC 3339 UTC."""
    import re

    proc = subprocess.Popen(
        [str(BIN / "exit-server"), "run", "--insecure-plaintext", "--log-format", "json"]
        + ["--public-addr", "127.0.0.1:0", "--control-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"],
        env=_env(tmp_path, BACKHAUL_TOKEN=TOKEN),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the start-up announcement: written once every port is bound
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = [first, *out.splitlines(), *err.splitlines()]
    records = [json.loads(line) for line in lines if line.strip()]
    assert len(records) >= 3 and records[0]["public_port"] > 0
    for record in records:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), record


async def _client_stderr_until(args: list[str], needle: str, tmp_path: Path, timeout: float = 20) -> str:
    """Run a tunnel-client until ``needle`` shows on its stderr (then stop it); its stderr."""
    proc = await asyncio.create_subprocess_exec(
        *args, env=_env(tmp_path, BACKHAUL_TOKEN=TOKEN), stdin=subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            while line := (await proc.stderr.readline()).decode():
                seen.append(line)
                if needle in line:
                    break
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
    text = "".join(seen)
    assert needle in text, text
    return text


@pytest.mark.asyncio
async def test_connect_errors_carry_hints(certs: Certs, tmp_path: Path) -> None:
    """Wrong CA and a URL pointing at the public (plain HTTP) port: OpenSSL's text plus a
    hint saying what to do."""
    import trustme

    from exit_server.control import SharedTokenAuth
    from exit_server.server import ExitServer

    from .helpers import server_config

    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    server = ExitServer(server_config(certs), auth=SharedTokenAuth(TOKEN))
    await server.start()
    try:
        base = [str(BIN / "tunnel-client"), "run", "--upstream", "default=http://127.0.0.1:9"]
        base += ["--admin-addr", "127.0.0.1:0", "--backoff-base", "0.1", "--backoff-cap", "0.2"]
        wrong_ca = await _client_stderr_until(
            [*base, "--server", f"wss://localhost:{server.control_port}", "--ca-file", str(other_ca)],
            "hint:",
            tmp_path,
        )
        assert f"--ca-file {other_ca}" in wrong_ca and "gen-certs" in wrong_ca
        public = await _client_stderr_until(
            [*base, "--server", f"wss://localhost:{server.public_port}", "--ca-file", str(certs.ca)], "hint:", tmp_path
        )
        assert "without TLS" in public and "control listener" in public
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_exit_on_auth_failure(certs: Certs, tmp_path: Path) -> None:
    from exit_server.control import SharedTokenAuth
    from exit_server.server import ExitServer

    from .helpers import server_config

    server = ExitServer(server_config(certs), auth=SharedTokenAuth("another-token-0123456789"))
    await server.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "tunnel-client"),
            "run",
            "--server",
            f"wss://localhost:{server.control_port}",
            "--ca-file",
            str(certs.ca),
            "--upstream",
            "default=http://127.0.0.1:9",
            "--admin-addr",
            "127.0.0.1:0",
            "--exit-on-auth-failure",
            "--log-level",
            "error",
            env=_env(tmp_path, BACKHAUL_TOKEN=TOKEN),
            stdin=subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await server.close()
    assert proc.returncode == 1
    text = err.decode()
    last = text.strip().splitlines()[-1]
    assert "Traceback" not in text and "token refused (401)" in last and "--exit-on-auth-failure" in last, text
