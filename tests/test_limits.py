"""Every limit at its boundary: n - 1 and n accepted, n + 1 refused, in one read and split.

The limits bound every buffer of dcp (``Limits``: max_frame, max_control, max_x_bits;
a broker's key bound), so an off-by-one in any of them either refuses what a peer may
send or admits what it may not.  Each is driven through the decoder and through a
broker (in process, over a fake transport), whole and cut at every byte.
"""

from __future__ import annotations

import msgpack
import pytest

from dcp.broker import Broker, BrokerConnection
from dcp.config import BrokerConfig
from dcp.errors import ConfigError, FrameTooLarge, RouteTooLarge
from dcp.routing import encode
from dcp.wire import (
    HEADER_SIZE,
    HOPS_OFFSET,
    SIGNED_ROUTE,
    ControlFrame,
    DataFrame,
    Decoder,
    Limits,
    Rejected,
    encode_control,
    encode_data,
)

from .test_broker_protocol import attached, fresh_broker

ROOMY = Limits(max_frame=Limits().max_frame, max_x_bits=64 * 1024, max_control=Limits().max_frame)


def reads_of(frame: bytes) -> list[list[bytes]]:
    """The frame in one read, and cut in two at every byte."""
    return [[frame]] + [[frame[:cut], frame[cut:]] for cut in range(1, len(frame))]


def decode(reads: list[bytes], limits: Limits) -> list[object]:
    decoder = Decoder(limits)
    events: list[object] = []
    for read in reads:
        events += decoder.feed(read)
    return events


def broker_pair(**settings: object) -> tuple[Broker, BrokerConnection, BrokerConnection]:
    broker = fresh_broker(**settings)
    return broker, attached(broker), attached(broker)


def forwarded(frame: bytes | bytearray) -> bytes:
    """``frame`` as a broker passes it on: the hop limit one lower."""
    out = bytearray(frame)
    out[HOPS_OFFSET] -= 1
    return bytes(out)


def control_of_size(size: int, **fields: object) -> tuple[dict[str, object], bytes]:
    """A ping whose msgpack body is exactly ``size`` bytes, and its frame."""
    body = {"op": "ping", **fields, "pad": ""}
    base = len(msgpack.packb(body, use_bin_type=True))
    for pad in range(size - base, size - base - 6, -1):  # the str header grows by 1-4 bytes with the string
        body["pad"] = "r" * max(pad, 0)
        if len(msgpack.packb(body, use_bin_type=True)) == size:
            return body, encode_control(body, ROOMY)
    raise AssertionError(f"no body of {size} bytes")


# --------------------------------------------------------------------------- max_frame


MAX_FRAME = 200


@pytest.mark.parametrize("size", [MAX_FRAME - 1, MAX_FRAME])
def test_a_frame_up_to_max_frame_decodes_in_any_reads(size: int) -> None:
    limits = Limits(max_frame=MAX_FRAME, max_control=100)
    frame = encode_data("t", b"p" * (size - HEADER_SIZE - 2), 5)
    assert len(frame) == size
    for reads in reads_of(frame):
        assert decode(reads, limits) == [DataFrame("t", b"p" * (size - HEADER_SIZE - 2), 5)]


def test_a_frame_over_max_frame_ends_the_stream_in_any_reads() -> None:
    limits = Limits(max_frame=MAX_FRAME, max_control=100)
    frame = encode_data("t", b"p" * (MAX_FRAME + 1 - HEADER_SIZE - 1), 0)
    assert len(frame) == MAX_FRAME + 1
    for reads in reads_of(frame):
        with pytest.raises(FrameTooLarge):
            decode(reads, limits)


