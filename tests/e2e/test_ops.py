"""Operations: admin listener, metrics, API, status command, client health, logs, ECS labels."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from ..waiting import wait_until
from .helpers import Certs, stack, upstream

pytestmark = pytest.mark.asyncio
DATA = Path(__file__).parent / "data"
BIN = Path(sys.executable).parent
ADMIN = "admin-secret-token-42"


def hello_app() -> web.Application:
    async def h(request: web.Request) -> web.Response:
        return web.json_response({"rid": request.headers.get("X-Request-Id"), "path": request.path})

    async def boom(request: web.Request) -> web.Response:
        return web.Response(status=500, text="boom")

    app = web.Application()
    app.router.add_get("/boom", boom)
    app.router.add_get("/{tail:.*}", h)
    return app


async def test_readyz_waits_for_min_ready_tunnels(certs: Certs) -> None:
    """--min-ready-tunnels 1: /readyz is 503 with no session (a restarted server that would
    answer 503 to everything), 200 once a client has registered, 503 again when it leaves."""
    async with upstream(hello_app()) as up, stack(certs, min_ready_tunnels=1) as s:
        admin = f"http://127.0.0.1:{s.server.admin_port}/readyz"
        async with aiohttp.ClientSession() as http:
            async with http.get(admin) as r:
                assert r.status == 503
            running = await s.add_client([f"api.example.com={up.url}"])
            async with http.get(admin) as r:
                assert r.status == 200
            await running.stop()
            for _ in range(100):
                async with http.get(admin) as r:
                    if r.status == 503:
                        break
                await asyncio.sleep(0.05)
            assert r.status == 503


async def test_admin_health_metrics_api_and_delete(certs: Certs) -> None:
    async with upstream(hello_app()) as up, stack(certs, admin_token=ADMIN) as s:
        running = await s.add_client([f"api.example.com={up.url}"], label=["site=berlin"])
        admin = f"http://127.0.0.1:{s.server.admin_port}"
        auth = {"Authorization": f"Bearer {ADMIN}"}
        async with aiohttp.ClientSession() as http:
            for i in range(5):
                async with http.get(f"{s.base}/users/{i}?q=secret", headers={"Host": "api.example.com"}) as r:
                    assert r.status == 200
            async with http.get(f"{s.base}/boom", headers={"Host": "api.example.com"}) as r:
                assert r.status == 500
            async with http.get(f"{s.base}/", headers={"Host": "nobody.example.com"}) as r:
                assert r.status == 503
            async with http.get(admin + "/healthz") as r:
                assert r.status == 200
            async with http.get(admin + "/readyz") as r:
                assert r.status == 200
            async with http.get(admin + "/metrics") as r:
                metrics = await r.text()
            assert 'backhaul_http_requests_total{code="2xx",host="api.example.com"} 5.0' in metrics
            assert 'backhaul_http_requests_total{code="5xx",host="api.example.com"} 1.0' in metrics
            assert 'backhaul_http_requests_total{code="5xx",host="unrouted"} 1.0' in metrics
            assert 'backhaul_rejected_requests_total{reason="no_tunnel"} 1.0' in metrics
            assert "backhaul_http_response_head_seconds_bucket" in metrics
            assert 'backhaul_tunnels_connected{client_id="default",ecs_cluster="",ecs_service=""} 1.0' in metrics
            assert "/users/" not in metrics and "secret" not in metrics  # no paths, no query strings
            async with http.get(admin + "/api/tunnels") as r:
                assert r.status == 401
            async with http.get(admin + "/api/tunnels", headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            async with http.get(admin + "/api/tunnels", headers=auth) as r:
                tunnels = (await r.json())["tunnels"]
            assert len(tunnels) == 1
            t = tunnels[0]
            assert t["client_id"] == "default" and t["hostnames"] == ["api.example.com"]
            assert t["labels"] == {"site": "berlin"} and t["remote_addr"] == "127.0.0.1"
            assert t["requests"] == 6 and t["bytes_in"] > 0 and t["bytes_out"] > 0 and "connected_since" in t
            async with http.delete(admin + "/api/tunnels/nope", headers=auth) as r:
                assert r.status == 404
            async with http.delete(admin + f"/api/tunnels/{t['id']}", headers=auth) as r:
                assert r.status == 204
            assert t["id"] not in s.server.registry.tunnels
            await running.client.wait_connected(10)  # the client reconnects by itself

            async def counted() -> bool:
                async with http.get(admin + "/metrics") as r:
                    return "backhaul_tunnel_reconnects_total 1.0" in await r.text()

            await wait_until(counted, 5, what="the reconnect counted")


async def test_status_command_prints_tunnel_table(certs: Certs) -> None:
    async with upstream(hello_app()) as up, stack(certs, admin_token=ADMIN) as s:
        await s.add_client([f"shop.example.com={up.url}"], label=["env=prod"])
        env = {**os.environ, "BACKHAUL_ADMIN_TOKEN": ADMIN}
        out = await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "exit-server"), "status", "--admin-addr", f"127.0.0.1:{s.server.admin_port}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split()[:3] == ["TUNNEL", "CLIENT", "HOSTNAMES"]
        assert "shop.example.com" in lines[1] and "env=prod" in lines[1] and "default" in lines[1]
        bad = await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "exit-server"), "status", "--admin-addr", f"127.0.0.1:{s.server.admin_port}"],
            capture_output=True,
            text=True,
            env={**os.environ, "BACKHAUL_ADMIN_TOKEN": "wrong"},
            timeout=30,
        )
        assert bad.returncode == 1 and "401" in bad.stderr


async def test_admin_api_disabled_without_token(certs: Certs) -> None:
    async with stack(certs) as s, aiohttp.ClientSession() as http:
        async with http.get(
            f"http://127.0.0.1:{s.server.admin_port}/api/tunnels", headers={"Authorization": "Bearer anything"}
        ) as r:
            assert r.status == 403


async def test_client_health_endpoint_and_healthcheck_command(certs: Certs) -> None:
    async with upstream(hello_app()) as up, stack(certs) as s:
        running = await s.add_client([f"default={up.url}"])
        port = running.client.admin_port
        check = [str(BIN / "tunnel-client"), "healthcheck", "--admin-addr", f"127.0.0.1:{port}"]
        ok = await asyncio.to_thread(subprocess.run, check, capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{s.base}/x") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
        assert 'backhaul_client_streams_total{kind="http",outcome="ok"} 1.0' in text
        assert 'backhaul_client_stream_duration_seconds_count{kind="http"} 1.0' in text
        assert "backhaul_client_sessions_connected" in text
        await s.server.close()  # the exit server goes away: the client is no longer healthy
        for _ in range(50):
            if not running.client.connected:
                break
            await asyncio.sleep(0.1)
        bad = await asyncio.to_thread(subprocess.run, check, capture_output=True, text=True, timeout=30)
        assert bad.returncode == 1
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 503
    nobody = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "tunnel-client"), "healthcheck", "--admin-addr", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert nobody.returncode == 1


async def test_access_log_and_request_id(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backhaul.access")
    async with upstream(hello_app()) as up, stack(certs) as s:
        running = await s.add_client([f"default={up.url}"])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{s.base}/a?b=1") as r:
                generated = r.headers["X-Request-Id"]
                assert (await r.json())["rid"] == generated and len(generated) >= 16
            async with http.get(f"{s.base}/keep", headers={"X-Request-Id": "abc-123"}) as r:
                assert r.headers["X-Request-Id"] == "abc-123" and (await r.json())["rid"] == "abc-123"
            async with http.get(f"{s.base}/bad", headers={"X-Request-Id": "x" * 300}) as r:
                assert r.headers["X-Request-Id"] != "x" * 300
    records = [r for r in caplog.records if r.name == "backhaul.access"]
    first = next(r for r in records if getattr(r, "request_id", None) == generated)
    assert first.method == "GET" and first.path == "/a" and first.status == 200  # type: ignore[attr-defined]
    assert first.caller == "127.0.0.1" and first.bytes_out > 0 and first.duration_ms > 0  # type: ignore[attr-defined]
    assert first.tunnel_id in s.server.registry.tunnels or first.tunnel_id != "-"  # type: ignore[attr-defined]
    assert running.client.connected is not None


async def test_json_logs_from_processes(certs: Certs, tmp_path: Path) -> None:
    from .test_cli import Proc, free_port, wait_port, wait_status

    up_script = tmp_path / "up.py"
    up_port = free_port()
    up_script.write_text(
        "from aiohttp import web\nasync def h(r):\n    return web.Response(text='ok')\n"
        "app = web.Application(); app.router.add_get('/{t:.*}', h)\n"
        f"web.run_app(app, host='127.0.0.1', port={up_port}, print=None)\n"
    )
    up = subprocess.Popen([sys.executable, str(up_script)])
    public, control = free_port(), free_port()
    server = Proc(
        [
            "exit-server",
            "run",
            "--public-addr",
            f"127.0.0.1:{public}",
            "--control-addr",
            f"127.0.0.1:{control}",
            "--tls-cert",
            str(certs.cert),
            "--tls-key",
            str(certs.key),
            "--log-format",
            "json",
        ],
        {"BACKHAUL_TOKEN": "json-token"},
    )
    client = Proc(
        [
            "tunnel-client",
            "run",
            "--server",
            f"wss://localhost:{control}",
            "--ca-file",
            str(certs.ca),
            "--upstream",
            f"default=http://127.0.0.1:{up_port}",
            "--log-format",
            "json",
        ],
        {"BACKHAUL_TOKEN": "json-token"},
    )
    try:
        await asyncio.to_thread(wait_port, up_port)
        await asyncio.to_thread(wait_port, public)
        await asyncio.to_thread(wait_status, f"http://127.0.0.1:{public}/hello", "x", 200)
    finally:
        for proc in (client, server):  # graceful stop: every log line is flushed
            proc.popen.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.popen.wait, 15)
        server_out = server.stop()
        client_out = client.stop()
        up.kill()
        up.wait()
    server_lines = [json.loads(line) for line in server_out.splitlines() if line.startswith("{")]
    assert len(server_lines) >= len(server_out.splitlines()) - 1  # all but the startup banner on stdout
    client_lines = [json.loads(line) for line in client_out.splitlines() if line.strip() and line.startswith("{")]
    access = [line for line in server_lines if line.get("logger") == "backhaul.access"]
    assert access and access[-1]["status"] == 200 and access[-1]["path"] == "/hello" and "request_id" in access[-1]
    assert any(
        line["logger"] == "exit_server.control" and "registered client" in line["message"] for line in server_lines
    )
    assert any(line["logger"] == "tunnel_client.client" for line in client_lines)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in server_lines)


@pytest_asyncio.fixture
async def ecs_metadata(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dict[str, str]]:
    """A loopback stand-in for the ECS agent's metadata endpoint, serving recorded documents."""
    docs: dict[str, str] = {}

    async def container(request: web.Request) -> web.Response:
        return web.Response(text=docs["container"], content_type="application/json")

    async def task(request: web.Request) -> web.Response:
        return web.Response(text=docs["task"], content_type="application/json")

    app = web.Application()
    app.router.add_get("/v4/abc", container)
    app.router.add_get("/v4/abc/task", task)
    async with upstream(app) as meta:
        monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", f"{meta.url}/v4/abc")
        yield docs


