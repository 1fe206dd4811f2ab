"""The fuzz oracle (tests/reference.py) on frames written out by hand, so that it is
not trusted blindly: the article's worked example, a signed route, a hop limit of 0,
an unknown type, a truncated stream, and the fatal cases."""

from __future__ import annotations

import msgpack
import pytest

from dcp.errors import FrameTooLarge, RemoteProtocolError, RouteTooLarge, TruncatedFrame
from dcp.wire import ControlFrame, DataFrame, Limits, Rejected, encode_data

from .reference import NotModeled, reason_of, reference_boundaries, reference_decode, reference_forward

TAG = bytes(range(100, 124))  # any 24 bytes: the reference checks no MAC


def frame(x: bytes = b"", topic: bytes = b"t", payload: bytes = b"", *, version: int = 1, ftype: int = 1,
          flags: int = 0, hops: int = 5, msg_id: int = 7, ts: int = 9) -> bytes:
    """A frame, its fixed header written field by field as the wire.py table lays it out."""
    return (
        bytes([version, ftype, flags, hops])
        + len(x).to_bytes(2, "big") + len(topic).to_bytes(2, "big") + len(payload).to_bytes(4, "big")
        + msg_id.to_bytes(8, "big") + ts.to_bytes(8, "big")
        + x + topic + payload
    )


def control(body: dict, **header: int) -> bytes:
    return frame(topic=b"", payload=msgpack.packb(body), ftype=2, hops=0, msg_id=0, ts=0, **header)


def hops_less_one(data: bytes) -> bytes:
    return data[:3] + bytes([data[3] - 1]) + data[4:]


def rejected(events: list) -> list:
    return [(type(e.error), reason_of(e.error), e.msg_id) if isinstance(e, Rejected) else e for e in events]


# The article: X = 11 is (2, 3, 1) in RNS(3, 4, 5).
EXAMPLE = bytes.fromhex(
    "01" "01" "00" "05"  # version, type DATA, flags, hops
    "0001" "0001" "00000002"  # x_len, topic_len, payload_len
    "0000000000000007" "0000000000000009"  # msg_id, timestamp_ns
    "0b" "74" "6869"  # X = 11, topic "t", payload "hi"
)


def test_the_worked_example() -> None:
    assert EXAMPLE == frame(b"\x0b", b"t", b"hi") == encode_data("t", b"hi", 11, hops=5, msg_id=7, timestamp_ns=9)
    assert reference_decode(EXAMPLE) == ([DataFrame("t", b"hi", 11, 5, 7, 9, 0)], None)
    copy = hops_less_one(EXAMPLE)
    assert copy[3] == 4 and copy[4:] == EXAMPLE[4:]
    # key 4: residue 3 = ports 0 and 1
    got = reference_forward(EXAMPLE, key=4, attached=0b011, ingress=2)
    assert got.out == {0: copy, 1: copy} and not got.drops and got.frames_in == 1
    assert (got.port, got.closed, got.held) == (2, False, 0)
    # key 3: residue 2 = port 1 only; port 2, attached, gets nothing
    got = reference_forward(EXAMPLE, key=3, attached=0b110, ingress=0)
    assert got.out == {1: copy, 2: b""} and not got.drops
    # key 5: residue 1 = port 0, the ingress itself: no route
    got = reference_forward(EXAMPLE, key=5, attached=0b110, ingress=0)
    assert got.out == {1: b"", 2: b""} and got.drops == {"no_route": 1}


def test_bits_of_unattached_ports_are_counted_per_copy() -> None:
    data = frame(bytes([0b101011]))  # ports 0, 1, 3, 5
    got = reference_forward(data, key=1009, attached=0b1, ingress=1)
    assert got.out == {0: hops_less_one(data)}
    assert got.drops == {"unattached_port": 2}  # 3 and 5; 1 is the ingress
    got = reference_forward(data, key=1009, attached=0b100, ingress=1)
    assert got.out == {2: b""} and got.drops == {"unattached_port": 3, "no_route": 1}


