"""Local, tamper-evident audit log of every stream the client served (``--audit-log FILE``).

One JSON object per line, keys in a fixed order, ASCII only::

    {"seq":7,"time":"2026-01-02T03:04:05.678Z","session":"s-…","stream":13,"kind":"http",
     "method":"GET","host":"app.example.com","path":"/api/x","upstream":"app.example.com/api",
     "status":200,"reset":null,"bytes_in":0,"bytes_out":512,"duration_ms":3.1,
     "caller":"203.0.113.9","prev":"<64 hex>","hash":"<64 hex>"}

``hash`` is the SHA-256 of the line's bytes before ``,"hash":``; ``prev`` is the previous line's
``hash`` (the first line of a file: :data:`GENESIS`), and ``seq`` counts from 1. So an edited,
removed, inserted or reordered line breaks the chain at that line or the next, and
``tunnel-client audit verify FILE`` names the first bad line. The chain has no secret: anyone
who can write the file can rebuild it from the tampered line to the end, and dropping the last
lines leaves a valid shorter chain. Record the ``head`` hash that ``verify`` prints (or ship the
file) somewhere the host cannot rewrite to detect that too.

Writes happen on a background thread: the event loop only queues a record (about a
microsecond); the thread formats, hashes, appends and flushes, batching when busy, with an
fsync at most once a second. The query string is never logged (it often carries secrets).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from shared.errors import ConfigError

__all__ = ["GENESIS", "AuditLog", "AuditRecord", "add_audit_parser", "audit_command", "verify"]

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_SUFFIX = re.compile(rb',"hash":"([0-9a-f]{64})"\}$')
_SEQ = re.compile(rb'^\{"seq":([0-9]+),')
_TAIL_READ = 256 * 1024
_FSYNC_EVERY = 1.0


@dataclass(slots=True, init=False)
class AuditRecord:
    """What the forwarder learns about one stream; filled in while it is served."""

    started: float  # wall clock, time.time()
    session: str
    stream: int
    kind: str
    method: str
    host: str
    path: str
    caller: str
    upstream: str | None = None
    status: int | None = None
    reset: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    duration_ms: float = 0.0

    def __init__(
        self,
        started: float,
        session: str,
        stream: int,
        kind: str,
        method: str,
        host: str,
        path: str,
        caller: str,
        upstream: str | None = None,
        status: int | None = None,
        reset: str | None = None,
        bytes_in: int = 0,
        bytes_out: int = 0,
        duration_ms: float = 0.0,
    ) -> None:
        self.started = started
        self.session = session
        self.stream = stream
        self.kind = kind
        self.method = method
        self.host = host
        self.path = path
        self.caller = caller
        self.upstream = upstream
        self.status = status
        self.reset = reset
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.duration_ms = duration_ms


def _line(seq: int, record: AuditRecord, prev: str) -> tuple[bytes, str]:
    stamp = datetime.fromtimestamp(record.started, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    body = {
        "seq": seq,
        "time": stamp,
        "session": record.session,
        "stream": record.stream,
        "kind": record.kind,
        "method": record.method,
        "host": record.host[:300],
        "path": record.path[:2048],
        "upstream": record.upstream,
        "status": record.status,
        "reset": record.reset,
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "duration_ms": round(record.duration_ms, 3),
        "caller": record.caller[:100],
        "prev": prev,
    }
    head = json.dumps(body, separators=(",", ":"), ensure_ascii=True)[:-1].encode("ascii")
    digest = hashlib.sha256(head).hexdigest()
    return head + b',"hash":"' + digest.encode("ascii") + b'"}\n', digest


def _parse_tail(line: bytes) -> tuple[int, str] | None:
    suffix = _SUFFIX.search(line)
    seq = _SEQ.match(line)
    if suffix is None or seq is None:
        return None
    return int(seq.group(1)), suffix.group(1).decode("ascii")


def _read_tail(path: Path) -> tuple[int, str, int]:
    """(last seq, last hash, offset of a torn tail or -1) of an existing log.

    Raises:
        ConfigError: unreadable, or the last complete line is not an audit record.
    """
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return 0, GENESIS, -1
            fh.seek(max(0, size - _TAIL_READ))
            tail = fh.read()
    except FileNotFoundError:
        return 0, GENESIS, -1
    except OSError as exc:
        raise ConfigError(f"--audit-log: cannot read {path}: {exc.strerror}") from None
    torn = -1
    if not tail.endswith(b"\n"):  # a crash in the middle of a write: drop the partial line
        cut = tail.rfind(b"\n")
        torn = size - len(tail) + cut + 1
        if cut == -1 and size > len(tail):
            raise ConfigError(f"--audit-log: {path}: last line too long to be an audit record")
        tail = tail[: cut + 1]
        if not tail:
            return 0, GENESIS, torn
    last = tail[:-1].rsplit(b"\n", 1)[-1]
    parsed = _parse_tail(last)
    if parsed is None:
        raise ConfigError(
            f"--audit-log: the last line of {path} is not an audit record; check it with "
            "`tunnel-client audit verify` and move the file away to start a new log"
        )
    return parsed[0], parsed[1], torn


class AuditLog:
    """Appends hash-chained records to ``path`` from a writer thread.

    The constructor only checks the file (so a bad one stops the client at startup);
    :meth:`start` opens it and continues the chain from its last line.

    When a write fails (disk full, file size limit, I/O error), the lines not yet on disk are
    kept in order and retried every :data:`RETRY_EVERY` seconds, so the chain stays whole and
    auditing resumes by itself when space returns. Meanwhile :attr:`failing` is set: with
    ``fail_closed`` (the default, ``--audit-failure closed``) the forwarder refuses new streams,
    as a guardrail should; otherwise they are served and what does not fit in the queue is
    counted in :attr:`lost` and reported in a ``kind: "audit-dropped"`` record on recovery.

    Args:
        path: the log file (created 0600 when missing).
        max_queue: records waiting for the disk beyond this are counted as lost and reported
            in a ``kind: "audit-dropped"`` record rather than growing memory without bound.
        fail_closed: refuse streams while the log cannot be written.
    """

    RETRY_EVERY = 1.0

    def __init__(self, path: Path, max_queue: int = 100_000, fail_closed: bool = True) -> None:
        self.path = path
        self.fail_closed = fail_closed
        _read_tail(path)
        if path.exists() and not os.access(path, os.W_OK):
            raise ConfigError(f"--audit-log: {path} is not writable")
        if not path.exists() and not os.access(path.parent if str(path.parent) else Path("."), os.W_OK):
            raise ConfigError(f"--audit-log: cannot create {path}")
        self._queue: queue.Queue[AuditRecord | None] = queue.Queue(max_queue)
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()
        self._dropped = 0
        self.failing = False  # the last write failed; cleared once pending lines are on disk
        self.failures = 0  # write failures seen (each retry that fails counts)
        self.lost = 0  # records never written (queue full)
        self.seq = 0
        self.head = GENESIS
        self.written = 0

    @property
    def refusing(self) -> bool:
        """Whether new streams must be refused now (fail closed, and the log is failing)."""
        return self.failing and self.fail_closed

    def start(self) -> None:
        """Open the file, continue its chain, start the writer thread."""
        if self._writer is not None:
            return
        self.seq, self.head, torn = _read_tail(self.path)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if torn >= 0:
            log.warning("audit log %s: dropping %d bytes of a torn last line", self.path, os.fstat(fd).st_size - torn)
            os.truncate(fd, torn)
        self._writer = threading.Thread(target=self._run, args=(fd,), name="audit-writer", daemon=True)
        self._writer.start()

    def write(self, record: AuditRecord) -> None:
        """Queue a finished record (never blocks the event loop)."""
        if self._writer is None:
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self._dropped += 1
                self.lost += 1
                first = self._dropped == 1
            if first:
                log.warning("audit log %s: the disk is not keeping up; counting dropped records", self.path)

    def close_sync(self, timeout: float = 5.0) -> None:
        """Write what is queued and stop the thread (blocking)."""
        thread = self._writer
        if thread is None:
            return
        if thread.is_alive():
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                log.error("audit log %s: writer stuck; %d records not written", self.path, self._queue.qsize())
            thread.join(timeout)
        self._writer = None

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and stop the thread without blocking the loop."""
        await asyncio.to_thread(self.close_sync, timeout)

    def _line(self, record: AuditRecord) -> bytes:
        self.seq += 1
        data, self.head = _line(self.seq, record, self.head)
        return data

    def _flush(self, fd: int, pending: bytearray) -> bool:
        """Write ``pending`` (whole lines, in order); keep what did not fit. True when empty."""
        while pending:
            try:
                n = os.write(fd, pending)
            except OSError as exc:
                self.failures += 1
                if not self.failing:
                    self.failing = True
                    log.error(
                        "audit log %s: write failed (%s); %s until it can be written, retrying every %.0fs",
                        self.path,
                        exc.strerror or exc,
                        "refusing new streams" if self.fail_closed else "streams still served (--audit-failure open)",
                        self.RETRY_EVERY,
                    )
                return False
            del pending[:n]
        if self.failing:
            self.failing = False
            log.warning("audit log %s: writing again; auditing resumed", self.path)
        return True

    def _run(self, fd: int) -> None:
        last_sync = time.monotonic()
        pending = bytearray()
        stopping = False
        try:
            while not (stopping and not pending):
                if self.failing and len(pending) >= _MAX_PENDING:
                    time.sleep(self.RETRY_EVERY)  # the queue fills meanwhile; past it, records are lost
                    self._flush(fd, pending)
                    continue
                try:
                    record = self._queue.get(timeout=self.RETRY_EVERY if pending else None)
                except queue.Empty:
                    record = None if stopping else _RETRY
                if record is None:  # stopping: write what is held (one more try), then end
                    stopping = True
                    if not self._flush(fd, pending):
                        log.error("audit log %s: stopped with unwritten records", self.path)
                        return
                    continue
                if record is not _RETRY:
                    pending += self._line(record)
                    with self._lock:
                        dropped, self._dropped = self._dropped, 0
                    if dropped:
                        note = AuditRecord(time.time(), "", 0, "audit-dropped", "", "", "", "", bytes_in=dropped)
                        pending += self._line(note)
                    self.written += 1
                    if not self._queue.empty() and len(pending) < (1 << 20):
                        continue  # batch while busy
                if not self._flush(fd, pending):
                    continue  # retried after RETRY_EVERY, or with the next record
                if time.monotonic() - last_sync >= _FSYNC_EVERY:
                    try:
                        os.fsync(fd)
                    except OSError as exc:
                        log.warning("audit log %s: fsync failed: %s", self.path, exc)
                    last_sync = time.monotonic()
        finally:
            try:
                os.fsync(fd)
            except OSError:
                pass
            os.close(fd)


