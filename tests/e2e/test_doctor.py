"""``tunnel-client doctor`` (the real command) against a real exit server, directly and
through real proxies: every step passes on a good path, and each fault fails at its own step
with its hint while the steps after it are skipped."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from tunnel_client.proxy import with_credentials

from .helpers import TOKEN, Certs, Stack, stack, upstream
from .proxies import PROXY_PASSWORD, PROXY_USER, dante, squid

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

BIN = Path(sys.executable).parent
STEPS = ["proxy", "dns", "tcp", "proxy-connect", "tls", "upgrade", "auth", "clock", "rtt"]


async def doctor(
    s: Stack, up: str, *extra: str, env: dict[str, str] | None = None
) -> tuple[int, list[dict[str, Any]], str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_") and "proxy" not in k.lower()}
    full_env.update({"BACKHAUL_TOKEN": TOKEN, **(env or {})})
    args = [
        str(BIN / "tunnel-client"),
        "doctor",
        "--server",
        f"wss://localhost:{s.server.control_port}",
        "--ca-file",
        str(s.certs.ca),
        "--upstream",
        f"app.test={up}",
        *extra,
    ]
    proc = await asyncio.create_subprocess_exec(
        *args, "--json", env=full_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, json.loads(out), err.decode()


def verdicts(checks: list[dict[str, Any]]) -> dict[str, str]:
    return {c["step"]: c["verdict"] for c in checks if c["target"].startswith("wss://")}


def step(checks: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(c for c in checks if c["step"] == name)


def app() -> web.Application:
    return web.Application()


async def test_a_good_direct_path_passes_every_step(certs: Certs) -> None:
    async with upstream(app()) as up, stack(certs) as s:
        rc, checks, err = await doctor(s, up.url)
        assert rc == 0, (checks, err)
        assert list(verdicts(checks)) == STEPS
        assert verdicts(checks)["proxy-connect"] == "skip" and "direct" in step(checks, "proxy")["detail"]
        assert all(v == "ok" for k, v in verdicts(checks).items() if k != "proxy-connect")
        assert "issued by" in step(checks, "tls")["detail"]
        assert step(checks, "upstream")["verdict"] == "ok"


async def test_challenge_authentication(certs: Certs) -> None:
    from tunnel_client.pinning import spki_pin

    from .test_tls import _leaf_der

    async with upstream(app()) as up, stack(certs) as s:
        pin = spki_pin(_leaf_der(certs.cert))
        rc, checks, _ = await doctor(s, up.url, "--auth", "challenge", "--pin", pin)
        assert rc == 0, checks
        assert "challenge authentication" in step(checks, "auth")["detail"]
        rc, checks, _ = await doctor(s, up.url, "--auth", "challenge", "--pin", pin, env={"BACKHAUL_TOKEN": "wrong"})
        assert rc == 1 and "4401" in step(checks, "auth")["detail"]


@pytest.mark.parametrize("kind", ["squid", "squid-ntlm", "dante", "mitmproxy"])
async def test_through_a_proxy_from_the_environment(certs: Certs, kind: str) -> None:
    from tunnel_client.pinning import spki_pin

    from .proxies import mitmproxy
    from .test_tls import _leaf_der

    async with upstream(app()) as up, stack(certs) as s:
        port = s.server.control_port
        if kind.startswith("squid"):
            cm = squid([port], login=True, ntlm=kind == "squid-ntlm")
        else:
            cm = dante() if kind == "dante" else mitmproxy(certs.ca)
        with cm as proxy:
            url = with_credentials(proxy.url, PROXY_USER, PROXY_PASSWORD) if kind.startswith("squid") else proxy.url
            extra: list[str] = []
            if kind == "mitmproxy":  # TLS intercepted: its CA trusted, the token proven inside
                pin = spki_pin(_leaf_der(certs.cert))
                extra = ["--ca-file", str(proxy.ca_file), "--auth", "challenge", "--pin", pin]
            rc, checks, _ = await doctor(s, up.url, *extra, env={"HTTPS_PROXY": url})
            assert rc == 0, checks
            assert "(HTTPS_PROXY)" in step(checks, "proxy")["detail"]
            connect = step(checks, "proxy-connect")
            assert connect["verdict"] == "ok"
            if kind.startswith("squid"):
                assert f"(login: {'ntlm' if kind == 'squid-ntlm' else 'basic'})" in connect["detail"], connect
            if kind == "mitmproxy":
                assert "TLS is intercepted" in step(checks, "tls")["detail"]
                assert "challenge authentication" in step(checks, "auth")["detail"]
            assert PROXY_PASSWORD not in json.dumps(checks)


async def test_each_fault_fails_at_its_own_step(certs: Certs, tmp_path: Path) -> None:
    async with upstream(app()) as up, stack(certs) as s:
        port = s.server.control_port
        with squid([port], login=True) as proxy:  # no login given: 407, and what it offers
            rc, checks, _ = await doctor(s, up.url, "--proxy", proxy.url)
            assert rc == 1 and verdicts(checks)["proxy-connect"] == "FAIL"
            assert "407" in step(checks, "proxy-connect")["detail"] and "Basic" in step(checks, "proxy-connect")["hint"]
            assert all(verdicts(checks)[k] == "skip" for k in ("tls", "upgrade", "auth", "clock", "rtt"))
        with squid([port], deny=True) as proxy:
            rc, checks, _ = await doctor(s, up.url, "--proxy", proxy.url)
            assert rc == 1 and "403" in step(checks, "proxy-connect")["detail"]
            assert "deny CONNECT" in step(checks, "proxy-connect")["hint"]
        # a CA that did not sign the server's certificate, behind a proxy: interception suspected
        other = trustme.CA()
        other_ca = tmp_path / "other-ca.pem"
        other.cert_pem.write_to_path(str(other_ca))
        with dante() as proxy:
            rc, checks, _ = await doctor(s, up.url, "--proxy", proxy.url, "--ca-file", str(other_ca))
            tls = step(checks, "tls")
            assert rc == 1 and tls["verdict"] == "FAIL" and "interception" in tls["hint"]
            assert "issued by" in tls["detail"]  # who signed what the far end presented
        # a pin of another key
        rc, checks, _ = await doctor(s, up.url, "--pin", "sha256:" + "A" * 43 + "=")
        assert rc == 1 and "--pin" in step(checks, "tls")["hint"]
        # a refused token
        rc, checks, _ = await doctor(s, up.url, env={"BACKHAUL_TOKEN": "not-the-token"})
        assert rc == 1 and verdicts(checks)["upgrade"] == "ok" and verdicts(checks)["auth"] == "FAIL"
        # nothing listens where the upstream should be
        rc, checks, _ = await doctor(s, "http://127.0.0.1:9")
        upstream_check = step(checks, "upstream")
        assert rc == 1 and upstream_check["verdict"] == "FAIL" and "not listening" in upstream_check["hint"]
        assert all(v == "ok" for k, v in verdicts(checks).items() if k != "proxy-connect")


async def test_a_configuration_error_is_the_first_failed_check(certs: Certs) -> None:
    async with stack(certs) as s:
        rc, checks, _ = await doctor(s, "http://127.0.0.1:9", "--proxy", "ftp://proxy:21")
        assert rc == 2 and checks[0]["step"] == "configuration" and checks[0]["verdict"] == "FAIL"
        assert "--proxy" in checks[0]["detail"] or "proxy scheme" in checks[0]["detail"]
