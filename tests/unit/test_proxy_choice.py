"""tunnel_client/proxy.py: which proxy a wss:// server is dialled through, and NO_PROXY with
curl's documented rules (https://curl.se/libcurl/c/CURLOPT_NOPROXY.html, curl 7.86+ for CIDR).
tests/e2e/test_proxy_curl_oracle.py checks the same table against the curl on this machine."""

from __future__ import annotations

import pytest

from tunnel_client.proxy import choose_proxy, no_proxy_match, parse_proxy_url, redact, with_credentials

#: (host, NO_PROXY value, exempt?) -- each row is a sentence of curl's documentation.
NO_PROXY_TABLE = [
    ("www.example.com", "*", True),  # "a single * character, which matches all hosts"
    ("www.example.com", "example.com", True),  # a domain matches its subdomains
    ("example.com", "example.com", True),  # and itself
    ("www.example.com", ".example.com", True),  # a leading dot is ignored
    ("example.com", ".example.com", True),
    ("www.myexample.com", "example.com", False),  # on a label boundary only
    ("example.com.evil.test", "example.com", False),
    ("WWW.Example.COM", "example.com", True),  # names compare case-insensitively
    ("www.example.com.", "example.com", True),  # a trailing dot on the host is ignored
    ("www.example.com", "other.test, example.com", True),  # a list, blanks ignored
    ("www.example.com", "other.test,,", False),
    ("www.example.com", "", False),
    ("www.example.com", "*.example.com", False),  # '*' is special only alone
    ("10.1.2.3", "10.1.2.3", True),  # an address matches itself
    ("10.1.2.3", "10.1.2.4", False),
    ("10.1.2.3", "10.0.0.0/8", True),  # CIDR
    ("11.1.2.3", "10.0.0.0/8", False),
    ("2001:db8::1", "2001:db8::1", True),  # IPv6 without brackets
    ("2001:db8::1", "2001:db8::/32", True),
    ("2001:db9::1", "2001:db8::/32", False),
    ("10.1.2.3", "1.2.3", False),  # no suffix matching for addresses
    ("www.example.com", "example.com:8443", False),  # an entry with a port matches nothing (curl)
    ("::1", "[::1]", False),  # nor one in brackets
]


@pytest.mark.parametrize(("host", "no_proxy", "exempt"), NO_PROXY_TABLE)
def test_no_proxy_follows_curl(host: str, no_proxy: str, exempt: bool) -> None:
    assert (no_proxy_match(host, no_proxy) is not None) is exempt


def env(**values: str) -> dict[str, str]:
    return values


def test_precedence_flag_then_https_then_all() -> None:
    url = "wss://tunnel.example.com:443"
    both = env(HTTPS_PROXY="http://a:3128", ALL_PROXY="socks5h://b:1080")
    assert choose_proxy(url, "http://flag:8080", both).url == "http://flag:8080"
    assert choose_proxy(url, "direct", both).url is None
    chosen = choose_proxy(url, None, both)
    assert (chosen.url, chosen.why) == ("http://a:3128", "HTTPS_PROXY")
    assert choose_proxy(url, None, env(ALL_PROXY="socks5h://b:1080")).url == "socks5h://b:1080"
    # lower case first, as curl reads them
    lower = env(https_proxy="http://low:1", HTTPS_PROXY="http://up:2", all_proxy="http://x:3")
    assert choose_proxy(url, None, lower).url == "http://low:1"
    assert choose_proxy(url, None, {}).url is None


def test_no_proxy_exempts_from_the_environment_not_from_the_flag() -> None:
    url = "wss://tunnel.example.com:443"
    values = env(HTTPS_PROXY="http://a:3128", NO_PROXY=".example.com")
    chosen = choose_proxy(url, None, values)
    assert chosen.url is None and "'.example.com'" in chosen.why and "NO_PROXY" in chosen.why
    assert choose_proxy(url, "http://a:3128", values).url == "http://a:3128"
    assert choose_proxy(url, None, env(HTTPS_PROXY="http://a:3128", no_proxy="x", NO_PROXY="*")).url == "http://a:3128"


def test_plaintext_loopback_is_never_proxied() -> None:
    assert choose_proxy("ws://127.0.0.1:8443", "http://a:3128", env(HTTPS_PROXY="http://a:1")).url is None


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("proxy.corp:3128", "http://proxy.corp:3128"),  # curl's default scheme
        ("HTTP://proxy.corp", "http://proxy.corp:1080"),  # curl's default port
        ("https://proxy.corp", "https://proxy.corp:443"),
        ("socks5h://[::1]:1080", "socks5h://[::1]:1080"),
        ("http://u:p%40ss@proxy:3128/", "http://u:p%40ss@proxy:3128"),
    ],
)
def test_proxy_urls_are_normalised(given: str, normal: str) -> None:
    assert parse_proxy_url(given) == normal


@pytest.mark.parametrize("bad", ["ftp://proxy:21", "socks4://p:1080", "http://", "http://p:99999", "http://p:1/path"])
def test_bad_proxy_urls_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_proxy_url(bad)


def test_a_malformed_environment_proxy_names_the_variable() -> None:
    with pytest.raises(ValueError, match="^HTTPS_PROXY: unsupported proxy scheme"):
        choose_proxy("wss://t:443", None, env(HTTPS_PROXY="ftp://p:21"))


def test_credentials_never_shown() -> None:
    url = with_credentials("http://old:x@proxy:3128", "svc", "s3cret:/@")
    assert url == "http://svc:s3cret%3A%2F%40@proxy:3128"
    assert redact(url) == "http://svc:***@proxy:3128"
    assert "s3cret" not in choose_proxy("wss://t:443", url, {}).shown
    assert redact("http://proxy:3128") == "http://proxy:3128"
