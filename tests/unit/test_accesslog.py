"""shared/runtime/accesslog.py: the same text as the logging path, batched per loop turn."""

from __future__ import annotations

import asyncio
import io
import logging
import re

from shared.runtime import accesslog
from shared.runtime.accesslog import AccessWriter
from shared.runtime.cli import EscapingFormatter

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


class Counting(io.StringIO):
    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_the_line_is_what_the_logging_path_writes() -> None:
    message = '127.0.0.1 app.test "GET /a\r\nforged: 1\x1b[2J HTTP/1.1" 200 in=0 out=5 1.2ms tunnel=t id=x'
    via_logging = io.StringIO()
    handler = logging.StreamHandler(via_logging)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("backhaul.access.test-twin")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.info("%s", message)
    direct = io.StringIO()
    AccessWriter(direct, name="backhaul.access.test-twin").write(message)  # no loop: written at once
    one, two = via_logging.getvalue(), direct.getvalue()
    assert STAMP.match(one) and STAMP.match(two)
    assert STAMP.sub("", one) == STAMP.sub("", two)
    assert "\r" not in two and "\x1b" not in two and two.count("\n") == 1  # no forged line, no escape code


def test_lines_of_one_loop_turn_go_out_in_one_write() -> None:
    stream = Counting()
    writer = AccessWriter(stream)

    async def burst() -> None:
        for i in range(100):
            writer.write(f"line {i}")
        assert stream.writes == 0  # held until the end of this turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(burst())
    assert stream.writes == 1 and stream.getvalue().count("\n") == 100


def test_a_long_burst_is_written_every_max_pending_lines() -> None:
    stream = Counting()
    writer = AccessWriter(stream)

    async def burst() -> None:
        for i in range(accesslog.MAX_PENDING * 2 + 1):
            writer.write(f"line {i}")
        assert stream.writes == 2
        await asyncio.sleep(0)

    asyncio.run(burst())
    assert stream.writes == 3 and stream.getvalue().count("\n") == accesslog.MAX_PENDING * 2 + 1