@pytest.mark.parametrize("max_frame", [MAX_FRAME, 100_000])  # 100 kB spans reads past the broker's join limit
@pytest.mark.parametrize("delta", [-1, 0])
def test_a_broker_forwards_a_frame_up_to_max_frame_in_any_reads(max_frame: int, delta: int) -> None:
    size = max_frame + delta
    cuts = range(1, size) if size < 1000 else (1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 9, 4096, 65536, size - 1)
    for cut in [None, *cuts]:
        broker, pub, sub = broker_pair(max_frame=max_frame)
        x = encode({broker.key: sub.bit})
        head = len(encode_data("t", b"", x))
        frame = encode_data("t", b"\x07" * (size - head), x, hops=3)
        assert len(frame) == size
        for read in ([frame] if cut is None else [frame[:cut], frame[cut:]]):
            pub.data_received(read)
        assert bytes(sub.transport.written) == forwarded(frame), cut  # type: ignore[union-attr]
        assert not pub.closing


def test_a_broker_closes_a_stream_with_a_frame_over_max_frame_in_any_reads() -> None:
    for cut in [None, *range(1, MAX_FRAME + 1)]:
        broker, pub, sub = broker_pair(max_frame=MAX_FRAME)
        x = encode({broker.key: sub.bit})
        frame = encode_data("t", b"", x)
        frame = encode_data("t", b"\x07" * (MAX_FRAME + 1 - len(frame)), x)
        for read in ([frame] if cut is None else [frame[:cut], frame[cut:]]):
            pub.data_received(read)
        assert pub.closing and sub.transport.written == b"", cut  # type: ignore[union-attr]
        [error] = Decoder().feed(bytes(pub.transport.written))  # type: ignore[union-attr]
        assert isinstance(error, ControlFrame) and error.body["code"] == "frame_too_large" and error.body["fatal"]


# --------------------------------------------------------------------------- max_control


MAX_CONTROL = 100


@pytest.mark.parametrize("size", [MAX_CONTROL - 1, MAX_CONTROL])
def test_a_control_body_up_to_max_control_decodes_in_any_reads(size: int) -> None:
    body, frame = control_of_size(size)
    for reads in reads_of(frame):
        assert decode(reads, Limits(max_control=MAX_CONTROL)) == [ControlFrame(body)]


