"""Which proxy, if any, the tunnel to an exit server goes through (sans-I/O: no sockets here).

Precedence, curl's for an ``https://`` URL (a ``wss://`` server is dialled like one):

1. ``--proxy URL`` (``http://``, ``https://``, ``socks5://``, ``socks5h://``), or
   ``--proxy direct`` to ignore the environment;
2. ``https_proxy``, then ``HTTPS_PROXY``;
3. ``all_proxy``, then ``ALL_PROXY``;

and, for 2 and 3 only, ``no_proxy`` (else ``NO_PROXY``) exempts a server, with curl's rules
(https://curl.se/libcurl/c/CURLOPT_NOPROXY.html): a comma-separated list, blanks around items
ignored; a lone ``*`` matches every host; a name matches itself and its subdomains on a label
boundary (``example.com`` and ``.example.com`` both match ``www.example.com``, neither matches
``www.myexample.com``), case-insensitively, a trailing dot ignored; an IP address matches
itself only, and ``ADDRESS/BITS`` matches a CIDR range (curl 7.86 and later, IPv4 and IPv6 as
documented; curl 7.88 applies it to IPv4 only); IPv6 addresses are written without brackets;
an item with a ``:port`` or brackets matches nothing, as in curl. A
``--proxy`` given explicitly is never bypassed (curl's ``--noproxy`` is a separate flag).

The plain ``ws://`` of ``--insecure-plaintext`` is loopback only, so it never uses a proxy.

Credentials: in the proxy URL (``http://user:pass@proxy:3128``) or ``--proxy-auth-file``
(``user:password`` on one line, which wins). They are sent to HTTP proxies as Basic
``Proxy-Authorization`` and to SOCKS5 proxies as username/password; :func:`redact` keeps them
out of every log line.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

__all__ = ["PROXY_SCHEMES", "ProxyChoice", "choose_proxy", "no_proxy_match", "parse_proxy_url", "redact"]

PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
DIRECT = "direct"
#: A proxy URL without a port: curl's defaults (1080, or 443 for an HTTPS proxy).
_DEFAULT_PORTS = {"http": 1080, "https": 443, "socks5": 1080, "socks5h": 1080}


@dataclass(frozen=True)
class ProxyChoice:
    """The decision for one server: ``url`` None means a direct connection; ``why`` says where
    the decision came from (for the log and ``doctor``), with no credentials in it."""

    url: str | None
    why: str

    @property
    def shown(self) -> str:
        return redact(self.url) if self.url is not None else "direct"


def parse_proxy_url(value: str) -> str:
    """Check a proxy URL and return it normalised (scheme lower-case, a port always present).

    Raises:
        ValueError: not ``SCHEME://HOST[:PORT]`` with a supported scheme, or with a path.
    """
    if "://" not in value:
        value = "http://" + value  # curl's default scheme for a proxy
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in PROXY_SCHEMES:
        raise ValueError(f"unsupported proxy scheme {parts.scheme!r} (use {', '.join(PROXY_SCHEMES)})")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError(f"bad port in proxy URL {redact(value)!r}") from None
    if not host:
        raise ValueError(f"no host in proxy URL {redact(value)!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"a proxy URL has no path: {redact(value)!r}")
    netloc = parts.netloc.rpartition("@")
    userinfo = netloc[0] + "@" if netloc[1] else ""
    hostport = f"[{host}]" if ":" in host else host
    return urlunsplit((scheme, f"{userinfo}{hostport}:{port or _DEFAULT_PORTS[scheme]}", "", "", ""))


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with its userinfo replaced by ``user:password`` (percent-encoded)."""
    parts = urlsplit(url)
    hostport = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{hostport}"
    return urlunsplit((parts.scheme, netloc, "", "", ""))


def credentials(url: str) -> tuple[str, str] | None:
    parts = urlsplit(url)
    if parts.username is None:
        return None
    return unquote(parts.username), unquote(parts.password or "")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (the user name stays: it helps debugging)."""
    parts = urlsplit(url)
    if parts.password is None and "@" not in parts.netloc:
        return url
    user, _, hostport = parts.netloc.rpartition("@")
    name = user.partition(":")[0]
    return urlunsplit((parts.scheme, f"{name}:***@{hostport}", parts.path, parts.query, parts.fragment))


def _env(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """The first of ``names`` set to a non-empty value, with its name."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def no_proxy_match(host: str, no_proxy: str) -> str | None:
    """The ``no_proxy`` entry that exempts ``host``, or None (curl's rules: module docstring)."""
    host = host.strip("[]").rstrip(".").lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.split(","):
        item = raw.strip()
        if not item:
            continue
        if item == "*":
            return item
        entry = item.lower().rstrip(".")
        if address is not None:
            if "/" in entry:
                try:
                    if address in ipaddress.ip_network(entry, strict=False):
                        return item
                except ValueError:
                    continue
                continue
            try:
                if ipaddress.ip_address(entry) == address:
                    return item
            except ValueError:
                pass
            continue
        entry = entry.lstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return item
    return None


def choose_proxy(server_url: str, flag: str | None, environ: Mapping[str, str]) -> ProxyChoice:
    """The proxy for ``server_url`` (``wss://HOST:PORT``), from ``--proxy`` or the environment.

    Raises:
        ValueError: a proxy URL in ``--proxy`` or the environment is malformed (naming which).
    """
    parts = urlsplit(server_url)
    if parts.scheme != "wss":
        return ProxyChoice(None, "ws:// (loopback) is never proxied")
    if flag is not None:
        if flag.strip().lower() == DIRECT:
            return ProxyChoice(None, "--proxy direct")
        return ProxyChoice(parse_proxy_url(flag), "--proxy")
    found = _env(environ, "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
    if found is None:
        return ProxyChoice(None, "no --proxy, no HTTPS_PROXY/ALL_PROXY in the environment")
    name, value = found
    try:
        url = parse_proxy_url(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    exempt = _env(environ, "no_proxy", "NO_PROXY")
    if exempt is not None:
        match = no_proxy_match(parts.hostname or "", exempt[1])
        if match is not None:
            return ProxyChoice(None, f"{exempt[0]} entry {match!r} matches {parts.hostname}")
    return ProxyChoice(url, name)
