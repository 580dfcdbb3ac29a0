"""shared.events: frozen dataclasses, each with a stream_id."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest

from shared import events
from shared.errors import SessionClosed
from shared.heads import RequestHead, ResponseHead, StreamKind
from shared.messages import Error

EXAMPLES = [
    events.ControlReceived(Error(code="x")),
    events.StreamOpened(1, RequestHead(StreamKind.HTTP, "GET", "/", "a"), False),
    events.ReplyReceived(1, ResponseHead(200), True),
    events.DataReceived(1, b"x", False),
    events.ResetReceived(1, 2, "refused"),
    events.WindowUpdated(0),
    events.TrailersReceived(1, (("grpc-status", "0"),)),
    events.GoAwayReceived(3, 0, ""),
    events.ConnectionFailed(SessionClosed("gone")),
]


def test_event_union_is_complete() -> None:
    assert set(typing.get_args(events.Event)) == {type(e) for e in EXAMPLES}
    assert {type(e).__name__ for e in EXAMPLES} == set(events.__all__) - {"Event"}


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: type(e).__name__)
def test_events_are_frozen_and_carry_a_stream_id(event: Any) -> None:
    assert dataclasses.is_dataclass(type(event))
    assert isinstance(event.stream_id, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.stream_id = 9


def test_connection_events_default_to_stream_zero() -> None:
    assert events.ControlReceived(Error(code="x")).stream_id == 0
    assert events.GoAwayReceived(3, 0, "").stream_id == 0
    assert events.ConnectionFailed(SessionClosed("gone")).stream_id == 0
