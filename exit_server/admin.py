"""The exit server's admin listener: health, readiness, Prometheus metrics, the tunnel API
(behind an admin token) and the live dashboard (one HTML page, no outside assets)."""

from __future__ import annotations

import hmac
import importlib.resources
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from shared.frames import GoAwayCode

from .h1 import Request, Response

if TYPE_CHECKING:
    from .server import ExitServer

__all__ = ["AdminApp", "json_response", "tunnel_view"]

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    resp = Response(status=status, body=json.dumps(data).encode(), headers=headers)
    resp.headers["Content-Type"] = "application/json; charset=utf-8"
    return resp


def _text(status: int, text: str) -> Response:
    return Response(status=status, text=text)


def tunnel_view(tunnel: Any) -> dict[str, Any]:
    """The public (secret-free) description of a tunnel for the API and the dashboard."""
    session = tunnel.conn.session
    return {
        "id": tunnel.id,
        "client_id": tunnel.client_id,
        "instance_id": tunnel.instance_id,
        "hostnames": [r.host + ("" if r.path_prefix == "/" else r.path_prefix) for r in tunnel.routes],
        "tcp_ports": list(tunnel.tcp_ports),
        "remote_addr": tunnel.remote,
        "connected_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(tunnel.connected_at)),
        "connected_seconds": round(time.time() - tunnel.connected_at, 1),
        "labels": dict(tunnel.labels),
        "routable": tunnel.routable,
        "streams_in_flight": tunnel.in_flight,
        "requests": tunnel.requests,
        "bytes_in": session.bytes_in,
        "bytes_out": session.bytes_out,
        "rtt_ms": round(session.rtt * 1000, 2) if session.rtt is not None else None,
    }


class AdminApp:
    """The admin listener's requests (served by exit_server/h1.py, as the public ones): a
    route table of exact paths, plus ``DELETE /api/tunnels/{id}``. A GET route answers HEAD
    too; an unknown path is 404, a known one with another method 405 with ``Allow``."""

    def __init__(self, server: ExitServer, admin_token: str | None) -> None:
        self.server = server
        self._token = admin_token.encode() if admin_token else None
        self._get: dict[str, Handler] = {
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/metrics": self.metrics,
            "/api/tunnels": self.list_tunnels,
            "/api/stats": self.stats,
            "/api/certificates": self.certificates,
            "/": self.dashboard,
        }

    async def __call__(self, request: Request) -> Response:
        path = request.path
        method = request.method
        if path.startswith("/api/tunnels/") and "/" not in path[len("/api/tunnels/") :] and len(path) > 13:
            if method != "DELETE":
                return self._not_allowed("DELETE")
            return await self.delete_tunnel(request, path[len("/api/tunnels/") :])
        handler = self._get.get(path)
        if handler is None:
            return _text(404, "404: Not Found")
        if method not in ("GET", "HEAD"):
            return self._not_allowed("GET, HEAD")
        return await handler(request)

    @staticmethod
    def _not_allowed(allow: str) -> Response:
        resp = _text(405, "405: Method Not Allowed")
        resp.headers["Allow"] = allow
        return resp

    def _authorized(self, request: Request) -> Response | None:
        if self._token is None:
            return json_response({"error": "admin API disabled: no admin token configured"}, status=403)
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), self._token):
            log.warning("admin: unauthorized API call from %s", request.remote)
            return json_response(
                {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": 'Bearer realm="backhaul-admin"'}
            )
        return None

    async def healthz(self, request: Request) -> Response:
        return Response(text="ok\n")

    async def readyz(self, request: Request) -> Response:
        if self.server.ready:
            return Response(text="ready\n")
        return Response(status=503, text="not ready\n")

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # at the first scrape (observe.py)

        body = generate_latest(self.server.metrics.registry)
        return Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_tunnels(self, request: Request) -> Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        tunnels = sorted(self.server.registry.tunnels.values(), key=lambda t: t.connected_at)
        return json_response({"tunnels": [tunnel_view(t) for t in tunnels]})

    async def delete_tunnel(self, request: Request, tunnel_id: str) -> Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        tunnel = self.server.registry.tunnels.get(tunnel_id)
        if tunnel is None:
            return json_response({"error": "no such tunnel"}, status=404)
        log.info(
            "admin: disconnecting tunnel %s (client %s) on request from %s", tunnel.id, tunnel.client_id, request.remote
        )
        self.server.registry.remove(tunnel)
        self.server.tcp.sync()
        tunnel.conn.goaway(GoAwayCode.NO_ERROR, "disconnected by the operator")
        await tunnel.conn.close(1000, "disconnected by the operator")
        return Response(status=204)

    async def stats(self, request: Request) -> Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        return json_response(
            {
                "time": time.time(),
                "hosts": self.server.metrics.host_stats(),
                "tunnels": [tunnel_view(t) for t in self.server.registry.tunnels.values()],
                "in_flight": self.server.public.in_flight,
            }
        )

    async def certificates(self, request: Request) -> Response:
        """The public HTTPS listener's certificates (name, source, issuer, not-after) and, with
        ACME on, each name's order or renewal state."""
        if (denied := self._authorized(request)) is not None:
            return denied
        certs = self.server.certs
        served = certs.all() if certs is not None else []
        return json_response(
            {
                "certificates": [
                    {
                        "name": c.name,
                        "source": c.source,
                        "issuer": c.issuer,
                        "not_after": c.not_after.isoformat(),
                        "seconds_left": round(c.not_after.timestamp() - time.time()),
                    }
                    for c in served
                ],
                "acme": self.server.acme.status() if self.server.acme is not None else None,
            }
        )

    async def dashboard(self, request: Request) -> Response:
        page = importlib.resources.files("exit_server").joinpath("static/dashboard.html").read_text()
        return Response(
            text=page,
            headers={
                "Content-Type": "text/html; charset=utf-8",
                "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'",
                "Cache-Control": "no-store",
            },
        )
