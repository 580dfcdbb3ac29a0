"""A small h2c upstream for tests, on the ``h2`` library: it shows what reached it (pseudo-
headers, fields, body, trailers) and misbehaves on request.

Paths:
    /echo...        200 with a JSON account of the request; request trailers come back as
                    response trailers named ``x-echo-<name>``, plus ``x-upstream: h2``.
    /reset/N        head and 5 body bytes, then RST_STREAM with error code N.
    /reset-early/N  RST_STREAM with error code N before any head.
    /big/N          N body bytes, as fast as the caller's window allows (``sent`` counts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions


@dataclass
class Seen:
    requests: list[dict[str, Any]] = field(default_factory=list)
    resets: list[tuple[int, int]] = field(default_factory=list)  # (stream id, error code) from the caller
    sent: dict[int, int] = field(default_factory=dict)  # /big: bytes sent per stream
    connections: int = 0


class _Conn(asyncio.Protocol):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="latin-1"))
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, dict[str, Any]] = {}
        self.windows: dict[int, asyncio.Future[None]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.seen.connections += 1
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self.tasks:
            task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                headers = dict(event.headers)
                request: dict[str, Any] = {
                    "method": headers[":method"],
                    "path": headers[":path"],
                    "authority": headers.get(":authority"),
                    "scheme": headers.get(":scheme"),
                    "fields": [(n, v) for n, v in event.headers if not n.startswith(":")],
                    "body": b"",
                    "trailers": None,
                }
                self.requests[event.stream_id] = request
                self.seen.requests.append(request)
                path = request["path"]
                if path.startswith("/reset-early/"):
                    self.h2.reset_stream(event.stream_id, int(path.rsplit("/", 1)[1]))
                elif path.startswith(("/reset/", "/big/")):
                    self.spawn(self.answer(event.stream_id))
                if event.stream_ended is not None and not path.startswith(("/reset", "/big/")):
                    self.spawn(self.answer(event.stream_id))
            elif isinstance(event, h2.events.DataReceived):
                req = self.requests.get(event.stream_id)
                if req is not None:
                    req["body"] += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                req = self.requests.get(event.stream_id)
                if req is not None:
                    req["trailers"] = list(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                req = self.requests.get(event.stream_id)
                if req is not None and not req["path"].startswith(("/reset", "/big/")):
                    self.spawn(self.answer(event.stream_id))
            elif isinstance(event, h2.events.StreamReset):
                self.seen.resets.append((event.stream_id, event.error_code))
                waiter = self.windows.pop(event.stream_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(ConnectionResetError())
            elif isinstance(event, h2.events.WindowUpdated):
                for sid, waiter in list(self.windows.items()):
                    if event.stream_id in (0, sid) and not waiter.done():
                        waiter.set_result(None)
                        del self.windows[sid]
        self.flush()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def send(self, stream_id: int, data: bytes) -> None:
        while data:
            room = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if room <= 0:
                waiter = self.windows[stream_id] = asyncio.get_running_loop().create_future()
                await waiter
                continue
            self.h2.send_data(stream_id, data[:room])
            self.seen.sent[stream_id] = self.seen.sent.get(stream_id, 0) + min(room, len(data))
            data = data[room:]
            self.flush()
            await asyncio.sleep(0)

    async def answer(self, stream_id: int) -> None:
        req = self.requests[stream_id]
        path: str = req["path"]
        with contextlib.suppress(h2.exceptions.ProtocolError, ConnectionResetError):
            if path.startswith("/reset/"):
                self.h2.send_headers(stream_id, [(":status", "200"), ("content-type", "text/plain")])
                self.h2.send_data(stream_id, b"hello")
                self.flush()
                await asyncio.sleep(0.05)  # pacing: the head and bytes go out before the reset
                self.h2.reset_stream(stream_id, int(path.rsplit("/", 1)[1]))
                self.flush()
                return
            if path.startswith("/big/"):
                n = int(path.rsplit("/", 1)[1])
                self.h2.send_headers(stream_id, [(":status", "200"), ("content-length", str(n))])
                self.flush()
                await self.send(stream_id, b"x" * n)
                self.h2.end_stream(stream_id)
                self.flush()
                return
            account = {k: v for k, v in req.items() if k != "body"}
            account["body_len"] = len(req["body"])
            account["body"] = req["body"].decode("latin-1")
            body = json.dumps(account).encode()
            self.h2.send_headers(
                stream_id,
                [(":status", "200"), ("content-type", "application/json"), ("content-length", str(len(body)))],
            )
            await self.send(stream_id, body)
            trailers = [("x-upstream", "h2")] + [(f"x-echo-{n}", v) for n, v in req["trailers"] or []]
            self.h2.send_headers(stream_id, trailers, end_stream=True)
            self.flush()


@contextlib.asynccontextmanager
async def h2c_upstream() -> AsyncIterator[tuple[str, Seen]]:
    """An h2c server on 127.0.0.1:0; yields its ``h2c://`` URL and what it saw."""
    seen = Seen()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Conn(seen), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"h2c://127.0.0.1:{port}", seen
    finally:
        server.close()
        await server.wait_closed()
