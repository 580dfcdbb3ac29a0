"""The tunnel client's WebSocket class: :class:`DirectMessages` on websockets' client
connection. Apart from wsfast.py so that the exit server never imports websockets' client,
which imports python-socks for its proxy support (8 ms of the exit server's start)."""

from __future__ import annotations

from websockets.asyncio.client import ClientConnection

from .wsfast import DirectMessages

__all__ = ["TunnelClientConnection"]


class TunnelClientConnection(DirectMessages, ClientConnection):
    """Client side of a tunnel WebSocket (``connect(create_connection=...)``): masks what it
    sends, as RFC 6455 requires of a client."""

    _masked = True
