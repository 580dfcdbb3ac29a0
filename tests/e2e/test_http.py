"""HTTP fidelity and routing through a real exit server, tunnel client and aiohttp upstream."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from .helpers import Certs, stack, upstream

pytestmark = pytest.mark.asyncio


def echo_app() -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = [[k, v] for k, v in request.headers.items()]
        return web.json_response(
            {
                "method": request.method,
                "path_qs": request.path_qs,
                "host": request.host,
                "headers": headers,
                "body_len": len(body),
                "body_hex": body[:64].hex(),
            },
            headers={"X-Upstream": "echo"},
        )

    async def cookies(request: web.Request) -> web.Response:
        resp = web.Response(text="ok")
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/")
        resp.headers.add("X-Multi", "one")
        resp.headers.add("X-Multi", "two")
        return resp

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code, headers={"ETag": '"x"'})
        return web.Response(status=code, text=f"status {code}")

    async def binary(request: web.Request) -> web.Response:
        return web.Response(body=bytes(range(256)) * 4, content_type="application/octet-stream")

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f"part{i};".encode())
        await resp.write_eof()
        return resp

    async def hop(request: web.Request) -> web.Response:
        return web.Response(
            text="hop", headers={"Connection": "close, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5"}
        )

    app = web.Application()
    app.router.add_route("*", "/cookies", cookies)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/binary", binary)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/hop", hop)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def test_get_through_tunnel_preserves_host_and_query(certs: Certs) -> None:
    async with upstream(echo_app()) as up, stack(certs) as s:
        await s.add_client([f"app.example.com={up.url}"])
        async with aiohttp.ClientSession() as http:
            async with http.get(s.base + "/a/b?x=1&y=%20z", headers={"Host": "app.example.com"}) as r:
                assert r.status == 200
                assert r.headers["X-Upstream"] == "echo"
                data = await r.json()
    assert data["method"] == "GET"
    assert data["path_qs"] == "/a/b?x=1&y=%20z"
    assert data["host"] == "app.example.com"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
async def test_every_method(certs: Certs, method: str) -> None:
    async with upstream(echo_app()) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        async with aiohttp.ClientSession() as http:
            body = b"payload" if method in ("POST", "PUT", "PATCH") else None
            async with http.request(method, s.base + "/m?q=1", data=body) as r:
                assert r.status == 200
                raw = await r.read()
                if method == "HEAD":
                    assert raw == b""
                    assert int(r.headers["Content-Length"]) > 0
                else:
                    data = await r.json(content_type=None)
                    assert data["method"] == method
                    assert data["body_len"] == (7 if body else 0)


async def test_repeated_headers_and_set_cookie(certs: Certs) -> None:
    async with upstream(echo_app()) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        async with aiohttp.ClientSession() as http:
            async with http.get(s.base + "/cookies") as r:
                assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
                assert r.headers.getall("X-Multi") == ["one", "two"]
            async with http.get(s.base + "/echo", headers=[("X-Rep", "1"), ("X-Rep", "2")]) as r:
                data = await r.json()
                assert [v for k, v in data["headers"] if k == "X-Rep"] == ["1", "2"]


async def test_binary_empty_204_304(certs: Certs) -> None:
    async with upstream(echo_app()) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        async with aiohttp.ClientSession() as http:
            async with http.get(s.base + "/binary") as r:
                assert await r.read() == bytes(range(256)) * 4
            blob = bytes(range(256)) * 100
            async with http.post(s.base + "/up", data=blob) as r:
                data = await r.json()
                assert data["body_len"] == len(blob) and data["body_hex"] == blob[:64].hex()
            async with http.post(s.base + "/empty", data=b"") as r:
                assert (await r.json())["body_len"] == 0
            for code in (204, 304):
                async with http.get(s.base + f"/status/{code}") as r:
                    assert r.status == code
                    assert r.headers["ETag"] == '"x"'
                    assert await r.read() == b""
            async with http.get(s.base + "/status/418") as r:
                assert r.status == 418 and await r.text() == "status 418"


async def test_chunked_request_and_response(certs: Certs) -> None:
    async def gen():  # type: ignore[no-untyped-def]
        for i in range(10):
            yield f"chunk{i}-".encode() * 100
            await asyncio.sleep(0)

    async with upstream(echo_app()) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        async with aiohttp.ClientSession() as http:
            async with http.post(s.base + "/chunked-up", data=gen()) as r:
                data = await r.json()
                assert data["body_len"] == sum(len(f"chunk{i}-") * 100 for i in range(10))
                sent = {k.lower(): v for k, v in data["headers"]}
                assert sent.get("transfer-encoding") == "chunked"
            async with http.get(s.base + "/chunked") as r:
                assert r.headers.get("Transfer-Encoding") == "chunked"
                assert await r.text() == "".join(f"part{i};" for i in range(5))


async def test_expect_100_continue(certs: Certs) -> None:
    async with upstream(echo_app()) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.public_port)
        writer.write(b"POST /exp HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b"hello")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()


async def test_hop_by_hop_removed_and_forwarded_headers(certs: Certs) -> None:
    async with upstream(echo_app()) as up, stack(certs) as s:
        await s.add_client([f"default={up.url}"])
        async with aiohttp.ClientSession() as http:
            headers = {
                "Host": "shop.example.com",
                "Connection": "keep-alive, X-Drop-Me",
                "X-Drop-Me": "1",
                "TE": "trailers",
                "Proxy-Authorization": "Basic eA==",
                "X-Forwarded-For": "203.0.113.9",
                "X-Keep": "yes",
            }
            async with http.get(s.base + "/fwd", headers=headers) as r:
                data = await r.json()
            got = {k.lower(): v for k, v in data["headers"]}
            assert "x-drop-me" not in got and "te" not in got and "proxy-authorization" not in got
            assert got["x-keep"] == "yes"
            assert got["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
            assert got["x-forwarded-proto"] == "http"
            assert got["x-forwarded-host"] == "shop.example.com"
            assert data["host"] == "shop.example.com"
            async with http.get(s.base + "/hop") as r:
                assert "X-Secret-Hop" not in r.headers and "Keep-Alive" not in r.headers
                assert await r.text() == "hop"


async def test_routing_exact_wildcard_default_and_prefix(certs: Certs) -> None:
    def tagged(tag: str) -> web.Application:
        async def h(request: web.Request) -> web.Response:
            return web.Response(text=f"{tag}:{request.path}")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", h)
        return app

    async with (
        upstream(tagged("exact")) as exact,
        upstream(tagged("api")) as api,
        upstream(tagged("wild")) as wild,
        upstream(tagged("deep")) as deep,
        upstream(tagged("default")) as dflt,
        stack(certs) as s,
    ):
        await s.add_client(
            [
                f"app.example.com={exact.url}",
                f"app.example.com/api={api.url}",
                f"*.example.com={wild.url}",
                f"*.b.example.com={deep.url}",
                f"default={dflt.url}",
            ]
        )
        cases = [
            ("app.example.com", "/", "exact:/"),
            ("app.example.com", "/api", "api:/api"),
            ("app.example.com", "/api/v1", "api:/api/v1"),
            ("app.example.com", "/apix", "exact:/apix"),
            ("APP.example.com:8080", "/x", "exact:/x"),
            ("other.example.com", "/x", "wild:/x"),
            ("a.b.example.com", "/x", "deep:/x"),
            ("example.org", "/x", "default:/x"),
        ]
        async with aiohttp.ClientSession() as http:
            for host, path, expected in cases:
                async with http.get(s.base + path, headers={"Host": host}) as r:
                    assert (host, await r.text()) == (host, expected)


async def test_no_tunnel_is_503_generic(certs: Certs) -> None:
    async with stack(certs) as s, aiohttp.ClientSession() as http:
        async with http.get(s.base + "/<script>", headers={"Host": "nobody.example.com"}) as r:
            assert r.status == 503
            text = await r.text()
            assert "script" not in text and "nobody" not in text and len(text) < 100


async def test_upstream_refusing_is_502(certs: Certs) -> None:
    from tests.ports import free_port

    dead = free_port()  # a port with nobody listening
    async with stack(certs) as s:
        await s.add_client([f"default=http://127.0.0.1:{dead}"])
        async with aiohttp.ClientSession() as http:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            async with http.get(s.base + "/") as r:
                assert r.status == 502
            assert loop.time() - t0 < 3


async def test_no_response_head_in_time_is_504(certs: Certs) -> None:
    cancelled = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/", hang)
    async with upstream(app) as up, stack(certs, upstream_timeout=0.5) as s:
        await s.add_client([f"default={up.url}"])
        async with aiohttp.ClientSession() as http:
            async with http.get(s.base + "/") as r:
                assert r.status == 504
        await asyncio.wait_for(cancelled.wait(), 5)  # the upstream call was cancelled too
