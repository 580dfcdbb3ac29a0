"""The admin dashboard in real headless Chromium: a tunnel row appears, numbers move after
traffic, and a screenshot is saved (.artifacts/dashboard.png)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from .cdp import browser_page
from .helpers import Certs, stack, upstream

pytestmark = pytest.mark.asyncio
ADMIN = "dashboard-admin-token"
SHOT = Path(__file__).resolve().parents[2] / ".artifacts" / "dashboard.png"  # gitignored; docs/screenshots has a copy


async def test_dashboard_shows_tunnels_and_live_traffic(certs: Certs, tmp_path: Path) -> None:
    async def h(request: web.Request) -> web.Response:
        return web.Response(text="ok", status=500 if request.path == "/fail" else 200)

    app = web.Application()
    app.router.add_get("/{t:.*}", h)
    async with upstream(app) as up, stack(certs, admin_token=ADMIN) as s:
        await s.add_client([f"shop.example.com={up.url}"], label=["site=berlin", "ecs.cluster=customer-7"])
        url = f"http://127.0.0.1:{s.server.admin_port}/#token={ADMIN}"
        async with browser_page(url) as page:
            row = await page.wait_for("document.querySelector('#tunnels tbody tr td:nth-child(3)')?.textContent")
            assert row == "shop.example.com"
            labels = await page.evaluate("document.querySelector('#tunnels tbody tr td:nth-child(4)').textContent")
            assert "site=berlin" in labels and "ecs.cluster=customer-7" in labels
            async with aiohttp.ClientSession() as http:
                for i in range(30):
                    path = "/fail" if i % 10 == 0 else f"/item/{i}"
                    async with http.get(s.base + path, headers={"Host": "shop.example.com"}) as r:
                        await r.read()
            count = await page.wait_for(
                "(() => { const c = document.querySelector('#hosts tbody tr td:nth-child(2)');"
                " return c && Number(c.textContent) >= 30 ? c.textContent : null })()"
            )
            assert int(count) == 30
            route = await page.evaluate("document.querySelector('#hosts tbody tr td').textContent")
            assert route == "shop.example.com"
            errors = await page.evaluate("document.querySelector('#hosts tbody tr td:nth-child(4)').textContent")
            assert errors.strip() == "10.0 %"
            # keep traffic flowing so the rate column is non-zero at the next refresh
            async with aiohttp.ClientSession() as http:
                for _ in range(20):
                    async with http.get(s.base + "/more", headers={"Host": "shop.example.com"}) as r:
                        await r.read()
                    await asyncio.sleep(0.05)
            rate = await page.wait_for(
                "(() => { const c = document.querySelector('#hosts tbody tr td:nth-child(3)');"
                " return c && Number(c.textContent) > 0 ? c.textContent : null })()"
            )
            assert float(rate) > 0
            summary = await page.evaluate("document.querySelector('[data-testid=summary]').textContent")
            assert summary.startswith("1 tunnel(s)")
            SHOT.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(tmp_path / "dashboard.png")
            assert (tmp_path / "dashboard.png").stat().st_size > 10_000
            (tmp_path / "dashboard.png").replace(SHOT)
