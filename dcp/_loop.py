"""The event loop and transport set-up every dcp process shares: uvloop, no Nagle
delay, and writes of small frames gathered into few system calls."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """``asyncio.run`` with a uvloop event loop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop, debug=debug) as runner:
        return runner.run(main)


def no_delay(transport: asyncio.BaseTransport) -> None:
    """Send small frames at once (TCP_NODELAY): dcp coalesces its own writes."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not a TCP socket
            pass


class CoalescedWriter:
    """Gathers small writes into one ``transport.write`` per loop iteration.

    uvloop (like asyncio) sends at once when its buffer is empty, so a publisher of
    small frames makes one system call per frame, most of its time.  Here they are
    appended to a buffer that is written when it reaches ``limit`` bytes or at the end
    of the current loop iteration, whichever comes first.
    """

    __slots__ = ("_transport", "_loop", "_buf", "_limit", "_scheduled")

    def __init__(self, transport: asyncio.Transport, limit: int = 64 * 1024) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._limit = limit
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` (copied into the buffer)."""
        buf = self._buf
        buf += data
        if len(buf) >= self._limit:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_scheduled)

    def write_uncopied(self, data: bytes | bytearray | memoryview) -> None:
        """Write a large buffer as it is, after what is queued."""
        self.flush()
        self._transport.write(data)

    def flush(self) -> None:
        """Hand what is queued to the transport now (before a close, or a control frame)."""
        if self._buf:
            data, self._buf = self._buf, bytearray()  # the transport may keep ``data``
            if not self._transport.is_closing():
                self._transport.write(data)

    def _flush_scheduled(self) -> None:
        self._scheduled = False
        self.flush()
