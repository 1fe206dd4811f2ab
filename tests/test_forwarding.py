"""The broker's forwarding core (dcp.forwarding), driven directly: no broker, no transport.

A small object stands in for the broker's port state (``key``, ``attached``,
``reserved``, ``table``); the frames are written out field by field, so that every
expected decision (the Write's mask, bytes, size and frame count; each Drop's reason,
count, message and ports) is spelled out.  Most of these were pinned by mutation
testing (docs/mutation.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp.errors import FrameTooLarge, RemoteProtocolError
from dcp.forwarding import DECODED_LIMIT, JOIN_LIMIT, Control, Drop, Forwarder, Write
from dcp.routing import KeyLayout, encode, int_to_bytes
from dcp.wire import SIGNED_ROUTE, Limits

from .test_reference import frame as written_frame

KEY = 65537  # prime, > 2**16: X mod KEY is the out bitmap of 16 ports
TAG = bytes(range(100, 124))  # a route tag: 24 bytes (no verifier checks its MAC unless given one)


@dataclass
class FakePorts:
    """The broker's port state, as the forwarder reads it."""

    key: int = KEY
    attached: int = 0
    reserved: int = 0
    table: dict[bytes, int] = field(default_factory=dict)
    layout: KeyLayout = KeyLayout.single(KEY)
    decoded: dict[int, int] = field(default_factory=dict)


def frame(x: bytes = b"", topic: bytes = b"t", payload: bytes = b"p", **fields: int) -> bytes:
    """A frame, its fixed header written field by field (tests/test_reference.py), payload ``b"p"`` by default."""
    return written_frame(x, topic, payload, **fields)


