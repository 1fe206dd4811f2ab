"""The dcp wire codec, sans-I/O: bytes in, frames out, and back.

Every frame, data or control, starts with the same 28-byte fixed header, big-endian::

    offset size field
         0    1 version       VERSION (1); anything else ends the connection
         1    1 type          DATA (1) or CONTROL (2)
         2    1 flags         bit 0 SIGNED_ROUTE; the other bits reserved, forwarded untouched
         3    1 hops          hop limit, decremented by every broker (HOPS_OFFSET)
         4    2 x_len         bytes of the topology number X that follow the header
         6    2 topic_len     bytes of the UTF-8 topic that follow X
         8    4 payload_len   bytes of payload that follow the topic
        12    8 msg_id        publisher's message id
        20    8 timestamp_ns  publisher's clock, ns since the epoch

then X (big-endian, minimal), the topic and the payload.  With ``SIGNED_ROUTE`` the
X field ends with the orchestrator's 24-byte route tag (:mod:`dcp.auth`): ``x_len``
counts both, X is the bytes before the tag.  A control frame has no X
and no topic; its payload is a msgpack map with an ``op`` key.  X travels as bytes
because msgpack ints stop at ``2**64 - 1`` and X does not.

The lengths in the header delimit the frame, so a frame that is well delimited but
unacceptable (unknown type, X over the limit) can be skipped without losing the
stream; a bad version or a length over a limit cannot, and ends the connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import msgpack

from .errors import (
    FrameTooLarge,
    LocalProtocolError,
    RemoteProtocolError,
    RouteTooLarge,
    TruncatedFrame,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

__all__ = [
    "VERSION",
    "DATA",
    "CONTROL",
    "HEADER",
    "HEADER_SIZE",
    "HOPS_OFFSET",
    "DEFAULT_HOPS",
    "SIGNED_ROUTE",
    "ROUTE_TAG_SIZE",
    "Limits",
    "DataFrame",
    "ControlFrame",
    "Rejected",
    "Event",
    "Payload",
    "Part",
    "uncopied",
    "Decoder",
    "IN_PLACE_PAYLOAD",
    "Found",
    "scan",
    "Reassembly",
    "DataEncoder",
    "encode_data",
    "encode_control",
    "decode_control",
]

VERSION = 1
DATA = 1
CONTROL = 2
DEFAULT_HOPS = 32
SIGNED_ROUTE = 0x01  # flags bit: the X field ends with a route tag
ROUTE_TAG_SIZE = 24  # epoch u32, expires u32, MAC 16 bytes (dcp.auth)

HEADER = struct.Struct("!BBBBHHIQQ")
HEADER_SIZE = HEADER.size  # 28
HOPS_OFFSET = 3
_pack = HEADER.pack

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one frame may declare; they bound every buffer in dcp.

    ``max_frame`` counts the whole frame, header included.  ``max_x_bits`` bounds the
    topology number: 131,072 bits (16 KiB) covers a tree of 2,000 65-bit keys, e.g.
    one stream to a thousand ports spread over the banks of ten 10,000-port brokers.
    """

    max_frame: int = 8 * 1024 * 1024
    max_topic: int = 255
    max_x_bits: int = 131_072
    max_control: int = 64 * 1024

    def __post_init__(self) -> None:
        if not HEADER_SIZE < self.max_frame <= _U32:
            raise ValueError(f"max_frame must be in ({HEADER_SIZE}, {_U32}]")
        if not 0 < self.max_topic <= _U16:
            raise ValueError(f"max_topic must be in (0, {_U16}]")
        if not 0 < self.max_x_bits <= _U16 * 8:
            raise ValueError(f"max_x_bits must be in (0, {_U16 * 8}]")
        if not 0 < self.max_control <= self.max_frame:
            raise ValueError("max_control must be in (0, max_frame]")

    def frame_length(self, header: tuple[int, ...]) -> int:
        """Total length of the frame whose unpacked fixed header is ``header``.

        Raises the errors after which the stream cannot be trusted: a bad version,
        or lengths over the limits (which a well-behaved peer never sends).  Hot
        loops test the same three conditions inline and call this to raise.
        """
        version, _type, _flags, _hops, x_len, topic_len, payload_len, _id, _ts = header
        if version != VERSION:
            raise RemoteProtocolError(f"unsupported wire version {version} (expected {VERSION})")
        if topic_len > self.max_topic:
            raise FrameTooLarge(f"topic of {topic_len} bytes exceeds max_topic={self.max_topic}")
        length = HEADER_SIZE + x_len + topic_len + payload_len
        if length > self.max_frame:
            raise FrameTooLarge(f"frame of {length} bytes exceeds max_frame={self.max_frame}")
        return length

    def rejection(self, header: tuple[int, ...], x: int) -> RemoteProtocolError | None:
        """Why a well-delimited frame must be skipped, or None if it is acceptable."""
        ftype = header[1]
        if ftype == DATA:
            if x.bit_length() > self.max_x_bits:
                return RouteTooLarge(
                    f"topology number of {x.bit_length()} bits exceeds max_x_bits={self.max_x_bits}"
                )
            return None
        if ftype == CONTROL:
            if header[4] or header[5]:
                return RemoteProtocolError("control frame carries a topology number or topic")
            if header[6] > self.max_control:
                return FrameTooLarge(
                    f"control frame of {header[6]} bytes exceeds max_control={self.max_control}"
                )
            return None
        return RemoteProtocolError(f"unknown frame type {ftype}")


