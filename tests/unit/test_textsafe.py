"""Control characters from callers never reach a log line raw (issue 15 item 7)."""

from __future__ import annotations

import logging

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.runtime.cli import EscapingFormatter
from shared.runtime.textsafe import escape_controls


def test_plain_text_is_returned_as_is() -> None:
    text = "GET /a/b?c=d HTTP/1.1 \\ é"
    assert escape_controls(text) is text


def test_controls_are_escaped() -> None:
    assert escape_controls("a\r\nb\x1b[31m\x00\x7f\x85\u2028") == "a\\x0d\\x0ab\\x1b[31m\\x00\\x7f\\x85\\u2028"


def test_formatter_escapes_message_and_args() -> None:
    fmt = EscapingFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "path %s", ("/x\r\n127.0.0.1 GET /forged",), None)
    line = fmt.format(record)
    assert "\n" not in line and "\r" not in line
    assert line == "INFO path /x\\x0d\\x0a127.0.0.1 GET /forged"


_EDGES = "\x00\x1b\r\n\x1f \x7f\x80\x85\x9f\xa0\u200b\u2028\u2029\ufeff a\\é"


@given(st.text(alphabet=st.one_of(st.sampled_from(_EDGES), st.characters()), max_size=40))
@settings(max_examples=500, deadline=None)
def test_every_text_matches_the_escape_rule(text: str) -> None:
    """The printable fast path changes nothing: each character the rule names is escaped, and
    only those."""
    expected = "".join((f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") if _named(c) else c for c in text)
    assert escape_controls(text) == expected


def _named(c: str) -> bool:
    code = ord(c)
    return code <= 0x1F or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029)
