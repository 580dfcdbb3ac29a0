"""Locust load test for Backhaul: a realistic request mix through exit server + tunnel client.

Run it with ``make load`` (bench/load.py starts the stack: bench/upstream.py behind a tunnel
client, an exit server in front, then runs locust headless from the separate ``.venv-load``).
Locust (gevent) is never imported into the uvloop processes under test.

Mix per user (weights): 100 B GETs (10), ~100 KiB uploads (2), 1 MiB downloads (2), one SSE
stream read for ~2 s (1), one WebSocket session (1): upgrade, then LOAD_WS_MESSAGES (default 10)
binary messages of 1-16 KiB echoed back by the upstream. Every answer is checked (status, size,
digest; SSE events must arrive one by one, not buffered until the end; each echo must equal what
was sent). The WebSocket session is reported as "WS connect" (time to the 101) and "WS echo"
(all round trips); it uses websocket-client (the ``load`` extra), whose sockets gevent patches
like locust's own.

Pass/fail (set in the ``quitting`` listener, so locust's exit status is the verdict):
    failures > LOAD_FAIL_RATIO (default 0.001 = 0.1%) of requests      -> exit 1
    total p95 response time > LOAD_P95_MS (default P95_LIMIT_MS below)  -> exit 1
    no requests at all                                                  -> exit 1

Environment: LOAD_HOST_HEADER (Host to send; Backhaul routes by it), LOAD_P95_MS,
LOAD_FAIL_RATIO, LOAD_SSE_SECONDS (default 2), LOAD_WS_MESSAGES (default 10).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

import websocket  # websocket-client
from locust import HttpUser, between, events, task

#: Default p95 limit over all requests (ms). A 1 MiB download or a 100 KiB upload through the
#: tunnel takes a few ms when idle; the limit leaves room for a 2-vCPU box shared by locust, the
#: exit server, the client and the upstream.
P95_LIMIT_MS = float(os.environ.get("LOAD_P95_MS", "250"))
FAIL_RATIO_LIMIT = float(os.environ.get("LOAD_FAIL_RATIO", "0.001"))
HOST_HEADER = os.environ.get("LOAD_HOST_HEADER", "")
SSE_SECONDS = float(os.environ.get("LOAD_SSE_SECONDS", "2"))
WS_MESSAGES = int(os.environ.get("LOAD_WS_MESSAGES", "10"))

UPLOAD = os.urandom(100 * 1024)
UPLOAD_SHA = hashlib.sha256(UPLOAD).hexdigest()
MIB = 1 << 20
# bench/upstream.py streams this 64 KiB pattern for /download
DOWNLOAD_SHA = hashlib.sha256((bytes(range(256)) * 256) * 16).hexdigest()

log = logging.getLogger("backhaul.load")


class BackhaulUser(HttpUser):
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        if HOST_HEADER:
            self.client.headers["Host"] = HOST_HEADER

    @task(10)
    def small(self) -> None:
        with self.client.get("/small", name="GET /small (100 B)", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
            elif len(resp.content) != 100:
                resp.failure(f"body {len(resp.content)} bytes, want 100")

    @task(2)
    def upload(self) -> None:
        with self.client.post(
            "/upload",
            data=UPLOAD,
            name="POST /upload (100 KiB)",
            catch_response=True,
            headers={"Content-Type": "application/octet-stream"},
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            try:
                body = resp.json()
            except ValueError:
                resp.failure("answer is not JSON")
                return
            if body.get("received") != len(UPLOAD) or body.get("sha256") != UPLOAD_SHA:
                resp.failure(f"upstream received {body.get('received')} bytes / wrong digest")

    @task(2)
    def download(self) -> None:
        with self.client.get(f"/download?n={MIB}", name="GET /download (1 MiB)", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
            elif len(resp.content) != MIB:
                resp.failure(f"body {len(resp.content)} bytes, want {MIB}")
            elif hashlib.sha256(resp.content).hexdigest() != DOWNLOAD_SHA:
                resp.failure("wrong digest")

    @task(1)
    def sse(self) -> None:
        """Read an event stream for ~SSE_SECONDS. Locust's response time for it is the time to the
        response head; the time to the first event is reported as its own "SSE" entry."""
        t0 = time.perf_counter()
        first_event_ms: float | None = None
        events_seen = 0
        done = False
        with self.client.get(
            f"/sse?seconds={SSE_SECONDS:g}&interval_ms=100",
            name="GET /sse (stream, head)",
            stream=True,
            catch_response=True,
            headers={"Accept": "text/event-stream"},
            timeout=SSE_SECONDS + 30,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            try:
                for line in resp.iter_lines(chunk_size=None):
                    if line.startswith(b"event: tick"):
                        events_seen += 1
                        if first_event_ms is None:
                            first_event_ms = (time.perf_counter() - t0) * 1000
                    elif line.startswith(b"event: done"):
                        done = True
                        break
                    if time.perf_counter() - t0 > SSE_SECONDS + 20:
                        break
            except Exception as exc:  # noqa: BLE001 (any broken stream is a failure)
                resp.failure(f"stream broke: {exc!r}")
                return
            want = int(SSE_SECONDS * 10 * 0.5)
            if not done:
                resp.failure(f"stream ended without the final event after {events_seen} events")
            elif events_seen < want:
                resp.failure(f"only {events_seen} events in {SSE_SECONDS:g} s")
            elif first_event_ms is not None and first_event_ms > SSE_SECONDS * 1000 * 0.5:
                resp.failure(f"first event after {first_event_ms:.0f} ms: the stream looks buffered")
            else:
                resp.success()
        if first_event_ms is not None:
            self.environment.events.request.fire(
                request_type="SSE",
                name="first event",
                response_time=first_event_ms,
                response_length=0,
                exception=None,
                context={},
                response=None,
            )

    @task(1)
    def websocket_echo(self) -> None:
        """One WebSocket session through the tunnel: the upgrade, then WS_MESSAGES binary
        messages of 1-16 KiB, each echoed back unchanged by bench/upstream.py's /ws."""
        url = "ws" + self.host.removeprefix("http") + "/ws"
        host = {"host": HOST_HEADER} if HOST_HEADER else {}
        t0 = time.perf_counter()
        try:
            ws = websocket.create_connection(url, timeout=30, enable_multithread=False, **host)
        except Exception as exc:  # noqa: BLE001 (a failed upgrade is the failure being counted)
            self._ws_report("WS connect", t0, 0, exc)
            return
        self._ws_report("WS connect", t0, 0, None)
        t1 = time.perf_counter()
        sent = 0
        error: Exception | None = None
        try:
            for i in range(WS_MESSAGES):
                message = os.urandom(1024 * (1 + (i * 7) % 16))
                ws.send_binary(message)
                opcode, echo = ws.recv_data()
                if opcode != websocket.ABNF.OPCODE_BINARY or echo != message:
                    raise ValueError(f"message {i}: echo of {len(echo)} bytes differs from the {len(message)} sent")
                sent += len(message)
            ws.close(timeout=5)
        except Exception as exc:  # noqa: BLE001 (any broken session is a failure)
            error = exc
            ws.abort()
        self._ws_report(f"WS echo x{WS_MESSAGES} (1-16 KiB)", t1, sent, error)

    def _ws_report(self, name: str, since: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=(time.perf_counter() - since) * 1000,
            response_length=length,
            exception=exc,
            context={},
            response=None,
        )


@events.quitting.add_listener
def _verdict(environment, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    total = environment.stats.total
    reasons = []
    if total.num_requests == 0:
        reasons.append("no requests were made")
    else:
        if total.fail_ratio > FAIL_RATIO_LIMIT:
            reasons.append(
                f"failure ratio {total.fail_ratio:.4%} > {FAIL_RATIO_LIMIT:.2%} "
                f"({total.num_failures} of {total.num_requests})"
            )
        p95 = total.get_response_time_percentile(0.95)
        if p95 is not None and p95 > P95_LIMIT_MS:
            reasons.append(f"p95 {p95:.0f} ms > {P95_LIMIT_MS:.0f} ms")
    if reasons:
        log.error("load test FAILED: %s", "; ".join(reasons))
        environment.process_exit_code = 1
    else:
        log.info(
            "load test passed: %d requests, %.4f%% failures (limit %.2f%%), p95 %s ms (limit %.0f ms)",
            total.num_requests,
            100 * total.fail_ratio,
            100 * FAIL_RATIO_LIMIT,
            total.get_response_time_percentile(0.95),
            P95_LIMIT_MS,
        )
        environment.process_exit_code = 0