def test_a_control_body_over_max_control_is_skipped_and_the_stream_goes_on() -> None:
    _, frame = control_of_size(MAX_CONTROL + 1)
    after = encode_data("t", b"after", 3)
    for reads in reads_of(frame + after):
        events = decode(reads, Limits(max_control=MAX_CONTROL))
        assert len(events) == 2 and isinstance(events[0], Rejected) and isinstance(events[0].error, FrameTooLarge)
        assert events[1] == DataFrame("t", b"after", 3)


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_a_broker_answers_a_control_frame_up_to_max_control_and_closes_over_it(delta: int) -> None:
    max_control = Limits().max_control  # a broker's: not configurable
    _, frame = control_of_size(max_control + delta, id=9)
    for cut in (None, 1, HEADER_SIZE, HEADER_SIZE + 1, len(frame) // 2, len(frame) - 1):
        broker, pub, _ = broker_pair()
        for read in ([frame] if cut is None else [frame[:cut], frame[cut:]]):
            pub.data_received(read)
        [reply] = Decoder().feed(bytes(pub.transport.written))  # type: ignore[union-attr]
        if delta <= 0:
            assert reply == ControlFrame({"op": "pong", "re": 9}) and not pub.closing, cut
        else:
            assert reply.body["code"] == "frame_too_large" and reply.body["fatal"] and pub.closing, cut  # type: ignore[union-attr]


def test_a_control_frame_with_the_signed_route_flag_is_still_that_control_frame() -> None:
    """SIGNED_ROUTE speaks of a data frame's X field; a control frame has none to cut a tag from."""
    body = {"op": "ping", "id": 7}
    frame = bytearray(encode_control(body))
    frame[2] |= SIGNED_ROUTE
    for reads in reads_of(bytes(frame)):
        assert decode(reads, Limits()) == [ControlFrame({"op": "ping", "id": 7})]
    broker, pub, _ = broker_pair()
    pub.data_received(bytes(frame))
    assert Decoder().feed(bytes(pub.transport.written)) == [ControlFrame({"op": "pong", "re": 7})]  # type: ignore[union-attr]


# --------------------------------------------------------------------------- max_x_bits


@pytest.mark.parametrize("bits, ok", [(256, True), (257, True), (258, False)])
def test_max_x_bits_bounds_the_bits_of_x_not_its_bytes(bits: int, ok: bool) -> None:
    """257 bits need 33 bytes, and so do 258: the byte count alone cannot decide."""
    x = (1 << (bits - 1)) | 5
    frame = encode_data("t", b"p", x, limits=ROOMY)
    for reads in reads_of(frame):
        [event] = decode(reads, Limits(max_x_bits=257))
        if ok:
            assert event == DataFrame("t", b"p", x)
        else:
            assert isinstance(event, Rejected) and isinstance(event.error, RouteTooLarge)


@pytest.mark.parametrize("bits, ok", [(256, True), (257, True), (258, False)])
def test_a_broker_drops_an_x_over_max_x_bits_as_route_too_large(bits: int, ok: bool) -> None:
    broker, pub, sub = broker_pair(max_x_bits=257)
    residue = encode({broker.key: sub.bit})
    low = 1 << (bits - 1)
    x = (low // broker.key + 1) * broker.key + residue  # routes to sub, with exactly ``bits`` bits
    assert x.bit_length() == bits
    frame = encode_data("t", b"p", x, hops=4, limits=ROOMY)
    pub.data_received(frame * 2)  # twice: the repeat of a decision must not skip the check
    if ok:
        assert bytes(sub.transport.written) == forwarded(frame) * 2  # type: ignore[union-attr]
        assert broker.drops["route_too_large"] == 0
    else:
        assert sub.transport.written == b""  # type: ignore[union-attr]
        assert broker.drops["route_too_large"] == 2
        assert not pub.closing  # a well-delimited frame: dropped, the stream goes on


# --------------------------------------------------------------------------- the key bound


@pytest.mark.parametrize(("ports", "width"), [(1, 1), (4, 4), (64, 64), (65, 65), (10_000, 67), (65_535, 80)])
def test_a_key_must_exceed_two_to_the_root_width(ports: int, width: int) -> None:
    """Up to 64 ports the key is above 2**ports; beyond, the root's residue also names
    its banks or directories (1 to 16 of them)."""
    for key in ((1 << width) - 1, 1 << width):
        with pytest.raises(ConfigError, match=f"greater than 2\\*\\*{width} "):
            BrokerConfig(key=key, ports=ports)
    assert BrokerConfig(key=(1 << width) + 1, ports=ports).key == (1 << width) + 1


# --------------------------------------------------------------------------- counted decisions


def test_a_repeated_frame_with_hops_0_is_dropped_not_repeated() -> None:
    broker, pub, sub = broker_pair()
    x = encode({broker.key: sub.bit})
    first, second = encode_data("t", b"p", x, hops=2), encode_data("t", b"p", x, hops=0)
    pub.data_received(first + second)
    assert bytes(sub.transport.written) == forwarded(first)  # type: ignore[union-attr]
    assert broker.drops["hop_limit"] == 1
    assert not pub.closing


def test_unattached_ports_are_counted_per_copy() -> None:
    broker, pub, sub = broker_pair()
    x = encode({broker.key: 1 << 40 | 1 << 41})
    pub.data_received(encode_data("t", b"p", x))
    assert broker.drops["unattached_port"] == 2
    assert broker.drops["no_route"] == 1


@pytest.mark.parametrize("n", [1, 2, 5])
def test_n_identical_frames_with_a_stray_bit_count_n_drops(n: int) -> None:
    """A decision that counted something is taken afresh for every frame, never repeated."""
    broker, pub, sub = broker_pair()
    x = encode({broker.key: sub.bit | 1 << 40})
    frame = encode_data("t", b"p", x)
    pub.data_received(frame * n)
    assert bytes(sub.transport.written) == forwarded(frame) * n  # type: ignore[union-attr]
    assert broker.drops["unattached_port"] == n
