"""A raw HTTP/2 caller for tests, on the ``h2`` library over asyncio streams: plain requests
with trailers, and the frames a hostile caller sends (resets, floods, huge headers)."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


@dataclass
class Answer:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[str, str]] | None = None
    reset: int | None = None  # RST_STREAM error code from the server
    done: bool = False

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


class H2Caller:
    """One HTTP/2 connection to the exit server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, window: int | None = None) -> None:
        self.reader = reader
        self.writer = writer
        config = h2.config.H2Configuration(client_side=True, header_encoding="latin-1")
        self.h2 = h2.connection.H2Connection(config=config)
        if window is not None:
            self.h2.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
            )
        self.h2.initiate_connection()
        self.answers: dict[int, Answer] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.auto_ack = True
        self.flush()

    @classmethod
    async def open(
        cls, port: int, *, tls: ssl.SSLContext | None = None, server_name: str | None = None, window: int | None = None
    ) -> H2Caller:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname=server_name if tls is not None else None
        )
        if tls is not None:
            sslobj = writer.get_extra_info("ssl_object")
            assert sslobj.selected_alpn_protocol() == "h2", sslobj.selected_alpn_protocol()
        return cls(reader, writer, window)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def pump(self) -> bool:
        """Read once and handle the events; False when the connection closed."""
        data = await self.reader.read(1 << 16)
        if not data:
            self.closed = True
            return False
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return False
        for event in events:
            sid = getattr(event, "stream_id", 0)
            answer = self.answers.setdefault(sid, Answer()) if sid else None
            if isinstance(event, h2.events.ResponseReceived) and answer is not None:
                answer.status = int(dict(event.headers)[":status"])
                answer.headers = [(n, v) for n, v in event.headers if not n.startswith(":")]
            elif isinstance(event, h2.events.DataReceived) and answer is not None:
                answer.body += event.data
                if self.auto_ack:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.TrailersReceived) and answer is not None:
                answer.trailers = list(event.headers)
            elif isinstance(event, h2.events.StreamEnded) and answer is not None:
                answer.done = True
            elif isinstance(event, h2.events.StreamReset) and answer is not None:
                answer.reset = event.error_code
                answer.done = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
        self.flush()
        return True

    def start(self, headers: list[tuple[str, str]], end: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.answers[sid] = Answer()
        self.h2.send_headers(sid, headers, end_stream=end)
        self.flush()
        return sid

    async def wait(self, sid: int, timeout: float = 10.0) -> Answer:
        async with asyncio.timeout(timeout):
            while not self.answers[sid].done:
                if not await self.pump():
                    break
        return self.answers[sid]

    async def request(
        self,
        authority: str,
        path: str = "/",
        method: str = "GET",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        trailers: list[tuple[str, str]] | None = None,
        scheme: str = "http",
    ) -> Answer:
        fields = [(":method", method), (":scheme", scheme), (":authority", authority), (":path", path)]
        fields += headers or []
        sid = self.start(fields, end=not body and not trailers)
        view = memoryview(body)
        while view:  # within the server's window: wait for WINDOW_UPDATE as needed
            room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size, len(view))
            if room <= 0:
                async with asyncio.timeout(10):
                    await self.pump()
                continue
            self.h2.send_data(sid, bytes(view[:room]), end_stream=room == len(view) and not trailers)
            self.flush()
            view = view[room:]
        if trailers:
            self.h2.send_headers(sid, trailers, end_stream=True)
        self.flush()
        return await self.wait(sid)

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError, OSError):
            pass


def get(authority: str, path: str = "/") -> list[tuple[str, str]]:
    return [(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", path)]


__all__ = ["Answer", "H2Caller", "get", "Any"]
