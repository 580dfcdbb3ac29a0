"""The library internals the hot path relies on, each pinned by one small test that fails
loudly, naming the file that depends on it, when an upgrade changes it. The dependency pins in
pyproject.toml are the minor versions these tests passed on.

Internals covered (docs/ARCHITECTURE.md, "Library internals"):

* websockets: ``protocol.reader.buffer`` and ``protocol.state`` (shared/aio/wsfast.py attaches
  its own parser only at a frame boundary), ``Connection.data_received``/``process_event``
  (the hand-over), ``protocol.max_message_size`` and ``close_rcvd``, ``Connection.drain_waiters``
  used as a list, and ``Server`` calling ``create_server`` and only the members of its
  asyncio server that exit_server/frontdoor.py's ``DoorServer`` has.
* asyncio/uvloop transports: ``set_protocol`` switches a reading transport's protocol
  (shared/aio/wsfast.py), and uvloop reads into a ``BufferedProtocol``'s buffer.
* aiohttp: ``site._server`` (the bound port of the tests' upstreams on port 0).
* httptools: ``HttpParserUpgrade`` after a 101 head (tunnel_client/http1.py) and after an
  upgrade request, with the offset of the bytes that follow it, and the request parser's
  callbacks called once per header with its whole name and value (shared/h1server.py).
* h2: settings set before ``initiate_connection``, the HPACK decoder limits and
  ``highest_inbound_stream_id`` (exit_server/h2public.py, tunnel_client/http2.py).
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from typing import Any

import httptools
import pytest
from aiohttp import web
from websockets.asyncio.connection import Connection
from websockets.protocol import Protocol, Side, State

from shared.aio.wsfast import DirectMessages


def test_websockets_reader_buffer_and_state() -> None:
    protocol = Protocol(Side.SERVER)
    assert protocol.state is State.OPEN
    assert isinstance(protocol.reader.buffer, bytearray) and not protocol.reader.buffer, "shared/aio/wsfast.py attach()"
    assert protocol.max_message_size is not None
    assert protocol.close_rcvd is None
    protocol.receive_data(b"\x82")  # half a frame header: websockets' reader keeps it
    next(iter(protocol.events_received()), None)
    assert isinstance(protocol.reader.buffer, bytearray)


def test_websockets_connection_hooks_exist() -> None:
    for name in ("data_received", "process_event", "drain", "connection_made", "connection_lost"):
        assert callable(getattr(Connection, name, None)), f"websockets Connection.{name} (shared/aio/wsfast.py)"
    # the mixin overrides exactly these, and must come first in the MRO
    assert set(vars(DirectMessages)) >= {"data_received", "process_event", "get_buffer", "buffer_updated"}


def test_websockets_drain_waiters_need_only_a_list() -> None:
    """shared/aio/wsfast.py makes ``drain_waiters`` a list: websockets must only append to,
    remove from and iterate it (its deque costs about 700 bytes per tunnel)."""
    import re

    source = inspect.getsource(Connection)
    uses = re.findall(r"self\.drain_waiters(\S*)", source)
    assert uses, "websockets Connection.drain_waiters is gone (shared/aio/wsfast.py)"
    allowed = {":", ".append(waiter)", ".remove(waiter)"}  # declaration and `for ... in`, the two calls
    assert set(uses) <= allowed, f"websockets uses drain_waiters as {set(uses) - allowed} (shared/aio/wsfast.py)"


def test_websockets_server_uses_only_what_door_server_has() -> None:
    """exit_server/server.py replaces ``serve()``'s ``create_server`` with one returning a
    ``DoorServer`` (exit_server/frontdoor.py): websockets' ``Server`` must still call it from
    its ``_await`` and use no member of ``self.server`` the door server lacks."""
    import re

    from websockets.asyncio.server import Server

    from exit_server.frontdoor import DoorServer

    assert "self.create_server()" in inspect.getsource(Server._await), "websockets Server._await changed"
    used = set(re.findall(r"self\.server\.(\w+)", inspect.getsource(Server)))
    assert used, "websockets Server no longer wraps self.server (exit_server/server.py)"
    missing = {name for name in used if not hasattr(DoorServer, name)}
    assert not missing, f"websockets Server uses {missing} of its asyncio server (exit_server/frontdoor.py DoorServer)"


@pytest.mark.asyncio
async def test_transport_set_protocol_switches_a_reading_transport() -> None:
    got: list[bytes] = []

    class First(asyncio.Protocol):
        pass

    class Buffered(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(64)

        def get_buffer(self, sizehint: int) -> memoryview:
            return memoryview(self.buf)

        def buffer_updated(self, nbytes: int) -> None:
            got.append(bytes(self.buf[:nbytes]))

    a, b = socket.socketpair()
    try:
        transport, _ = await asyncio.get_running_loop().create_connection(First, sock=a)
        transport.set_protocol(Buffered())  # shared/aio/wsfast.py DirectMessages.attach
        b.send(b"after the switch")
        async with asyncio.timeout(5):
            while not got:
                await asyncio.sleep(0)
        assert b"".join(got) == b"after the switch"
        transport.close()
    finally:
        b.close()


@pytest.mark.asyncio
async def test_aiohttp_site_server_sockets() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        server: Any = site._server  # the tests' upstream helpers: the bound port
        assert server.sockets[0].getsockname()[1] > 0
    finally:
        await runner.cleanup()


def test_httptools_signals_an_upgrade_after_a_101_head() -> None:
    class Callbacks:
        headers: list[tuple[bytes, bytes]] = []

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

    parser = httptools.HttpResponseParser(Callbacks())
    with pytest.raises(httptools.HttpParserUpgrade):  # tunnel_client/http1.py parse_response_head
        parser.feed_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert parser.get_status_code() == 101


def test_httptools_request_parser_contract() -> None:
    """shared/h1server.py: on_url may come in pieces, on_header once per header (whole name and
    value, even fed a byte at a time), and an upgrade request raises HttpParserUpgrade with the
    offset of the first byte after it."""

    class Callbacks:
        def __init__(self) -> None:
            self.url = b""
            self.headers: list[tuple[bytes, bytes]] = []

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

    data = b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nRAW"
    callbacks = Callbacks()
    parser = httptools.HttpRequestParser(callbacks)
    with pytest.raises(httptools.HttpParserUpgrade) as upgrade:
        for i in range(len(data)):
            parser.feed_data(data[i : i + 1])
    assert callbacks.url == b"/chat"
    assert callbacks.headers == [(b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    assert upgrade.value.args[0] == 1  # the offset after the head in the last piece fed (its end)
    parser = httptools.HttpRequestParser(Callbacks())
    with pytest.raises(httptools.HttpParserUpgrade) as upgrade:
        parser.feed_data(data)
    assert data[upgrade.value.args[0] :] == b"RAW"
    assert parser.should_upgrade()


def test_h2_internals_exit_server_h2public_relies_on() -> None:
    """exit_server/h2public.py and tunnel_client/http2.py: settings replaced before
    initiate_connection take effect at once, the HPACK decoder's limits are settable, and
    ``highest_inbound_stream_id`` exists for the hand-written graceful GOAWAY."""
    import h2.config
    import h2.connection
    import h2.settings

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.local_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 7}
    )
    conn.initiate_connection()
    assert conn.local_settings.max_concurrent_streams == 7
    conn.decoder.max_header_list_size = 1234
    conn.decoder.max_allowed_table_size = 4096
    assert conn.decoder.max_header_list_size == 1234
    assert conn.highest_inbound_stream_id == 0
    assert "remote_settings" in vars(conn)
