"""shared.events: slotted dataclasses with read-only (``Final``) fields, each with a stream_id.

Not ``frozen=True``: a frozen dataclass's ``__init__`` sets each field through
``object.__setattr__``, three times slower to build (about 430 against 140 ns), and the mux
builds one or more per frame. ``Final`` fields make mypy --strict (run by ``make lint``) refuse
any assignment after construction instead, and the compiled build refuses one at run time.
Each class writes its own ``__init__`` (``init=False``): mypyc compiles that one, where a
dataclass-made ``__init__`` stays interpreted (five times slower to build compiled) and could
not set a ``Final`` field of a native class."""

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
    """A dataclass whose every annotated attribute is a ``Final`` field, with slots. Compiled:
    a native class's fixed layout (no ``__slots__`` attribute, and no ``__dict__`` either),
    whose annotations mypyc writes without ``Final`` (the next test checks it is enforced)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    assert [f.name for f in dataclasses.fields(cls)] == list(hints)
    assert "__dict__" not in dir(cls)
    compiled = not str(sys.modules[cls.__module__].__file__).endswith(".py")
    assert compiled or cls.__slots__
    assert compiled or all(typing.get_origin(hint) is typing.Final for hint in hints.values()), hints


def test_a_field_is_not_written_after_construction() -> None:
    compiled = not str(sys.modules[events.__name__].__file__).endswith(".py")
    event = events.DataReceived(1, b"x", False)
    if compiled:  # a native Final attribute: no setter
        with pytest.raises(AttributeError):
            event.stream_id = 2  # type: ignore[misc]
    assert event == events.DataReceived(1, b"x", False)  # dataclass eq, repr still made
    assert repr(event) == "DataReceived(stream_id=1, data=b'x', end_stream=False)"


def test_connection_events_default_to_stream_zero() -> None:
    assert events.ControlReceived(Error(code="x")).stream_id == 0
    assert events.GoAwayReceived(3, 0, "").stream_id == 0
    assert events.ConnectionFailed(SessionClosed("gone")).stream_id == 0