DEFAULT_LIMITS = Limits()


class DataFrame(NamedTuple):
    """A data frame as a subscriber sees it.  ``payload`` is ``bytes``, or, for a payload
    of :data:`IN_PLACE_PAYLOAD` bytes or more received through
    :meth:`Decoder.get_buffer`, the ``bytearray`` the socket read it into (no copy)."""

    topic: str
    payload: bytes | bytearray
    route: int = 0
    hops: int = DEFAULT_HOPS
    msg_id: int = 0
    timestamp_ns: int = 0
    flags: int = 0


class ControlFrame(NamedTuple):
    """A control frame: a msgpack map whose ``op`` names what it is."""

    body: dict[str, Any]

    @property
    def op(self) -> str:
        return str(self.body.get("op", ""))


class Rejected(NamedTuple):
    """A well-delimited frame that was skipped; the stream goes on after it."""

    error: RemoteProtocolError
    msg_id: int


Event = Union[DataFrame, ControlFrame, Rejected]

#: What a data frame's payload may be: any object with the buffer protocol (bytes, a
#: bytearray, a memoryview, a numpy array, an mmap), or a tuple of them, sent back to
#: back as one payload (a header and an array: :mod:`dcp.arrays`).
Payload = Union["Buffer", tuple["Buffer", ...]]
#: A payload as the writers take it (:func:`uncopied`).
Part = Union[bytes, memoryview]


def uncopied(payload: Payload) -> tuple[Part | tuple[Part, ...], int]:
    """``payload`` as the writers take it without copying it, and its size in bytes.

    ``bytes`` stays as it is; any other buffer becomes a flat byte view of its memory
    (writers then see one shape: ``len()`` is its size, and ``bytearray += view``
    appends bytes, where ``+=`` with a numpy array would add elementwise); a tuple
    becomes a tuple of such parts.

    Raises:
        LocalProtocolError: an object without the buffer protocol, or whose memory is
            not one C-ordered block (a strided numpy view: ``np.ascontiguousarray`` it).
    """
    if isinstance(payload, tuple):
        parts = tuple(_part(p) for p in payload)
        return parts, sum(map(len, parts))
    part = _part(payload)
    return part, len(part)


def _part(buffer: Buffer) -> Part:
    if type(buffer) is bytes:
        return buffer
    try:
        return memoryview(buffer).cast("B")
    except TypeError as exc:  # no buffer protocol, or not C-contiguous ("casts are restricted to C-contiguous views")
        raise LocalProtocolError(
            f"a payload is a C-contiguous buffer (bytes, bytearray, memoryview, numpy array...), "
            f"not {type(buffer).__name__}: {exc}"
        ) from exc


