"""The MQTT codec, sans-I/O: bytes in, packets out, and back; MQTT 3.1.1 and 5.0.

``Decoder(max_packet=...).feed(data) -> list[Packet]`` takes the bytes of one side of
a connection in any reads; ``feed(b"")`` is the end of the stream, and a packet cut
short by it is an error.  :func:`encode` turns a packet back into bytes.  Packets are
frozen slotted dataclasses, one per packet type; a PUBACK and its siblings share
:class:`Ack`.  MQTT 5.0 properties travel as a tuple of ``(identifier, value)`` pairs
in the order they came (:func:`property_value` reads one).

Which version a packet is in: the decoder is given one, or, made with ``version=None``
(a server's), learns it from the CONNECT that must come first; encoding takes it as an
argument (a CONNECT says its own).

Bounded: a packet, fixed header included, may be at most ``max_packet`` bytes, which
is checked as soon as its remaining length is read, so the decoder never holds more
than one packet (and at most ``max_packet`` bytes) between reads.  The remaining
length takes at most 4 bytes and must be minimal, as the specification says.

Every error the decoder raises is an :class:`MqttError` (a ``dcp``
``RemoteProtocolError``) whose ``reason`` is the MQTT 5.0 reason code that says why:

* ``MALFORMED_PACKET`` (0x81): the bytes do not parse (a bad length, reserved bits
  set, a string that is not UTF-8 or holds U+0000, bytes left over, the stream ended
  inside a packet);
* ``PROTOCOL_ERROR`` (0x82): well-formed, but the protocol forbids it (a first packet
  that is not CONNECT, a property twice or in the wrong packet, a property value out
  of range, a SUBSCRIBE without topic filters);
* ``UNSUPPORTED_PROTOCOL_VERSION`` (0x84): a CONNECT of another protocol or level
  (MQTT 3.1's ``MQIsdp``, or a level other than 4 and 5);
* ``PACKET_TOO_LARGE`` (0x95): over ``max_packet``.

After an error the stream cannot be trusted: every later ``feed`` raises again, and
packets of the same read that came before the bad one are not returned (the
connection closes with it).  The encoder raises ``LocalProtocolError`` for a packet
that cannot be put on the wire in the given version.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Union, cast

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "Reason",
    "MqttError",
    "PacketType",
    "Properties",
    "PropertyValue",
    "Prop",
    "PROPERTIES",
    "property_value",
    "Will",
    "Connect",
    "ConnAck",
    "Publish",
    "Ack",
    "PubAck",
    "PubRec",
    "PubRel",
    "PubComp",
    "Subscription",
    "Subscribe",
    "SubAck",
    "Unsubscribe",
    "UnsubAck",
    "PingReq",
    "PingResp",
    "Disconnect",
    "Auth",
    "Packet",
    "Decoder",
    "encode",
    "DEFAULT_MAX_PACKET",
    "MAX_REMAINING_LENGTH",
    "V311",
    "V5",
    "CONNACK_V311",
]

V311 = 4  # the protocol level of MQTT 3.1.1
V5 = 5
DEFAULT_MAX_PACKET = 1024 * 1024
MAX_REMAINING_LENGTH = 268_435_455  # what 4 bytes of variable byte integer hold
_MAX_VARINT = MAX_REMAINING_LENGTH

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class Reason(IntEnum):
    """The MQTT 5.0 reason codes this codec and the gateway use (several share a value)."""

    SUCCESS = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


#: A 3.1.1 CONNACK's return code for the 5.0 reason code of a refused CONNECT.
CONNACK_V311: dict[int, int] = {
    Reason.SUCCESS: 0,
    Reason.UNSUPPORTED_PROTOCOL_VERSION: 1,
    Reason.CLIENT_IDENTIFIER_NOT_VALID: 2,
    Reason.SERVER_UNAVAILABLE: 3,
    Reason.SERVER_BUSY: 3,
    Reason.BAD_USER_NAME_OR_PASSWORD: 4,
    Reason.NOT_AUTHORIZED: 5,
}


class MqttError(RemoteProtocolError):
    """The peer's bytes break MQTT; ``reason`` is the MQTT 5.0 reason code that says why."""

    code = "mqtt_error"

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(f"{message} (reason 0x{reason:02X})")
        self.reason = reason


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


# -- properties ------------------------------------------------------------------------------

PropertyValue = Union[int, str, bytes, tuple[str, str]]
Properties = tuple[tuple[int, PropertyValue], ...]

