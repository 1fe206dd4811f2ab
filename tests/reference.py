"""A slow, plain reference of the wire format and of stateless forwarding: the oracle
of the fuzz tests (tests/test_wire.py, tests/test_broker_protocol.py).

Written from the specification, not from the fast code: the module docstring of
:mod:`dcp.wire` (the fixed header, restated below), the ``Limits`` docstring, the
routing contract of docs/design.md (``out = (X mod key) & ~(1 << ingress) & attached``;
hop limit; bits of unattached ports counted per copy) and ``DROP_REASONS``
(:mod:`dcp.forwarding`).  Nothing here is fast: one whole ``bytes`` object, one frame at a
time, each field sliced out by its offset, no cache, no shortcut, no state carried
from one frame to the next but where the stream is.  It imports no decoder or broker
code: the error classes, the ``Limits`` bounds and the event types (plain
NamedTuples) are all it takes from dcp.

Where the specification is silent, the choices (each with the reason) are:

- checks in reading order: the version, then the lengths (fatal, the frame cannot be
  delimited); then the type; then, for data, the X field (its tag, then X's bits), then
  the topic.  A frame with two faults is reported for the first one.
- ``max_x_bits`` bounds the *value* of X (its bit length), not ``x_len``: leading zero
  bytes are accepted, as the ``Limits`` docstring says ("bounds the bit length of X").
- ``SIGNED_ROUTE`` is a flag of data frames: a control frame has no X field to end with
  a tag, and an unknown type is unknown before its fields are read.
- a control frame that is well delimited but carries X or a topic, or a body over
  ``max_control``, is skipped (``Rejected``) by a decoder, as tests/test_wire.py pins;
  one that is not a msgpack map with a string ``op`` is fatal (the tests pin that too).
  A broker, whose docstring lists "length over a limit, malformed control frame" as
  what closes a connection, closes on all three.
- map keys of a control body are strings (or bytes): ``strict_map_key``, msgpack's own
  default, which tests/test_wire.py pins (``{1: "x", "op": "y"}`` is refused).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, NamedTuple

import msgpack

from dcp.errors import FrameTooLarge, RemoteProtocolError, RouteTooLarge, TruncatedFrame
from dcp.wire import ControlFrame, DataFrame, Limits, Rejected

__all__ = [
    "Header",
    "read_header",
    "reference_decode",
    "reference_boundaries",
    "reason_of",
    "Forwarded",
    "NotModeled",
    "reference_forward",
]

# --------------------------------------------------------------------------- the spec, restated

HEADER_LEN = 28  # every frame starts with this fixed header
VERSION = 1
DATA = 1
CONTROL = 2
SIGNED_ROUTE = 0x01  # flags bit 0: the X field ends with a route tag
TAG_LEN = 24  # bytes of that tag, counted in x_len
HOPS_AT = 3  # offset of the hop limit byte

#: (name, offset, size) of the header fields, all big-endian unsigned.
FIELDS = (
    ("version", 0, 1),
    ("type", 1, 1),
    ("flags", 2, 1),
    ("hops", 3, 1),
    ("x_len", 4, 2),
    ("topic_len", 6, 2),
    ("payload_len", 8, 4),
    ("msg_id", 12, 8),
    ("timestamp_ns", 20, 8),
)

#: Words that name why a frame was skipped; each is in the message of the error the
#: reference gives, so that a decoder's reason can be compared with it.
REASONS = (
    "unknown frame type",
    "shorter than its tag",
    "max_x_bits",
    "UTF-8",
    "topology number or topic",
    "max_control",
)


class Header(NamedTuple):
    version: int
    type: int
    flags: int
    hops: int
    x_len: int
    topic_len: int
    payload_len: int
    msg_id: int
    timestamp_ns: int

    @property
    def length(self) -> int:
        """The whole frame's length, header included."""
        return HEADER_LEN + self.x_len + self.topic_len + self.payload_len


def read_header(stream: bytes, pos: int) -> Header:
    """The fixed header at ``stream[pos:]`` (which holds at least HEADER_LEN bytes)."""
    return Header(*(int.from_bytes(stream[pos + at : pos + at + size], "big") for _, at, size in FIELDS))