def test_a_signed_route() -> None:
    signed = frame(b"\x0b" + TAG, flags=0x01)  # x_len 25 counts X and the tag
    assert signed[4:6] == b"\x00\x19"
    assert reference_decode(signed) == ([DataFrame("t", b"", 11, 5, 7, 9, 0x01)], None)
    got = reference_forward(signed, key=4, attached=0b011, ingress=2)
    assert got.out == {0: hops_less_one(signed), 1: hops_less_one(signed)} and not got.drops
    # all tag: X is 0
    assert reference_decode(frame(TAG, flags=0x01))[0] == [DataFrame("t", b"", 0, 5, 7, 9, 0x01)]
    # unsigned, the same bytes are one big X
    assert reference_decode(signed[:2] + b"\x00" + signed[3:])[0][0].route == int.from_bytes(b"\x0b" + TAG, "big")
    # shorter than its tag: skipped, and the stream goes on
    short = frame(TAG[:23], flags=0x03, msg_id=42)
    events, error = reference_decode(short + EXAMPLE)
    assert error is None and rejected(events) == [(RemoteProtocolError, "shorter than its tag", 42), reference_decode(EXAMPLE)[0][0]]
    got = reference_forward(short + EXAMPLE, key=4, attached=0b011, ingress=2)
    assert got.drops == {"route_forged": 1} and got.out[0] == hops_less_one(EXAMPLE) and got.frames_in == 2
    # the flag means nothing to a control frame (no X field) nor to an unknown type
    assert reference_decode(control({"op": "ping"}, flags=0x01)) == ([ControlFrame({"op": "ping"})], None)
    assert rejected(reference_decode(frame(b"\x01", ftype=9, flags=0x01))[0]) == [(RemoteProtocolError, "unknown frame type", 7)]


def test_a_hop_limit_of_0_is_dropped_and_counted() -> None:
    spent, last = frame(b"\x03", hops=0), frame(b"\x03", hops=1)
    assert reference_decode(spent + last)[0] == [DataFrame("t", b"", 3, 0, 7, 9), DataFrame("t", b"", 3, 1, 7, 9)]
    got = reference_forward(spent + last + spent, key=1009, attached=0b11, ingress=2)
    assert got.drops == {"hop_limit": 2} and got.frames_in == 3 and not got.closed
    assert got.out == {0: hops_less_one(last), 1: hops_less_one(last)} and got.out[0][3] == 0


@pytest.mark.parametrize("ftype", [0, 3, 255])
def test_an_unknown_type_is_skipped(ftype: int) -> None:
    odd = frame(b"\x03", payload=b"?", ftype=ftype, msg_id=77)
    events, error = reference_decode(odd + EXAMPLE + odd)
    assert error is None
    assert rejected(events) == [(RemoteProtocolError, "unknown frame type", 77), DataFrame("t", b"hi", 11, 5, 7, 9), (RemoteProtocolError, "unknown frame type", 77)]
    got = reference_forward(odd + EXAMPLE, key=4, attached=0b11, ingress=2)
    assert got.drops == {"rejected": 1} and got.frames_in == 1 and got.out[0] == hops_less_one(EXAMPLE) and not got.closed
    # before any hello too: skipped, not fatal
    assert reference_forward(odd, key=4, attached=0b11, ingress=2, hello=True).closed is False


@pytest.mark.parametrize("cut", [1, 27, 28, 29, len(EXAMPLE) - 1])
def test_a_truncated_stream(cut: int) -> None:
    stream = EXAMPLE + EXAMPLE[:cut]
    assert reference_decode(stream) == ([DataFrame("t", b"hi", 11, 5, 7, 9)], TruncatedFrame)
    assert reference_decode(stream, eof=False) == ([DataFrame("t", b"hi", 11, 5, 7, 9)], None)
    assert reference_boundaries(stream) == [len(EXAMPLE)]
    got = reference_forward(stream, key=4, attached=0b11, ingress=2)
    assert got.drops == {"truncated": 1} and got.held == cut and got.frames_in == 1 and not got.closed
    assert reference_forward(stream, key=4, attached=0b11, ingress=2, eof=False).drops == {}


