"""Hostile HTTP/2 callers against the public listener: Rapid Reset (CVE-2023-44487), more
streams than advertised, oversized header lists, an HPACK bomb, PING and empty-DATA floods, a
flow-control window never opened, and the requests-per-connection cap. Each ends with a
defined GOAWAY or RST_STREAM, the upstream spared, and the server still serving others."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import h2.settings
import pytest
import pytest_asyncio
from aiohttp import web

from tests.waiting import wait_until

from .h2client import H2Caller, get
from .h2server import h2c_upstream
from .helpers import Certs, Stack, stack, upstream

pytestmark = pytest.mark.asyncio

ENHANCE_YOUR_CALM = 11
PROTOCOL_ERROR = 1


@pytest_asyncio.fixture
async def edge(certs: Certs) -> AsyncIterator[tuple[Stack, Any, list[str]]]:
    hits: list[str] = []

    async def counted(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", counted)
    async with h2c_upstream() as (url, seen), upstream(app) as up, stack(certs, h2c=True, send_timeout=2) as s:
        await s.add_client([f"app.test={up.url}", f"h2.test={url}"])
        yield s, seen, hits


async def closes_with(caller: H2Caller, timeout: float = 10.0) -> int | None:
    """Read until the server closes; the GOAWAY code it sent (None: none)."""
    async with asyncio.timeout(timeout):
        while await caller.pump():
            pass
    return None if caller.goaway is None else caller.goaway.error_code


async def still_serving(s: Stack) -> None:
    caller = await H2Caller.open(s.server.public_port)
    try:
        assert (await caller.request("app.test", "/after")).status == 200
    finally:
        await caller.close()


async def test_rapid_reset_gets_goaway_and_spares_the_upstream(edge: tuple[Stack, Any, list[str]]) -> None:
    s, _, hits = edge
    caller = await H2Caller.open(s.server.public_port)
    try:
        for _ in range(1000):  # HEADERS then RST_STREAM, all in a few writes
            sid = caller.h2.get_next_available_stream_id()
            caller.h2.send_headers(sid, get("app.test", "/reset-me"), end_stream=True)
            caller.h2.reset_stream(sid, 8)
        caller.flush()
        assert await closes_with(caller) == ENHANCE_YOUR_CALM
        assert caller.goaway is not None and caller.goaway.additional_data == b"rapid_reset"
    finally:
        await caller.close()
    assert len(hits) <= 101  # at most the resets allowed in one second reached the upstream
    await still_serving(s)
    assert s.server.h2 is not None and s.server.h2.goaways.get("rapid_reset") == 1


async def test_more_streams_than_advertised_is_a_connection_error(edge: tuple[Stack, Any, list[str]]) -> None:
    s, _, _ = edge
    caller = await H2Caller.open(s.server.public_port)
    try:
        await caller.pump()  # the server's SETTINGS
        assert caller.h2.remote_settings.max_concurrent_streams == 100
        # Pretend the server allowed more, then open 101 streams that stay open (no END_STREAM).
        caller.h2.remote_settings._settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = collections.deque([1000])
        for _ in range(101):
            caller.start(get("h2.test", "/big/10"), end=False)
        assert await closes_with(caller) == PROTOCOL_ERROR
    finally:
        await caller.close()
    await still_serving(s)


async def test_header_list_over_the_limit(edge: tuple[Stack, Any, list[str]]) -> None:
    s, _, hits = edge
    caller = await H2Caller.open(s.server.public_port)
    try:
        caller.start([*get("app.test", "/big-head"), ("x-big", "a" * 70_000)])
        assert await closes_with(caller) == ENHANCE_YOUR_CALM
    finally:
        await caller.close()
    assert "/big-head" not in hits
    await still_serving(s)


async def test_hpack_bomb(edge: tuple[Stack, Any, list[str]]) -> None:
    s, _, hits = edge
    caller = await H2Caller.open(s.server.public_port)
    try:
        # One 4,000-byte field enters the dynamic table; each repeat is a one-byte index:
        # 40 repeats decode to 160 KB from a header block of a few KB.
        sid = caller.h2.get_next_available_stream_id()
        caller.h2.send_headers(sid, [*get("app.test", "/bomb"), *[("x-bomb", "b" * 4000)] * 40], end_stream=True)
        wire = caller.h2.data_to_send()
        assert len(wire) < 8000
        caller.writer.write(wire)
        assert await closes_with(caller) == ENHANCE_YOUR_CALM
    finally:
        await caller.close()
    assert "/bomb" not in hits
    await still_serving(s)


@pytest.mark.parametrize("flood", ["ping", "empty_data", "settings"])
async def test_control_frame_floods(edge: tuple[Stack, Any, list[str]], flood: str) -> None:
    s, _, _ = edge
    caller = await H2Caller.open(s.server.public_port)
    try:
        if flood == "empty_data":
            sid = caller.start(get("app.test", "/slow-body"), end=False)
        for i in range(2000):
            if flood == "ping":
                caller.h2.ping(i.to_bytes(8, "big"))
            elif flood == "settings":
                caller.h2.update_settings({h2.settings.SettingCodes.ENABLE_PUSH: 0})
            else:
                caller.h2.send_data(sid, b"")
        caller.flush()
        assert await closes_with(caller) == ENHANCE_YOUR_CALM
    finally:
        await caller.close()
    await still_serving(s)


async def test_window_never_opened_keeps_memory_bounded(edge: tuple[Stack, Any, list[str]]) -> None:
    s, seen, _ = edge
    size = 64 * 1024 * 1024
    caller = await H2Caller.open(s.server.public_port, window=0)  # the caller never opens a window
    try:
        sid = caller.start(get("h2.test", f"/big/{size}"))
        await wait_until(lambda: seen.sent, what="upstream started sending")
        await asyncio.sleep(0.5)  # deliberate: give a missing bound time to show
        (sent,) = seen.sent.values()
        # Bounded by windows (the upstream's to the client, the tunnel stream's, the caller's),
        # never the body: a few hundred KiB, not 64 MiB.
        assert sent < 2 * 1024 * 1024, sent
        answer = await caller.wait(sid, timeout=10)  # --send-timeout 2: the edge gives up
        assert answer.reset == 8  # CANCEL
        assert answer.status == 200 and answer.body == b""
    finally:
        await caller.close()
    await wait_until(lambda: seen.resets, timeout=5, what="upstream stream reset")
    assert max(seen.sent.values()) < 2 * 1024 * 1024


async def test_requests_per_connection_cap_sends_goaway(certs: Certs) -> None:
    """After --h2-max-requests streams the connection gets GOAWAY NO_ERROR naming the last
    stream it will answer (as nginx's keepalive_requests); that stream is still served, and
    the connection closes once it is done. (h2, the library this caller is built on, stops
    reading at a GOAWAY, so the 50th answer itself is checked at the upstream.)"""
    hits: list[str] = []

    async def counted(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", counted)
    async with upstream(app) as up, stack(certs, h2c=True, h2_max_requests=50) as s:
        await s.add_client([f"app.test={up.url}"])
        caller = await H2Caller.open(s.server.public_port)
        try:
            for i in range(49):
                assert (await caller.request("app.test", f"/n{i}")).status == 200
            caller.start(get("app.test", "/n49"))
            assert await closes_with(caller) == 0
            assert caller.goaway is not None and caller.goaway.last_stream_id == 99
        finally:
            await caller.close()
        await wait_until(lambda: len(hits) == 50, what="the 50th request served")
        await still_serving(s)
