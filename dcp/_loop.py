"""The event loop and transport set-up every dcp process shares: uvloop, no Nagle
delay, writes of small frames gathered into few system calls, and the open-file limit."""

from __future__ import annotations

import asyncio
import os
import resource
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


# Tried in turn when the hard open-file limit is unlimited (macOS): the kernel caps the soft one.
_UNLIMITED_TRIES = (1 << 20, 10240)


def raise_open_file_limit() -> tuple[int, int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, as far as the system
    lets it; return (soft before, soft now, hard).  ``resource.RLIM_INFINITY`` stands
    for no limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    infinite = resource.RLIM_INFINITY
    if soft != infinite:
        for target in (hard,) if hard != infinite else _UNLIMITED_TRIES:
            if target <= soft:
                break
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ValueError, OSError):  # above what the kernel allows (an unlimited hard limit)
                continue
            soft = target
            break
    return before, soft, hard


def open_file_count() -> int:
    """The file descriptors this process has open now (0 where the system does not say)."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            return max(0, len(os.listdir(listing)) - 1)  # less the one listdir opened
        except OSError:
            continue
    return 0


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
        self._buf += data
        self._queued()

    def write_frame(self, head: bytes, tail: bytes, payload: Any, size: int, copy_limit: int = 8192) -> None:
        """Queue a frame given as its header, its X-and-topic bytes and its payload of
        ``size`` bytes, unjoined: a payload up to ``copy_limit`` bytes is copied into the
        buffer (small frames share one write); a larger one is handed to the transport
        as it is, behind what is queued, in one ``writelines`` (one system call, no copy
        here).  ``payload`` is bytes, a flat byte view, or a tuple of them
        (:func:`dcp.wire.uncopied`)."""
        buf = self._buf
        buf += head
        buf += tail
        if size > copy_limit:
            self._buf = bytearray()
            if not self._transport.is_closing():
                self._transport.writelines((buf, *payload) if type(payload) is tuple else (buf, payload))
            return
        if type(payload) is tuple:
            for part in payload:
                buf += part
        else:
            buf += payload
        self._queued()

    def _queued(self) -> None:
        """Write now if the buffer is full, else at the end of this loop iteration."""
        if len(self._buf) >= self._limit:
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
