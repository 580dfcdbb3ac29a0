"""AWS IAM authentication of tunnel clients (docs/PROTOCOL.md section 5.3), the sans-I/O part.

The client signs an ``sts:GetCallerIdentity`` request with its own AWS credentials (a task role,
an instance's SSM-managed role), binding it to one exit server with a signed
``X-Backhaul-Server-ID`` header, and sends the whole signed request in the WebSocket upgrade
(``Backhaul-AWS-IAM``). The exit server checks that it is exactly that request, to an STS
endpoint it allows, bound to itself and fresh, then forwards it to STS: STS verifies the
signature and answers with the caller's ARN. No secret is shared (Vault's AWS IAM auth method).

Envelope: base64url (no padding) of the JSON object
``{"method": "POST", "url": URL, "body": BODY, "headers": {NAME: VALUE, ...}}``.
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "BODY",
    "ENVELOPE_HEADER",
    "MAX_ENVELOPE",
    "SERVER_ID_HEADER",
    "IamRefused",
    "SignedRequest",
    "check_request",
    "decode_envelope",
    "default_endpoints",
    "encode_envelope",
    "endpoint_allowed",
    "parse_identity",
    "role_matches",
    "role_of",
]

#: The upgrade request header carrying the envelope.
ENVELOPE_HEADER = "Backhaul-AWS-IAM"
#: The signed header binding a request to one exit server (Vault: X-Vault-AWS-IAM-Server-ID).
SERVER_ID_HEADER = "x-backhaul-server-id"
#: The only request accepted, as botocore encodes it.
BODY = "Action=GetCallerIdentity&Version=2011-06-15"
#: Bound on the envelope's size (a session token is at most a few KB).
MAX_ENVELOPE = 8192

_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d{1,2}$")
_ARN = re.compile(r"^arn:(aws|aws-cn|aws-us-gov|aws-iso[a-z-]*):(sts|iam)::(\d{12}):(.+)$")
_STS_NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"


class IamRefused(ValueError):
    """The signed request is not one this exit server accepts; ``reason`` is for the log."""


@dataclass(frozen=True)
class SignedRequest:
    method: str
    url: str
    body: str
    headers: dict[str, str]  # names lower-cased

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def encode_envelope(method: str, url: str, body: str, headers: dict[str, str]) -> str:
    raw = json.dumps({"method": method, "url": url, "body": body, "headers": headers}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_envelope(value: str) -> SignedRequest:
    """Parse the header value.

    Raises:
        IamRefused: oversized or malformed.
    """
    if len(value) > MAX_ENVELOPE:
        raise IamRefused("envelope too large")
    try:
        raw = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise IamRefused("envelope is not base64url JSON") from None
    if not isinstance(raw, dict) or set(raw) != {"method", "url", "body", "headers"}:
        raise IamRefused("envelope must have exactly method, url, body and headers")
    headers = raw["headers"]
    if not all(isinstance(raw[k], str) for k in ("method", "url", "body")) or not isinstance(headers, dict):
        raise IamRefused("envelope fields have the wrong types")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()) or len(headers) > 32:
        raise IamRefused("envelope headers must be at most 32 strings")
    for text in (raw["url"], *headers, *headers.values()):
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise IamRefused("control characters in the envelope")
    return SignedRequest(raw["method"], raw["url"], raw["body"], {k.lower(): v for k, v in headers.items()})


def default_endpoints() -> tuple[str, ...]:
    """The global STS endpoint; regional ones (``https://sts.REGION.amazonaws.com/``) are
    recognised by pattern in :func:`endpoint_allowed`."""
    return ("https://sts.amazonaws.com/",)


def _normal(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def endpoint_allowed(url: str, allowed: tuple[str, ...] | None) -> bool:
    """``url`` is one of ``allowed`` (exactly, up to a trailing slash); with None, the global
    STS endpoint or a regional one (``https://sts.REGION.amazonaws.com/``, ``.amazonaws.com.cn``
    in China), nothing else: never a URL the caller could point at a server of its own."""
    url = _normal(url)
    if allowed is not None:
        return url in {_normal(a) for a in allowed}
    if url in default_endpoints():
        return True
    parts = urlsplit(url)
    if parts.scheme != "https" or parts.path != "/" or parts.query or parts.port is not None or parts.username:
        return False
    host = parts.hostname or ""
    for suffix in (".amazonaws.com", ".amazonaws.com.cn"):
        if host.startswith("sts.") and host.endswith(suffix):
            return bool(_REGION.match(host[4 : -len(suffix)]))
    return False


def check_request(
    req: SignedRequest,
    server_id: str,
    allowed: tuple[str, ...] | None,
    now: dt.datetime,
    max_age: float,
) -> None:
    """Everything checkable before STS sees it: the exact action, an allowed endpoint, the
    server id header present, signed and ours, a SigV4 signature for STS, and a fresh date.

    Raises:
        IamRefused: the first check that fails.
    """
    if req.method != "POST":
        raise IamRefused(f"method {req.method[:10]!r}, not POST")
    if not endpoint_allowed(req.url, allowed):
        raise IamRefused("STS endpoint not allowed")
    body = parse_qs(req.body, keep_blank_values=True, strict_parsing=False)
    if body != {"Action": ["GetCallerIdentity"], "Version": ["2011-06-15"]}:
        raise IamRefused("not exactly sts:GetCallerIdentity")
    host = req.header("host")
    if host is not None and host.lower() != (urlsplit(req.url).netloc or "").lower():
        raise IamRefused("Host header does not match the endpoint")
    authorization = req.header("authorization") or ""
    scheme, _, params = authorization.partition(" ")
    if scheme != "AWS4-HMAC-SHA256":
        raise IamRefused("not a SigV4 signature")
    fields = dict(part.strip().partition("=")[::2] for part in params.split(","))
    credential = fields.get("Credential", "").split("/")
    if len(credential) != 5 or credential[3] != "sts" or credential[4] != "aws4_request":
        raise IamRefused("the signature is not for STS")
    signed = set(fields.get("SignedHeaders", "").split(";"))
    if SERVER_ID_HEADER not in signed:
        raise IamRefused(f"{SERVER_ID_HEADER} is not signed")
    if req.header(SERVER_ID_HEADER) != server_id:
        raise IamRefused("signed for another exit server")
    if "x-amz-date" not in signed:
        raise IamRefused("x-amz-date is not signed")
    try:
        when = dt.datetime.strptime(req.header("x-amz-date") or "", "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        raise IamRefused("bad x-amz-date") from None
    age = (now - when).total_seconds()
    if abs(age) > max_age:
        raise IamRefused(f"signed {age:.0f}s ago, more than {max_age:.0f}s")


def parse_identity(xml: bytes) -> str:
    """The ARN in a GetCallerIdentity response.

    Raises:
        ValueError: no ARN in it.
    """
    from xml.etree import ElementTree  # only an exit server checking an identity parses XML

    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as exc:
        raise ValueError(f"STS answer is not XML: {exc}") from None
    for path in (f"{_STS_NS}GetCallerIdentityResult/{_STS_NS}Arn", "GetCallerIdentityResult/Arn"):
        node = root.find(path)
        if node is not None and node.text and _ARN.match(node.text.strip()):
            return node.text.strip()
    raise ValueError("no ARN in the STS answer")


def role_of(arn: str) -> str:
    """The IAM identity an ARN stands for: an assumed-role session
    ``arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION`` is the role ``arn:aws:iam::ACCOUNT:role/ROLE``
    (the session name, which the caller chooses, is dropped); other ARNs are returned as they are."""
    match = _ARN.match(arn)
    if match is None:
        return arn
    partition, service, account, resource = match.groups()
    if service == "sts" and resource.startswith("assumed-role/"):
        role = resource.split("/")[1]
        return f"arn:{partition}:iam::{account}:role/{role}"
    return arn


def role_matches(pattern: str, arn: str) -> bool:
    """``pattern`` (``*`` and ``?`` wildcards) matches the role of ``arn``, or ``arn`` itself
    (a pattern for an assumed-role session ARN can match session names)."""
    return fnmatch.fnmatchcase(role_of(arn), pattern) or fnmatch.fnmatchcase(arn, pattern)