class DataEncoder:
    """Encodes data frames, caching the X-and-topic bytes of recent (topic, route, tag)s.

    A payload up to ``join_limit`` bytes is joined to its head (one write, one small
    copy); a larger one is returned as its own buffer (or buffers), uncopied.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, cache_size: int = 1024, join_limit: int = 8192) -> None:
        self.limits = limits
        # (topic, route, tag) -> (x_len, topic_len, X-and-topic bytes, flags, the largest payload)
        self._cache: dict[tuple[str | bytes, int, bytes | None], tuple[int, int, bytes, int, int]] = {}
        self._cache_size = cache_size
        self._join_limit = join_limit
        self._max_payload = limits.max_frame - HEADER_SIZE

    def encode(
        self,
        topic: str | bytes,
        payload: Payload,
        route: int = 0,
        hops: int = DEFAULT_HOPS,
        msg_id: int = 0,
        timestamp_ns: int = 0,
        flags: int = 0,
        tag: bytes | None = None,
    ) -> list[Buffer]:
        """The frame as a list of buffers to write in order; ``tag``, the route tag
        the orchestrator gave with ``route``, if any, follows X (``SIGNED_ROUTE``).

        Raises:
            LocalProtocolError: a field out of range or a frame over the limits.
        """
        size = uncopied(payload)[1]  # and the check that each part is one C-ordered block
        parts = payload if isinstance(payload, tuple) else (payload,)  # returned as they came
        head, tail = self.head(topic, size, route, hops, msg_id, timestamp_ns, flags, tag)
        if size <= self._join_limit:
            return [b"".join((head, tail, *parts))]
        return [head + tail, *parts]

    def head(
        self,
        topic: str | bytes,
        size: int,
        route: int = 0,
        hops: int = DEFAULT_HOPS,
        msg_id: int = 0,
        timestamp_ns: int = 0,
        flags: int = 0,
        tag: bytes | None = None,
    ) -> tuple[bytes, bytes]:
        """The fixed header and the X-and-topic bytes of a frame whose payload has
        ``size`` bytes: what goes before the payload, for a writer that gathers the
        three without joining them.

        Raises:
            LocalProtocolError: a field out of range or a frame over the limits.
        """
        entry = self._cache.get((topic, route, tag)) or self._route_and_topic(topic, route, tag)
        x_len, topic_len, tail, signed, max_size = entry
        if size > max_size:
            raise LocalProtocolError(
                f"frame of {HEADER_SIZE + len(tail) + size} bytes exceeds max_frame={self.limits.max_frame}"
            )
        if flags & SIGNED_ROUTE and not signed:
            raise LocalProtocolError("the SIGNED_ROUTE flag comes with a route tag (tag=), not from flags")
        try:
            return _pack(VERSION, DATA, flags | signed, hops, x_len, topic_len, size, msg_id, timestamp_ns), tail
        except struct.error as exc:  # struct does the range checks of the header fields
            raise LocalProtocolError(
                f"field out of range: hops={hops}, flags={flags} (0..255); "
                f"msg_id={msg_id}, timestamp_ns={timestamp_ns} (64 bits)"
            ) from exc

    def _route_and_topic(self, topic: str | bytes, route: int, tag: bytes | None) -> tuple[int, int, bytes, int, int]:
        try:
            topic_b = topic.encode() if isinstance(topic, str) else bytes(topic)
        except UnicodeEncodeError as exc:
            raise LocalProtocolError(f"topic {topic!r} is not encodable as UTF-8") from exc
        if len(topic_b) > self.limits.max_topic:
            raise LocalProtocolError(f"topic of {len(topic_b)} bytes exceeds max_topic={self.limits.max_topic}")
        if not isinstance(route, int) or route < 0:
            raise LocalProtocolError(f"route must be a non-negative int, got {route!r}")
        if route.bit_length() > self.limits.max_x_bits:
            raise LocalProtocolError(
                f"route of {route.bit_length()} bits exceeds max_x_bits={self.limits.max_x_bits}"
            )
        x_b = route.to_bytes((route.bit_length() + 7) // 8, "big")
        if tag is not None:
            if len(tag) != ROUTE_TAG_SIZE:
                raise LocalProtocolError(f"a route tag has {ROUTE_TAG_SIZE} bytes, got {len(tag)}")
            x_b += tag
        tail = x_b + topic_b
        entry = (len(x_b), len(topic_b), tail, 0 if tag is None else SIGNED_ROUTE, self._max_payload - len(tail))
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[(topic, route, tag)] = entry
        return entry


def encode_data(
    topic: str | bytes,
    payload: Payload,
    route: int = 0,
    *,
    hops: int = DEFAULT_HOPS,
    msg_id: int = 0,
    timestamp_ns: int = 0,
    flags: int = 0,
    limits: Limits = DEFAULT_LIMITS,
    tag: bytes | None = None,
) -> bytes:
    """One data frame as bytes (see :class:`DataEncoder` for the uncopied form)."""
    parts = DataEncoder(limits, cache_size=1, join_limit=0).encode(
        topic, payload, route, hops, msg_id, timestamp_ns, flags, tag
    )
    return b"".join(parts)


def encode_control(body: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Encode a control frame carrying the msgpack map ``body``."""
    if not isinstance(body.get("op"), str):
        raise LocalProtocolError("a control frame needs a string 'op'")
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    if len(packed) > limits.max_control:
        raise LocalProtocolError(f"control frame of {len(packed)} bytes exceeds max_control={limits.max_control}")
    if HEADER_SIZE + len(packed) > limits.max_frame:
        raise LocalProtocolError(f"control frame of {HEADER_SIZE + len(packed)} bytes exceeds max_frame={limits.max_frame}")
    return HEADER.pack(VERSION, CONTROL, 0, 0, 0, 0, len(packed), 0, 0) + packed