def data(out: int, topic: bytes = b"t", payload: bytes = b"p", **header: Any) -> bytes:
    """A data frame whose X is ``out + KEY`` (so that only X mod KEY gives ``out``)."""
    x = out + KEY
    return frame(x.to_bytes((x.bit_length() + 7) // 8, "big"), topic, payload, **header)


def control(body: dict[str, Any]) -> bytes:
    return frame(b"", b"", msgpack.packb(body), ftype=2, hops=0, msg_id=0, ts=0)


def less_one(frame_bytes: bytes) -> bytes:
    """The frame as forwarded: its hop limit one lower."""
    return frame_bytes[:3] + bytes([frame_bytes[3] - 1]) + frame_bytes[4:]


class Sent(NamedTuple):
    """A Write with its chunks joined into bytes."""

    mask: int
    data: bytes
    size: int
    frames: int


def plain(decisions: Any) -> list[Any]:
    """The decisions, each Write as a Sent."""
    return [Sent(d.mask, b"".join(bytes(c) for c in d.chunks), d.size, d.frames) if isinstance(d, Write) else d for d in decisions]


def forwarder(port: int = 0, attached: int = 0xFFFF, *, reserved: int = 0, limits: Limits | None = None,
              **options: Any) -> tuple[Forwarder, FakePorts]:
    ports = FakePorts(attached=attached, reserved=reserved)
    fw = Forwarder(ports, limits or Limits(), **options)
    if port >= 0:
        fw.attach(port)
    return fw, ports


class FakeVerifier:
    """A route check that answers ``reason`` and records what it was asked."""

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason
        self.calls: list[tuple[bytes, int, bytes, float]] = []

    def check(self, field: bytes, x_len: int, topic: bytes, now: float) -> str | None:
        self.calls.append((field, x_len, topic, now))
        return self.reason


# --------------------------------------------------------------------------- the decision


def test_a_data_frame_goes_to_x_mod_key_but_the_ingress() -> None:
    fw, _ = forwarder(port=1)
    f = data(0b1110)
    assert plain(fw.receive(f)) == [Sent(0b1100, less_one(f), len(f), 1)]
    assert fw.frames_in == 1 and fw.held == 0


LAYOUT = KeyLayout.random(300, rng=random.Random(7))


def test_with_many_keys_a_frame_goes_where_its_decoded_x_says_and_the_decoding_is_memoised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ports in the root and in two banks; the second frame with that X is not decoded
    again; a flood of distinct numbers empties the memo instead of growing it."""
    ports = FakePorts(key=LAYOUT.root, attached=(1 << 300) - 1, layout=LAYOUT)
    fw = Forwarder(ports, Limits())
    fw.attach(5)
    out = 1 << 3 | 1 << 5 | 1 << 70 | 1 << 299
    x = encode(LAYOUT.residues(out))
    f = frame(int_to_bytes(x))
    assert plain(fw.receive(f)) == [Sent(out & ~(1 << 5), less_one(f), len(f), 1)]
    assert ports.decoded == {x: out}
    monkeypatch.setattr(KeyLayout, "decode", lambda self, x: pytest.fail("decoded again"))
    assert plain(fw.receive(f)) == [Sent(out & ~(1 << 5), less_one(f), len(f), 1)]
    monkeypatch.undo()
    ports.decoded.update((-i, 0) for i in range(1, DECODED_LIMIT))  # full
    other = frame(int_to_bytes(encode(LAYOUT.residues(1 << 100))))
    assert plain(fw.receive(other)) == [Sent(1 << 100, less_one(other), len(other), 1)]
    assert len(ports.decoded) == 1


def test_a_defaults_forwarder_is_stateless_without_a_verifier() -> None:
    fw = Forwarder(FakePorts(attached=0b11), Limits())
    assert (fw.port, fw.stateless, fw.verifier, fw.frames_in, fw.held) == (-1, True, None, 0, 0)
    assert fw.refusal == "data frame before hello"
    fw.attach(0)
    assert (fw.port, fw.not_bit) == (0, ~1)
    f = data(0b10)
    assert plain(fw.receive(f)) == [Sent(0b10, less_one(f), len(f), 1)]


def test_runs_of_frames_with_the_same_mask_are_one_write_each() -> None:
    fw, _ = forwarder(port=0)
    a1, a2, b1, a3 = data(0b10, payload=b"1"), data(0b10, payload=b"22"), data(0b100, payload=b"3"), data(0b10, topic=b"u")
    got = plain(fw.receive(a1 + a2 + b1 + a3))
    assert got == [
        Sent(0b10, less_one(a1) + less_one(a2), len(a1) + len(a2), 2),
        Sent(0b100, less_one(b1), len(b1), 1),
        Sent(0b10, less_one(a3), len(a3), 1),
    ]
    assert fw.frames_in == 4


def test_a_dropped_frame_ends_a_run_and_is_not_written() -> None:
    fw, _ = forwarder(port=0)
    a, dropped, b = data(0b10, payload=b"a"), data(0b10, payload=b"x", hops=0), data(0b10, payload=b"b")
    got = plain(fw.receive(a + dropped + b))
    assert got == [  # a drop is given when decided, a write when its run ends
        Drop("hop_limit", 1, "frame arrived with a hop limit of 0"),
        Sent(0b10, less_one(a), len(a), 1),
        Sent(0b10, less_one(b), len(b), 1),
    ]
    assert fw.frames_in == 3


def test_a_frame_with_a_hop_limit_of_1_is_forwarded_with_0() -> None:
    fw, _ = forwarder(port=0)
    f = data(0b10, hops=1)
    [write] = plain(fw.receive(f))
    assert write.data[3] == 0 and write == Sent(0b10, less_one(f), len(f), 1)


def test_repeated_frames_reuse_a_clean_decision_but_not_one_that_counted() -> None:
    fw, ports = forwarder(port=0, attached=0b11)
    f = data(0b10)
    assert plain(fw.receive(f * 3)) == [Sent(0b10, less_one(f) * 3, 3 * len(f), 3)]
    g = data(0b110)  # bit 2 unattached: counted for every frame, never repeated
    assert plain(fw.receive(g * 2)) == [
        Drop("unattached_port", 1), Drop("unattached_port", 1), Sent(0b10, less_one(g) * 2, 2 * len(g), 2),
    ]
    assert fw.frames_in == 5


def test_a_repeat_after_a_control_frame_is_decided_afresh() -> None:
    fw, ports = forwarder(port=0, attached=0b11)
    f = data(0b10)
    decisions = fw.receive(f + control({"op": "ping"}) + f)
    assert plain([next(decisions), next(decisions)]) == [Sent(0b10, less_one(f), len(f), 1), Control({"op": "ping"})]
    ports.attached = 0b1  # the control frame detached port 1
    assert plain(decisions) == [Drop("unattached_port", 1), Drop("no_route", 1)]


def test_the_drops_of_a_decision_come_before_its_write_in_order() -> None:
    fw, _ = forwarder(port=0, attached=0b11, reserved=0b1100000)
    f = data(0b1110010)  # 1: attached; 4: unattached; 5, 6: links that are down
    assert plain(fw.receive(f)) == [
        Drop("link_down", 2, "", 0b1100000),
        Drop("unattached_port", 1),
        Sent(0b10, less_one(f), len(f), 1),
    ]


def test_a_frame_for_down_links_only_is_no_route() -> None:
    fw, _ = forwarder(port=0, attached=0b1, reserved=0b110)
    assert plain(fw.receive(data(0b110))) == [Drop("link_down", 2, "", 0b110), Drop("no_route", 1)]


def test_a_frame_for_the_ingress_only_is_no_route_and_counts_nothing_else() -> None:
    fw, _ = forwarder(port=3, attached=0b1000)
    assert plain(fw.receive(data(0b1000))) == [Drop("no_route", 1)]
    assert plain(fw.receive(data(0))) == [Drop("no_route", 1)]


@settings(max_examples=200, deadline=None)
@given(out=st.integers(0, 0xFFFF), attached=st.integers(0, 0xFFFF), reserved=st.integers(0, 0xFFFF), port=st.integers(0, 15))
def test_every_bit_of_the_out_bitmap_is_written_or_counted_once(out: int, attached: int, reserved: int, port: int) -> None:
    attached |= 1 << port
    reserved &= ~attached
    fw, _ = forwarder(port=port, attached=attached, reserved=reserved)
    f = data(out)
    mask = out & attached & ~(1 << port)
    expected: list[Any] = []
    if out & reserved:
        expected.append(Drop("link_down", (out & reserved).bit_count(), "", out & reserved))
    if out & ~attached & ~reserved:
        expected.append(Drop("unattached_port", (out & ~attached & ~reserved).bit_count()))
    expected.append(Sent(mask, less_one(f), len(f), 1) if mask else Drop("no_route", 1))
    assert plain(fw.receive(f)) == expected


def test_stateful_mode_routes_by_the_topic_table() -> None:
    fw, ports = forwarder(port=1, attached=0b111, stateless=False)
    ports.table = {b"t": 0b101, b"u": 0b10}
    f = frame(b"\x02", b"t")  # X is ignored
    assert plain(fw.receive(f)) == [Sent(0b101, less_one(f), len(f), 1)]
    assert plain(fw.receive(frame(b"", b"u"))) == [Drop("no_route", 1)]
    assert plain(fw.receive(frame(b"\x02\x05", b"v"))) == [Drop("no_route", 1)]  # no subscriber, not port 0
    g = frame(b"\x00\x01", b"t", flags=SIGNED_ROUTE)  # stateful: no route tag is looked for
    assert plain(fw.receive(g)) == [Sent(0b101, less_one(g), len(g), 1)]


# --------------------------------------------------------------------------- X: its tag and its size


def test_a_signed_x_is_the_bytes_before_its_tag() -> None:
    fw, _ = forwarder(port=0)
    x = (0b100 + KEY).to_bytes(3, "big")
    f = frame(x + TAG, flags=SIGNED_ROUTE)
    assert plain(fw.receive(f)) == [Sent(0b100, less_one(f), len(f), 1)]
    g = frame(TAG, flags=SIGNED_ROUTE)  # X of no bytes: 0
    assert plain(fw.receive(g)) == [Drop("no_route", 1)]


def test_a_signed_x_field_shorter_than_its_tag_is_forged() -> None:
    fw, _ = forwarder(port=0)
    assert plain(fw.receive(frame(TAG[:-1], flags=SIGNED_ROUTE))) == [
        Drop("route_forged", 1, "a signed route shorter than its tag")
    ]
    assert fw.frames_in == 1


def test_an_x_over_max_x_bits_is_dropped_and_one_of_max_x_bits_is_not() -> None:
    fw, _ = forwarder(port=0, limits=Limits(max_x_bits=24))
    big = frame((1 << 24 | 0b10).to_bytes(4, "big"))
    assert plain(fw.receive(big)) == [Drop("route_too_large", 1, "topology number of 25 bits exceeds max_x_bits=24")]
    x = (1 << 23) + (0b10 - (1 << 23)) % KEY  # 24 bits, X mod KEY = 0b10
    assert x.bit_length() == 24 and x % KEY == 0b10
    ok = frame(x.to_bytes(3, "big"))
    assert plain(fw.receive(ok)) == [Sent(0b10, less_one(ok), len(ok), 1)]


def test_a_long_x_field_with_leading_zero_bytes_is_counted_in_bits() -> None:
    fw, _ = forwarder(port=0, limits=Limits(max_x_bits=16))
    f = frame(b"\x00" * 10 + b"\x02")  # 11 bytes, 2 bits
    assert plain(fw.receive(f)) == [Sent(0b10, less_one(f), len(f), 1)]
    g = frame(b"\x00" * 10 + (1 << 16).to_bytes(3, "big"))  # 17 bits
    assert plain(fw.receive(g)) == [Drop("route_too_large", 1, "topology number of 17 bits exceeds max_x_bits=16")]
    signed = frame(b"\x00" * 3 + b"\x02" + TAG, flags=SIGNED_ROUTE)  # the tag is not X: 4 bytes, 2 bits
    assert plain(fw.receive(signed)) == [Sent(0b10, less_one(signed), len(signed), 1)]


# --------------------------------------------------------------------------- --verify-routes


def test_a_verifier_is_asked_about_the_whole_field_the_x_length_the_topic_and_the_time() -> None:
    verifier = FakeVerifier()
    fw, _ = forwarder(port=0, verifier=verifier, clock=lambda: 1234.5)
    x = (0b10 + KEY).to_bytes(3, "big")
    f = frame(x + TAG, b"topic", flags=SIGNED_ROUTE)
    assert plain(fw.receive(f)) == [Sent(0b10, less_one(f), len(f), 1)]
    assert verifier.calls == [(x + TAG, 3, b"topic", 1234.5)]


def test_a_verifier_refuses_an_unsigned_route() -> None:
    verifier = FakeVerifier()
    fw, _ = forwarder(port=0, verifier=verifier)
    assert plain(fw.receive(data(0b10))) == [
        Drop("route_unsigned", 1, "this broker forwards only topology numbers signed by the orchestrator")
    ]
    assert verifier.calls == []


@pytest.mark.parametrize("reason, why", [
    ("route_expired", "expired"),
    ("route_forged", "not signed with this broker's secret, or altered"),
])
def test_a_refused_tag_is_dropped_for_the_verifiers_reason(reason: str, why: str) -> None:
    fw, _ = forwarder(port=0, verifier=FakeVerifier(reason), clock=lambda: 1.0)
    f = frame(b"\x02" + TAG, b"a/b\xff", flags=SIGNED_ROUTE)
    assert plain(fw.receive(f)) == [Drop(reason, 1, f"the route tag of topic 'a/b\ufffd' is {why}")]
    assert fw.frames_in == 1


def test_a_verified_forwarder_still_refuses_a_forged_short_field_first() -> None:
    verifier = FakeVerifier()
    fw, _ = forwarder(port=0, verifier=verifier)
    assert plain(fw.receive(frame(b"\x02", flags=SIGNED_ROUTE))) == [
        Drop("route_forged", 1, "a signed route shorter than its tag")
    ]
    assert verifier.calls == []


def test_the_default_clock_is_the_wall_clock() -> None:
    import time

    verifier = FakeVerifier()
    fw, _ = forwarder(port=0, verifier=verifier)
    before = time.time()
    list(fw.receive(frame(b"\x02" + TAG, flags=SIGNED_ROUTE)))
    [(_, _, _, now)] = verifier.calls
    assert before <= now <= time.time()


# --------------------------------------------------------------------------- other frames


def test_a_control_frame_is_passed_on_decoded() -> None:
    fw, _ = forwarder(port=-1)
    assert plain(fw.receive(control({"op": "hello", "id": 1}))) == [Control({"op": "hello", "id": 1})]
    assert fw.frames_in == 0


def test_a_control_frame_over_max_control_ends_the_stream() -> None:
    limits = Limits(max_frame=1000, max_control=10)
    fw, _ = forwarder(port=0, limits=limits)
    body = {"op": "ping", "pad": "x" * 10}
    size = len(msgpack.packb(body))
    with pytest.raises(FrameTooLarge) as raised:
        list(fw.receive(control(body)))
    assert str(raised.value) == f"control frame of {size} bytes exceeds max_control=10"


def test_a_control_frame_with_an_x_field_ends_the_stream() -> None:
    fw, _ = forwarder(port=0)
    with pytest.raises(RemoteProtocolError) as raised:
        list(fw.receive(frame(b"\x01", b"", msgpack.packb({"op": "ping"}), ftype=2)))
    assert str(raised.value) == "control frame carries a topology number or topic"


def test_a_control_frame_is_decoded_within_the_forwarders_limits() -> None:
    limits = Limits(max_frame=1 << 20, max_control=1 << 20)
    body = {"op": "ping", "pad": "x" * 70_000}  # over the default max_control (64 KiB)
    fw, _ = forwarder(port=0, limits=limits)
    assert plain(fw.receive(control(body))) == [Control(body)]


def test_an_unknown_frame_type_is_dropped_and_the_stream_goes_on() -> None:
    fw, _ = forwarder(port=0)
    f = data(0b10)
    assert plain(fw.receive(frame(b"", b"t", ftype=3) + f)) == [
        Drop("rejected", 1, "unknown frame type 3"),
        Sent(0b10, less_one(f), len(f), 1),
    ]
    assert fw.frames_in == 1


def test_data_before_hello_is_rejected_and_ends_the_stream_after_the_frames_before_it() -> None:
    fw, _ = forwarder(port=-1)
    decisions = fw.receive(control({"op": "ping"}) + data(0b10) + control({"op": "stats"}))
    assert next(decisions) == Control({"op": "ping"})
    assert next(decisions) == Drop("rejected", 1)
    with pytest.raises(RemoteProtocolError) as raised:
        next(decisions)
    assert str(raised.value) == "data frame before hello" and fw.frames_in == 0
    fw.refusal = "an admin connection cannot publish"
    with pytest.raises(RemoteProtocolError, match="^an admin connection cannot publish$"):
        list(fw.receive(data(0b10)))


def test_data_from_an_unattached_connection_is_not_counted_as_frames_in() -> None:
    fw, _ = forwarder(port=-1)
    with pytest.raises(RemoteProtocolError):
        list(fw.receive(data(0b10)))
    assert fw.frames_in == 0


def test_the_frames_before_a_bad_header_are_decided_then_it_raises() -> None:
    fw, _ = forwarder(port=0)
    a, b = data(0b10, payload=b"a"), data(0b100, payload=b"bb")  # b: X, topic and payload of 3, 1 and 2 bytes
    decisions = fw.receive(a + b + frame(version=2))
    assert plain([next(decisions), next(decisions)]) == [Sent(0b10, less_one(a), len(a), 1), Sent(0b100, less_one(b), len(b), 1)]
    with pytest.raises(RemoteProtocolError, match=r"^unsupported wire version 2 \(expected 1\)$"):
        next(decisions)
    assert fw.frames_in == 2
    assert fw.held == 0 and fw.eof() is None  # what cannot be delimited is no frame left incomplete
    fw2, _ = forwarder(port=0)
    with pytest.raises(RemoteProtocolError, match="unsupported wire version 2"):
        list(fw2.receive(frame(version=2) + a))
    assert fw2.frames_in == 0


def test_frames_in_counts_the_frames_decided_before_iteration_stops() -> None:
    fw, _ = forwarder(port=0)
    f = data(0b10)
    decisions = fw.receive(f + control({"op": "ping"}) + f)
    next(decisions)
    assert next(decisions) == Control({"op": "ping"})
    decisions.close()  # type: ignore[attr-defined]  # a control frame closed the connection
    assert fw.frames_in == 1


# --------------------------------------------------------------------------- frames across reads


def test_a_frame_split_at_every_byte_is_forwarded_whole() -> None:
    f, g = data(0b10, payload=b"first"), data(0b100, payload=b"second")
    stream = f + g
    for cut in range(1, len(stream)):
        fw, _ = forwarder(port=0)
        got = plain(fw.receive(stream[:cut])) + plain(fw.receive(stream[cut:]))
        joined = [(d.mask, d.data) for d in got]
        assert b"".join(c for _, c in joined) == less_one(f) + less_one(g), cut
        assert {m for m, _ in joined} == {0b10, 0b100}
        assert fw.held == 0 and fw.frames_in == 2


def test_what_is_held_is_the_incomplete_tail_and_eof_reports_it() -> None:
    fw, _ = forwarder(port=0)
    f = data(0b10)
    assert plain(fw.receive(f + f[:10])) == [Sent(0b10, less_one(f), len(f), 1)]
    assert fw.held == 10
    assert fw.eof() == Drop("truncated", 1, "stream ended inside a frame (10 bytes held)")
    assert fw.held == 0 and fw.eof() is None


def test_a_short_first_read_is_held() -> None:
    fw, _ = forwarder(port=0)
    f = data(0b10)
    assert plain(fw.receive(f[:27])) == []
    assert fw.held == 27
    assert plain(fw.receive(f[27:])) == [Sent(0b10, less_one(f), len(f), 1)]
    assert fw.held == 0


def test_a_header_whose_frame_spans_reads_is_held_as_is() -> None:
    fw, _ = forwarder(port=0)
    f = data(0b10, payload=b"0123456789")
    assert plain(fw.receive(f[:28])) == []
    assert fw.held == 28
    assert plain(fw.receive(f[28:-1])) == []
    assert fw.held == len(f) - 1
    assert plain(fw.receive(f[-1:] + f)) == [Sent(0b10, less_one(f) * 2, 2 * len(f), 2)]


def test_close_forgets_what_is_held() -> None:
    fw, _ = forwarder(port=0)
    list(fw.receive(data(0b10)[:5]))
    fw.close()
    assert fw.held == 0 and fw.eof() is None


def test_eof_with_nothing_held_is_none() -> None:
    fw, _ = forwarder(port=0)
    list(fw.receive(data(0b10)))
    assert fw.eof() is None


def test_a_bad_header_completed_by_a_later_read_ends_the_stream() -> None:
    fw, _ = forwarder(port=0, limits=Limits(max_frame=100, max_control=100))
    big = frame(payload=b"x" * 100)
    assert plain(fw.receive(big[:20])) == []
    with pytest.raises(FrameTooLarge, match=r"^frame of 129 bytes exceeds max_frame=100$"):
        list(fw.receive(big[20:40]))


def test_a_large_frame_over_reads_goes_out_as_those_reads_uncopied() -> None:
    limits = Limits(max_frame=4 * JOIN_LIMIT)
    fw, _ = forwarder(port=0, limits=limits)
    big = data(0b10, topic=b"t", payload=bytes(range(256)) * (JOIN_LIMIT // 256 + 1))  # X (3 bytes) longer than the topic
    after = data(0b100)
    reads = [big[:20], big[20:30], big[30:40000], big[40000:] + after]  # header and X straddle reads
    got: list[Any] = []
    for read in reads[:-1]:
        got += fw.receive(read)
        assert got == []
    decisions = list(fw.receive(reads[-1]))
    [write, rest] = decisions
    assert isinstance(write, Write)
    assert write.mask == 0b10 and write.frames == 1 and write.size == len(big)
    assert len(write.chunks) == 3  # the header, X and topic copied; the two later reads as they came
    assert b"".join(bytes(c) for c in write.chunks) == less_one(big)
    assert write.chunks[1].obj is reads[2]  # uncopied
    assert plain([rest]) == [Sent(0b100, less_one(after), len(after), 1)]
    assert fw.frames_in == 2 and fw.held == 0


def test_a_large_frame_that_ends_a_read_leaves_nothing_held() -> None:
    fw, _ = forwarder(port=0, limits=Limits(max_frame=4 * JOIN_LIMIT))
    big = data(0b10, payload=b"z" * (JOIN_LIMIT + 1))
    assert list(fw.receive(big[:100])) == []
    [write] = plain(fw.receive(big[100:]))
    assert write == Sent(0b10, less_one(big), len(big), 1)
    assert fw.held == 0 and fw.frames_in == 1


def test_a_frame_of_exactly_the_join_limit_is_joined_with_the_rest_of_the_read() -> None:
    fw, _ = forwarder(port=0, limits=Limits(max_frame=4 * JOIN_LIMIT))
    f = data(0b10)
    big = data(0b10, payload=b"z" * (JOIN_LIMIT - len(f) + 1))
    assert len(big) == JOIN_LIMIT
    assert list(fw.receive(big[:100])) == []
    assert plain(fw.receive(big[100:] + f)) == [Sent(0b10, less_one(big) + less_one(f), len(big) + len(f), 2)]
    fw2, _ = forwarder(port=0, limits=Limits(max_frame=4 * JOIN_LIMIT))
    bigger = data(0b10, payload=b"z" * (JOIN_LIMIT - len(f) + 2))
    list(fw2.receive(bigger[:100]))
    got = plain(fw2.receive(bigger[100:] + f))
    assert got == [Sent(0b10, less_one(bigger), len(bigger), 1), Sent(0b10, less_one(f), len(f), 1)]


@pytest.mark.parametrize("case", ["hops0", "no_route", "unknown", "control", "before_hello"])
def test_a_large_frame_over_reads_is_decided_like_any_other(case: str) -> None:
    limits = Limits(max_frame=4 * JOIN_LIMIT, max_control=4 * JOIN_LIMIT)
    fw, _ = forwarder(port=-1 if case == "before_hello" else 0, attached=0b1, limits=limits)
    payload = b"q" * (JOIN_LIMIT + 10)
    if case == "control":
        body = {"op": "ping", "pad": payload.decode()}
        big = control(body)
    else:
        big = data(0b10 if case != "no_route" else 0b1, payload=payload, hops=0 if case == "hops0" else 5,
                   ftype=3 if case == "unknown" else 1)
    assert list(fw.receive(big[:50])) == []
    decisions = fw.receive(big[50:])
    if case == "before_hello":
        assert next(decisions) == Drop("rejected", 1)
        with pytest.raises(RemoteProtocolError, match="^data frame before hello$"):
            next(decisions)
        assert fw.frames_in == 0
        return
    expected = {
        "hops0": [Drop("hop_limit", 1, "frame arrived with a hop limit of 0")],
        "no_route": [Drop("no_route", 1)],
        "unknown": [Drop("rejected", 1, "unknown frame type 3")],
        "control": [Control(body)] if case == "control" else [],
    }[case]
    assert list(decisions) == expected
    assert fw.frames_in == (0 if case in ("unknown", "control") else 1)


def test_the_drops_of_a_large_frame_are_given_once() -> None:
    fw, _ = forwarder(port=0, attached=0b11, limits=Limits(max_frame=4 * JOIN_LIMIT))
    big = data(0b1010, payload=b"q" * (JOIN_LIMIT + 10))
    list(fw.receive(big[:50]))
    got = plain(fw.receive(big[50:]))
    assert got == [Drop("unattached_port", 1), Sent(0b10, less_one(big), len(big), 1)]
    f = data(0b10)
    assert plain(fw.receive(f)) == [Sent(0b10, less_one(f), len(f), 1)]


def test_frames_for_port_0_only_are_forwarded() -> None:
    fw, _ = forwarder(port=1, attached=0b11)
    f = data(0b1)
    assert plain(fw.receive(f)) == [Sent(0b1, less_one(f), len(f), 1)]
    big = data(0b1, payload=b"q" * (JOIN_LIMIT + 10))
    fw2, _ = forwarder(port=1, attached=0b11, limits=Limits(max_frame=4 * JOIN_LIMIT))
    assert list(fw2.receive(big[:100])) == []
    assert plain(fw2.receive(big[100:])) == [Sent(0b1, less_one(big), len(big), 1)]


def test_a_read_of_one_28_byte_frame_is_decided_at_once() -> None:
    fw, _ = forwarder(port=0)
    assert plain(fw.receive(frame(b"", b"", b"", ftype=3))) == [Drop("rejected", 1, "unknown frame type 3")]
    assert fw.held == 0
    fw2, ports = forwarder(port=0, stateless=False)
    ports.table = {b"": 0b10}
    f = frame(b"", b"", b"")
    assert len(f) == 28 and plain(fw2.receive(f)) == [Sent(0b10, less_one(f), 28, 1)]


def test_a_run_ended_by_a_drop_or_a_control_frame_has_its_own_size() -> None:
    fw, _ = forwarder(port=0)
    a, b, c = data(0b10, payload=b"a"), data(0b100, payload=b"bb"), data(0b1000, payload=b"ccc")
    dropped = data(0b10, hops=0)
    ping = control({"op": "ping"})
    got = plain(fw.receive(a + b + dropped + c + ping))
    assert got == [
        Sent(0b10, less_one(a), len(a), 1),
        Drop("hop_limit", 1, "frame arrived with a hop limit of 0"),
        Sent(0b100, less_one(b), len(b), 1),
        Sent(0b1000, less_one(c), len(c), 1),
        Control({"op": "ping"}),
    ]


def test_a_repeated_route_is_verified_once_per_read() -> None:
    verifier = FakeVerifier()
    fw, _ = forwarder(port=0, verifier=verifier, clock=lambda: 5.0)
    f = frame(b"\x02" + TAG, flags=SIGNED_ROUTE)
    assert plain(fw.receive(f * 3)) == [Sent(0b10, less_one(f) * 3, 3 * len(f), 3)]
    assert verifier.calls == [(b"\x02" + TAG, 1, b"t", 5.0)]
    assert plain(fw.receive(f)) == [Sent(0b10, less_one(f), len(f), 1)]
    assert len(verifier.calls) == 2  # a new read: checked afresh
