"""The audit log's hash chain: any edited, removed, inserted or reordered line is found, and a
restarted writer continues the chain."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from shared.errors import ConfigError
from tunnel_client.__main__ import main
from tunnel_client.audit import GENESIS, AuditLog, AuditRecord, verify


def record(i: int) -> AuditRecord:
    return AuditRecord(
        time.time(),
        "sess-1",
        2 * i + 1,
        "http",
        "GET",
        "app.example.com",
        f"/item/{i}",
        "203.0.113.9",
        upstream="app.example.com",
        status=200,
        bytes_out=10 * i,
        duration_ms=1.5,
    )


def write_log(path: Path, count: int, start: int = 0) -> AuditLog:
    audit = AuditLog(path)
    audit.start()
    for i in range(start, start + count):
        audit.write(record(i))
    audit.close_sync()
    return audit


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_lines_are_chained_json(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    parsed = [json.loads(line) for line in lines(path)]
    assert [p["seq"] for p in parsed] == [1, 2, 3, 4, 5]
    assert parsed[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(parsed, parsed[1:], strict=False))
    first = parsed[0]
    assert list(first) == [
        "seq",
        "time",
        "session",
        "stream",
        "kind",
        "method",
        "host",
        "path",
        "upstream",
        "status",
        "reset",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "caller",
        "prev",
        "hash",
    ]
    assert first["time"].endswith("Z") and first["caller"] == "203.0.113.9"
    assert verify(path) == (5, parsed[-1]["hash"], None)
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_restart_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    write_log(path, 2, start=3)
    count, _, problem = verify(path)
    assert (count, problem) == (5, None)
    assert [json.loads(line)["seq"] for line in lines(path)] == [1, 2, 3, 4, 5]


def test_torn_last_line_is_dropped_on_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    with open(path, "ab") as fh:
        fh.write(b'{"seq":4,"time":"2026-')  # a crash in the middle of a write
    assert verify(path)[2] == "incomplete last line"
    write_log(path, 1, start=3)
    assert verify(path)[::2] == (4, None)


def test_damaged_last_line_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("not an audit line\n")
    with pytest.raises(ConfigError, match="audit-log"):
        AuditLog(path)


def _tamper(path: Path, how: str) -> None:
    data = lines(path)
    if how == "edit":
        data[2] = data[2].replace(b'"status":200', b'"status":201')
    elif how == "edit-and-rehash":
        import hashlib

        line = data[2].replace(b'"status":200', b'"status":201').rstrip(b"\n")
        head = line[: line.rindex(b',"hash":"')]
        data[2] = head + b',"hash":"' + hashlib.sha256(head).hexdigest().encode() + b'"}\n'
    elif how == "remove":
        del data[2]
    elif how == "insert":
        data.insert(2, data[1])
    elif how == "reorder":
        data[2], data[3] = data[3], data[2]
    elif how == "garbage":
        data[2] = b"hello\n"
    path.write_bytes(b"".join(data))


@pytest.mark.parametrize(
    ("how", "bad_line"),
    [("edit", 3), ("edit-and-rehash", 4), ("remove", 3), ("insert", 3), ("reorder", 3), ("garbage", 3)],
)
def test_verify_finds_the_first_bad_line(
    tmp_path: Path, how: str, bad_line: int, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 6)
    assert main(["audit", "verify", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok 6 lines, head ")
    _tamper(path, how)
    count, _, problem = verify(path)
    assert count == bad_line and problem is not None
    assert main(["audit", "verify", str(path)]) == 1
    assert capsys.readouterr().out.startswith(f"line {bad_line}: ")


def test_verify_unreadable_is_2(tmp_path: Path) -> None:
    assert main(["audit", "verify", str(tmp_path / "missing")]) == 2


def test_empty_log_is_ok(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.touch()
    assert verify(path) == (0, GENESIS, None)


def test_hostile_strings_stay_on_one_ascii_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.start()
    audit.write(AuditRecord(time.time(), "s", 1, "http", "G\r\nET", 'h\n{"seq":99}', "/\u2028é\x00" + "x" * 5000, "\n"))
    audit.close_sync()
    data = path.read_bytes()
    assert data.count(b"\n") == 1 and data.isascii()
    assert len(json.loads(data)["path"]) == 2048
    assert verify(path)[::2] == (1, None)


def test_fail_open_keeps_order_counts_losses_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--audit-failure open: streams go on while writes fail; held lines are written in order
    on recovery, and records past the queue are counted and noted in the chain."""
    import errno
    import os
    import threading

    import tunnel_client.audit as audit_module

    full = threading.Event()
    full.set()
    real_write = os.write

    def write(fd: int, data: bytes | bytearray) -> int:
        if full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(audit_module.os, "write", write)
    monkeypatch.setattr(AuditLog, "RETRY_EVERY", 0.05)
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_queue=4, fail_closed=False)
    audit.start()
    audit.write(record(0))
    deadline = time.monotonic() + 10
    while not audit.failing:
        assert time.monotonic() < deadline, "the failure was not noticed"
        time.sleep(0.01)  # polling a thread's state: no event to wait on
    assert not audit.refusing  # open: streams are served
    for i in range(1, 40):  # the writer holds a few; the queue takes 4; the rest are lost
        audit.write(record(i))
    full.clear()
    while audit.failing or audit._queue.qsize():
        assert time.monotonic() < deadline, "never resumed"
        time.sleep(0.01)
    audit.close_sync()
    good, _, problem = verify(path)
    assert problem is None
    parsed = [json.loads(line) for line in lines(path)]
    dropped = sum(p["bytes_in"] for p in parsed if p["kind"] == "audit-dropped")
    served = [p for p in parsed if p["kind"] != "audit-dropped"]
    assert audit.lost == dropped > 0 and len(served) + audit.lost == 40
    assert [p["path"] for p in served] == sorted((p["path"] for p in served), key=lambda x: int(x.rsplit("/", 1)[1]))
    assert audit.failures >= 1 and good == len(parsed)
