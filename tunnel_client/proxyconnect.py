"""HTTP CONNECT through a proxy that wants a login, NTLM and Negotiate included (sans-I/O core,
then an asyncio dialer).

websockets' own proxy support sends one CONNECT with Basic credentials and fails on anything
but 2xx. Corporate proxies often want NTLM or Negotiate (Kerberos), a handshake of several
round trips that authenticates the *TCP connection*, so every round must use the same socket
(RFC 4559, and NTLM over HTTP). :class:`ConnectHandshake` runs that exchange:

1. ``CONNECT host:port`` without credentials (never send a password before the proxy says
   which scheme it takes);
2. on ``407``, read the whole answer (its body drained, by Content-Length or chunked, so that
   the next request starts clean), pick the strongest scheme offered that we can answer:
   Negotiate, then NTLM (both through pyspnego, the ``ntlm`` extra), then Basic;
3. answer it, on the same connection unless the proxy closed it (then on a new one: for
   NTLM that restarts the exchange); at most :data:`MAX_ROUNDS` requests;
4. ``2xx``: the tunnel is open; anything else is :class:`ConnectRefused`.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["MAX_ROUNDS", "ConnectHandshake", "ConnectRefused", "open_tunnel", "spnego_available"]

MAX_ROUNDS = 4
MAX_HEAD = 64 * 1024
MAX_BODY = 1 << 20
SCHEME_ORDER = ("negotiate", "ntlm", "basic")


class ConnectRefused(Exception):
    """The proxy answered CONNECT with something other than 2xx (after any login rounds)."""

    def __init__(self, status: int, reason: str, offered: list[str]) -> None:
        super().__init__(f"{status} {reason}".strip())
        self.status = status
        self.reason = reason
        self.offered = offered


class _Context(Protocol):  # what we use of a pyspnego context
    def step(self, in_token: bytes | None = None) -> bytes | None: ...


@dataclass
class Answer:
    """One parsed proxy answer."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    keep_alive: bool

    def challenges(self) -> dict[str, str]:
        """``{scheme (lower case): parameter}`` from every Proxy-Authenticate field."""
        out: dict[str, str] = {}
        for name, value in self.headers:
            if name == "proxy-authenticate":
                scheme, _, param = value.strip().partition(" ")
                out.setdefault(scheme.lower(), param.strip())
        return out


@dataclass
class _Reader:
    """Incremental reader of one HTTP/1.1 answer head and body (the body only drained)."""

    buffer: bytearray = field(default_factory=bytearray)
    answer: Answer | None = None
    _remaining: int | None = None  # body bytes left (Content-Length), None when chunked/none
    _chunked: bool = False
    _chunk_left: int = 0
    _last_chunk: bool = False
    _done: bool = False
    _drained: int = 0

    def feed(self, data: bytes) -> Answer | None:
        """Feed bytes; the answer once its head and body are complete."""
        self.buffer += data
        if self.answer is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    raise ValueError("proxy answer head too large")
                return None
            head = bytes(self.buffer[:end]).decode("latin-1")
            del self.buffer[: end + 4]
            self.answer = _parse_head(head)
            if 200 <= self.answer.status < 300:
                self._done = True  # a CONNECT's 2xx has no body: what follows is the tunnel
            else:
                headers = dict(self.answer.headers)
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    self._chunked = True
                elif "content-length" in headers:
                    self._remaining = int(headers["content-length"])
                    if self._remaining > MAX_BODY:
                        raise ValueError("proxy answer body too large")
                else:
                    self._remaining = 0  # no body (a 407 without a length is read as empty)
        if not self._done:
            self._drain()
        return self.answer if self._done else None

    def _drain(self) -> None:
        if not self._chunked:
            assert self._remaining is not None
            take = min(self._remaining, len(self.buffer))
            del self.buffer[:take]
            self._remaining -= take
            self._done = self._remaining == 0
            return
        while True:
            if self._chunk_left:
                take = min(self._chunk_left, len(self.buffer))
                del self.buffer[:take]
                self._chunk_left -= take
                self._drained += take
                if self._chunk_left:
                    return
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return
            line = bytes(self.buffer[:line_end]).split(b";")[0].strip()
            del self.buffer[: line_end + 2]
            if self._last_chunk:  # trailer fields, then an empty line
                if not line:
                    self._done = True
                    return
                continue
            if not line or line.strip(b"0123456789abcdefABCDEF"):
                raise ValueError("bad chunk size in the proxy's answer")
            size = int(line, 16)
            if size == 0:
                self._last_chunk = True
                continue
            if self._drained + size > MAX_BODY:
                raise ValueError("proxy answer body too large")
            self._chunk_left = size + 2  # data and its CRLF


def _parse_head(head: str) -> Answer:
    lines = head.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer from the proxy: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip().lower(), value.strip()))
    connection = ",".join(v for n, v in headers if n in ("connection", "proxy-connection")).lower()
    keep_alive = "close" not in connection and parts[0] != "HTTP/1.0" or "keep-alive" in connection
    return Answer(int(parts[1]), parts[2] if len(parts) > 2 else "", headers, keep_alive)