def decode_control(payload: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> ControlFrame:
    """Decode the msgpack map of a control frame.

    Raises:
        RemoteProtocolError: not one msgpack map with a string ``op``.
    """
    size = limits.max_control
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=max(size, 1),
        max_str_len=size,
        max_bin_len=size,
        max_array_len=size,
        max_map_len=size,
        max_ext_len=size,
    )
    try:
        unpacker.feed(payload)
        body = unpacker.unpack()
        extra = unpacker.tell() != len(payload)
    except msgpack.OutOfData as exc:
        raise RemoteProtocolError("control frame holds a truncated msgpack value") from exc
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise RemoteProtocolError(f"control frame is not valid msgpack: {exc}") from exc
    if extra:
        raise RemoteProtocolError("control frame has bytes after its msgpack map")
    if not isinstance(body, dict) or not isinstance(body.get("op"), str):
        raise RemoteProtocolError("control frame is not a map with a string 'op'")
    return ControlFrame(body)


#: One complete frame found by :func:`scan`: where it starts, its fixed header, and
#: whether it repeats the route of the data frame before it (see :func:`scan`).
Found = tuple[int, tuple[int, ...], bool]


def scan(buf: bytes | bytearray, pos: int, limits: Limits, found: list[Found]) -> int:
    """Delimit the complete frames of ``buf[pos:]``: append a :data:`Found` for each
    and return where they end (where an incomplete frame starts, or ``len(buf)``).

    This is the one parser of the frame format, shared by the :class:`Decoder` and
    the broker's forwarding core (:mod:`dcp.forwarding`).  ``repeat`` is true for a
    data frame whose flags, X and topic lengths and X-and-topic bytes are those of the
    data frame before it in this call: a stream's frames mostly are, and a reader may
    then reuse what it made of them (the number, the topic, a forwarding decision)
    with one compare of bytes instead of a new int and a lookup.  Both lengths count,
    not their sum: the same bytes split otherwise between X and topic route otherwise.

    Raises:
        RemoteProtocolError: the first frame that cannot be delimited (bad version, a
            length over a limit), after appending the frames before it.
    """
    end = len(buf)
    max_frame = limits.max_frame
    max_topic = limits.max_topic
    unpack = HEADER.unpack_from
    append = found.append
    memo_x = memo_topic = memo_flags = -1
    memo_route: bytes | bytearray = b""
    while end - pos >= HEADER_SIZE:
        header = unpack(buf, pos)
        version, ftype, flags, _hops, x_len, topic_len, payload_len, _msg_id, _ts = header  # locals: cheaper than indexing
        length = HEADER_SIZE + x_len + topic_len + payload_len
        if version != VERSION or topic_len > max_topic or length > max_frame:
            limits.frame_length(header)  # raises the error that says which limit
        if end - pos < length:
            break
        if ftype == DATA:
            body = pos + HEADER_SIZE
            if x_len == memo_x and topic_len == memo_topic and flags == memo_flags and buf.startswith(memo_route, body):
                append((pos, header, True))
            else:
                memo_x, memo_topic, memo_flags, memo_route = x_len, topic_len, flags, buf[body : body + x_len + topic_len]
                append((pos, header, False))
        else:
            append((pos, header, False))
        pos += length
    return pos