def test_what_ends_a_stream() -> None:
    small = Limits(max_frame=100, max_topic=4, max_x_bits=16, max_control=50)
    ok = frame(b"\x01")
    cases = [
        (frame(b"\x01", version=2), RemoteProtocolError),
        (frame(topic=b"fives"), FrameTooLarge),  # topic over max_topic
        (frame(payload=b"p" * 72), FrameTooLarge),  # 101 bytes: over max_frame
        (frame(payload=b"p" * 72)[:28], FrameTooLarge),  # the header is enough to know
        (control({"op": 1}), RemoteProtocolError),  # no string op
        (frame(topic=b"", payload=b"\xc1", ftype=2), RemoteProtocolError),  # not msgpack
        (frame(topic=b"", payload=msgpack.packb({"op": "x"}) + b"\x00", ftype=2), RemoteProtocolError),  # bytes after the map
        (frame(topic=b"", payload=msgpack.packb({1: "x", "op": "y"}), ftype=2), RemoteProtocolError),
    ]
    for bad, error in cases:
        assert reference_decode(ok + bad + ok, small) == ([DataFrame("t", b"", 1, 5, 7, 9)], error), bad
        got = reference_forward(ok + bad + ok, key=1009, attached=0b11, ingress=2, limits=small)
        assert got.closed and got.frames_in == 1 and got.held == 0 and got.out == {0: hops_less_one(ok), 1: b""}, bad
    at_max = frame(payload=b"p" * 71)
    assert len(at_max) == small.max_frame and reference_decode(at_max, small)[1] is None


def test_skipped_frames() -> None:
    small = Limits(max_frame=200, max_topic=8, max_x_bits=12, max_control=20)
    cases = [
        (frame(b"\x1f\xff"), RouteTooLarge, "max_x_bits"),  # 13 bits
        (frame(topic=b"\xff\xfe"), RemoteProtocolError, "UTF-8"),
        (frame(topic=b"\xed\xa0\x80"), RemoteProtocolError, "UTF-8"),  # an encoded surrogate
        (frame(b"\x05", b"", msgpack.packb({"op": "x"}), ftype=2), RemoteProtocolError, "topology number or topic"),
        (frame(b"", b"t", msgpack.packb({"op": "x"}), ftype=2), RemoteProtocolError, "topology number or topic"),
        (control({"op": "x" * 30}), FrameTooLarge, "max_control"),
    ]
    for bad, error, reason in cases:
        events, failed = reference_decode(bad + EXAMPLE, small)
        assert failed is None and rejected(events[:1]) == [(error, reason, int.from_bytes(bad[12:20], "big"))], bad
        assert events[1:] == [DataFrame("t", b"hi", 11, 5, 7, 9)]
    # X is bounded by its bits, not its bytes: leading zeros are fine
    assert reference_decode(frame(b"\x00\x00\x0f\xff"), small) == ([DataFrame("t", b"", 0xFFF, 5, 7, 9)], None)
    # a broker drops an X over the limit, forwards a topic that is not UTF-8 untouched, and
    # closes on a control frame a decoder would skip
    bad_topic = frame(b"\x01", topic=b"\xff")
    got = reference_forward(frame(b"\x1f\xff") + bad_topic, key=1009, attached=0b11, ingress=2, limits=small)
    assert got.drops == {"route_too_large": 1} and got.out[0] == hops_less_one(bad_topic)
    assert reference_forward(control({"op": "x" * 30}), key=1009, attached=0b11, ingress=2, limits=small).closed


def test_hello_decides_the_port() -> None:
    data = frame(b"\x01")
    hello = control({"op": "hello", "id": 1})
    got = reference_forward(hello + data, key=1009, attached=0b1, ingress=2, hello=True)
    assert (got.port, got.closed, got.frames_in, got.out) == (2, False, 1, {0: hops_less_one(data)})
    got = reference_forward(data + hello, key=1009, attached=0b1, ingress=2, hello=True)
    assert (got.port, got.closed, got.drops) == (None, True, {"rejected": 1})
    for refused in ({"op": "hello", "role": "king"}, {"op": "hello", "slow_consumer": "never"}, {"op": "going_away"},
                    {"op": "error", "fatal": True}):
        got = reference_forward(control(refused) + hello + data, key=1009, attached=0b1, ingress=2, hello=True)
        assert got.closed and got.out == {0: b""} and got.port is None, refused
    admin = reference_forward(control({"op": "hello", "role": "admin"}) + hello + data, key=1009, attached=0b1, ingress=2, hello=True)
    assert (admin.port, admin.closed, admin.drops) == (None, True, {"rejected": 1})  # a second hello changes nothing
    chatty = control({"op": "ping"}) + control({"op": "subscribe", "topic": "t"}) + control({"op": "error", "fatal": False})
    assert reference_forward(chatty + hello + data, key=1009, attached=0b1, ingress=2, hello=True).out == {0: hops_less_one(data)}
    with pytest.raises(NotModeled):
        reference_forward(control({"op": "hello", "role": "peer"}), key=1009, attached=0b1, ingress=2, hello=True)
