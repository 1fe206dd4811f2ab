"""The raw relay: the thinnest asyncio/uvloop relay of length-prefixed frames.

The floor any Python broker can reach on this host: no routing, no header beyond a
length, no per-frame decision.  A frame is a u32 big-endian length and that many
bytes.  The first frame of a connection says what it is: ``b"S"`` a subscriber
(answered with the same frame, ``b"S"``, once it is registered: the subscriber's
"ready"), ``b"SP"`` a subscriber that pauses the publishers (the same answer, ``b"S"``),
``b"P"`` a publisher (no answer).  Every later frame a connection sends is forwarded
to every *other* subscriber.

The data path is the same as dcp's broker: the whole frames of one read are sliced
out of it with a memoryview and written to each subscriber with one ``write``; a
frame longer than one read is held as the list of the reads that carry it and
forwarded when complete.  A subscriber's output buffer is bounded (4 MiB by default,
like dcp's ``--out-buffer-bytes``): while it is past the bound the frames meant for
it are dropped and counted, or, for a ``b"SP"`` subscriber, the relay stops reading
from every publisher until it is below the bound again (dcp's ``slow_consumer=pause``:
lossless, by TCP backpressure).

``python -m dcp.bench.relay --listen 127.0.0.1:0`` prints ``relay listening on
HOST:PORT`` to stderr and runs until SIGTERM or SIGINT (exit 0, after printing its
counters).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys
from typing import Any, cast

from .._loop import no_delay

__all__ = ["Relay", "RelayConnection", "SUBSCRIBE", "SUBSCRIBE_PAUSING", "PUBLISH", "frame", "main"]

SUBSCRIBE = b"S"
SUBSCRIBE_PAUSING = b"SP"  # a subscriber whose full buffer pauses the publishers instead of dropping
PUBLISH = b"P"
DEFAULT_OUT_BUFFER = 4 * 1024 * 1024
MAX_FRAME = 64 * 1024 * 1024  # a longer declared length ends the connection

_LEN = struct.Struct("!I")
_unpack_len = _LEN.unpack_from


def frame(body: bytes) -> bytes:
    """``body`` as one length-prefixed frame."""
    return _LEN.pack(len(body)) + body


class Relay:
    """Listening socket, the subscriber set and the counters."""

    def __init__(self, out_buffer_bytes: int = DEFAULT_OUT_BUFFER) -> None:
        self.out_buffer_bytes = out_buffer_bytes
        self.subscribers: list[RelayConnection] = []
        self.publishers: set[RelayConnection] = set()
        self.full_pausing = 0  # pausing subscribers past their bound: publishers are not read while > 0
        self.connections: set[RelayConnection] = set()
        self.frames_in = 0
        self.bytes_in = 0
        self.frames_out = 0
        self.bytes_out = 0
        self.dropped = 0  # frame copies a full subscriber buffer could not take
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: RelayConnection(self), host, port, reuse_address=True, backlog=1024)
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        name = self._server.sockets[0].getsockname()
        return name[0], name[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()  # flushes what is buffered first
        for _ in range(100):  # give the output buffers a moment to flush
            if not self.connections:
                break
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()

    def summary(self) -> str:
        return (
            f"frames in={self.frames_in} out={self.frames_out}, bytes in={self.bytes_in} out={self.bytes_out}, "
            f"dropped={self.dropped}"
        )


class RelayConnection(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.role = b""
        self.paused = False  # output buffer past the bound
        self.pauses_publishers = False  # a b"SP" subscriber
        self.dropped = 0
        self._held: list[Any] = []  # the reads carrying an incomplete frame
        self._held_len = 0
        self._need = 0  # that frame's full length (prefix included); 0 while its prefix is cut

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream server's transport
        no_delay(transport)
        self.transport.set_write_buffer_limits(high=self.relay.out_buffer_bytes)
        self.relay.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        relay = self.relay
        relay.connections.discard(self)
        relay.publishers.discard(self)
        if self.paused:
            self.resume_writing()
        if self in relay.subscribers:
            relay.subscribers = [s for s in relay.subscribers if s is not self]
        self._held.clear()

    def pause_writing(self) -> None:
        self.paused = True
        if self.pauses_publishers:
            relay = self.relay
            relay.full_pausing += 1
            if relay.full_pausing == 1:
                for publisher in relay.publishers:
                    publisher.reading(False)

    def resume_writing(self) -> None:
        self.paused = False
        if self.pauses_publishers:
            relay = self.relay
            relay.full_pausing -= 1
            if relay.full_pausing == 0:
                for publisher in relay.publishers:
                    publisher.reading(True)

    def reading(self, on: bool) -> None:
        """Resume or pause reading this publisher's socket."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading() if on else transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.relay.bytes_in += len(data)
        if self._held:
            rest = self._complete(data)
            if rest is None:
                return
            data = rest
        self._chunk(data)

    # -- the data path ---------------------------------------------------------

    def _chunk(self, data: Any) -> None:
        """Forward the whole frames of ``data`` with one write per subscriber; hold the tail."""
        end = len(data)
        pos = 0
        if not self.role:
            if end < 4 or end < 4 + _unpack_len(data, 0)[0]:
                self._hold(data, end)
                return
            pos = self._hello(data)
            if pos < 0:
                return
        start = pos
        frames = 0
        while end - pos >= 4:
            length = 4 + _unpack_len(data, pos)[0]
            if length > MAX_FRAME:
                assert self.transport is not None  # data comes after connection_made
                self.transport.abort()
                return
            if end - pos < length:
                break
            pos += length
            frames += 1
        if frames:
            self._send((memoryview(data)[start:pos],), pos - start, frames)
        if pos < end:
            self._hold(memoryview(data)[pos:], end - pos)  # every read is immutable bytes: no copy

    def _hello(self, data: Any) -> int:
        length = _unpack_len(data, 0)[0]
        role = bytes(data[4 : 4 + length])
        if role in (SUBSCRIBE, SUBSCRIBE_PAUSING):
            self.role = SUBSCRIBE
            self.pauses_publishers = role == SUBSCRIBE_PAUSING
            self.relay.subscribers = [*self.relay.subscribers, self]
            assert self.transport is not None  # data comes after connection_made
            self.transport.write(frame(SUBSCRIBE))
        elif role == PUBLISH:
            self.role = role
            self.relay.publishers.add(self)
            if self.relay.full_pausing:
                self.reading(False)
        else:
            assert self.transport is not None  # data comes after connection_made
            self.transport.abort()
            return -1
        return 4 + length

    def _hold(self, tail: Any, size: int) -> None:
        self._held = [tail]
        self._held_len = size
        self._need = 4 + _unpack_len(tail, 0)[0] if size >= 4 else 0
        if self._need > MAX_FRAME:
            assert self.transport is not None  # data comes after connection_made
            self.transport.abort()

    def _complete(self, data: bytes) -> Any:
        """Add a read to the held frame; forward the frame once whole; return what follows it (or None)."""
        self._held.append(data)
        self._held_len += len(data)
        if not self._need:  # the length prefix itself was cut
            if self._held_len < 4:
                return None
            joined = b"".join(self._held)
            self._held, self._held_len = [], 0
            return joined
        if self._held_len < self._need or not self.role:
            if self._held_len >= self._need:  # the hello itself spanned reads
                joined = b"".join(self._held)
                self._held, self._held_len = [], 0
                return joined
            return None
        pieces, left = self._held, self._need
        self._held, self._held_len, self._need = [], 0, 0
        out: list[Any] = []
        rest = None
        for piece in pieces:
            view = memoryview(piece)
            if len(view) >= left:
                out.append(view[:left])
                if len(view) > left:
                    rest = view[left:]
                break
            out.append(view)
            left -= len(view)
        self._send(tuple(out), sum(len(v) for v in out), 1)
        return rest

    def _send(self, chunks: tuple[Any, ...], size: int, frames: int) -> None:
        relay = self.relay
        relay.frames_in += frames
        for sub in relay.subscribers:
            if sub is self:
                continue
            if sub.paused and not sub.pauses_publishers:  # a pausing one takes what is already read
                sub.dropped += frames
                relay.dropped += frames
                continue
            transport = sub.transport
            if transport is None or transport.is_closing():
                continue
            if len(chunks) == 1:
                transport.write(chunks[0])
            else:
                transport.writelines(chunks)
            relay.frames_out += frames
            relay.bytes_out += size


async def serve(host: str, port: int, out_buffer_bytes: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):  # before the listening line: a driver may signal at once
        loop.add_signal_handler(signum, stop.set)
    relay = Relay(out_buffer_bytes)
    host, port = await relay.start(host, port)
    print(f"relay listening on {host}:{port}", file=sys.stderr, flush=True)
    await stop.wait()
    await relay.close()
    print(f"relay stopped: {relay.summary()}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from .._loop import run
    from ..config import parse_address

    parser = argparse.ArgumentParser(prog="python -m dcp.bench.relay", description="The raw relay baseline of dcp bench.")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default: 127.0.0.1:0)")
    parser.add_argument("--out-buffer-bytes", type=int, default=DEFAULT_OUT_BUFFER, help="output buffer bound per subscriber (default: 4 MiB)")
    args = parser.parse_args(argv)
    host, port = parse_address(args.listen)
    run(serve(host, port, args.out_buffer_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
