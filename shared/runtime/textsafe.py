"""Text that came from a caller, a client or an upstream, made safe to print in a log line.

A percent-decoded path can carry CR/LF (forged log lines), ESC (terminal escapes) or NUL
(a log that turns binary): every such character is written as a visible escape instead.
"""

from __future__ import annotations

import re

__all__ = ["escape_controls"]

# C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """Return ``text`` with every control character written as ``\\xNN`` (or ``\\uNNNN``).

    A backslash is left alone: the result is for reading, not for decoding back.
    """
    if text.isprintable():  # the usual line, in C: every character escaped is unprintable
        return text
    if _CONTROLS.search(text) is None:
        return text
    return _CONTROLS.sub(_escaped, text)