def reason_of(error: BaseException) -> str | None:
    """Which of :data:`REASONS` the message of ``error`` names, if any."""
    text = str(error)
    return next((reason for reason in REASONS if reason in text), None)


def _fatal_header(header: Header, limits: Limits) -> RemoteProtocolError | None:
    """Why the stream cannot go on past this header, or None."""
    if header.version != VERSION:
        return RemoteProtocolError(f"version {header.version}")
    if header.topic_len > limits.max_topic:
        return FrameTooLarge(f"topic of {header.topic_len} bytes over max_topic")
    if header.length > limits.max_frame:
        return FrameTooLarge(f"frame of {header.length} bytes over max_frame")
    return None


def _control_body(payload: bytes) -> dict[str, Any] | None:
    """The control body: exactly one msgpack map with a string ``op``; None if not."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception:  # noqa: BLE001 - whatever msgpack refuses, the frame is malformed
        return None
    if isinstance(body, dict) and isinstance(body.get("op"), str):
        return body
    return None


def _split(stream: bytes, limits: Limits) -> tuple[list[tuple[Header, bytes]], int, RemoteProtocolError | None]:
    """The well-delimited frames of ``stream`` as (header, the whole frame's bytes),
    where they end, and the fatal header error that stops them (if any)."""
    frames, pos = [], 0
    while len(stream) - pos >= HEADER_LEN:
        header = read_header(stream, pos)
        fatal = _fatal_header(header, limits)
        if fatal is not None:
            return frames, pos, fatal
        if len(stream) - pos < header.length:
            break
        frames.append((header, stream[pos : pos + header.length]))
        pos += header.length
    return frames, pos, None


def _x_field(header: Header, frame: bytes) -> tuple[bytes | None, bytes]:
    """X (without its tag; None if a signed X field is shorter than the tag) and the topic bytes."""
    topic_at = HEADER_LEN + header.x_len
    field = frame[HEADER_LEN:topic_at]
    topic = frame[topic_at : topic_at + header.topic_len]
    if header.flags & SIGNED_ROUTE:
        if header.x_len < TAG_LEN:
            return None, topic
        return field[: header.x_len - TAG_LEN], topic
    return field, topic


# --------------------------------------------------------------------------- decoding

def _event(header: Header, frame: bytes, limits: Limits) -> DataFrame | ControlFrame | Rejected | RemoteProtocolError:
    """The event of one whole frame, or the fatal error it is."""
    payload = frame[HEADER_LEN + header.x_len + header.topic_len :]

    def skip(error: RemoteProtocolError) -> Rejected:
        return Rejected(error, header.msg_id)

    if header.type == DATA:
        x_bytes, topic_b = _x_field(header, frame)
        if x_bytes is None:
            return skip(RemoteProtocolError("a signed route shorter than its tag"))
        x = int.from_bytes(x_bytes, "big")
        if x.bit_length() > limits.max_x_bits:
            return skip(RouteTooLarge(f"X of {x.bit_length()} bits over max_x_bits"))
        try:
            topic = topic_b.decode("utf-8")
        except UnicodeDecodeError:
            return skip(RemoteProtocolError("topic is not UTF-8"))
        return DataFrame(topic, payload, x, header.hops, header.msg_id, header.timestamp_ns, header.flags)
    if header.type == CONTROL:
        if header.x_len or header.topic_len:
            return skip(RemoteProtocolError("control frame with a topology number or topic"))
        if header.payload_len > limits.max_control:
            return skip(FrameTooLarge("control body over max_control"))
        body = _control_body(payload)
        if body is None:
            return RemoteProtocolError("control frame is not a msgpack map with a string op")
        return ControlFrame(body)
    return skip(RemoteProtocolError(f"unknown frame type {header.type}"))


def reference_decode(stream: bytes, limits: Limits = Limits(), eof: bool = True) -> tuple[list[Any], type[Exception] | None]:
    """The events a correct decoder yields for ``stream``, and the class of the error
    that ends it (None: none; with ``eof``, a stream that ends inside a frame ends
    with TruncatedFrame)."""
    frames, end, fatal = _split(bytes(stream), limits)
    events: list[Any] = []
    for header, frame in frames:
        event = _event(header, frame, limits)
        if isinstance(event, Exception):
            return events, type(event)
        events.append(event)
    if fatal is not None:
        return events, type(fatal)
    if eof and end < len(stream):
        return events, TruncatedFrame
    return events, None


def reference_boundaries(stream: bytes, limits: Limits = Limits()) -> list[int]:
    """Where the frames a decoder takes whole end, up to the first fatal one: what a
    decoder fed ``stream[:n]`` holds is ``n`` less the last of them not after ``n``."""
    frames, _, _ = _split(bytes(stream), limits)
    ends, pos = [], 0
    for header, _frame in frames:
        pos += header.length
        ends.append(pos)
    return ends


# --------------------------------------------------------------------------- forwarding

class NotModeled(Exception):
    """The stream does what this reference does not model (links, stats)."""


class Forwarded(NamedTuple):
    """What a stateless broker does with one connection's stream."""

    out: dict[int, bytes]  # attached port (not the ingress) -> the bytes it receives
    drops: Counter[str]  # by reason (dcp.broker.DROP_REASONS); zeros left out
    frames_in: int  # data frames read while the connection had a port
    port: int | None  # the connection's port at the end; None: it never had one
    closed: bool  # the broker closed the connection (a fatal error, or asked to)
    held: int  # bytes of an incomplete frame at the end (0 once closed)


#: Bytes an answer to a request takes besides the request's echoed id: a message of
#: up to 1024 characters and a few short fields.
ECHO_ROOM = 8192

#: Slow-consumer policies a hello may name (dcp.config.SLOW_CONSUMER_POLICIES).
POLICIES = ("drop-newest", "drop-oldest", "pause", "drop")


#: What each field of a hello may hold, written out here rather than taken from
#: dcp.control: a hello with any other value is refused, and the connection closed.
_HELLO_FIELDS: dict[str, Any] = {
    "id": lambda v: type(v) is int and 0 <= v < 2**64,
    "role": lambda v: type(v) is str,
    "name": lambda v: type(v) is str,
    "token": lambda v: type(v) is str,
    "slow_consumer": lambda v: v in POLICIES and type(v) is str,
    "key": lambda v: type(v) is bytes,
    "keys": lambda v: type(v) is list and all(type(k) is bytes for k in v),
    "link": lambda v: type(v) is int and 0 <= v <= 0xFFFF,
}


def _hello_fields_valid(body: dict[str, Any]) -> bool:
    """Whether every field of a hello that is there (nil counts as absent) has a valid value."""
    return all(body.get(name) is None or valid(body[name]) for name, valid in _HELLO_FIELDS.items())


def reference_forward(
    stream: bytes,
    *,
    key: int,
    attached: int,
    ingress: int,
    limits: Limits = Limits(),
    hello: bool = False,
    eof: bool = True,
) -> Forwarded:
    """What a stateless broker with ``key`` does with ``stream`` read on one connection.

    ``attached``: the bitmap of the other connections' ports; ``ingress``: the port of
    this one, from the start, or (``hello=True``) once its agent hello is taken.  Every
    data frame read on a port goes, hop limit less one, to each port of ``(X mod key) &
    ~(1 << ingress) & attached``; it is dropped (and counted once) with a hop limit of 0,
    an X over ``max_x_bits``, a signed X field shorter than its tag (``route_forged``),
    or no port left (``no_route``); each bit naming a port nothing is attached to is
    counted (``unattached_port``).  A frame of unknown type is dropped (``rejected``).
    The connection is closed, nothing more read, after a fatal frame: a bad version or
    length, a control frame that is malformed, carries X or a topic, or has a body over
    ``max_control``, a data frame before an agent hello (counted ``rejected``), a refused
    hello.  With ``eof``, a stream that ends inside a frame
    counts one ``truncated``.  With ``hello``, until a hello is taken no frame may be
    longer than ``max_control`` and its header (the broker's pre-hello limit), so a
    longer one before it is fatal.

    Of control ops, only what decides the port and the closing is modelled: ``hello``
    (role agent by default, or admin; an unknown role or slow-consumer policy is
    fatal; a second hello is answered, not fatal), ``going_away`` and a fatal ``error``
    (closed); any other op is answered and changes nothing here.

    Raises:
        NotModeled: a ``peer`` hello, an admin's ``link``, ``stats``; a request with an
            ``id`` within ECHO_ROOM of ``max_control`` (not a u64: refused as a bad request).
    """
    stream = bytes(stream)
    before_hello = Limits(  # dcp._serving.pre_hello_limits, written out
        max_frame=min(limits.max_frame, HEADER_LEN + limits.max_control), max_topic=limits.max_topic,
        max_x_bits=limits.max_x_bits, max_control=limits.max_control,
    ) if hello else limits
    frames, end, fatal = _split(stream, before_hello)
    drops: Counter[str] = Counter()
    out = {port: bytearray() for port in range(attached.bit_length()) if attached >> port & 1 and port != ingress}
    role = "agent" if not hello else ""
    port = ingress if not hello else None
    frames_in = 0
    closed = False
    index, pos = 0, 0
    while index < len(frames):
        header, frame = frames[index]
        index += 1
        pos += len(frame)
        if header.type == DATA:
            if port is None:  # no hello, or an admin's: nothing to publish from
                drops["rejected"] += 1
                closed = True
                break
            frames_in += 1
            x_bytes, _topic = _x_field(header, frame)
            if header.hops == 0:
                drops["hop_limit"] += 1
                continue
            if x_bytes is None:
                drops["route_forged"] += 1
                continue
            x = int.from_bytes(x_bytes, "big")
            if x.bit_length() > limits.max_x_bits:
                drops["route_too_large"] += 1
                continue
            named = x % key
            everyone = attached | 1 << port
            targets = named & ~(1 << port) & everyone
            drops["unattached_port"] += bin(named & ~everyone).count("1")
            if not targets:
                drops["no_route"] += 1
                continue
            copy = frame[:HOPS_AT] + bytes([header.hops - 1]) + frame[HOPS_AT + 1 :]
            for target in out:
                if targets >> target & 1:
                    out[target] += copy
        elif header.type == CONTROL:
            if header.x_len or header.topic_len or header.payload_len > limits.max_control:
                closed = True
                break
            body = _control_body(frame[HEADER_LEN:])
            if body is None:
                closed = True
                break
            op = body["op"]
            if op not in ("going_away", "error") and len(msgpack.packb(body.get("id"))) > limits.max_control - ECHO_ROOM:
                # such an id is no u64: dcp.broker refuses the request as a bad_request,
                # answered without "re" (tests/test_control.py); not modelled here
                raise NotModeled("a request whose id leaves its answer no room")
            if op == "hello":
                if role:
                    continue  # answered "already attached"
                new_role = body.get("role", "agent")
                if new_role == "peer":
                    raise NotModeled("a peer hello makes a link")
                if new_role not in ("agent", "admin") or not _hello_fields_valid(body):
                    closed = True
                    break
                role = new_role
                if role == "agent":
                    port = ingress
                if before_hello is not limits:  # what follows the hello is read under the limits
                    rest, rest_end, fatal = _split(stream[pos:], limits)
                    frames[index:] = rest
                    end = pos + rest_end
            elif op == "going_away" or (op == "error" and body.get("fatal")):
                closed = True
                break
            elif op == "stats" or (op == "link" and role == "admin"):
                raise NotModeled(f"op {op!r}")
        else:
            drops["rejected"] += 1
    if not closed:
        if fatal is not None:
            closed = True
        elif end < len(stream) and eof:
            drops["truncated"] += 1
    held = 0 if closed else len(stream) - end
    return Forwarded({p: bytes(b) for p, b in out.items()}, +drops, frames_in, port, closed, held)

