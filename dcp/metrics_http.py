"""The metrics port (``--metrics-listen``): ``/metrics``, ``/healthz`` and ``/readyz``
over HTTP/1.x, with asyncio alone.

It serves those three paths and nothing else, one request per connection, and every
byte a client sends is hostile: a malformed head gets 400, one over
:data:`MAX_HEAD` bytes 431, one not complete within :data:`READ_TIMEOUT_S` 408, and
the connection is closed.  What a client can hold is bounded: at most
:data:`MAX_CLIENTS` connections at once (past it, 503 at once), and an answer it does
not read within :data:`WRITE_TIMEOUT_S` is aborted.  A scrape renders the families
afresh at most every :data:`RENDER_INTERVAL_S`, so a flood of scrapes costs the daemon
a few renders a second, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import cast

from .metrics import CONTENT_TYPE, Family, render

__all__ = ["MetricsServer", "BadHttpRequest", "parse_head", "MAX_HEAD", "MAX_CLIENTS"]

log = logging.getLogger(__name__)

MAX_HEAD = 8192  # request line and headers, bytes
READ_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 10.0
MAX_CLIENTS = 16
RENDER_INTERVAL_S = 0.25
PATHS = ("/metrics", "/healthz", "/readyz")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 token: a method, a header name
_TARGET = re.compile(rb"/[\x21-\x7e]*\Z")  # origin-form, visible ASCII
_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    431: "Request Header Fields Too Large", 503: "Service Unavailable",
}


class BadHttpRequest(ValueError):
    """A request head that is not HTTP/1.x, or asks for what this port does not do."""


def parse_head(head: bytes) -> tuple[str, str]:
    """The method and path (without its query) of a request head, its blank line excluded.

    Raises:
        BadHttpRequest: not a request line and headers of HTTP/1.0 or 1.1, or a request
            with a body (none of these paths takes one).
    """
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadHttpRequest("the request line is not METHOD TARGET VERSION")
    method, target, version = parts
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise BadHttpRequest("not HTTP/1.0 or HTTP/1.1")
    if not _TOKEN.match(method):
        raise BadHttpRequest("the method is not a token")
    if not _TARGET.match(target):
        raise BadHttpRequest("the target is not a path")
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):  # obsolete line folding included: a name cannot start with a space
            raise BadHttpRequest("a header line is not NAME: VALUE")
        lowered = name.lower()
        if lowered == b"transfer-encoding" or (lowered == b"content-length" and value.strip() != b"0"):
            raise BadHttpRequest("a request with a body")
    return method.decode("ascii"), target.decode("ascii").partition("?")[0]


class MetricsServer:
    """Serves ``collect()``'s families on ``/metrics``; ``/readyz`` answers 200 when
    ``unready()`` finds nothing missing, else 503 with what is; ``/healthz`` 200 while the
    event loop turns."""

    def __init__(self, address: tuple[str, int], collect: Callable[[], Iterable[Family]], unready: Callable[[], list[str]]) -> None:
        self.listen = address
        self.collect = collect
        self.unready = unready
        self.scrapes = 0
        self.bad_requests = 0  # answered 400, 405, 408 or 431
        self.turned_away = 0  # answered 503 past MAX_CLIENTS
        self.render_s = 0.0  # the last render, seconds
        self.clients: set[_MetricsConnection] = set()
        self._rendered = b""
        self._rendered_at = float("-inf")
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host, port = self.listen
        self._server = await asyncio.get_running_loop().create_server(lambda: _MetricsConnection(self), host, port, reuse_address=True)
        host, port = self.address
        log.info("metrics on http://%s:%d/metrics (and /healthz, /readyz)", host, port)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "not started"
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for client in list(self.clients):
            client.abort()
        self._server = None

    def answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a well-formed request."""
        if path not in PATHS:
            return 404, "text/plain", b"not found: this port serves /metrics, /healthz and /readyz\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            missing = self.unready()
            if missing:
                return 503, "text/plain", ("not ready: " + "; ".join(missing) + "\n").encode()
            return 200, "text/plain", b"ready\n"
        self.scrapes += 1
        now = time.monotonic()
        if now - self._rendered_at >= RENDER_INTERVAL_S:
            started = time.perf_counter()
            self._rendered = render([*self.collect(), *self._own_families()])
            self.render_s = time.perf_counter() - started
            self._rendered_at = now
        return 200, CONTENT_TYPE, self._rendered

    def _own_families(self) -> list[Family]:
        return [
            Family("dcp_metrics_scrapes_total", "counter", "requests for /metrics").add(self.scrapes),
            Family("dcp_metrics_render_seconds", "gauge", "how long the last render of /metrics took, seconds").add(self.render_s),
            Family("dcp_metrics_refused_total", "counter", "metrics requests refused: malformed (400), a wrong method "
                   "(405), too slow (408), too large (431), or past the client limit (503)").add(self.bad_requests + self.turned_away),
        ]


class _MetricsConnection(asyncio.Protocol):
    """One request, one answer, closed."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.answered = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        server.clients.add(self)
        if len(server.clients) > MAX_CLIENTS:
            server.turned_away += 1
            self.respond(503, "text/plain", b"too many metrics clients at once\n")
            return
        self.timer = asyncio.get_running_loop().call_later(READ_TIMEOUT_S, self.timed_out)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return  # a pipelined request: one per connection
        self.buffer += data
        ends = [i for i in (self.buffer.find(b"\r\n\r\n"), self.buffer.find(b"\n\n")) if i >= 0]
        if not ends:
            if len(self.buffer) > MAX_HEAD:
                self.refuse(431, "the request head is over %d bytes" % MAX_HEAD)
            return
        end = min(ends)
        if end > MAX_HEAD:
            self.refuse(431, "the request head is over %d bytes" % MAX_HEAD)
            return
        try:
            method, path = parse_head(bytes(self.buffer[:end]))
        except BadHttpRequest as exc:
            self.refuse(400, str(exc))
            return
        status, content_type, body = self.server.answer(method, path)
        if status == 405:
            self.server.bad_requests += 1
        self.respond(status, content_type, body, head_only=method == "HEAD")

    def eof_received(self) -> bool:
        if not self.answered:
            self.refuse(400, "the request ended before its blank line")
        return False

    def timed_out(self) -> None:
        if not self.answered:
            self.refuse(408, "no complete request within %g s" % READ_TIMEOUT_S)
        else:  # the answer was not read in time: nothing more is held for this client
            self.abort()

    def refuse(self, status: int, reason: str) -> None:
        self.server.bad_requests += 1
        self.respond(status, "text/plain", (reason + "\n").encode())

    def respond(self, status: int, content_type: str, body: bytes, head_only: bool = False) -> None:
        """Write the answer, close once it is flushed, abort if it is not within WRITE_TIMEOUT_S."""
        self.answered = True
        self.buffer = bytearray()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            + ("Allow: GET, HEAD\r\n" if status == 405 else "")
            + "Connection: close\r\n\r\n"
        ).encode("ascii")
        transport.writelines([head] if head_only else [head, body])
        transport.close()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(WRITE_TIMEOUT_S, self.timed_out)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.server.clients.discard(self)
