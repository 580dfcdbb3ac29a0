"""No secret leaks: a client token, its hash, a basic-auth password (and its hash), a route bearer
token: none may appear on argv, in any log line (DEBUG included), in an error body, in /metrics or
in the admin API, whatever succeeds or fails."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from exit_server import ExitServer
from exit_server.hashing import hash_secret
from exit_server.tokens import load_entries

from .helpers import Certs, client_config, server_config, upstream
from .sec_helpers import echo_app, write_tokens

PASSWORD = "pa55-w0rd-do-not-leak"
BEARER = "route-bearer-do-not-leak-91c2"
ADMIN = "admin-token-do-not-leak-5b7e"


def _secrets(tmp_path: Path, token: str) -> list[str]:
    entry = load_entries(tmp_path / "tokens.toml")["acme"]
    access = (tmp_path / "access.toml").read_text()
    hashes = [
        line.split('"')[1].split(":", 1)[1] for line in access.splitlines() if line.startswith(("basic", "bearer"))
    ]
    token_secret = token.split("_", 2)[2]
    return [
        token,
        token_secret,
        entry.hash,
        entry.hash.split("$")[-1],
        PASSWORD,
        BEARER,
        ADMIN,
        base64.b64encode(f"alice:{PASSWORD}".encode()).decode(),
        *hashes,
        *(h.split("$")[-1] for h in hashes),
    ]


def _setup(tmp_path: Path) -> str:
    tokens = write_tokens(tmp_path / "tokens.toml", {"acme": ["app.example"]})
    (tmp_path / "access.toml").write_text(
        '[[site]]\nhosts = ["app.example"]\n'
        f'basic = ["alice:{hash_secret(PASSWORD)}"]\n'
        f'bearer = ["ci:{hash_secret(BEARER)}"]\n'
    )
    (tmp_path / "admin-token").write_text(ADMIN + "\n")
    return tokens["acme"]


@pytest.mark.asyncio
async def test_no_secret_in_logs_bodies_metrics_or_admin_api(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = _setup(tmp_path)
    collected: list[str] = []
    config = server_config(
        certs,
        tokens=tmp_path / "tokens.toml",
        access=tmp_path / "access.toml",
        admin_token_file=tmp_path / "admin-token",
        log_level="debug",
    )
    server = ExitServer(config)
    await server.start()
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    raw_log = logging.getLogger("test.rawclient")
    from tunnel_client import TunnelClient

    try:
        async with upstream(echo_app()) as up:
            client = TunnelClient(client_config(certs, server, [f"app.example={up.url}"]), token=token)
            task = asyncio.create_task(client.run())
            await client.wait_connected(10)
            # Wrong tokens: right id with a wrong secret, a near miss, garbage; then the limiter.
            wrong = [token[:-4] + "AAAA", token + "x", token.replace("bh_", "xx_"), PASSWORD]
            for presented in wrong * 3:
                with pytest.raises(InvalidStatus) as info:
                    await connect(
                        f"wss://localhost:{server.control_port}",
                        ssl=ctx,
                        logger=raw_log,
                        additional_headers={"Authorization": f"Bearer {presented}"},
                    )
                collected.append(info.value.response.body.decode("latin-1"))
                collected.extend(f"{k}: {v}" for k, v in info.value.response.headers.raw_items())
            base = f"http://127.0.0.1:{server.public_port}"
            async with aiohttp.ClientSession() as http:
                attempts = [
                    None,
                    f"Basic {base64.b64encode(f'alice:{PASSWORD}x'.encode()).decode()}",
                    f"Bearer {BEARER}x",
                    f"Bearer {token}",
                    f"Basic {base64.b64encode(f'alice:{PASSWORD}'.encode()).decode()}",
                    f"Bearer {BEARER}",
                ]
                for auth in attempts:
                    headers = {"Host": "app.example", **({"Authorization": auth} if auth else {})}
                    async with http.get(base + "/x", headers=headers) as r:
                        collected.append(await r.text())
                        collected.extend(f"{k}: {v}" for k, v in r.headers.items())
                admin = f"http://127.0.0.1:{server.admin_port}"
                for path in ("/metrics", "/api/tunnels", "/api/stats", "/healthz", "/"):
                    for auth_header in ({"Authorization": f"Bearer {ADMIN}"}, {"Authorization": "Bearer wrong"}):
                        async with http.get(admin + path, headers=auth_header) as r:
                            collected.append(await r.text())
            server.reload("test")  # reload logging too
            await client.shutdown(1)
            await task
    finally:
        await server.close()
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")  # with tracebacks, if any
    collected.extend(formatter.format(r) for r in caplog.records if not r.name.startswith("test."))
    text = "\n".join(collected)
    assert "authentication failed" in text and "access:" in text  # the failures were logged, without secrets
    for secret in _secrets(tmp_path, token):
        assert secret not in text, f"a secret leaked: {secret[:6]}..."


def test_no_secret_on_argv_or_in_cli_output(certs: Certs, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "exit-server"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    env["BACKHAUL_ADMIN_ADDR"] = ""
    add = subprocess.run(
        [
            str(exe),
            "token",
            "add",
            "--tokens",
            str(tmp_path / "tokens.toml"),
            "--client",
            "acme",
            "--host",
            "app.example",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert add.returncode == 0, add.stderr
    token = add.stdout.strip()
    assert token.startswith("bh_") and token not in add.stderr
    assert oct((tmp_path / "tokens.toml").stat().st_mode & 0o777) == "0o600"
    stored = (tmp_path / "tokens.toml").read_text()
    assert token not in stored and token.split("_", 2)[2] not in stored
    listing = subprocess.run(
        [str(exe), "token", "list", "--tokens", str(tmp_path / "tokens.toml")],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    entry = load_entries(tmp_path / "tokens.toml")["acme"]
    assert "acme" in listing.stdout and entry.hash not in listing.stdout and token not in listing.stdout
    (tmp_path / "access.toml").write_text(
        f'[[site]]\nhosts = ["app.example"]\nbasic = ["alice:{hash_secret(PASSWORD)}"]\n'
    )
    proc = subprocess.Popen(
        [
            str(exe),
            "run",
            "--public-addr",
            "127.0.0.1:0",
            "--control-addr",
            "127.0.0.1:0",
            "--tls-cert",
            str(certs.cert),
            "--tls-key",
            str(certs.key),
            "--tokens",
            str(tmp_path / "tokens.toml"),
            "--access",
            str(tmp_path / "access.toml"),
            "--log-level",
            "debug",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 15
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "public port" in line or time.monotonic() < deadline
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().decode(errors="replace")
        # SIGHUP reloads the files (and logs it).
        import signal

        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(0.5)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    assert "reloading" in err and "SIGHUP" in err, err[-2000:]
    for secret in (token, token.split("_", 2)[2], entry.hash, PASSWORD):
        for where, text in (("argv", cmdline), ("environment", environ), ("stdout", line + out), ("stderr", err)):
            assert secret not in text, f"secret on {where}"