class Reassembly:
    """The one incomplete frame a reader holds: the reads that carry it, uncopied.

    Its declared length is checked against the limits as soon as its fixed header is
    whole, so what is held never exceeds one frame of at most ``max_frame`` bytes.
    """

    __slots__ = ("limits", "pieces", "size", "need")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.pieces: list[bytes | bytearray | memoryview] = []
        self.size = 0  # bytes held
        self.need = 0  # the frame's length; 0 while its fixed header is incomplete

    def hold(self, tail: bytes | bytearray | memoryview) -> None:
        """Start holding ``tail``, the start of a frame (which the holder must not change).

        Raises:
            RemoteProtocolError: its header is whole and breaks a limit.
        """
        self.pieces = [tail]
        self.size = len(tail)
        self.need = 0
        self._check()

    def add(self, data: bytes | bytearray | memoryview) -> tuple[list[bytes | bytearray | memoryview], int] | None:
        """Add the next read; once the frame is whole, return its pieces (the last cut
        where the frame ends) and that end's offset in ``data``, and hold nothing.

        Raises:
            RemoteProtocolError: the header just completed breaks a limit.
        """
        self.pieces.append(data)
        self.size += len(data)
        if not self.need:
            self._check()
            if not self.need:
                return None
        if self.size < self.need:
            return None
        pieces, used = self.pieces, len(data) - (self.size - self.need)
        if used < len(data):
            pieces[-1] = memoryview(data)[:used]
        self.pieces, self.size, self.need = [], 0, 0
        return pieces, used

    def clear(self) -> None:
        """Hold nothing (the frame held was taken elsewhere)."""
        self.pieces, self.size, self.need = [], 0, 0

    def truncated(self) -> TruncatedFrame | None:
        """At the end of the stream: the error for a frame left incomplete, if any (and drop it)."""
        if not self.size:
            return None
        error = TruncatedFrame(f"stream ended inside a frame ({self.size} bytes held)")
        self.pieces, self.size, self.need = [], 0, 0
        return error

    def _check(self) -> None:
        if self.size >= HEADER_SIZE:
            first = self.pieces[0]
            head = first if len(first) >= HEADER_SIZE else b"".join(self.pieces)
            self.need = self.limits.frame_length(HEADER.unpack_from(head))


#: A data frame with at least this many payload bytes is received in place by
#: :meth:`Decoder.get_buffer`: its payload is a ``bytearray`` the socket reads into.
IN_PLACE_PAYLOAD = 64 * 1024
#: The read buffer :meth:`Decoder.get_buffer` lends between large payloads (uvloop's own size).
READ_SIZE = 256 * 1024


