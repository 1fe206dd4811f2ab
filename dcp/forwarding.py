"""The broker's forwarding core, sans-I/O: one connection's bytes in, decisions out.

A :class:`Forwarder` is fed the reads of one connection and yields what to do with
them, in order:

- :class:`Write`: these bytes (whole frames, hop limits already decremented) go to
  every port of ``mask``;
- :class:`Drop`: frames (or copies) that go nowhere, by reason (``DROP_REASONS``),
  with a message for the sender when it should be told;
- :class:`Control`: a control frame for the broker to act on.  The forwarder reads the
  broker's ports afresh after it, since a control frame may attach or detach one.

It raises :class:`~dcp.errors.RemoteProtocolError` when the stream can no longer be
trusted, after yielding the decisions for the frames before the bad one.

The frame format is parsed by :func:`dcp.wire.scan`, as the subscribers' decoder
parses it; a read of small frames is copied once (the hop bytes are patched in place)
and each run of consecutive frames with the same out bitmap is one :class:`Write` of a
memoryview slice.  A read that starts with a frame of ``UNCOPIED_FRAME`` bytes or more
is not copied: each frame is written as a new 4-byte start of header (hop limit
decremented) and a view of the rest.  A frame longer than a read is held as the reads
that carry it (:class:`~dcp.wire.Reassembly`) and forwarded without a copy.

The decision for a data frame arriving on port ``p`` (stateless mode) is
``out = (X mod key) & attached & ~(1 << p)`` for a broker with one key; with a key
layout (over 64 ports) ``X mod key`` becomes :meth:`~dcp.routing.KeyLayout.decode`,
memoised per X in the broker's ``decoded`` (up to ``DECODED_LIMIT`` numbers, then
forgotten at once).  Bits naming unattached ports, or links that are down, are
counted per copy.  A decision that counted nothing is repeated for
the following frames of the read that :func:`~dcp.wire.scan` marks as repeating its
route, with a hop limit above 0.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol, Union

from .errors import RemoteProtocolError
from .routing import KeyLayout
from .wire import (
    CONTROL,
    DATA,
    HEADER,
    HEADER_SIZE,
    ROUTE_TAG_SIZE,
    SIGNED_ROUTE,
    ControlFrame,
    Found,
    Limits,
    Reassembly,
    decode_control,
    scan,
)

__all__ = ["DECODED_LIMIT", "DROP_REASONS", "Write", "Drop", "Control", "Decision", "Ports", "RouteCheck", "Forwarder"]

#: Why a frame (or one copy of it) was not delivered; each is a counter in a broker's stats.
DROP_REASONS = (
    "no_route",  # the out bitmap named no attached port but the ingress
    "unattached_port",  # one copy per bit naming a port with nothing attached
    "slow_consumer",  # one copy per frame a full output buffer could not take
    "hop_limit",  # the frame arrived with a hop limit of 0
    "route_too_large",  # X over max_x_bits
    "rejected",  # unknown frame type, data before hello, ...
    "truncated",  # the sender's stream ended inside a frame
    "link_down",  # one copy per bit naming the port of a link that is down
    "route_unsigned",  # --verify-routes: X carried no route tag
    "route_forged",  # a signed X field shorter than its tag; --verify-routes: the tag does not match topic, X, epoch,
    # expiry, the name the publishing agent was admitted under and this broker's key
    "route_expired",  # --verify-routes: the tag's expiry has passed
    "route_stale",  # --verify-routes: a genuine tag of an epoch older than one verified for the same producer and topic
)

# Frames up to this size that span reads are joined to the rest of the read and
# forwarded with it; larger ones go out as the reads that carry them, uncopied.
JOIN_LIMIT = 64 * 1024
# A read whose first frame has at least this many bytes is not copied: each of its frames
# goes out as a new header with the hop limit decremented and a view of the rest, since
# copying a read of a few large frames costs more than writing two pieces per frame.
UNCOPIED_FRAME = 16 * 1024
_HOPS_HEAD = struct.Struct("!BBBB").pack  # the first 4 bytes of a header, up to the hop limit


class Write(NamedTuple):
    """``frames`` whole frames, ``size`` bytes in ``chunks``, for every port of ``mask``."""

    mask: int
    chunks: tuple[Any, ...]
    size: int
    frames: int


class Drop(NamedTuple):
    """``count`` frames or copies not delivered for ``reason``.

    ``message``: what to tell the sender, or "" when only counted.  ``ports``: for
    ``link_down``, the bitmap of the link ports concerned.
    """

    reason: str
    count: int  # type: ignore[assignment]  # the field shadows tuple.count, on purpose
    message: str = ""
    ports: int = 0


class Control(NamedTuple):
    """A control frame, decoded and within the limits."""

    body: dict[str, Any]


Decision = Union[Write, Drop, Control]

#: Topology numbers a broker with many keys remembers the decoding of: one per live
#: stream through it, in practice; a flood of distinct numbers only empties the memo.
DECODED_LIMIT = 4096


class Ports(Protocol):
    """What the forwarder reads of its broker, at every decision."""

    key: int  # the root key: the only one with up to 64 ports
    layout: KeyLayout
    decoded: dict[int, int]  # X -> layout.decode(X), kept by the forwarders
    attached: int  # bitmap of the ports with a connection
    reserved: int  # bitmap of the ports held by links, up or down
    table: dict[bytes, int]  # stateful mode: topic -> bitmap of ports


class RouteCheck(Protocol):
    """``--verify-routes``: the reason a route tag is refused, or None.  One per connection:
    an agent's checks its tags against the name it was admitted under
    (:class:`dcp.auth.ProducerRoutes`); a link's frames are not checked (no verifier)."""

    def check(self, field: bytes, x_len: int, topic: bytes, now: float) -> str | None: ...


