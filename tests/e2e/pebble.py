"""A real ACME server for the tests: Debian's pebble, with pebble-challtestsrv as its DNS.

Every name resolves to 127.0.0.1 (``-defaultIPv4``; no AAAA answers), so pebble's validation
authority really dials the exit server's public HTTP port (HTTP-01) or TLS port (TLS-ALPN-01):
those ports are given to pebble's configuration, so the test picks them before the exit
server starts. Validation is real: ``PEBBLE_VA_ALWAYS_VALID`` is never set; the random 0-15 s
validation delay is off (``PEBBLE_VA_NOSLEEP``); pebble's default 5 % nonce rejection stays on,
so the client's badNonce retry runs too. Installed by scripts/ci-deps.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.ports import free_port


@dataclass
class Pebble:
    directory: str  # the ACME directory URL
    ca_file: Path  # trusts pebble's own HTTPS (the WFE)
    management: int
    process: subprocess.Popen[bytes]
    log: Path

    def root(self) -> bytes:
        """The root certificate pebble signs with (PEM), from its management API."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(f"https://127.0.0.1:{self.management}/roots/0", context=ctx, timeout=10) as r:
            return bytes(r.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited: {log.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling a port that is not open yet
    raise RuntimeError(f"{process.args[0]} not listening on {port} within {timeout}s: {log.read_text()[-2000:]}")


@contextmanager
def pebble(
    tmp: Path, http_port: int, tls_port: int, authz_reuse: int | None = None, validity: int | None = None
) -> Iterator[Pebble]:
    """pebble and its DNS on free loopback ports, validating against ``http_port`` and
    ``tls_port`` on 127.0.0.1. ``authz_reuse``: the percentage of orders that get an
    authorization already valid (pebble's default is 50); ``validity``: the certificates'
    lifetime in seconds (pebble's ``certificateValidityPeriod``; its default is 5 years)."""
    if shutil.which("pebble") is None or shutil.which("pebble-challtestsrv") is None:
        raise RuntimeError("pebble is not installed: run scripts/ci-deps.sh (Debian package pebble)")
    ca = trustme.CA()
    wfe = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert, key = tmp / "pebble-ca.pem", tmp / "pebble-cert.pem", tmp / "pebble-key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    wfe.cert_chain_pems[0].write_to_path(str(cert))
    wfe.private_key_pem.write_to_path(str(key))
    listen, management, dns, dns_management = (free_port() for _ in range(4))
    config = tmp / "pebble.json"
    config.write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{listen}",
                    "managementListenAddress": f"127.0.0.1:{management}",
                    "certificate": str(cert),
                    "privateKey": str(key),
                    "httpPort": http_port,
                    "tlsPort": tls_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                    **({"certificateValidityPeriod": validity} if validity else {}),
                }
            }
        )
    )
    dns_log, log = tmp / "challtestsrv.log", tmp / "pebble.log"
    dns_out, out = dns_log.open("wb"), log.open("wb")
    dns_proc = subprocess.Popen(
        [
            "pebble-challtestsrv",
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
            "-dns01",
            f"127.0.0.1:{dns}",
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            f"127.0.0.1:{dns_management}",
        ],
        stdout=dns_out,
        stderr=subprocess.STDOUT,
    )
    env = dict(os.environ, PEBBLE_VA_NOSLEEP="1")
    if authz_reuse is not None:
        env["PEBBLE_AUTHZREUSE"] = str(authz_reuse)
    proc = subprocess.Popen(
        ["pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{dns}"],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
    )
    running = Pebble(f"https://127.0.0.1:{listen}/dir", ca_file, management, proc, log)
    try:
        _wait_listening(dns_management, dns_proc, dns_log)
        _wait_listening(listen, proc, log)
        _wait_listening(management, proc, log)
        yield running
    finally:
        running.stop()
        dns_proc.terminate()
        dns_proc.wait(10)
        dns_out.close()
        out.close()
