"""ACME against a real ACME server (pebble, tests/e2e/pebble.py) with real validation over
loopback: issue on a route's first registration (HTTP-01 on the public HTTP port, TLS-ALPN-01
on the TLS port), serve it (curl with pebble's root gets 200 through the tunnel), renew at two
thirds of the lifetime, keep serving while the CA is down, and never order for a name nobody
may serve or for random SNI names."""

from __future__ import annotations

import asyncio
import resource
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web

from tests.ports import free_port
from tests.waiting import wait_until

from .helpers import Certs, Stack, stack, upstream
from .pebble import Pebble, pebble
from .sec_helpers import TokenStack, token_stack, write_tokens

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


async def hello_app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {request.host}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    return app


@asynccontextmanager
async def acme_stack(
    certs: Certs,
    tmp_path: Path,
    challenge: str = "http-01",
    authz_reuse: int | None = None,
    validity: int | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[Stack, Pebble]]:
    http_port, tls_port = free_port(), free_port()
    with pebble(tmp_path, http_port, tls_port, authz_reuse, validity) as ca:
        settings: dict[str, Any] = {
            "public_addr": f"127.0.0.1:{http_port}",
            "public_tls_addr": f"127.0.0.1:{tls_port}",
            "acme_dir": tmp_path / "acme",
            "acme_directory": ca.directory,
            "acme_ca_file": ca.ca_file,
            "acme_challenge": challenge,
            "acme_domain": ["app.test", "*.apps.test"],
        }
        settings.update(overrides)
        async with stack(certs, **settings) as s:
            yield s, ca


