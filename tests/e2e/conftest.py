from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from .helpers import TOKEN, Certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    d = tmp_path_factory.mktemp("certs")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    for extra in cert.cert_chain_pems[1:]:
        with open(d / "cert.pem", "ab") as fh:
            fh.write(extra.bytes())
    app = ca.issue_cert("app.localhost")
    app.cert_chain_pems[0].write_to_path(str(d / "app.pem"))
    app.private_key_pem.write_to_path(str(d / "app-key.pem"))
    return Certs(d / "ca.pem", d / "cert.pem", d / "key.pem", d / "app.pem", d / "app-key.pem")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path