_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_WILL = 0  # the properties of a CONNECT's will, which are no packet's
_ALL = frozenset(range(1, 16)) - {PacketType.PINGREQ, PacketType.PINGRESP} | {_WILL}
_P = PacketType


class Prop(IntEnum):
    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


_MESSAGE = frozenset({_P.PUBLISH, _WILL})
_ACKS = frozenset({_P.PUBACK, _P.PUBREC, _P.PUBREL, _P.PUBCOMP})
#: Each property: its type, and the packets (0: a will) it may appear in.
PROPERTIES: dict[int, tuple[int, frozenset[int]]] = {
    Prop.PAYLOAD_FORMAT_INDICATOR: (_BYTE, _MESSAGE),
    Prop.MESSAGE_EXPIRY_INTERVAL: (_FOUR, _MESSAGE),
    Prop.CONTENT_TYPE: (_UTF8, _MESSAGE),
    Prop.RESPONSE_TOPIC: (_UTF8, _MESSAGE),
    Prop.CORRELATION_DATA: (_BINARY, _MESSAGE),
    Prop.SUBSCRIPTION_IDENTIFIER: (_VARINT, frozenset({_P.PUBLISH, _P.SUBSCRIBE})),
    Prop.SESSION_EXPIRY_INTERVAL: (_FOUR, frozenset({_P.CONNECT, _P.CONNACK, _P.DISCONNECT})),
    Prop.ASSIGNED_CLIENT_IDENTIFIER: (_UTF8, frozenset({_P.CONNACK})),
    Prop.SERVER_KEEP_ALIVE: (_TWO, frozenset({_P.CONNACK})),
    Prop.AUTHENTICATION_METHOD: (_UTF8, frozenset({_P.CONNECT, _P.CONNACK, _P.AUTH})),
    Prop.AUTHENTICATION_DATA: (_BINARY, frozenset({_P.CONNECT, _P.CONNACK, _P.AUTH})),
    Prop.REQUEST_PROBLEM_INFORMATION: (_BYTE, frozenset({_P.CONNECT})),
    Prop.WILL_DELAY_INTERVAL: (_FOUR, frozenset({_WILL})),
    Prop.REQUEST_RESPONSE_INFORMATION: (_BYTE, frozenset({_P.CONNECT})),
    Prop.RESPONSE_INFORMATION: (_UTF8, frozenset({_P.CONNACK})),
    Prop.SERVER_REFERENCE: (_UTF8, frozenset({_P.CONNACK, _P.DISCONNECT})),
    Prop.REASON_STRING: (_UTF8, _ACKS | {_P.CONNACK, _P.SUBACK, _P.UNSUBACK, _P.DISCONNECT, _P.AUTH}),
    Prop.RECEIVE_MAXIMUM: (_TWO, frozenset({_P.CONNECT, _P.CONNACK})),
    Prop.TOPIC_ALIAS_MAXIMUM: (_TWO, frozenset({_P.CONNECT, _P.CONNACK})),
    Prop.TOPIC_ALIAS: (_TWO, frozenset({_P.PUBLISH})),
    Prop.MAXIMUM_QOS: (_BYTE, frozenset({_P.CONNACK})),
    Prop.RETAIN_AVAILABLE: (_BYTE, frozenset({_P.CONNACK})),
    Prop.USER_PROPERTY: (_PAIR, _ALL),
    Prop.MAXIMUM_PACKET_SIZE: (_FOUR, frozenset({_P.CONNECT, _P.CONNACK})),
    Prop.WILDCARD_SUBSCRIPTION_AVAILABLE: (_BYTE, frozenset({_P.CONNACK})),
    Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE: (_BYTE, frozenset({_P.CONNACK})),
    Prop.SHARED_SUBSCRIPTION_AVAILABLE: (_BYTE, frozenset({_P.CONNACK})),
}
#: Properties whose value is 0 or 1 only, and those that may not be 0 (both: a protocol error otherwise).
_FLAGS = frozenset({
    Prop.PAYLOAD_FORMAT_INDICATOR, Prop.REQUEST_PROBLEM_INFORMATION, Prop.REQUEST_RESPONSE_INFORMATION,
    Prop.MAXIMUM_QOS, Prop.RETAIN_AVAILABLE, Prop.WILDCARD_SUBSCRIPTION_AVAILABLE,
    Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE, Prop.SHARED_SUBSCRIPTION_AVAILABLE,
})
_NONZERO = frozenset({Prop.RECEIVE_MAXIMUM, Prop.MAXIMUM_PACKET_SIZE, Prop.TOPIC_ALIAS, Prop.SUBSCRIPTION_IDENTIFIER})


