"""shared.aio.tls: what the contexts enforce, a real handshake between them over a socketpair,
and one line naming the flag for every file that cannot be loaded."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from shared.aio.tls import client_context, server_context
from shared.errors import ConfigError


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    server = ca.issue_cert("tunnel.example")
    client = ca.issue_cert("client-1")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key", "ccert", "ckey")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    client.cert_chain_pems[0].write_to_path(str(paths["ccert"]))
    client.private_key_pem.write_to_path(str(paths["ckey"]))
    return paths


def test_contexts_require_tls12_and_verification(pki: dict[str, Path]) -> None:
    server = server_context(pki["cert"], pki["key"])
    client = client_context(pki["ca"])
    for ctx in (server, client):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
        assert all("GCM" in c["name"] or "CHACHA20" in c["name"] for c in ctx.get_ciphers())
    assert client.check_hostname and client.verify_mode is ssl.CERT_REQUIRED
    assert server.verify_mode is ssl.CERT_NONE  # no client certificate asked without --client-ca
    assert server_context(pki["cert"], pki["key"], client_ca=pki["ca"]).verify_mode is ssl.CERT_REQUIRED


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake between the two contexts in memory (no socket)."""
    s, c, _, _ = connected(server, client, hostname)
    return s, c


def connected(
    server: ssl.SSLContext, client: ssl.SSLContext, hostname: str
) -> tuple[ssl.SSLObject, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """:func:`handshake`, also returning the server's outgoing and the client's incoming BIO."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    done = {id(s): False, id(c): False}
    for _ in range(10):
        for side in (c, s):
            if not done[id(side)]:
                try:
                    side.do_handshake()
                    done[id(side)] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    return s, c, s_out, c_in


def test_mutual_tls_handshake(pki: dict[str, Path]) -> None:
    server = server_context(pki["cert"], pki["key"], client_ca=pki["ca"])
    s, c = handshake(server, client_context(pki["ca"], pki["ccert"], pki["ckey"]), "tunnel.example")
    assert c.version() in ("TLSv1.2", "TLSv1.3")
    peer = s.getpeercert()
    assert (
        peer is not None
        and ("commonName", "client-1") in [pair for rdn in peer["subject"] for pair in rdn]
        or (peer is not None and any("client-1" in str(v) for v in peer.get("subjectAltName", ())))
    )


def test_the_tunnel_server_sends_no_session_tickets(pki: dict[str, Path]) -> None:
    """A tunnel client never resumes (asyncio cannot offer a session): tickets would be work
    for both sides and memory kept by the client. With OpenSSL's default (two tickets), the
    same exchange does leave the client a ticket."""
    default = server_context(pki["cert"], pki["key"])
    default.num_tickets = 2
    for server, tickets in ((server_context(pki["cert"], pki["key"]), False), (default, True)):
        s, c, s_out, c_in = connected(server, client_context(pki["ca"]), "tunnel.example")
        assert c.version() == "TLSv1.3"
        s.write(b"x")  # TLS 1.3 tickets follow the handshake, before the first data
        c_in.write(s_out.read())
        assert c.read(1) == b"x"
        assert c.session is not None and c.session.has_ticket is tickets


def test_the_client_checks_the_server_name(pki: dict[str, Path]) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(pki["cert"], pki["key"]), client_context(pki["ca"]), "other.example")


def test_a_server_asking_for_a_client_certificate_refuses_none(pki: dict[str, Path]) -> None:
    server = server_context(pki["cert"], pki["key"], client_ca=pki["ca"])
    with pytest.raises(ssl.SSLError):
        s, c = handshake(server, client_context(pki["ca"]), "tunnel.example")
        c.write(b"x")  # TLS 1.3: the refusal arrives after the client's handshake completed
        s.read(1)


@pytest.mark.parametrize(
    ("build", "flag"),
    [
        (lambda p: server_context(p["cert"], p["ca"]), "--tls-cert/--tls-key"),
        (lambda p: server_context(p["cert"], p["key"], client_ca=p["cert"].with_name("none.pem")), "--client-ca"),
        (lambda p: client_context(p["cert"].with_name("none.pem")), "--ca-file"),
        (lambda p: client_context(p["ca"], p["ccert"], p["key"]), "--client-cert/--client-key"),
    ],
)
def test_unloadable_files_name_the_flag(pki: dict[str, Path], build: object, flag: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(pki)  # type: ignore[operator]
    assert str(caught.value).startswith(flag) and "\n" not in str(caught.value)