class Forwarder:
    """The forwarding decisions of one connection of a broker.

    Args:
        ports: the broker's port state, read at every decision.
        limits: the frame limits.
        stateless: route by ``X mod key`` (True) or by the topic table (False).
        verifier: with ``--verify-routes``, checks the route tag of every new route
            (the broker sets it per connection at the hello: ``verifier`` may change).
        clock: wall-clock seconds, for route tag expiry.
    """

    def __init__(
        self,
        ports: Ports,
        limits: Limits,
        *,
        stateless: bool = True,
        verifier: RouteCheck | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ports = ports
        self.limits = limits
        self.stateless = stateless
        self.verifier = verifier
        self.clock = clock
        self.port = -1  # the port this connection is attached on; -1 before
        self.not_bit = -1  # ~(1 << port): the ingress never gets its own frames back
        self.refusal = "data frame before hello"  # why data from an unattached connection is refused
        self.frames_in = 0  # data frames decided
        self._held = Reassembly(limits)
        self._x_fast = limits.max_x_bits // 8  # X of up to this many bytes is always within max_x_bits
        self._drops: list[Drop] = []

    def attach(self, port: int) -> None:
        self.port = port
        self.not_bit = ~(1 << port)

    def set_limits(self, limits: Limits) -> None:
        """Take frames within ``limits`` from now on (a broker widens a connection's
        limits once its hello is accepted), the frames after the hello in the same read
        included."""
        self.limits = limits
        self._held.limits = limits
        self._x_fast = limits.max_x_bits // 8

    @property
    def held(self) -> int:
        """Bytes held for an incomplete frame."""
        return self._held.size

    def eof(self) -> Drop | None:
        """The stream ended: the drop of a frame it left incomplete, if any."""
        error = self._held.truncated()
        return None if error is None else Drop("truncated", 1, str(error))

    def close(self) -> None:
        """Forget what is held: nothing more is read."""
        self._held.truncated()

    def receive(self, data: bytes | bytearray | memoryview) -> Iterator[Decision]:
        """The decisions for the frames that ``data`` completes, in order.

        ``data`` must not change afterwards (a transport's reads do not): the tail of
        a frame that spans reads is held as it is.  Stop iterating, e.g. after a
        control frame closed the connection, and nothing after it is decided.

        Raises:
            RemoteProtocolError: the stream cannot be trusted any more.
        """
        if self._held.size:
            done = self._held.add(data)
            if done is None:
                return
            pieces, used = done
            if sum(len(piece) for piece in pieces) <= JOIN_LIMIT:
                joined = bytearray().join(pieces)
                joined += memoryview(data)[used:]
                yield from self._chunk(joined)
                return
            yield from self._pieces(pieces)
            if used == len(data):
                return
            yield from self._chunk(data, used)
            return
        yield from self._chunk(data)

    def _chunk(self, data: bytes | bytearray | memoryview, pos: int = 0) -> Iterator[Decision]:
        """The decisions for the complete frames of ``data[pos:]``; hold its incomplete tail."""
        end = len(data)
        if end - pos < HEADER_SIZE:
            self._held.hold(memoryview(data)[pos:])
            return
        length = self.limits.frame_length(HEADER.unpack_from(data, pos))
        if length > end - pos:  # a large frame begins: hold the read as it is, no copy
            self._held.hold(memoryview(data)[pos:])
            return
        buf: bytes | bytearray
        if type(data) is bytes and length >= UNCOPIED_FRAME:
            buf, patch = data, False
        elif type(data) is bytearray and not pos:
            buf, patch = data, True
        else:  # the one copy: hops are patched in place
            buf, pos, patch = bytearray(memoryview(data)[pos:]), 0, True
        view = memoryview(buf)
        found: list[Found] = []
        limits = self.limits
        try:
            stop = scan(buf, pos, limits, found)
        except RemoteProtocolError as exc:  # decide the frames before the bad one, then raise
            error: RemoteProtocolError | None = exc
            stop = _end_of(found[-1]) if found else 0
        else:
            error = None
        decide = self._decide
        drops = self._drops
        frames = 0
        run_mask = run_start = run_frames = 0
        memo = 0  # a decision that counted nothing, for the frames that repeat its route
        try:
            for start, header, repeat in found:
                if header[1] == DATA and self.port >= 0:
                    frames += 1
                    if repeat and memo and header[3]:
                        mask = memo
                    else:
                        mask = decide(buf, start, header)
                        if drops:
                            memo = 0
                            yield from drops
                            drops.clear()
                        else:
                            memo = mask
                    if mask > 0 and not patch:
                        length = HEADER_SIZE + header[4] + header[5] + header[6]
                        head = _HOPS_HEAD(header[0], header[1], header[2], header[3] - 1)
                        yield Write(mask, (head, view[start + 4 : start + length]), length, 1)
                    elif mask > 0:
                        buf[start + 3] = header[3] - 1  # type: ignore[index]  # patch: a bytearray
                        if mask != run_mask:
                            if run_mask:
                                yield Write(run_mask, (view[run_start:start],), start - run_start, run_frames)
                            run_mask, run_start, run_frames = mask, start, 0
                        run_frames += 1
                    elif run_mask:
                        yield Write(run_mask, (view[run_start:start],), start - run_start, run_frames)
                        run_mask = 0
                else:
                    if run_mask:
                        yield Write(run_mask, (view[run_start:start],), start - run_start, run_frames)
                        run_mask = 0
                    memo = 0
                    body = start + HEADER_SIZE
                    yield from self._other(header, view[body : body + header[4] + header[5] + header[6]])
            if run_mask:
                yield Write(run_mask, (view[run_start:stop],), stop - run_start, run_frames)
        finally:
            self.frames_in += frames
        if error is not None:
            if self.limits is not limits:  # a hello just widened them: read the rest under the new ones
                yield from self._chunk(view[stop:])
                return
            raise error
        if stop < end:
            self._held.hold(view[stop:])

    def _pieces(self, pieces: list[Any]) -> Iterator[Decision]:
        """The decision for one large frame spread over ``pieces`` (forwarded uncopied)."""
        views = [memoryview(piece) for piece in pieces]
        head = bytearray()
        _take(views, HEADER_SIZE, head)
        header = HEADER.unpack_from(head, 0)
        _take(views, HEADER_SIZE + header[4] + header[5], head)  # X and topic may straddle reads
        size = len(head) + sum(len(view) for view in views)
        if header[1] != DATA or self.port < 0:
            yield from self._other(header, memoryview(b"".join(views)))
            return
        self.frames_in += 1
        mask = self._decide(head, 0, header)
        yield from self._drops
        self._drops.clear()
        if mask > 0:
            head[3] = header[3] - 1
            yield Write(mask, (head, *views), size, 1)

    def _decide(self, buf: bytes | bytearray, pos: int, header: tuple[int, ...]) -> int:
        """The out bitmap of the data frame at ``buf[pos]``; what it drops goes to ``_drops``."""
        hops = header[3]
        if hops == 0:
            self._drops.append(Drop("hop_limit", 1, "frame arrived with a hop limit of 0"))
            return -1
        x_len = header[4]
        start = pos + HEADER_SIZE
        ports = self.ports
        if self.stateless:
            if header[2] & SIGNED_ROUTE:
                x_len -= ROUTE_TAG_SIZE
                if x_len < 0:
                    self._drops.append(Drop("route_forged", 1, "a signed route shorter than its tag"))
                    return -1
            if self.verifier is not None and not self._verified(self.verifier, buf, start, x_len, header):
                return -1
            x = int.from_bytes(buf[start : start + x_len], "big")
            if x_len > self._x_fast and x.bit_length() > self.limits.max_x_bits:
                message = f"topology number of {x.bit_length()} bits exceeds max_x_bits={self.limits.max_x_bits}"
                self._drops.append(Drop("route_too_large", 1, message))
                return -1
            if len(ports.layout.keys) == 1:
                out = x % ports.key
            else:
                decoded = ports.decoded
                out = decoded.get(x, -1)
                if out < 0:
                    if len(decoded) >= DECODED_LIMIT:
                        decoded.clear()
                    out = decoded[x] = ports.layout.decode(x)
        else:
            topic_start = start + x_len
            out = ports.table.get(bytes(buf[topic_start : topic_start + header[5]]), 0)
        attached = ports.attached
        mask = out & attached & self.not_bit
        if mask != out:
            stray = out & ~attached
            if stray:
                down = stray & ports.reserved
                if down:
                    self._drops.append(Drop("link_down", down.bit_count(), "", down))
                    stray ^= down
                if stray:
                    self._drops.append(Drop("unattached_port", stray.bit_count()))
        if not mask:
            self._drops.append(Drop("no_route", 1))
        return mask

    def _verified(self, verifier: RouteCheck, buf: bytes | bytearray, start: int, x_len: int, header: tuple[int, ...]) -> bool:
        """--verify-routes: is the tag after X genuine and unexpired (else a drop)?"""
        if not header[2] & SIGNED_ROUTE:
            message = "this broker forwards only topology numbers signed by the orchestrator"
            self._drops.append(Drop("route_unsigned", 1, message))
            return False
        field_end = start + header[4]
        topic = bytes(buf[field_end : field_end + header[5]])
        reason = verifier.check(bytes(buf[start:field_end]), x_len, topic, self.clock())
        if reason is None:
            return True
        if reason == "route_stale":
            why = "of an older epoch than one this broker has seen for the stream (replaced by a newer route)"
        else:
            why = "expired" if reason == "route_expired" else "not signed with this broker's secret, or altered"
        self._drops.append(Drop(reason, 1, f"the route tag of topic {topic.decode(errors='replace')!r} is {why}"))
        return False

    def _other(self, header: tuple[int, ...], body: memoryview) -> Iterator[Decision]:
        """A control frame, or a frame that will not be forwarded.

        Raises:
            RemoteProtocolError: a control frame over the limits or not valid; data
                from a connection that is not attached.
        """
        ftype = header[1]
        if ftype == CONTROL:
            rejection = self.limits.rejection(header, 0)
            if rejection is not None:
                raise rejection
            frame: ControlFrame = decode_control(body, self.limits)
            yield Control(frame.body)
        elif ftype == DATA:
            yield Drop("rejected", 1)
            raise RemoteProtocolError(self.refusal)
        else:
            yield Drop("rejected", 1, f"unknown frame type {ftype}")


def _end_of(frame: Found) -> int:
    """Where a frame :func:`~dcp.wire.scan` found ends."""
    start, header, _ = frame
    return start + HEADER_SIZE + header[4] + header[5] + header[6]


def _take(views: list[memoryview], size: int, into: bytearray) -> None:
    """Move bytes from the front of ``views`` to ``into`` until it holds ``size``."""
    while len(into) < size:
        view = views.pop(0)
        take = size - len(into)
        into += view[:take]
        if len(view) > take:
            views.insert(0, view[take:])