def property_value(properties: Properties, identifier: int) -> PropertyValue | None:
    """The value of the first ``identifier`` property, or None."""
    for ident, value in properties:
        if ident == identifier:
            return value
    return None


# -- reason codes a packet may carry (any other is a protocol error) -------------------------

_CONNACK_REASONS = frozenset({
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A,
    0x9B, 0x9C, 0x9D, 0x9F,
})
_PUBACK_REASONS = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_PUBREL_REASONS = frozenset({0x00, 0x92})
_SUBACK_REASONS = frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2})
_SUBACK_V311 = frozenset({0x00, 0x01, 0x02, 0x80})
_UNSUBACK_REASONS = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
_DISCONNECT_REASONS = frozenset({
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97,
    0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
})
_AUTH_REASONS = frozenset({0x00, 0x18, 0x19})
_ACK_REASONS: dict[int, frozenset[int]] = {
    _P.PUBACK: _PUBACK_REASONS, _P.PUBREC: _PUBACK_REASONS, _P.PUBREL: _PUBREL_REASONS, _P.PUBCOMP: _PUBREL_REASONS,
}


# -- packets ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Will:
    """The message a CONNECT leaves for the server to publish if the connection ends abnormally."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    version: int = V5
    clean_start: bool = True
    keep_alive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class ConnAck:
    """``reason``: the 5.0 reason code, or in 3.1.1 the return code (:data:`CONNACK_V311`)."""

    session_present: bool = False
    reason: int = 0
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0  # 0 at QoS 0, which has none
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class Ack:
    """PUBACK, PUBREC, PUBREL and PUBCOMP: a packet identifier and, in 5.0, a reason."""

    packet_id: int
    reason: int = 0
    properties: Properties = ()


class PubAck(Ack):
    __slots__ = ()


class PubRec(Ack):
    __slots__ = ()


class PubRel(Ack):
    __slots__ = ()


class PubComp(Ack):
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Subscription:
    topic_filter: str
    qos: int = 0
    no_local: bool = False  # 5.0
    retain_as_published: bool = False  # 5.0
    retain_handling: int = 0  # 5.0: 0 send retained messages, 1 only if the subscription is new, 2 never


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class SubAck:
    packet_id: int
    reasons: tuple[int, ...]
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class UnsubAck:
    packet_id: int
    reasons: tuple[int, ...] = ()  # 5.0 only: 3.1.1 has none
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class PingReq:
    pass


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason: int = 0
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class Auth:
    """5.0 only."""

    reason: int = 0
    properties: Properties = ()


Packet = Union[Connect, ConnAck, Publish, Ack, Subscribe, SubAck, Unsubscribe, UnsubAck, PingReq, PingResp, Disconnect, Auth]
_ACK_CLASSES: dict[int, type[Ack]] = {_P.PUBACK: PubAck, _P.PUBREC: PubRec, _P.PUBREL: PubRel, _P.PUBCOMP: PubComp}
_ACK_TYPES = {cls: ptype for ptype, cls in _ACK_CLASSES.items()}


# -- decoding --------------------------------------------------------------------------------


def _malformed(message: str) -> MqttError:
    return MqttError(Reason.MALFORMED_PACKET, message)


def _protocol(message: str) -> MqttError:
    return MqttError(Reason.PROTOCOL_ERROR, message)


class _Reader:
    """Reads the fields of one packet's body, ``buf[pos:end]``; running past ``end`` is malformed."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes | bytearray, pos: int, end: int) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        pos = self.pos
        if n > self.end - pos:
            raise _malformed(f"a field of {n} bytes runs past the end of its packet")
        self.pos = pos + n
        return bytes(self.buf[pos : pos + n])

    def u8(self) -> int:
        if self.pos >= self.end:
            raise _malformed("a byte field runs past the end of its packet")
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def u16(self) -> int:
        value: int = _U16.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = _U32.unpack(self.take(4))[0]
        return value

    def varint(self) -> int:
        value, shift = 0, 0
        for i in range(4):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if i and not byte:
                    raise _malformed("a variable byte integer is not in its shortest form")
                return value
            shift += 7
        raise _malformed("a variable byte integer of more than 4 bytes")

    def string(self) -> str:
        raw = self.take(self.u16())
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed("a string is not well-formed UTF-8") from None
        if "\x00" in text:
            raise _malformed("a string holds U+0000")
        return text

    def binary(self) -> bytes:
        return self.take(self.u16())

    def rest(self) -> bytes:
        return self.take(self.end - self.pos)

    def done(self, what: str) -> None:
        if self.pos != self.end:
            raise _malformed(f"{self.end - self.pos} bytes left over at the end of a {what}")

    def properties(self, packet: int) -> Properties:
        length = self.varint()
        if length > self.end - self.pos:
            raise _malformed("the properties run past the end of their packet")
        end, self.end = self.end, self.pos + length
        found: list[tuple[int, PropertyValue]] = []
        seen: set[int] = set()
        try:
            while self.pos < self.end:
                ident = self.varint()
                spec = PROPERTIES.get(ident)
                if spec is None:
                    raise _malformed(f"unknown property 0x{ident:02X}")
                kind, packets = spec
                if packet not in packets:
                    raise _protocol(f"property 0x{ident:02X} is not allowed in this packet")
                if ident in seen and not (ident == Prop.USER_PROPERTY or (ident == Prop.SUBSCRIPTION_IDENTIFIER and packet == _P.PUBLISH)):
                    raise _protocol(f"property 0x{ident:02X} appears twice")
                seen.add(ident)
                value = self._property(kind)
                if ident in _FLAGS and value not in (0, 1):
                    raise _protocol(f"property 0x{ident:02X} must be 0 or 1, got {value!r}")
                if ident in _NONZERO and value == 0:
                    raise _protocol(f"property 0x{ident:02X} must not be 0")
                found.append((ident, value))
        finally:
            self.end = end
        return tuple(found)

    def _property(self, kind: int) -> PropertyValue:
        if kind == _BYTE:
            return self.u8()
        if kind == _TWO:
            return self.u16()
        if kind == _FOUR:
            return self.u32()
        if kind == _VARINT:
            return self.varint()
        if kind == _UTF8:
            return self.string()
        if kind == _BINARY:
            return self.binary()
        return self.string(), self.string()


