"""Request heads written by the client's upstream HTTP/1.1 client, and websocket mask keys."""

from __future__ import annotations

from shared.aio.wsfast import mask_key
from tunnel_client.http1 import build_head


def test_host_added_when_absent_and_kept_when_present() -> None:
    assert build_head("GET", "/a?b=1", [("Accept", "*/*")], "up:8080", None, False) == (
        b"GET /a?b=1 HTTP/1.1\r\nAccept: */*\r\nHost: up:8080\r\n\r\n"
    )
    head = build_head("GET", "/", [("Host", "public.example")], "up:8080", None, False)
    assert b"Host: public.example\r\n" in head and b"up:8080" not in head


def test_body_framing_is_ours() -> None:
    # a known body: its real length replaces whatever the caller claimed
    head = build_head("POST", "/", [("Content-Length", "999")], "h", 5, False)
    assert head.count(b"Content-Length") == 1 and b"Content-Length: 5\r\n" in head
    # a streamed body without a length goes chunked
    head = build_head("PUT", "/", [], "h", None, True)
    assert b"Transfer-Encoding: chunked\r\n" in head and b"Content-Length" not in head
    # a streamed body framed by the caller's Content-Length keeps it
    head = build_head("PUT", "/", [("Content-Length", "7")], "h", None, False)
    assert b"Content-Length: 7\r\n" in head
    # POST without a body says so; GET says nothing
    assert b"Content-Length: 0\r\n" in build_head("POST", "/", [], "h", None, False)
    assert b"Content-Length" not in build_head("GET", "/", [], "h", None, False)


def test_mask_keys_are_four_random_bytes_across_blocks() -> None:
    keys = [mask_key() for _ in range(3000)]  # crosses two 4 KiB refills
    assert all(len(k) == 4 for k in keys)
    assert len(set(keys)) > 2900  # 32-bit keys: collisions in 3,000 draws are rare