async def test_ecs_labels_reach_api_and_metrics(certs: Certs, ecs_metadata: dict[str, str]) -> None:
    ecs_metadata["container"] = (DATA / "ecs_container_bridge.json").read_text()
    ecs_metadata["task"] = (DATA / "ecs_task_bridge.json").read_text()
    async with upstream(hello_app()) as up, stack(certs, admin_token=ADMIN) as s:
        await s.add_client([f"default={up.url}"])
        tunnel = next(iter(s.server.registry.tunnels.values()))
        assert tunnel.labels == {
            "ecs.cluster": "customer-site-7",
            "ecs.task_arn": "arn:aws:ecs:eu-west-1:111122223333:task/customer-site-7/0f1e2d3c4b5a69788796a5b4c3d2e1f0",
            "ecs.family": "vendor-app-bridge",
            "ecs.revision": "3",
            "ecs.service": "vendor-app",
        }
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{s.server.admin_port}/metrics") as r:
                text = await r.text()
            async with http.get(
                f"http://127.0.0.1:{s.server.admin_port}/api/tunnels", headers={"Authorization": f"Bearer {ADMIN}"}
            ) as r:
                api = await r.json()
        assert (
            'backhaul_tunnels_connected{client_id="default",ecs_cluster="customer-site-7",ecs_service="vendor-app"} 1.0'
        ) in text
        assert "task/customer-site-7" not in text  # the task ARN is not a metric label (unbounded)
        assert api["tunnels"][0]["labels"]["ecs.family"] == "vendor-app-bridge"


async def test_route_discovery_host_mode_serves_traffic(certs: Certs, ecs_metadata: dict[str, str]) -> None:
    async with upstream(hello_app()) as up, stack(certs) as s:
        ecs_metadata["container"] = (DATA / "ecs_container_host.json").read_text()
        ecs_metadata["task"] = (DATA / "ecs_task_host.json").read_text().replace("UPSTREAM_PORT", str(up.port))
        await s.add_client([], upstream_from_ecs=True)
        tunnel = next(iter(s.server.registry.tunnels.values()))
        assert [r.host for r in tunnel.routes] == ["host-app.example.com"]
        assert tunnel.labels["ecs.cluster"] == "customer-site-9"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{s.base}/via-ecs", headers={"Host": "host-app.example.com"}) as r:
                assert r.status == 200 and (await r.json())["path"] == "/via-ecs"