def served_serial(port: int, name: str, root: Path | None) -> int:
    """The serial of the certificate served for ``name``, verified against ``root`` (None: not
    verified, for a certificate that may have expired meanwhile)."""
    ctx = ssl.create_default_context(cafile=str(root)) if root is not None else ssl._create_unverified_context()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def issued(s: Stack | TokenStack, name: str, timeout: float = 60) -> None:
    certs = s.server.certs
    assert certs is not None
    await wait_until(
        lambda: (c := certs.lookup(name)) is not None and c.source == "acme", timeout=timeout, what=f"{name} issued"
    )


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
async def test_issue_on_registration_and_serve(certs: Certs, tmp_path: Path, challenge: str) -> None:
    admin_token = "admin-token-0123456789"
    async with (
        upstream(await hello_app()) as up,
        acme_stack(certs, tmp_path, challenge, admin_token=admin_token) as (s, ca),
    ):
        name = "app.test" if challenge == "http-01" else "x.apps.test"
        await s.add_client([f"{name}={up.url}"])
        await issued(s, name)
        root = tmp_path / "pebble-root.pem"
        root.write_bytes(await asyncio.to_thread(ca.root))
        port = s.server.public_tls_port
        curl = await asyncio.to_thread(
            subprocess.run,
            ["curl", "-sS", "--cacert", str(root), "--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/x"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert curl.returncode == 0, curl.stderr
        assert curl.stdout == f"hello from {name}:{port}"
        stored = tmp_path / "acme" / "certs"
        for path in (stored / f"{name}.pem", stored / f"{name}-key.pem", tmp_path / "acme" / "account-key.pem"):
            assert path.stat().st_mode & 0o777 == 0o600, path
        assert s.server.acme is not None and s.server.acme.attempts == 1
        text = s.server.metrics.registry.get_sample_value("backhaul_acme_orders_total", {"result": "issued"})
        assert text == 1.0
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"http://127.0.0.1:{s.server.admin_port}/api/certificates",
                headers={"Authorization": f"Bearer {admin_token}"},
            ) as resp:
                listing = await resp.json()
        [cert] = listing["certificates"]
        assert cert["name"] == name and cert["source"] == "acme" and "Pebble" in cert["issuer"]
        assert listing["acme"] == [{"name": name, "state": "valid", "failures": 0, "next_attempt": mock.ANY}]


async def test_renewal_and_the_ca_down_during_renewal(certs: Certs, tmp_path: Path) -> None:
    # every renewal order comes with the authorization the first order validated: the issuer
    # must skip it rather than answer it again
    async with upstream(await hello_app()) as up, acme_stack(certs, tmp_path, authz_reuse=100) as (s, ca):
        await s.add_client([f"app.test={up.url}"])
        await issued(s, "app.test")
        root = tmp_path / "pebble-root.pem"
        root.write_bytes(await asyncio.to_thread(ca.root))
        port = s.server.public_tls_port
        first = await asyncio.to_thread(served_serial, port, "app.test", root)
        acme = s.server.acme
        assert acme is not None
        served = s.server.certs.lookup("app.test")  # type: ignore[union-attr]
        assert served is not None
        # two thirds into the lifetime: renewed, and the new certificate is served
        acme.clock = lambda: served.not_after.timestamp() - 1
        acme._wake.set()
        await wait_until(lambda: asyncio.to_thread(served_serial, port, "app.test", root), timeout=1, what="serving")
        await wait_until(lambda: acme.attempts >= 2, timeout=60, what="renewal attempted")
        second = await wait_until(
            lambda: asyncio.to_thread(lambda: (n := served_serial(port, "app.test", root)) != first and n),
            timeout=60,
            what="the renewed certificate is served",
        )
        # the CA goes away: the renewal fails, is counted and retried later; the current
        # certificate is still served
        ca.stop()
        renewed = s.server.certs.lookup("app.test")  # type: ignore[union-attr]
        assert renewed is not None
        acme.clock = lambda: renewed.not_after.timestamp() - 1
        acme._wake.set()
        registry = s.server.metrics.registry
        await wait_until(
            lambda: (registry.get_sample_value("backhaul_acme_orders_total", {"result": "failed"}) or 0) >= 1,
            timeout=60,
            what="a failed renewal counted",
        )
        assert await asyncio.to_thread(served_serial, port, "app.test", root) == second
        state = acme._states["app.test"]
        assert state.failures == 1 and state.next_try >= acme.clock() + 50  # backoff: about a minute


async def test_short_lived_certificates_are_renewed_in_real_time(certs: Certs, tmp_path: Path) -> None:
    """pebble issuing 15-second certificates: with no clock moved, each is renewed two
    thirds into its life (10 s, less up to 5 % jitter) and the new one is served."""
    async with upstream(await hello_app()) as up, acme_stack(certs, tmp_path, validity=15) as (s, ca):
        await s.add_client([f"app.test={up.url}"])
        await issued(s, "app.test")
        root = tmp_path / "pebble-root.pem"
        root.write_bytes(await asyncio.to_thread(ca.root))
        port = s.server.public_tls_port
        first = await asyncio.to_thread(served_serial, port, "app.test", root)
        served = s.server.certs.lookup("app.test")  # type: ignore[union-attr]
        assert served is not None and served.not_before is not None
        lifetime = (served.not_after - served.not_before).total_seconds()
        assert lifetime <= 16
        # renewal is due at 2/3 of the lifetime: allow that plus the order itself (and a loaded
        # machine: the serial is read without verification, so a late renewal is still seen)
        renewed = await wait_until(
            lambda: asyncio.to_thread(lambda: served_serial(port, "app.test", None) != first),
            timeout=lifetime + 30,
            what="a renewed certificate served",
        )
        assert renewed
        registry = s.server.metrics.registry
        assert (registry.get_sample_value("backhaul_acme_orders_total", {"result": "issued"}) or 0) >= 2


async def test_no_order_for_names_nobody_may_serve_or_random_sni(certs: Certs, tmp_path: Path) -> None:
    async with upstream(await hello_app()) as up, acme_stack(certs, tmp_path) as (s, _ca):
        acme = s.server.acme
        assert acme is not None
        await s.add_client([f"other.test={up.url}", f"*.apps.test={up.url}"])  # not allowed / a wildcard
        assert acme.pending() == set() and acme.attempts == 0
        port = s.server.public_tls_port
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        def storm() -> int:
            refused = 0
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            for i in range(1000):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                    try:
                        with ctx.wrap_socket(raw, server_hostname=f"r{i}-{i * 7919 % 100003}.app.test"):
                            pass
                    except ssl.SSLError:
                        refused += 1
            return refused

        assert await asyncio.to_thread(storm) == 1000
        # random Host headers on the HTTP port: the wildcard route serves them (its pattern
        # matches --acme-domain), and still no request ever starts an order
        async with aiohttp.ClientSession() as session:
            for i in range(200):
                async with session.get(s.base + "/", headers={"Host": f"h{i}.apps.test"}) as resp:
                    assert resp.status == 200
                async with session.get(s.base + "/", headers={"Host": f"h{i}.nowhere.test"}) as resp:
                    assert resp.status == 503
        assert acme.pending() == set() and acme.attempts == 0 and not acme._states
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mib < 32, f"peak RSS grew {grown_mib:.1f} MiB over 1,000 refused handshakes"
        handshakes = s.server.metrics.registry.get_sample_value(
            "backhaul_public_tls_handshakes_total", {"result": "unknown_name"}
        )
        assert handshakes == 1000


async def test_a_token_grant_naming_the_host_orders_and_an_any_host_grant_does_not(
    certs: Certs, tmp_path: Path
) -> None:
    """With --tokens and no --acme-domain, the registry decides: a grant that names the host
    ("named.test") orders on registration; a client whose grant is "*" registers its route
    (and is served over HTTP) but starts no order."""
    tokens = write_tokens(tmp_path / "tokens.toml", {"named": ["named.test"], "anyone": ["*"]})
    http_port, tls_port = free_port(), free_port()
    with pebble(tmp_path, http_port, tls_port) as ca:
        async with (
            upstream(await hello_app()) as up,
            token_stack(
                certs,
                tmp_path / "tokens.toml",
                public_addr=f"127.0.0.1:{http_port}",
                public_tls_addr=f"127.0.0.1:{tls_port}",
                acme_dir=tmp_path / "acme",
                acme_directory=ca.directory,
                acme_ca_file=ca.ca_file,
            ) as s,
        ):
            acme = s.server.acme
            assert acme is not None
            await s.add_client(tokens["anyone"], [f"wild.test={up.url}"])
            await s.add_client(tokens["named"], [f"named.test={up.url}"])
            await issued(s, "named.test")
            assert acme.attempts == 1 and "wild.test" not in acme.pending() and "wild.test" not in acme._states
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{http_port}/", headers={"Host": "wild.test"}) as resp:
                    assert resp.status == 200
