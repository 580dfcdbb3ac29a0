"""AWS IAM authentication on the exit server (docs/PROTOCOL.md 5.3): check the client's signed
``sts:GetCallerIdentity`` request (shared/awsiam.py), forward it to STS, and return the ARN STS
names. STS unreachable is :class:`StsUnavailable` (the upgrade gets 503 and the client retries),
never a crash and never a pass; sessions already open are not touched.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING

from shared.awsiam import IamRefused, check_request, decode_envelope, parse_identity

if TYPE_CHECKING:
    import aiohttp

__all__ = ["IamVerifier", "StsUnavailable"]

log = logging.getLogger(__name__)

#: Headers of the envelope that are not passed to STS (the HTTP client writes its own).
_NOT_FORWARDED = frozenset({"host", "content-length", "connection", "transfer-encoding"})


class StsUnavailable(Exception):
    """STS could not be asked (down, timed out, 5xx): refuse new sessions for now."""


class IamVerifier:
    """Verifies envelopes for one exit server (its ``--aws-server-id``).

    Args:
        endpoints: the STS endpoints allowed (None: global and regional AWS ones).
        max_age: seconds a signed request stays acceptable (either side of now).
        cache_ttl: seconds an STS answer is reused for the same signed request (a client that
            reconnects at once within the signature's life costs STS nothing).
    """

    def __init__(
        self,
        server_id: str,
        endpoints: tuple[str, ...] | None = None,
        max_age: float = 300.0,
        timeout: float = 5.0,
        ca_file: Path | None = None,
        cache_ttl: float = 60.0,
    ) -> None:
        self.server_id = server_id
        self.endpoints = endpoints
        self.max_age = max_age
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self._ssl = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
        self._cache: dict[bytes, tuple[str, float]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.sts_calls = 0
        self.sts_failures = 0

    async def verify(self, envelope: str) -> str:
        """The caller's ARN.

        Raises:
            IamRefused: not an acceptable request, or STS refused it (bad signature, expired
                or unknown credentials).
            StsUnavailable: STS could not answer.
        """
        req = decode_envelope(envelope)
        check_request(req, self.server_id, self.endpoints, dt.datetime.now(dt.UTC), self.max_age)
        key = hashlib.sha256(envelope.encode()).digest()
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        headers = {k: v for k, v in req.headers.items() if k not in _NOT_FORWARDED}
        import aiohttp  # at the first STS call: an exit server without IAM clients never loads it

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout), connector=aiohttp.TCPConnector(ssl=self._ssl or True)
            )
        self.sts_calls += 1
        try:
            async with self._session.post(req.url, data=req.body.encode(), headers=headers) as resp:
                body = await resp.content.read(64 * 1024)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.sts_failures += 1
            raise StsUnavailable(f"STS unreachable: {type(exc).__name__}: {exc}") from None
        if status >= 500 or status == 429:
            self.sts_failures += 1
            raise StsUnavailable(f"STS answered {status}")
        if status != 200:
            raise IamRefused(f"STS refused the signed request ({status}: {_error_code(body)})")
        try:
            arn = parse_identity(body)
        except ValueError as exc:
            self.sts_failures += 1
            raise StsUnavailable(str(exc)) from None
        if len(self._cache) >= 1024:
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            if len(self._cache) >= 1024:
                self._cache.clear()
        self._cache[key] = (arn, now + self.cache_ttl)
        return arn

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _error_code(body: bytes) -> str:
    """STS's error code from an error answer (for the log), or "?"."""
    start = body.find(b"<Code>")
    end = body.find(b"</Code>", start)
    if start < 0 or end < 0:
        return "?"
    return body[start + 6 : min(end, start + 70)].decode("ascii", "replace")
