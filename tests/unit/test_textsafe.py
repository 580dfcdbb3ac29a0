"""Control characters from callers never reach a log line raw (issue 15 item 7)."""

from __future__ import annotations

import logging

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
