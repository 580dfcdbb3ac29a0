"""Sizes both sides agree on by default (docs/PROTOCOL.md sections 3 and 6), named once."""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_FRAME", "DEFAULT_STREAM_WINDOW", "MAX_MESSAGE"]

#: The largest frame payload a side accepts unless configured otherwise (section 3).
DEFAULT_MAX_FRAME = 256 * 1024

#: The per-stream flow-control window granted unless configured otherwise (section 6).
DEFAULT_STREAM_WINDOW = 256 * 1024

#: Frames queued in one loop iteration are coalesced into WebSocket messages of at most this
#: many bytes (plus one frame): one frame's worth, so a batch never needs a larger message
#: limit than a single frame.
MAX_MESSAGE = 256 * 1024
