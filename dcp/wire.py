"""The dcp wire codec, sans-I/O: bytes in, frames out, and back.

Every frame, data or control, starts with the same 28-byte fixed header, big-endian::

    offset size field
         0    1 version       VERSION (1); anything else ends the connection
         1    1 type          DATA (1) or CONTROL (2)
         2    1 flags         reserved bits, forwarded untouched
         3    1 hops          hop limit, decremented by every broker (HOPS_OFFSET)
         4    2 x_len         bytes of the topology number X that follow the header
         6    2 topic_len     bytes of the UTF-8 topic that follow X
         8    4 payload_len   bytes of payload that follow the topic
        12    8 msg_id        publisher's message id
        20    8 timestamp_ns  publisher's clock, ns since the epoch

then X (big-endian, minimal), the topic and the payload.  A control frame has no X
and no topic; its payload is a msgpack map with an ``op`` key.  X travels as bytes
because msgpack ints stop at ``2**64 - 1`` and X does not.

The lengths in the header delimit the frame, so a frame that is well delimited but
unacceptable (unknown type, X over the limit) can be skipped without losing the
stream; a bad version or a length over a limit cannot, and ends the connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import msgpack

from .errors import (
    FrameTooLarge,
    LocalProtocolError,
    RemoteProtocolError,
    RouteTooLarge,
    TruncatedFrame,
)

__all__ = [
    "VERSION",
    "DATA",
    "CONTROL",
    "HEADER",
    "HEADER_SIZE",
    "HOPS_OFFSET",
    "DEFAULT_HOPS",
    "Limits",
    "DataFrame",
    "ControlFrame",
    "Rejected",
    "Event",
    "Decoder",
    "DataEncoder",
    "encode_data",
    "encode_control",
    "decode_control",
]

VERSION = 1
DATA = 1
CONTROL = 2
DEFAULT_HOPS = 32

HEADER = struct.Struct("!BBBBHHIQQ")
HEADER_SIZE = HEADER.size  # 28
HOPS_OFFSET = 3

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one frame may declare; they bound every buffer in dcp.

    ``max_frame`` counts the whole frame, header included.  ``max_x_bits`` bounds the
    topology number: 8192 bits covers a tree of over a hundred 65-bit keys.
    """

    max_frame: int = 8 * 1024 * 1024
    max_topic: int = 255
    max_x_bits: int = 8192
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

    @property
    def max_x_bytes(self) -> int:
        return (self.max_x_bits + 7) // 8

    def frame_length(self, header: tuple[int, ...]) -> int:
        """Total length of the frame whose unpacked fixed header is ``header``.

        Raises the errors after which the stream cannot be trusted: a bad version,
        or lengths over the limits (which a well-behaved peer never sends).
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
    """A data frame as a subscriber sees it."""

    topic: str
    payload: bytes
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


class DataEncoder:
    """Encodes data frames, caching the X-and-topic bytes of recent (topic, route) pairs.

    A payload up to ``join_limit`` bytes is joined to its head (one write, one small
    copy); a larger one is returned as its own buffer, uncopied.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, cache_size: int = 1024, join_limit: int = 8192) -> None:
        self.limits = limits
        self._cache: dict[tuple[str | bytes, int], tuple[int, int, bytes]] = {}
        self._cache_size = cache_size
        self._join_limit = join_limit

    def encode(
        self,
        topic: str | bytes,
        payload: bytes | bytearray | memoryview,
        route: int = 0,
        *,
        hops: int = DEFAULT_HOPS,
        msg_id: int = 0,
        timestamp_ns: int = 0,
        flags: int = 0,
    ) -> list[bytes | bytearray | memoryview]:
        """The frame as a list of buffers to write in order.

        Raises:
            LocalProtocolError: a field out of range or a frame over the limits.
        """
        cached = self._cache.get((topic, route))
        if cached is None:
            cached = self._route_and_topic(topic, route)
        x_len, topic_len, tail = cached
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        length = HEADER_SIZE + len(tail) + size
        if length > self.limits.max_frame:
            raise LocalProtocolError(f"frame of {length} bytes exceeds max_frame={self.limits.max_frame}")
        if not (0 <= hops <= 255 and 0 <= flags <= 255 and 0 <= msg_id <= _U64 and 0 <= timestamp_ns <= _U64):
            raise LocalProtocolError(
                f"field out of range: hops={hops}, flags={flags} (0..255); "
                f"msg_id={msg_id}, timestamp_ns={timestamp_ns} (64 bits)"
            )
        head = HEADER.pack(VERSION, DATA, flags, hops, x_len, topic_len, size, msg_id, timestamp_ns) + tail
        if size <= self._join_limit:
            return [b"".join((head, payload))]
        return [head, payload]

    def _route_and_topic(self, topic: str | bytes, route: int) -> tuple[int, int, bytes]:
        topic_b = topic.encode() if isinstance(topic, str) else bytes(topic)
        if len(topic_b) > self.limits.max_topic:
            raise LocalProtocolError(f"topic of {len(topic_b)} bytes exceeds max_topic={self.limits.max_topic}")
        if not isinstance(route, int) or route < 0:
            raise LocalProtocolError(f"route must be a non-negative int, got {route!r}")
        if route.bit_length() > self.limits.max_x_bits:
            raise LocalProtocolError(
                f"route of {route.bit_length()} bits exceeds max_x_bits={self.limits.max_x_bits}"
            )
        x_b = route.to_bytes((route.bit_length() + 7) // 8, "big")
        entry = (len(x_b), len(topic_b), x_b + topic_b)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[(topic, route)] = entry
        return entry


def encode_data(
    topic: str | bytes,
    payload: bytes | bytearray | memoryview,
    route: int = 0,
    *,
    hops: int = DEFAULT_HOPS,
    msg_id: int = 0,
    timestamp_ns: int = 0,
    flags: int = 0,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """One data frame as bytes (see :class:`DataEncoder` for the uncopied form)."""
    parts = DataEncoder(limits, cache_size=1, join_limit=0).encode(
        topic, payload, route, hops=hops, msg_id=msg_id, timestamp_ns=timestamp_ns, flags=flags
    )
    return b"".join(parts)


def encode_control(body: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Encode a control frame carrying the msgpack map ``body``."""
    if not isinstance(body.get("op"), str):
        raise LocalProtocolError("a control frame needs a string 'op'")
    packed = msgpack.packb(body, use_bin_type=True)
    if len(packed) > limits.max_control:
        raise LocalProtocolError(f"control frame of {len(packed)} bytes exceeds max_control")
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


class Decoder:
    """Incremental decoder: ``feed(bytes) -> list[Event]``; ``feed(b"")`` means EOF.

    Buffers at most one incomplete frame, whose length was checked against
    ``limits`` before its bytes are kept.  After a :class:`ProtocolError` is raised
    the stream cannot be trusted and the decoder refuses further input.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._buf = bytearray()
        self._error: Exception | None = None
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._error is not None:
            raise RemoteProtocolError("decoder already failed") from self._error
        if self._eof:
            raise LocalProtocolError("data fed after EOF")
        if not data:
            self._eof = True
            if self._buf:
                self._error = TruncatedFrame(f"stream ended inside a frame ({len(self._buf)} bytes held)")
                raise self._error
            return []
        self._buf += data
        try:
            events, used = self._parse(self._buf)
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        del self._buf[:used]
        return events

    def _parse(self, buf: bytearray) -> tuple[list[Event], int]:
        events: list[Event] = []
        limits = self.limits
        end = len(buf)
        pos = 0
        unpack = HEADER.unpack_from
        while end - pos >= HEADER_SIZE:
            header = unpack(buf, pos)
            length = limits.frame_length(header)
            if end - pos < length:
                break
            _v, ftype, flags, hops, x_len, topic_len, payload_len, msg_id, ts = header
            body = pos + HEADER_SIZE
            x = int.from_bytes(buf[body : body + x_len], "big")
            rejection = limits.rejection(header, x)
            if rejection is not None:
                events.append(Rejected(rejection, msg_id))
            elif ftype == DATA:
                topic_end = body + x_len + topic_len
                try:
                    topic = buf[body + x_len : topic_end].decode()
                except UnicodeDecodeError as exc:
                    raise RemoteProtocolError("topic is not valid UTF-8") from exc
                payload = bytes(buf[topic_end : pos + length])
                events.append(DataFrame(topic, payload, x, hops, msg_id, ts, flags))
            else:
                events.append(decode_control(buf[body : pos + length], limits))
            pos += length
        return events, pos
