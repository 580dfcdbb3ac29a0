"""Test helpers: two sessions wired back to back (the idea of h11's ``ConnectionPair``)."""

from __future__ import annotations

from typing import Any

from shared.events import Event
from shared.frames import ABSOLUTE_MAX_PAYLOAD, Frame, decode_frames, encode_frame
from shared.heads import RequestHead, StreamKind
from shared.messages import Hello, Welcome
from shared.mux import Role, Session

__all__ = ["GET", "Pair", "frames", "raw"]

GET = RequestHead(StreamKind.HTTP, "GET", "/", "app.example.com")


def frames(messages: list[bytes]) -> list[Frame]:
    """Decode every frame of some messages (no size limit)."""
    return [f for message in messages for f in decode_frames(message, ABSOLUTE_MAX_PAYLOAD)]


def raw(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One hand-made frame, to play a misbehaving peer."""
    return encode_frame(frame_type, flags, stream_id, payload)


class Pair:
    """An exit-server session and a tunnel-client session that talk to each other.

    ``pump()`` moves ``data_to_send()`` of each side into ``receive()`` of the other until both
    are quiet, and keeps the events each side produced.
    """

    def __init__(
        self,
        *,
        server: dict[str, Any] | None = None,
        client: dict[str, Any] | None = None,
        hello: dict[str, Any] | None = None,
        welcome: dict[str, Any] | None = None,
        handshake: bool = True,
    ) -> None:
        self.now = 0.0
        self.server = Session(Role.SERVER, **(server or {}))
        self.client = Session(Role.CLIENT, **(client or {}))
        self.server_events: list[Event] = []
        self.client_events: list[Event] = []
        self._hello = hello or {}
        self._welcome = welcome or {}
        if handshake:
            self.handshake()

    def hello(self) -> Hello:
        c = self.client
        fields: dict[str, Any] = {
            "versions": [1],
            "instance_id": "test-1",
            "max_streams": c.max_streams,
            "initial_window": c.initial_window,
            "max_frame": c.max_frame,
        }
        fields.update(self._hello)
        return Hello(**fields)

    def welcome(self) -> Welcome:
        s = self.server
        fields: dict[str, Any] = {
            "version": 1,
            "session_id": "s1",
            "client_id": "default",
            "max_streams": s.max_streams,
            "initial_window": s.initial_window,
            "max_frame": s.max_frame,
        }
        fields.update(self._welcome)
        return Welcome(**fields)

    def handshake(self) -> None:
        self.client.send_hello(self.hello())
        self.to_server()
        self.server.accept(self.welcome())
        self.pump()
        self.take()

    # -- moving bytes
    def to_server(self) -> list[bytes]:
        """Deliver what the client queued; return the messages."""
        messages = self.client.data_to_send()
        for message in messages:
            self.server.receive(message, self.now)
        self.server_events += self.server.events()
        return messages

    def to_client(self) -> list[bytes]:
        """Deliver what the server queued; return the messages."""
        messages = self.server.data_to_send()
        for message in messages:
            self.client.receive(message, self.now)
        self.client_events += self.client.events()
        return messages

    def pump(self) -> None:
        """Deliver in both directions until neither side has output."""
        while self.server.has_output or self.client.has_output:
            self.to_client()
            self.to_server()

    def take(self) -> tuple[list[Event], list[Event]]:
        """Return and clear (server events, client events)."""
        out = (self.server_events, self.client_events)
        self.server_events, self.client_events = [], []
        return out

    def open(self, head: RequestHead = GET, end_stream: bool = False) -> int:
        """Open a stream from the server and deliver the OPEN."""
        stream_id = self.server.open_stream(head, end_stream)
        self.pump()
        return stream_id
