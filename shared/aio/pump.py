"""Byte pumps between a tunnel stream and a socket-like endpoint (WebSocket passthrough): asyncio
streams (:func:`stream_endpoint`), the public listener's upgraded connection, or anything with
the four :class:`Endpoint` calls. Half-close travels both ways: EOF from the socket becomes
END_STREAM, END_STREAM from the peer becomes a write-EOF or a close. (Raw TCP streams own their
socket's protocol, so they are spliced by callbacks instead: :mod:`shared.aio.splice`.)

An optional idle timeout ends a pump that moved no byte in either direction for that long: the
stream is reset (CANCEL, "idle timeout") and the endpoint aborted. The check is a timer armed
once per timeout period, not per chunk (a chunk only stores the time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from ..errors import TunnelError
from ..frames import ResetCode
from ..sizes import DEFAULT_MAX_FRAME
from .connection import TunnelStream

__all__ = ["Endpoint", "pump", "stream_endpoint"]

log = logging.getLogger(__name__)

#: Bytes asked of an asyncio stream per read: one tunnel frame's worth.
READ_SIZE = DEFAULT_MAX_FRAME


class Endpoint:
    """What a pump needs from the non-tunnel side."""

    def __init__(
        self,
        recv: Callable[[], Awaitable[bytes]],
        send: Callable[[bytes | memoryview], Awaitable[None]],
        close_send: Callable[[], None],
        abort: Callable[[], None],
    ) -> None:
        self.recv = recv
        self.send = send
        self.close_send = close_send
        self.abort = abort


def stream_endpoint(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, read_size: int = READ_SIZE) -> Endpoint:
    """Endpoint over asyncio streams; ``close_send`` half-closes (write EOF)."""

    async def recv() -> bytes:
        return await reader.read(read_size)

    async def send(data: bytes | memoryview) -> None:
        writer.write(data)
        await writer.drain()

    def close_send() -> None:
        if writer.can_write_eof() and not writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()

    def abort() -> None:
        writer.transport.abort()

    return Endpoint(recv, send, close_send, abort)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def pump(stream: TunnelStream, endpoint: Endpoint, idle_timeout: float = 0) -> int:
    """Copy bytes both ways until both directions ended. Returns bytes sent to the endpoint.

    A reset stream or a broken socket aborts both directions at once; so does ``idle_timeout``
    seconds (0: no limit) without a byte in either direction.
    """
    received = 0
    loop = asyncio.get_running_loop()
    last = loop.time()

    async def outbound() -> None:  # endpoint -> tunnel
        nonlocal last
        try:
            while data := await endpoint.recv():
                last = loop.time()
                await stream.write(data)
            stream.end()
        except (ConnectionError, OSError):
            stream.reset(ResetCode.UPSTREAM_RESET, "connection reset")
            raise

    async def inbound() -> None:  # tunnel -> endpoint
        nonlocal received, last
        while chunk := await stream.read():
            last = loop.time()
            received += len(chunk)
            await endpoint.send(chunk)
        endpoint.close_send()

    tasks = [asyncio.create_task(outbound()), asyncio.create_task(inbound())]
    timer: asyncio.TimerHandle | None = None
    idled = False

    def check_idle() -> None:
        nonlocal timer, idled
        idle = loop.time() - last
        if idle < idle_timeout:
            timer = loop.call_at(last + idle_timeout, check_idle)  # noqa: F821 (deleted only after the timer)
            return
        timer = None
        idled = True
        log.info("stream %d: no byte either way for %.0fs: closed (idle timeout)", stream.id, idle)
        stream.reset(ResetCode.CANCEL, "idle timeout")
        endpoint.abort()
        for task in tasks:
            task.cancel()

    if idle_timeout > 0:
        timer = loop.call_at(last + idle_timeout, check_idle)
    try:
        for finished in asyncio.as_completed(tasks):
            await finished
    except (TunnelError, ConnectionError, OSError) as exc:
        log.debug("stream %d: pump ended: %s", stream.id, exc)
        endpoint.abort()
        if stream.error is None:
            stream.reset(ResetCode.UPSTREAM_RESET, "connection reset")
    except asyncio.CancelledError:
        # (no local may hold the current task here: this frame is in the exception's traceback,
        # and the task holds the exception, which would make a cycle for the GC)
        if not idled or _being_cancelled():
            raise  # this task itself is being cancelled
        # else: the idle check cancelled both halves: the pump is over
    finally:
        if timer is not None:
            timer.cancel()
        # check_idle refers to itself (it re-arms its timer): a function <-> cell cycle that
        # would keep the tasks, their cancelled exceptions and every frame of their tracebacks
        # alive until the cyclic GC runs (docs/RELIABILITY.md: about 80 objects per WebSocket
        # session). Deleting the name empties the cell and breaks the cycle.
        del check_idle
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return received