class Decoder:
    """Incremental decoder: ``feed(bytes) -> list[Event]``; ``feed(b"")`` means EOF.

    Frames are parsed straight from each read (:func:`scan`); only an incomplete frame
    is held aside (:class:`Reassembly`), so the decoder never holds more than one frame.
    After a :class:`ProtocolError` the stream cannot be trusted and the decoder
    refuses further input.

    For ``asyncio.BufferedProtocol`` there is a second way in, :meth:`get_buffer` and
    :meth:`buffer_updated`: the socket reads into a buffer the decoder lends, and once
    the route of a data frame of at least :data:`IN_PLACE_PAYLOAD` bytes is known, the
    rest of its payload is read straight into the ``bytearray`` that becomes its
    ``payload``: a large payload is not copied after the kernel's copy, except the part
    that came in the read of its header.  (The threshold and the read size are
    parameters so that tests can reach the path with small frames.)
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, in_place_payload: int = IN_PLACE_PAYLOAD, read_size: int = READ_SIZE) -> None:
        self.limits = limits
        self._held = Reassembly(limits)
        self._topics: dict[bytes, str] = {}
        self._error: Exception | None = None
        self._eof = False
        self._in_place_payload = in_place_payload
        self._read_size = read_size
        self._read_buffer: memoryview | None = None
        self._payload: bytearray | None = None  # the large payload being read in place
        self._payload_view = memoryview(b"")
        self._filled = 0
        self._frame_head = 0  # the bytes of that frame before its payload
        self._frame: tuple[str, int, int, int, int, int] = ("", 0, 0, 0, 0, 0)  # its topic, X, hops, msg_id, ts, flags

    def get_buffer(self) -> memoryview:
        """Where the next read goes: the rest of a large payload, or the read buffer."""
        if self._payload is not None:
            return self._payload_view[self._filled :]
        if self._read_buffer is None:
            self._read_buffer = memoryview(bytearray(self._read_size))
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """The events of the ``nbytes`` just read into :meth:`get_buffer`'s buffer.

        A large data frame at the start of a read (where the one before it ended) is
        taken from the read buffer itself; one that starts later in a read goes through
        :meth:`feed` until its route is known.  Either way, the rest of its payload is
        read in place.

        Raises:
            RemoteProtocolError, LocalProtocolError: as :meth:`feed`.
        """
        if self._payload is not None:
            self._filled += nbytes
            return [] if self._filled < len(self._payload) else [self._payload_frame()]
        read = self._read_buffer
        assert read is not None  # lent by get_buffer
        events: list[Event] = []
        pos = 0
        while not self._held.size and self._error is None and not self._eof:
            end = self._in_place(read, pos, nbytes)
            if end < 0:
                break
            if self._payload is not None and self._filled < len(self._payload):
                return events  # the rest of it comes in place
            events.append(self._payload_frame())
            pos = end
        if pos < nbytes:
            events += self.feed(read[pos:nbytes].tobytes())
            held = self._held
            if held.need and self._error is None:
                start = held.pieces[0] if len(held.pieces) == 1 else b"".join(held.pieces)
                if self._in_place(start, 0, len(start)) >= 0:
                    held.clear()
        return events

    def _in_place(self, buf: bytes | bytearray | memoryview, pos: int, end: int) -> int:
        """If an acceptable data frame with a payload of ``in_place_payload`` bytes or
        more starts at ``buf[pos]`` and its route is within ``buf[:end]``, start its
        payload with what came of it and return where the frame ends in ``buf`` (or
        ``end``, its rest to come in place).  -1 if not: the usual path takes it."""
        if end - pos < HEADER_SIZE:
            return -1
        limits = self.limits
        version, ftype, flags, hops, x_len, topic_len, payload_len, msg_id, ts = HEADER.unpack_from(buf, pos)
        body = pos + HEADER_SIZE + x_len + topic_len
        if (
            ftype != DATA or payload_len < self._in_place_payload or body > end
            or version != VERSION or topic_len > limits.max_topic or body - pos + payload_len > limits.max_frame
        ):
            return -1
        route = self._route(bytes(buf[pos:body]), HEADER_SIZE, x_len, topic_len, flags, limits.max_x_bits // 8, limits.max_x_bits, self._topics)
        if not isinstance(route, tuple):
            return -1  # skipped, with the reason, by the usual path
        frame_end: int = body + payload_len
        if frame_end <= end:  # all of it in this read: one copy, out of the read buffer
            payload = bytearray(buf[body:frame_end])
            self._filled = payload_len
        else:
            payload = bytearray(payload_len)
            self._filled = end - body
            payload[: self._filled] = buf[body:end]
        self._payload, self._payload_view, self._frame_head = payload, memoryview(payload), body - pos
        self._frame = (route[1], route[0], hops, msg_id, ts, flags)
        return min(frame_end, end)

    def _payload_frame(self) -> DataFrame:
        """The frame whose payload has just been filled in place."""
        payload = self._payload
        assert payload is not None
        self._payload, self._payload_view = None, memoryview(b"")
        topic, x, hops, msg_id, ts, flags = self._frame
        return DataFrame(topic, payload, x, hops, msg_id, ts, flags)

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        if self._payload is not None:
            return self._frame_head + self._filled
        return self._held.size

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """The events of the frames ``data`` completes (``b""``: the end of the stream).

        ``data`` may be any buffer; the decoder keeps no view of it.

        Raises:
            RemoteProtocolError: the stream cannot be trusted (a bad version, a length
                over a limit, the end inside a frame); every later call raises too.
            LocalProtocolError: data fed after the end.
        """
        if self._error is not None:
            raise RemoteProtocolError("decoder already failed") from self._error
        if self._eof:
            raise LocalProtocolError("data fed after EOF")
        if type(data) is not bytes:
            data = bytes(data)  # held pieces must not change under us; a memoryview has no startswith
        if not data:
            self._eof = True
            if self._payload is not None:  # the stream ended inside a payload read in place
                self._error = TruncatedFrame(f"stream ended inside a frame ({self._filled} of its {len(self._payload)} payload bytes came)")
                self._payload = None
                raise self._error
            self._error = self._held.truncated()
            if self._error is not None:
                raise self._error
            return []
        try:
            return self._feed(data)
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        pos = 0
        if self._held.size:
            done = self._held.add(data)
            if done is None:
                return events
            pieces, pos = done
            self._parse(b"".join(pieces), 0, events)
        used = self._parse(data, pos, events)
        if used < len(data):
            self._held.hold(memoryview(data)[used:])
        return events

    def _parse(self, buf: bytes, pos: int, events: list[Event]) -> int:
        """Append the events of the complete frames of ``buf[pos:]``; return where they end."""
        found: list[Found] = []
        try:
            end = scan(buf, pos, self.limits, found)
        except RemoteProtocolError as exc:  # the frames before the bad one first: one may fail sooner
            error: RemoteProtocolError | None = exc
            end = -1
        else:
            error = None
        limits = self.limits
        max_x_bits = limits.max_x_bits
        x_fast = max_x_bits // 8  # X of up to this many bytes is always within max_x_bits
        topics = self._topics
        append = events.append
        new = tuple.__new__
        x, topic, skip = 0, "", None  # of the last data frame, which a repeat shares
        for start, header, repeat in found:
            _version, ftype, flags, hops, x_len, topic_len, payload_len, msg_id, ts = header
            if ftype == DATA:
                topic_end = start + HEADER_SIZE + x_len + topic_len
                if not repeat:
                    route = self._route(buf, start + HEADER_SIZE, x_len, topic_len, flags, x_fast, max_x_bits, topics)
                    if isinstance(route, tuple):
                        (x, topic), skip = route, None
                    else:
                        skip = route
                if skip is None:
                    append(new(DataFrame, (topic, buf[topic_end : topic_end + payload_len], x, hops, msg_id, ts, flags)))
                else:
                    append(Rejected(skip, msg_id))
            elif ftype == CONTROL:
                rejection = limits.rejection(header, 0)
                if rejection is not None:
                    append(Rejected(rejection, msg_id))
                else:
                    body = start + HEADER_SIZE
                    append(decode_control(memoryview(buf)[body : body + payload_len], limits))
            else:
                append(Rejected(RemoteProtocolError(f"unknown frame type {ftype}"), msg_id))
        if error is not None:
            raise error
        return end

    def _route(
        self, buf: bytes, body: int, x_len: int, topic_len: int, flags: int, x_fast: int, max_x_bits: int,
        topics: dict[bytes, str],
    ) -> tuple[int, str] | RemoteProtocolError:
        """(X, topic) of a data frame's route bytes, or why the frame must be skipped."""
        x_end = body + x_len - (ROUTE_TAG_SIZE if flags & SIGNED_ROUTE else 0)
        if x_end < body:
            return RemoteProtocolError("a signed route shorter than its tag")
        x = int.from_bytes(buf[body:x_end], "big")
        if x_end - body > x_fast and x.bit_length() > max_x_bits:
            return RouteTooLarge(f"topology number of {x.bit_length()} bits exceeds max_x_bits={max_x_bits}")
        topic_b = buf[body + x_len : body + x_len + topic_len]
        topic = topics.get(topic_b)
        if topic is None:
            try:
                topic = topic_b.decode()
            except UnicodeDecodeError:  # forwarded untouched by brokers; skip it, keep the stream
                return RemoteProtocolError("topic is not valid UTF-8")
            if len(topics) >= 1024:
                topics.clear()
            topics[topic_b] = topic
        return x, topic
