"""Valid MQTT packets and streams from a ``random.Random``, and their mutations: what the
MQTT codec's and the gateway's fuzz tests feed (hypothesis draws the seed, the cuts
and the mutations; see tests/fuzzing.py for how the dcp codec's are scaled)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from dcp import mqtt_codec as codec
from dcp.mqtt_codec import (
    PROPERTIES,
    V5,
    V311,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    Prop,
    Properties,
    PubAck,
    PubComp,
    PubRec,
    PubRel,
    Publish,
    SubAck,
    Subscribe,
    Subscription,
    Unsubscribe,
    UnsubAck,
    Will,
)

#: Topics and filters: mappable to dcp, and not (a dot, an empty level, '$', wildcards in odd places).
TOPICS = ("a", "a/b", "sensors/s1/temp", "é/ü", "a.b", "a//b", "/a", "$SYS/x", "a/+", "#", "")
FILTERS = ("a/#", "+/b", "#", "a/b", "sensors/+/temp", "a.b/#", "a/#/b", "a+", "$share/g/a", "")
_TEXT = "abcé/+#.$\x01 "
_SINGLE = {ident for ident in PROPERTIES if ident != Prop.USER_PROPERTY}
# the reason codes each packet may carry (the codec's own tables: a code outside them is refused)
_REASONS = {
    ConnAck: sorted(codec._CONNACK_REASONS), PubAck: sorted(codec._PUBACK_REASONS), PubRec: sorted(codec._PUBACK_REASONS),
    PubRel: sorted(codec._PUBREL_REASONS), PubComp: sorted(codec._PUBREL_REASONS), SubAck: sorted(codec._SUBACK_REASONS),
    UnsubAck: sorted(codec._UNSUBACK_REASONS), Disconnect: sorted(codec._DISCONNECT_REASONS), Auth: sorted(codec._AUTH_REASONS),
}


def text(rng: random.Random, most: int = 12) -> str:
    return "".join(rng.choice(_TEXT) for _ in range(rng.randint(0, most)))


def _value(rng: random.Random, ident: int) -> codec.PropertyValue:
    kind = PROPERTIES[ident][0]
    if ident in codec._FLAGS:
        return rng.randint(0, 1)
    low = 1 if ident in codec._NONZERO else 0
    if kind == codec._BYTE:
        return rng.randint(low, 255)
    if kind == codec._TWO:
        return rng.randint(low, 0xFFFF)
    if kind == codec._FOUR:
        return rng.randint(low, 0xFFFFFFFF)
    if kind == codec._VARINT:
        return rng.choice((low, 127, 128, 16383, 16384, codec.MAX_REMAINING_LENGTH))
    if kind == codec._UTF8:
        return text(rng)
    if kind == codec._BINARY:
        return rng.randbytes(rng.randint(0, 8))
    return text(rng, 5), text(rng, 5)


def properties(rng: random.Random, packet: int, version: int) -> Properties:
    """Valid properties of ``packet`` (a PacketType, 0 for a will): none in 3.1.1."""
    if version != V5 or rng.random() < 0.5:
        return ()
    allowed = sorted(ident for ident in _SINGLE if packet in PROPERTIES[ident][1])
    chosen = rng.sample(allowed, rng.randint(0, min(3, len(allowed))))
    found = [(ident, _value(rng, ident)) for ident in chosen]
    found += [(int(Prop.USER_PROPERTY), (text(rng, 4), text(rng, 4))) for _ in range(rng.randint(0, 2))]
    rng.shuffle(found)
    return tuple(found)


def _reason(rng: random.Random, cls: type, version: int) -> int:
    return rng.choice(_REASONS[cls]) if version == V5 else 0


def packet(rng: random.Random, version: int) -> Packet:
    """One valid packet of ``version``, any type but CONNECT."""
    pid = rng.choice((1, 2, 0xFFFF))
    kind = rng.choice(("publish", "publish", "publish", "ack", "subscribe", "suback", "unsubscribe", "unsuback", "ping", "disconnect", "connack", "auth"))
    P = codec.PacketType
    if kind == "publish":
        qos = rng.randint(0, 2)
        return Publish(rng.choice(TOPICS), rng.randbytes(rng.choice((0, 1, 10, 200))), qos, rng.random() < 0.3,
                       qos > 0 and rng.random() < 0.3, pid if qos else 0, properties(rng, P.PUBLISH, version))
    if kind == "ack":
        cls = rng.choice((PubAck, PubRec, PubRel, PubComp))
        return cls(pid, _reason(rng, cls, version), properties(rng, {PubAck: P.PUBACK, PubRec: P.PUBREC, PubRel: P.PUBREL, PubComp: P.PUBCOMP}[cls], version))
    if kind == "subscribe":
        subs = tuple(
            Subscription(rng.choice(FILTERS) or "x", rng.randint(0, 2), *(
                (rng.random() < 0.5, rng.random() < 0.5, rng.randint(0, 2)) if version == V5 else (False, False, 0)))
            for _ in range(rng.randint(1, 3))
        )
        return Subscribe(pid, subs, properties(rng, P.SUBSCRIBE, version))
    if kind == "suback":
        reasons = tuple(rng.choice(_REASONS[SubAck] if version == V5 else [0, 1, 2, 0x80]) for _ in range(rng.randint(1, 3)))
        return SubAck(pid, reasons, properties(rng, P.SUBACK, version))
    if kind == "unsubscribe":
        return Unsubscribe(pid, tuple(rng.choice(FILTERS) for _ in range(rng.randint(1, 3))), properties(rng, P.UNSUBSCRIBE, version))
    if kind == "unsuback":
        if version != V5:
            return UnsubAck(pid)
        return UnsubAck(pid, tuple(rng.choice(_REASONS[UnsubAck]) for _ in range(rng.randint(1, 3))), properties(rng, P.UNSUBACK, version))
    if kind == "ping":
        return rng.choice((PingReq(), PingResp()))
    if kind == "connack":
        return ConnAck(rng.random() < 0.5, _reason(rng, ConnAck, version) if version == V5 else rng.randint(0, 5), properties(rng, P.CONNACK, version))
    if kind == "auth" and version == V5:
        return Auth(_reason(rng, Auth, version), properties(rng, P.AUTH, version))
    return Disconnect(_reason(rng, Disconnect, version), properties(rng, P.DISCONNECT, version))


def connect(rng: random.Random, version: int) -> Connect:
    will = None
    if rng.random() < 0.5:
        will = Will(rng.choice(TOPICS), rng.randbytes(rng.randint(0, 10)), rng.randint(0, 2), rng.random() < 0.5, properties(rng, 0, version))
    username = rng.choice((None, "u", "sensor-1"))
    password = rng.choice((None, b"", b"token", b"bad")) if username is not None or version == V5 else None
    return Connect(rng.choice(("", "c1", "client")), version, rng.random() < 0.7, rng.choice((0, 1, 60, 0xFFFF)), username, password,
                   will, properties(rng, codec.PacketType.CONNECT, version))


def stream(rng: random.Random, version: int | None = None, most: int = 8) -> tuple[int, list[Packet]]:
    """(version, packets): a CONNECT first, then up to ``most`` other packets of that version."""
    version = version or rng.choice((V311, V5))
    return version, [connect(rng, version), *(packet(rng, version) for _ in range(rng.randint(0, most)))]


def encoded(version: int, packets: Sequence[Packet]) -> tuple[bytes, list[int]]:
    """The bytes of ``packets`` and where each starts."""
    parts = [codec.encode(p, version) for p in packets]
    starts, at = [], 0
    for part in parts:
        starts.append(at)
        at += len(part)
    return b"".join(parts), starts


#: flip a bit, set, insert or delete a byte anywhere; set a byte of a packet's remaining length.
MUTATIONS = ("flip", "set", "insert", "delete", "length")


def mutate(data: bytes, starts: Sequence[int], ops: Sequence[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, pos, value in ops:
        if not out:
            out.append(value)
            continue
        if op == "length" and starts:
            at = starts[pos % len(starts)] + 1 + pos // len(starts) % 2
            if at < len(out):
                out[at] = value
            continue
        pos %= len(out)
        if op == "flip":
            out[pos] ^= 1 << (value % 8)
        elif op == "insert":
            out.insert(pos, value)
        elif op == "delete":
            del out[pos]
        else:
            out[pos] = value
    return bytes(out)


def random_mutations(rng: random.Random) -> list[tuple[str, int, int]]:
    return [(rng.choice(MUTATIONS), rng.randrange(10**6), rng.randrange(256)) for _ in range(rng.randint(1, 4))]
