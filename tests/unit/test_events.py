"""shared.events: slotted dataclasses, each with a stream_id.

Events and heads are values that nothing assigns to once made. Not ``frozen=True``: a frozen
dataclass's ``__init__`` sets each field through ``object.__setattr__``, three times slower to
build (about 430 against 140 ns), and the mux builds one or more per frame. Their fields were
``Final`` (mypy --strict refused an assignment after construction) until the compiled build:
mypyc refuses a dataclass ``__init__`` that sets a ``Final`` field, and these modules are among
the compiled ones (README, "Compiled build"). What stays checked: slots, so no stray attribute
either."""

from __future__ import annotations

import dataclasses
import sys
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
def test_events_are_slotted_and_carry_a_stream_id(event: Any) -> None:
    assert dataclasses.is_dataclass(type(event))
    assert isinstance(event.stream_id, int)
    assert_slotted(type(event))
    with pytest.raises(AttributeError):  # slots: no stray attributes either
        event.extra = 1


@pytest.mark.parametrize("cls", [RequestHead, ResponseHead])
def test_heads_are_slotted(cls: type[Any]) -> None:
    assert_slotted(cls)


def assert_slotted(cls: type[Any]) -> None:
    """A dataclass whose every annotated attribute is a field, with slots (or, compiled, a
    native class's fixed layout: no ``__slots__`` attribute, and no ``__dict__`` either)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    assert [f.name for f in dataclasses.fields(cls)] == list(hints)
    assert "__dict__" not in dir(cls)
    compiled = not str(sys.modules[cls.__module__].__file__).endswith(".py")
    assert compiled or cls.__slots__


def test_connection_events_default_to_stream_zero() -> None:
    assert events.ControlReceived(Error(code="x")).stream_id == 0
    assert events.GoAwayReceived(3, 0, "").stream_id == 0
    assert events.ConnectionFailed(SessionClosed("gone")).stream_id == 0