#: Lines held for the disk while writes fail; beyond, records wait in the queue, then are lost.
_MAX_PENDING = 8 << 20
#: Wakes the writer to retry pending lines (never written itself).
_RETRY = AuditRecord(0.0, "", 0, "retry", "", "", "", "")


def verify(path: Path) -> tuple[int, str, str | None]:
    """Check a log's chain.

    Returns:
        (number of good lines, head hash, None) when intact, or
        (number of the first bad line, head hash so far, reason).

    Raises:
        OSError: the file cannot be read.
    """
    prev, seq, number = GENESIS, 0, 0
    with open(path, "rb") as fh:
        for raw in fh:
            number += 1
            if not raw.endswith(b"\n"):
                return number, prev, "incomplete last line"
            line = raw[:-1]
            suffix = _SUFFIX.search(line)
            if suffix is None:
                return number, prev, "no hash"
            digest = suffix.group(1).decode("ascii")
            if hashlib.sha256(line[: suffix.start()]).hexdigest() != digest:
                return number, prev, "hash does not match the line (edited)"
            try:
                fields = json.loads(line)
            except ValueError:
                return number, prev, "not JSON"
            if not isinstance(fields, dict) or fields.get("prev") != prev:
                return number, prev, "prev does not match the previous line (removed, inserted or reordered)"
            if fields.get("seq") != seq + 1 or next(iter(fields)) != "seq":
                return number, prev, f"seq {fields.get('seq')!r} where {seq + 1} was expected"
            prev, seq = digest, seq + 1
    return number, prev, None


def add_audit_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``audit verify FILE`` to the command line."""
    audit = sub.add_parser("audit", help="audit log tools", description="Tools for the --audit-log file.")
    tools = audit.add_subparsers(dest="audit_command", required=True)
    check = tools.add_parser(
        "verify",
        help="check the hash chain of an audit log",
        description="Check every line's hash and its link to the previous line. Exit 0 "
        "with 'ok N lines' and the head hash, 1 naming the first bad line, 2 if unreadable.",
    )
    check.add_argument("file", type=Path, metavar="FILE")


def audit_command(args: argparse.Namespace) -> int:
    """Run ``audit verify``; returns the exit status."""
    try:
        count, head, problem = verify(args.file)
    except OSError as exc:
        print(f"tunnel-client: error: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    if problem is None:
        print(f"ok {count} lines, head {head}")
        return 0
    print(f"line {count}: {problem}")
    return 1
