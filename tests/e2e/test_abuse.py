"""Floods of wrong credentials from one address (issue 15 item 5): attempts are counted when
they start, so a concurrent flood is evaluated at most ``burst`` times, and clients from other
addresses do not queue behind it."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import ssl
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from .helpers import Certs, stack, upstream
from .sec_helpers import echo_app, token_stack, write_tokens
from .test_access import PASSWORD, write_access

pytestmark = pytest.mark.asyncio

FLOOD = 60
BURST = 10  # FailureLimiter's default: 10 failures free, then 1 per second


async def test_token_flood_is_evaluated_at_most_burst_times_and_others_pass(certs: Certs, tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.toml", {"acme": ["acme.example"]})
    wrong = tokens["acme"][:16] + "x" * (len(tokens["acme"]) - 16)  # a real token id: scrypt runs
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    quiet = logging.getLogger("test.rawclient")
    async with token_stack(certs, tmp_path / "tokens.toml") as s:
        url = f"wss://localhost:{s.server.control_port}"

        async def attempt(token: str, source: str) -> int:
            try:
                ws = await connect(
                    url,
                    ssl=ctx,
                    additional_headers={"Authorization": f"Bearer {token}"},
                    local_addr=(source, 0),
                    logger=quiet,
                    open_timeout=30,
                )
            except InvalidStatus as exc:
                return exc.response.status_code
            await ws.close()
            return 101

        loop = asyncio.get_running_loop()
        started = loop.time()
        flood = [asyncio.create_task(attempt(wrong, "127.0.0.3")) for _ in range(FLOOD)]
        await asyncio.sleep(0)  # the flood's connections are on their way
        good_started = loop.time()
        assert await attempt(tokens["acme"], "127.0.0.2") == 101
        good_took = loop.time() - good_started
        statuses = await asyncio.gather(*flood)
        elapsed = loop.time() - started
    evaluated = statuses.count(401)
    assert statuses.count(401) + statuses.count(429) == FLOOD
    assert evaluated <= BURST + math.ceil(elapsed), (evaluated, elapsed)  # 3d9815c: all 60
    assert good_took < 1.0, good_took  # 3d9815c: seconds, queued behind the flood's scrypt


async def test_password_flood_is_evaluated_at_most_burst_times_and_others_pass(certs: Certs, tmp_path: Path) -> None:
    write_access(tmp_path / "access.toml")
    async with upstream(echo_app()) as up, stack(certs, access=tmp_path / "access.toml") as s:
        await s.add_client([f"secure.example={up.url}"])

        async def get(password: str, source: str) -> int:
            auth = "Basic " + base64.b64encode(f"alice:{password}".encode()).decode()
            connector = aiohttp.TCPConnector(local_addr=(source, 0))
            async with (
                aiohttp.ClientSession(connector=connector) as http,
                http.get(s.base + "/p", headers={"Host": "secure.example", "Authorization": auth}) as r,
            ):
                return r.status

        loop = asyncio.get_running_loop()
        started = loop.time()
        flood = [asyncio.create_task(get("wrong password", "127.0.0.3")) for _ in range(FLOOD)]
        await asyncio.sleep(0)
        good_started = loop.time()
        assert await get(PASSWORD, "127.0.0.2") == 200
        good_took = loop.time() - good_started
        statuses = await asyncio.gather(*flood)
        elapsed = loop.time() - started
    evaluated = statuses.count(401)
    assert evaluated + statuses.count(429) == FLOOD
    assert evaluated <= BURST + math.ceil(elapsed), (evaluated, elapsed)
    assert good_took < 1.0, good_took