class ConnectHandshake:
    """The CONNECT exchange for one tunnel (module docstring).

    Args:
        target: ``host:port`` of the exit server.
        login: user and password, or None.
        proxy_host: the proxy's name (Negotiate's service principal is ``HTTP@proxy_host``).
    """

    def __init__(self, target: str, login: tuple[str, str] | None, proxy_host: str, user_agent: str) -> None:
        self.target = target
        self.login = login
        self.proxy_host = proxy_host
        self.user_agent = user_agent
        self.rounds = 0
        self.scheme: str | None = None
        self._context: _Context | None = None
        self._authorization: str | None = None
        self._reader = _Reader()
        self.offered: list[str] = []

    def request(self) -> bytes:
        """The next CONNECT request to send."""
        self.rounds += 1
        self._reader = _Reader()
        lines = [f"CONNECT {self.target} HTTP/1.1", f"Host: {self.target}", f"User-Agent: {self.user_agent}"]
        if self._authorization is not None:
            lines.append(f"Proxy-Authorization: {self._authorization}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def receive(self, data: bytes) -> Answer | None:
        """Feed bytes of the answer; returns it once complete."""
        return self._reader.feed(data)

    @property
    def leftover(self) -> bytes:
        return bytes(self._reader.buffer)

    def next_step(self, answer: Answer) -> bool:
        """After a complete answer: True when the tunnel is open; False when another request
        is due (on the same connection if ``answer.keep_alive``, else call :meth:`restart`
        with a new one).

        Raises:
            ConnectRefused: refused for good (not 407, no usable scheme, a login that
                failed, too many rounds).
        """
        if 200 <= answer.status < 300:
            return True
        challenges = answer.challenges()
        self.offered = ["NTLM" if c == "ntlm" else c.capitalize() for c in challenges]
        refused = ConnectRefused(answer.status, answer.reason, self.offered)
        if answer.status != 407 or self.login is None or self.rounds >= MAX_ROUNDS:
            raise refused
        if self.scheme is None:
            usable = [s for s in SCHEME_ORDER if s in challenges and _supported(s)]
            if not usable:
                raise refused
            self.scheme = usable[0]
            if self.scheme == "basic":
                user, password = self.login
                self._authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
                return False
            self._context = _context(self.scheme, self.login, self.proxy_host)
            out = self._context.step(None)
        else:
            param = challenges.get(self.scheme, "")
            if self.scheme == "basic" or not param:
                raise refused  # a wrong password, or the exchange started over: our answer failed
            assert self._context is not None
            out = self._context.step(base64.b64decode(param))
        if not out:
            raise refused
        self._authorization = f"{self._label} {base64.b64encode(out).decode()}"
        return False

    @property
    def _label(self) -> str:
        return "Negotiate" if self.scheme == "negotiate" else "NTLM"

    def restart(self) -> None:
        """The proxy closed the connection after a 407: NTLM and Negotiate authenticate a
        connection, so an exchange under way starts over on the new one."""
        if self.scheme in ("ntlm", "negotiate") and self.login is not None:
            self._context = _context(self.scheme, self.login, self.proxy_host)
            out = self._context.step(None)
            self._authorization = f"{self._label} {base64.b64encode(out or b'').decode()}"


def spnego_available() -> bool:
    """pyspnego (the ``ntlm`` extra) is installed: NTLM and Negotiate can be answered."""
    try:
        import spnego  # noqa: F401
    except ImportError:
        return False
    return True


def _supported(scheme: str) -> bool:
    return scheme == "basic" or spnego_available()


def _context(scheme: str, login: tuple[str, str], proxy_host: str) -> _Context:
    import spnego

    user, password = login
    protocol = "negotiate" if scheme == "negotiate" else "ntlm"
    ctx: Any = spnego.client(user, password, hostname=proxy_host, service="HTTP", protocol=protocol)
    return ctx  # type: ignore[no-any-return]


async def open_tunnel(
    proxy_host: str,
    proxy_port: int,
    target: str,
    login: tuple[str, str] | None,
    user_agent: str,
) -> socket.socket:
    """A socket connected through the proxy to ``target`` (``host:port``).

    Raises:
        ConnectRefused: the proxy refused.
        OSError: the proxy is unreachable or closed the connection.
        ValueError: the proxy's answer is not HTTP.
    """
    loop = asyncio.get_running_loop()
    handshake = ConnectHandshake(target, login, proxy_host, user_agent)
    sock = await _dial(loop, proxy_host, proxy_port)
    try:
        while True:
            await loop.sock_sendall(sock, handshake.request())
            answer = None
            while answer is None:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    raise OSError(f"the proxy closed the connection during CONNECT {target}")
                answer = handshake.receive(data)
            if handshake.next_step(answer):
                if handshake.leftover:
                    raise ValueError("the proxy sent data before the tunnel's TLS began")
                return sock
            if not answer.keep_alive:
                sock.close()
                sock = await _dial(loop, proxy_host, proxy_port)
                handshake.restart()
    except BaseException:
        sock.close()
        raise


async def _dial(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"cannot resolve {host}")
