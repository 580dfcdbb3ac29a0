"""shared/awsiam.py and the client's signer, without sockets.

The local STS of the e2e tests (moto) does not verify SigV4 signatures: these tests show that
what the client sends is a valid signature over exactly the request the exit server checks
(recomputed here with the same secret), that the server id header is inside it, and that
changing any checked part (the server id, the action) changes the signature, so real STS
would refuse a tampered request."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from shared.awsiam import (
    BODY,
    IamRefused,
    check_request,
    decode_envelope,
    encode_envelope,
    endpoint_allowed,
    parse_identity,
    role_matches,
    role_of,
)
from tunnel_client.awsiam import AwsSigner

CREDS = Credentials("AKIAEXAMPLE", "secret/key", "session-token")
SERVER = "exit.example.com"


def signed(monkeypatch: pytest.MonkeyPatch, server_id: str = SERVER, endpoint: str | None = None) -> str:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDS.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDS.secret_key)
    monkeypatch.setenv("AWS_SESSION_TOKEN", CREDS.token)
    signer = AwsSigner(endpoint, "eu-west-1")
    return signer._sign(server_id)


def recompute(req: Any, secret: str) -> str:
    """The SigV4 signature of the envelope's request, computed again from its parts."""
    fields = dict(p.strip().partition("=")[::2] for p in req.header("authorization").split(" ", 1)[1].split(","))
    scope = fields["Credential"].split("/")
    headers = {k: v for k, v in req.headers.items() if k in fields["SignedHeaders"].split(";") and k != "host"}
    request = AWSRequest(method=req.method, url=req.url, data=req.body, headers=headers)
    auth = SigV4Auth(Credentials(scope[0], secret, req.header("x-amz-security-token")), "sts", scope[2])
    request.context["timestamp"] = req.header("x-amz-date")
    auth._modify_request_before_signing(request)
    canonical = auth.canonical_request(request)
    return str(auth.signature(auth.string_to_sign(request, canonical), request))


def test_the_signature_covers_the_server_id_and_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    req = decode_envelope(signed(monkeypatch))
    assert req.url == "https://sts.eu-west-1.amazonaws.com/" and req.body == BODY
    signed_headers = req.header("authorization").split("SignedHeaders=")[1].split(",")[0].split(";")
    assert "x-backhaul-server-id" in signed_headers and "x-amz-date" in signed_headers
    presented = req.header("authorization").rsplit("Signature=", 1)[1]
    assert recompute(req, CREDS.secret_key) == presented  # what STS computes: it would accept
    tampered = decode_envelope(signed(monkeypatch))
    tampered.headers["x-backhaul-server-id"] = "other.example.com"
    assert recompute(tampered, CREDS.secret_key) != tampered.header("authorization").rsplit("Signature=", 1)[1]
    check_request(req, SERVER, None, dt.datetime.now(dt.UTC), 300)


def envelope_with(monkeypatch: pytest.MonkeyPatch, **changes: Any) -> Any:
    raw = json.loads(base64.urlsafe_b64decode(signed(monkeypatch) + "=="))
    headers = raw["headers"]
    for key, value in changes.items():
        if key in ("method", "url", "body"):
            raw[key] = value
        else:
            headers[key.replace("_", "-")] = value
    return decode_envelope(encode_envelope(raw["method"], raw["url"], raw["body"], headers))


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"method": "GET"}, "not POST"),
        ({"body": "Action=GetSessionToken&Version=2011-06-15"}, "GetCallerIdentity"),
        ({"body": BODY + "&Action=AssumeRole"}, "GetCallerIdentity"),
        ({"url": "https://sts.evil.example/"}, "endpoint not allowed"),
        ({"url": "http://sts.amazonaws.com/"}, "endpoint not allowed"),
        ({"X_Backhaul_Server_ID": "other.example.com"}, "another exit server"),
        ({"X_Amz_Date": "20200101T000000Z"}, "more than 300s"),
        ({"X_Amz_Date": "yesterday"}, "bad x-amz-date"),
        ({"Authorization": "Bearer x"}, "not a SigV4"),
        ({"Host": "sts.evil.example"}, "Host header"),
    ],
)
def test_refused_before_sts(monkeypatch: pytest.MonkeyPatch, changes: dict[str, str], why: str) -> None:
    req = envelope_with(monkeypatch, **changes)
    with pytest.raises(IamRefused, match=why):
        check_request(req, SERVER, None, dt.datetime.now(dt.UTC), 300)


def test_server_id_must_be_signed(monkeypatch: pytest.MonkeyPatch) -> None:
    req = decode_envelope(signed(monkeypatch))
    auth = req.headers["authorization"].replace("x-backhaul-server-id;", "").replace(";x-backhaul-server-id", "")
    req.headers["authorization"] = auth
    with pytest.raises(IamRefused, match="not signed"):
        check_request(req, SERVER, None, dt.datetime.now(dt.UTC), 300)


@pytest.mark.parametrize("value", ["", "!!!", "e30", base64.urlsafe_b64encode(b'{"method":1}').decode(), "x" * 9000])
def test_malformed_envelopes(value: str) -> None:
    with pytest.raises(IamRefused):
        decode_envelope(value)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://sts.amazonaws.com/", True),
        ("https://sts.amazonaws.com", True),
        ("https://sts.eu-west-1.amazonaws.com/", True),
        ("https://sts.us-gov-west-1.amazonaws.com/", True),
        ("https://sts.cn-north-1.amazonaws.com.cn/", True),
        ("https://sts.eu-west-1.amazonaws.com.evil.com/", False),
        ("https://sts.amazonaws.com@evil.com/", False),
        ("https://sts.x.amazonaws.com/", False),
        ("https://sts.eu-west-1.amazonaws.com:8443/", False),
        ("https://sts.eu-west-1.amazonaws.com/path", False),
        ("https://iam.amazonaws.com/", False),
    ],
)
def test_default_endpoints(url: str, ok: bool) -> None:
    assert endpoint_allowed(url, None) is ok


def test_explicit_endpoints_replace_the_defaults() -> None:
    assert endpoint_allowed("http://127.0.0.1:5000/", ("http://127.0.0.1:5000",))
    assert not endpoint_allowed("https://sts.amazonaws.com/", ("http://127.0.0.1:5000/",))


def test_identity_and_roles() -> None:
    xml = (
        b'<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><GetCallerIdentityResult>'
        b"<Arn>arn:aws:sts::123456789012:assumed-role/backhaul-edge/i-0abc</Arn></GetCallerIdentityResult>"
        b"</GetCallerIdentityResponse>"
    )
    arn = parse_identity(xml)
    assert role_of(arn) == "arn:aws:iam::123456789012:role/backhaul-edge"
    assert role_matches("arn:aws:iam::123456789012:role/backhaul-*", arn)
    assert not role_matches("arn:aws:iam::999999999999:role/backhaul-*", arn)
    assert role_matches("arn:aws:sts::123456789012:assumed-role/backhaul-edge/i-0*", arn)
    assert role_of("arn:aws:iam::123456789012:user/alice") == "arn:aws:iam::123456789012:user/alice"
    with pytest.raises(ValueError):
        parse_identity(b"<nope/>")
    with pytest.raises(ValueError):
        parse_identity(b"not xml")