#: The flags a packet type must have in its first byte (PUBLISH's are its own).
_FIXED_FLAGS: dict[int, int] = {ptype: 0b0010 if ptype in (_P.PUBREL, _P.SUBSCRIBE, _P.UNSUBSCRIBE) else 0 for ptype in PacketType}


class Decoder:
    """Incremental MQTT decoder: ``feed(bytes) -> list[Packet]``; ``feed(b"")`` is EOF.

    ``version``: 4 (3.1.1) or 5, or None for a server's, which learns it from the
    CONNECT that must come first.  ``max_packet``: the largest packet accepted, bytes,
    fixed header included.  See the module docstring for what is raised.
    """

    def __init__(self, *, version: int | None = None, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        if version not in (None, V311, V5):
            raise ValueError(f"version must be 4 (3.1.1), 5 or None, got {version!r}")
        if not 2 <= max_packet <= MAX_REMAINING_LENGTH + 5:
            raise ValueError(f"max_packet must be in [2, {MAX_REMAINING_LENGTH + 5}]")
        self.version = version
        self.max_packet = max_packet
        self._buffer = bytearray()
        self._error: MqttError | None = None
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete packet (at most ``max_packet``)."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        """The packets ``data`` completes (``b""``: the end of the stream).

        Raises:
            MqttError: the stream breaks MQTT (``reason`` says how); every later call raises too.
            LocalProtocolError: data fed after the end.
        """
        if self._error is not None:
            raise MqttError(self._error.reason, "decoder already failed") from self._error
        if self._eof:
            raise LocalProtocolError("data fed after EOF")
        if not data:
            self._eof = True
            if self._buffer:
                self._error = _malformed(f"the stream ended inside a packet ({len(self._buffer)} bytes of it came)")
                raise self._error
            return []
        if self._buffer:
            self._buffer += data
            buf: bytes | bytearray = self._buffer
        else:
            buf = data if isinstance(data, (bytes, bytearray)) else bytes(data)
        packets: list[Packet] = []
        try:
            used = self._parse(buf, packets)
        except MqttError as exc:
            self._error = exc
            self._buffer = bytearray()
            raise
        if buf is self._buffer:
            del self._buffer[:used]
        else:
            self._buffer = bytearray(buf[used:])
        return packets

    def _parse(self, buf: bytes | bytearray, packets: list[Packet]) -> int:
        """Append the complete packets of ``buf``; return where they end."""
        pos, size = 0, len(buf)
        while pos < size:
            first = buf[pos]
            ptype = first >> 4
            if ptype == 0 or (ptype == _P.AUTH and self.version == V311):
                raise _malformed(f"packet type {ptype} is reserved")
            if self.version is None and ptype != _P.CONNECT:
                raise _protocol(f"the first packet must be CONNECT, not {PacketType(ptype).name}")
            if ptype != _P.PUBLISH and first & 0x0F != _FIXED_FLAGS[ptype]:
                raise _malformed(f"{PacketType(ptype).name} with fixed header flags {first & 0x0F:#06b}")
            remaining, shift, at = 0, 0, pos + 1
            while True:  # the remaining length: at most 4 bytes, the shortest form
                if at >= size:
                    return pos
                byte = buf[at]
                remaining |= (byte & 0x7F) << shift
                at += 1
                if not byte & 0x80:
                    if at - pos > 2 and not byte:
                        raise _malformed("the remaining length is not in its shortest form")
                    break
                shift += 7
                if at - pos > 4:
                    raise _malformed("a remaining length of more than 4 bytes")
            end = at + remaining
            if end - pos > self.max_packet:
                raise MqttError(Reason.PACKET_TOO_LARGE, f"a packet of {end - pos} bytes is over max_packet={self.max_packet}")
            if end > size:
                return pos
            packets.append(self._packet(ptype, first & 0x0F, _Reader(buf, at, end)))
            pos = end
        return pos

    def _packet(self, ptype: int, flags: int, r: _Reader) -> Packet:
        if ptype == _P.PUBLISH:
            return self._publish(flags, r)
        if ptype == _P.CONNECT:
            connect = _connect(r)
            if self.version is None:
                self.version = connect.version
            return connect
        v5 = self.version == V5
        if ptype in _ACK_CLASSES:
            return _ack(ptype, r, v5)
        if ptype == _P.SUBSCRIBE:
            return _subscribe(r, v5)
        if ptype == _P.UNSUBSCRIBE:
            packet_id = _packet_id(r)
            properties = r.properties(ptype) if v5 else ()
            filters = []
            while r.left():
                filters.append(r.string())
            if not filters:
                raise (_protocol if v5 else _malformed)("UNSUBSCRIBE without topic filters")
            return Unsubscribe(packet_id, tuple(filters), properties)
        if ptype in (_P.PINGREQ, _P.PINGRESP):
            r.done(PacketType(ptype).name)
            return PingReq() if ptype == _P.PINGREQ else PingResp()
        if ptype in (_P.DISCONNECT, _P.AUTH):
            return _reason_only(ptype, r, v5)
        if ptype == _P.CONNACK:
            return _connack(r, v5)
        if ptype == _P.SUBACK:
            packet_id = _packet_id(r)
            properties = r.properties(ptype) if v5 else ()
            reasons = tuple(r.rest())
            if not reasons or not set(reasons) <= (_SUBACK_REASONS if v5 else _SUBACK_V311):
                raise _protocol(f"SUBACK with reason codes {reasons!r}")
            return SubAck(packet_id, reasons, properties)
        packet_id = _packet_id(r)  # UNSUBACK
        if not v5:
            r.done("UNSUBACK")
            return UnsubAck(packet_id)
        properties = r.properties(ptype)
        reasons = tuple(r.rest())
        if not reasons or not set(reasons) <= _UNSUBACK_REASONS:
            raise _protocol(f"UNSUBACK with reason codes {reasons!r}")
        return UnsubAck(packet_id, reasons, properties)

    def _publish(self, flags: int, r: _Reader) -> Publish:
        qos = flags >> 1 & 3
        if qos == 3:
            raise _malformed("PUBLISH at QoS 3")
        dup = bool(flags & 0b1000)
        if dup and not qos:
            raise _malformed("PUBLISH at QoS 0 with DUP set")
        topic = r.string()
        packet_id = _packet_id(r) if qos else 0
        properties = r.properties(_P.PUBLISH) if self.version == V5 else ()
        return Publish(topic, r.rest(), qos, bool(flags & 1), dup, packet_id, properties)


def _packet_id(r: _Reader) -> int:
    packet_id = r.u16()
    if not packet_id:
        raise _malformed("packet identifier 0")
    return packet_id


def _connect(r: _Reader) -> Connect:
    name = r.string()
    level = r.u8()
    if name != "MQTT" or level not in (V311, V5):
        raise MqttError(Reason.UNSUPPORTED_PROTOCOL_VERSION, f"CONNECT for protocol {name!r} level {level}: only MQTT 3.1.1 (4) and 5.0 (5)")
    flags = r.u8()
    if flags & 1:
        raise _malformed("CONNECT with its reserved flag set")
    will_flag, will_qos, will_retain = flags & 0b100, flags >> 3 & 3, bool(flags & 0b10_0000)
    if will_qos == 3 or (not will_flag and (will_qos or will_retain)):
        raise _malformed("CONNECT with will QoS or retain but no will, or will QoS 3")
    has_password, has_username = flags & 0b100_0000, flags & 0b1000_0000
    if has_password and not has_username and level == V311:
        raise _malformed("a 3.1.1 CONNECT with a password but no user name")
    keep_alive = r.u16()
    properties = r.properties(_P.CONNECT) if level == V5 else ()
    client_id = r.string()
    will = None
    if will_flag:
        will_properties = r.properties(_WILL) if level == V5 else ()
        will = Will(r.string(), r.binary(), will_qos, will_retain, will_properties)
    username = r.string() if has_username else None
    password = r.binary() if has_password else None
    r.done("CONNECT")
    return Connect(client_id, level, bool(flags & 0b10), keep_alive, username, password, will, properties)


def _connack(r: _Reader, v5: bool) -> ConnAck:
    flags = r.u8()
    if flags & 0xFE:
        raise _malformed("CONNACK with reserved flags set")
    reason = r.u8()
    if reason not in (_CONNACK_REASONS if v5 else frozenset(range(6))):
        raise _protocol(f"CONNACK with reason code 0x{reason:02X}")
    properties = r.properties(_P.CONNACK) if v5 else ()
    r.done("CONNACK")
    return ConnAck(bool(flags & 1), reason, properties)


def _ack(ptype: int, r: _Reader, v5: bool) -> Ack:
    packet_id = _packet_id(r)
    reason, properties = 0, cast(Properties, ())
    if v5 and r.left():
        reason = r.u8()
        if reason not in _ACK_REASONS[ptype]:
            raise _protocol(f"{PacketType(ptype).name} with reason code 0x{reason:02X}")
        if r.left():
            properties = r.properties(ptype)
    r.done(PacketType(ptype).name)
    return _ACK_CLASSES[ptype](packet_id, reason, properties)


def _subscribe(r: _Reader, v5: bool) -> Subscribe:
    packet_id = _packet_id(r)
    properties = r.properties(_P.SUBSCRIBE) if v5 else ()
    subscriptions = []
    while r.left():
        topic_filter = r.string()
        options = r.u8()
        if options & (0b1100_0000 if v5 else 0b1111_1100):
            raise _malformed("subscription options with reserved bits set")
        qos, retain_handling = options & 3, options >> 4 & 3
        if qos == 3:
            raise _malformed("a subscription at QoS 3")
        if retain_handling == 3:
            raise _protocol("a subscription with retain handling 3")
        subscriptions.append(Subscription(topic_filter, qos, bool(options & 0b100), bool(options & 0b1000), retain_handling))
    if not subscriptions:
        raise (_protocol if v5 else _malformed)("SUBSCRIBE without topic filters")
    return Subscribe(packet_id, tuple(subscriptions), properties)


def _reason_only(ptype: int, r: _Reader, v5: bool) -> Disconnect | Auth:
    """DISCONNECT and AUTH (5.0 only): a reason and properties, both optional on the wire."""
    reason, properties = 0, cast(Properties, ())
    if v5 and r.left():
        reason = r.u8()
        if reason not in (_DISCONNECT_REASONS if ptype == _P.DISCONNECT else _AUTH_REASONS):
            raise _protocol(f"{PacketType(ptype).name} with reason code 0x{reason:02X}")
        if r.left():
            properties = r.properties(ptype)
    r.done(PacketType(ptype).name)
    return Disconnect(reason, properties) if ptype == _P.DISCONNECT else Auth(reason, properties)


# -- encoding --------------------------------------------------------------------------------


def _bad(message: str) -> LocalProtocolError:
    return LocalProtocolError(message)


def _varint(value: int) -> bytes:
    if not 0 <= value <= _MAX_VARINT:
        raise _bad(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _u16(value: int) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise _bad(f"{value} does not fit two bytes")
    return _U16.pack(value)


def _binary(data: bytes) -> bytes:
    return _u16(len(data)) + data


def _string(text: str) -> bytes:
    if "\x00" in text:
        raise _bad("an MQTT string cannot hold U+0000")
    try:
        return _binary(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise _bad(f"{text!r} is not encodable as UTF-8") from None


def _properties(properties: Properties, packet: int) -> bytes:
    parts = []
    for ident, value in properties:
        spec = PROPERTIES.get(ident)
        if spec is None or packet not in spec[1]:
            raise _bad(f"property 0x{ident:02X} cannot go in this packet")
        parts.append(_varint(ident) + _property(spec[0], value))
    body = b"".join(parts)
    return _varint(len(body)) + body


def _property(kind: int, value: PropertyValue) -> bytes:
    try:
        if kind == _BYTE:
            assert isinstance(value, int)
            return bytes([value])
        if kind == _TWO:
            assert isinstance(value, int)
            return _u16(value)
        if kind == _FOUR:
            assert isinstance(value, int)
            return _U32.pack(value)
        if kind == _VARINT:
            assert isinstance(value, int)
            return _varint(value)
        if kind == _UTF8:
            assert isinstance(value, str)
            return _string(value)
        if kind == _BINARY:
            assert isinstance(value, bytes)
            return _binary(value)
        assert isinstance(value, tuple)
        return _string(value[0]) + _string(value[1])
    except (AssertionError, ValueError, struct.error) as exc:
        raise _bad(f"a property value of the wrong type or range: {value!r}") from exc


def _packet(first: int, body: bytes) -> bytes:
    if len(body) > MAX_REMAINING_LENGTH:
        raise _bad(f"a packet body of {len(body)} bytes is over {MAX_REMAINING_LENGTH}")
    return bytes([first]) + _varint(len(body)) + body


def _v5_only(version: int, properties: Properties, reason: int = 0) -> None:
    if version != V5 and (properties or reason):
        raise _bad("properties and reason codes are MQTT 5.0 only")


def encode(packet: Packet, version: int = V5) -> bytes:
    """The bytes of ``packet`` in ``version`` (4: 3.1.1, or 5); a CONNECT is in its own.

    Raises:
        LocalProtocolError: a field out of range, or what ``version`` cannot carry.
    """
    if version not in (V311, V5):
        raise _bad(f"version must be 4 (3.1.1) or 5, got {version!r}")
    v5 = version == V5
    if isinstance(packet, Publish):
        if packet.qos not in (0, 1, 2) or (packet.qos == 0) != (packet.packet_id == 0) or (packet.dup and not packet.qos):
            raise _bad("PUBLISH: QoS 0 has no packet identifier and no DUP; QoS 1 and 2 have a non-zero one")
        _v5_only(version, packet.properties)
        body = _string(packet.topic) + (_u16(packet.packet_id) if packet.qos else b"")
        if v5:
            body += _properties(packet.properties, _P.PUBLISH)
        first = 0x30 | packet.dup << 3 | packet.qos << 1 | packet.retain
        return _packet(first, body + packet.payload)
    if isinstance(packet, Ack):
        ptype = _ACK_TYPES[type(packet)]
        _v5_only(version, packet.properties, packet.reason)
        body = _u16(packet.packet_id)
        if not packet.packet_id or (packet.reason and packet.reason not in _ACK_REASONS[ptype]):
            raise _bad(f"{PacketType(ptype).name}: packet identifier 0 or reason code 0x{packet.reason:02X}")
        if packet.properties:
            body += bytes([packet.reason]) + _properties(packet.properties, ptype)
        elif packet.reason:
            body += bytes([packet.reason])
        return _packet(ptype << 4 | _FIXED_FLAGS[ptype], body)
    if isinstance(packet, Connect):
        return _encode_connect(packet)
    if isinstance(packet, ConnAck):
        _v5_only(version, packet.properties)
        if packet.reason not in (_CONNACK_REASONS if v5 else frozenset(range(6))):
            raise _bad(f"CONNACK reason code 0x{packet.reason:02X}")
        body = bytes([packet.session_present, packet.reason])
        return _packet(0x20, body + (_properties(packet.properties, _P.CONNACK) if v5 else b""))
    if isinstance(packet, Subscribe):
        return _encode_subscribe(packet, v5)
    if isinstance(packet, (SubAck, UnsubAck)):
        ptype = _P.SUBACK if isinstance(packet, SubAck) else _P.UNSUBACK
        allowed = _SUBACK_REASONS if ptype == _P.SUBACK else _UNSUBACK_REASONS
        if not v5:
            allowed = _SUBACK_V311 if ptype == _P.SUBACK else frozenset()
        if not packet.packet_id or not set(packet.reasons) <= allowed or (v5 or ptype == _P.SUBACK) != bool(packet.reasons):
            raise _bad(f"{PacketType(ptype).name}: packet identifier 0, or reason codes {packet.reasons!r}")
        _v5_only(version, packet.properties)
        body = _u16(packet.packet_id) + (_properties(packet.properties, ptype) if v5 else b"")
        return _packet(ptype << 4, body + bytes(packet.reasons))
    if isinstance(packet, Unsubscribe):
        if not packet.packet_id or not packet.topic_filters:
            raise _bad("UNSUBSCRIBE: packet identifier 0, or no topic filters")
        _v5_only(version, packet.properties)
        body = _u16(packet.packet_id) + (_properties(packet.properties, _P.UNSUBSCRIBE) if v5 else b"")
        return _packet(0xA2, body + b"".join(_string(f) for f in packet.topic_filters))
    if isinstance(packet, (PingReq, PingResp)):
        return b"\xc0\x00" if isinstance(packet, PingReq) else b"\xd0\x00"
    ptype = _P.DISCONNECT if isinstance(packet, Disconnect) else _P.AUTH
    if ptype == _P.AUTH and not v5:
        raise _bad("AUTH is MQTT 5.0 only")
    _v5_only(version, packet.properties, packet.reason)
    if packet.reason not in (_DISCONNECT_REASONS if ptype == _P.DISCONNECT else _AUTH_REASONS):
        raise _bad(f"{PacketType(ptype).name} reason code 0x{packet.reason:02X}")
    body = b""
    if packet.properties:
        body = bytes([packet.reason]) + _properties(packet.properties, ptype)
    elif packet.reason:
        body = bytes([packet.reason])
    return _packet(ptype << 4, body)


def _encode_connect(packet: Connect) -> bytes:
    v5 = packet.version == V5
    if packet.version not in (V311, V5):
        raise _bad(f"CONNECT version must be 4 or 5, got {packet.version}")
    will = packet.will
    _v5_only(packet.version, packet.properties + (will.properties if will else ()))
    if packet.password is not None and packet.username is None and not v5:
        raise _bad("a 3.1.1 CONNECT with a password needs a user name")
    flags = packet.clean_start << 1
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise _bad(f"will QoS {will.qos}")
        flags |= 0b100 | will.qos << 3 | will.retain << 5
    flags |= (packet.password is not None) << 6 | (packet.username is not None) << 7
    body = _string("MQTT") + bytes([packet.version, flags]) + _u16(packet.keep_alive)
    if v5:
        body += _properties(packet.properties, _P.CONNECT)
    body += _string(packet.client_id)
    if will is not None:
        body += (_properties(will.properties, _WILL) if v5 else b"") + _string(will.topic) + _binary(will.payload)
    if packet.username is not None:
        body += _string(packet.username)
    if packet.password is not None:
        body += _binary(packet.password)
    return _packet(0x10, body)


def _encode_subscribe(packet: Subscribe, v5: bool) -> bytes:
    if not packet.packet_id or not packet.subscriptions:
        raise _bad("SUBSCRIBE: packet identifier 0, or no subscriptions")
    _v5_only(V5 if v5 else V311, packet.properties)
    body = _u16(packet.packet_id) + (_properties(packet.properties, _P.SUBSCRIBE) if v5 else b"")
    for sub in packet.subscriptions:
        if sub.qos not in (0, 1, 2) or sub.retain_handling not in (0, 1, 2):
            raise _bad(f"subscription QoS {sub.qos} or retain handling {sub.retain_handling}")
        extra = sub.no_local << 2 | sub.retain_as_published << 3 | sub.retain_handling << 4
        if extra and not v5:
            raise _bad("subscription options other than QoS are MQTT 5.0 only")
        body += _string(sub.topic_filter) + bytes([sub.qos | extra])
    return _packet(0x82, body)
