"""The MQTT codec (dcp/mqtt_codec.py) and the topic mapping (dcp/mqtt_topics.py), pure.

Fuzzed as the dcp codec is (tests/fuzzing.py scales them: ``DCP_FUZZ_EXAMPLES=N``):
random bytes, and valid streams (a CONNECT, then packets of every type) mutated, fed
in any reads.  The decoder yields packets or raises an ``MqttError`` and nothing else;
any split into reads gives a prefix of what one byte at a time gives, and the same
error; it never holds more than ``max_packet`` bytes; every packet it yields encodes
back to bytes that decode to the same packet.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp.errors import LocalProtocolError, RemoteProtocolError
from dcp.mqtt_codec import (
    V5,
    V311,
    Connect,
    Decoder,
    MqttError,
    Packet,
    PubAck,
    Publish,
    Reason,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    encode,
)
from dcp.mqtt_topics import filter_matches, to_dcp_patterns, to_dcp_topic, to_mqtt_topic

from . import mqtt_streams
from .fuzzing import executed, fuzz_settings, split
from .purity import loaded

MAX_PACKET = 512
seeds = st.integers(0, 2**64 - 1)
cuts = st.lists(st.integers(0, 4096), max_size=8)
ops = st.lists(st.tuples(st.sampled_from(mqtt_streams.MUTATIONS), st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4)


def decode(reads: list[bytes], version: int | None = None, max_packet: int = MAX_PACKET) -> tuple[list[Packet], int | None]:
    """Feed ``reads`` then EOF: (the packets, the reason of the error, if any).  Checks on the
    way that the decoder holds at most ``max_packet`` bytes and that each packet re-encodes."""
    decoder = Decoder(version=version, max_packet=max_packet)
    packets: list[Packet] = []
    try:
        for read in [*(r for r in reads if r), b""]:
            version_before = decoder.version
            new = decoder.feed(read)
            assert decoder.buffered <= max_packet
            for packet in new:
                again_in = packet.version if isinstance(packet, Connect) else (decoder.version if version_before is None else version_before)
                assert Decoder(version=None if isinstance(packet, Connect) else again_in, max_packet=1 << 28).feed(encode(packet, again_in or V5)) == [packet]
            packets += new
    except MqttError as exc:
        with pytest.raises(MqttError):  # and it stays failed
            decoder.feed(b"\x00")
        return packets, exc.reason
    return packets, None


def check_any_reads(data: bytes, cut_points: list[int], version: int | None = None) -> tuple[list[Packet], int | None]:
    """Whole, byte at a time and in the given reads: the same packets, or a prefix and the same error."""
    one_by_one, reason = decode([data[i : i + 1] for i in range(len(data))], version)
    for reads in ([data], split(data, cut_points)):
        packets, other = decode(reads, version)
        assert other == reason
        assert packets == one_by_one[: len(packets)]
        if reason is None:
            assert packets == one_by_one
    return one_by_one, reason


# -- round trips ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(seeds, cuts, st.sampled_from((V311, V5)))
def test_every_packet_type_round_trips_in_any_reads(seed: int, cut_points: list[int], version: int) -> None:
    _, packets = mqtt_streams.stream(random.Random(seed), version)
    data, _ = mqtt_streams.encoded(version, packets)
    assert check_any_reads(data, cut_points) == (packets, None)  # a server's decoder: it learns the version
    assert decode([data[len(encode(packets[0])) :]], version, 1 << 20)[0] == packets[1:]  # a client's: told it


def test_what_a_packet_can_carry_depends_on_the_version() -> None:
    with pytest.raises(LocalProtocolError):
        encode(PubAck(1, Reason.NO_MATCHING_SUBSCRIBERS), V311)  # reason codes are 5.0's
    with pytest.raises(LocalProtocolError):
        encode(Publish("t", b"", 0, properties=((0x23, 1),)), V311)
    with pytest.raises(LocalProtocolError):
        encode(UnsubAck(1, (0,)), V311)  # a 3.1.1 UNSUBACK has no reason codes
    with pytest.raises(LocalProtocolError):
        encode(Publish("t", b"", 1, packet_id=0))  # QoS 1 needs a packet identifier
    assert encode(PubAck(7), V5) == encode(PubAck(7), V311) == b"\x40\x02\x00\x07"  # success: the short form
    assert encode(PubAck(7, 0x10), V5) == b"\x40\x03\x00\x07\x10"


# -- hostile bytes ----------------------------------------------------------------------------

V5_CONNECT = encode(Connect("c", V5))
V311_CONNECT = encode(Connect("c", V311))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x00", Reason.MALFORMED_PACKET),  # packet type 0 is reserved
        (b"\x30\x00", Reason.PROTOCOL_ERROR),  # a server's first packet must be CONNECT
        (b"\x10\x0e\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x00", Reason.UNSUPPORTED_PROTOCOL_VERSION),  # MQTT 3.1
        (encode(Connect("c", V5)).replace(b"MQTT\x05", b"MQTT\x06"), Reason.UNSUPPORTED_PROTOCOL_VERSION),
        (V5_CONNECT + b"\x36\x03\x00\x01t", Reason.MALFORMED_PACKET),  # PUBLISH at QoS 3
        (V5_CONNECT + b"\x38\x04\x00\x01t\x00", Reason.MALFORMED_PACKET),  # QoS 0 with DUP
        (V5_CONNECT + b"\x32\x05\x00\x01t\x00\x00", Reason.MALFORMED_PACKET),  # packet identifier 0
        (V5_CONNECT + b"\x30\x80\x00", Reason.MALFORMED_PACKET),  # remaining length not in its shortest form
        (V5_CONNECT + b"\x30\xff\xff\xff\xff\x01", Reason.MALFORMED_PACKET),  # remaining length of 5 bytes
        (V5_CONNECT + b"\x30\xff\x7f", Reason.PACKET_TOO_LARGE),  # told before the body comes
        (V5_CONNECT + b"\x30\x05\x00\x02\xff\xfe\x00", Reason.MALFORMED_PACKET),  # a topic that is not UTF-8
        (V5_CONNECT + b"\x30\x05\x00\x02a\x00\x00", Reason.MALFORMED_PACKET),  # a topic holding U+0000
        (V5_CONNECT + b"\x30\x07\x00\x01t\x04\x23\x00\x01", Reason.MALFORMED_PACKET),  # properties past the end of the packet
        (V5_CONNECT + b"\x30\x07\x00\x01t\x03\x23\x00\x00", Reason.PROTOCOL_ERROR),  # topic alias 0
        (V5_CONNECT + b"\x30\x0a\x00\x01t\x06\x23\x00\x01\x23\x00\x02", Reason.PROTOCOL_ERROR),  # a property twice
        (V5_CONNECT + b"\x30\x07\x00\x01t\x03\x11\x00\x00", Reason.PROTOCOL_ERROR),  # Session Expiry Interval in a PUBLISH
        (V5_CONNECT + b"\x30\x06\x00\x01t\x02\x7f\x00", Reason.MALFORMED_PACKET),  # an unknown property
        (V5_CONNECT + b"\x30\x06\x00\x01t\x02\x01\x02", Reason.PROTOCOL_ERROR),  # Payload Format Indicator 2
        (V5_CONNECT + b"\x80\x05\x00\x01\x00\x00\x00", Reason.MALFORMED_PACKET),  # SUBSCRIBE's fixed flags must be 0010
        (V5_CONNECT + b"\x82\x03\x00\x01\x00", Reason.PROTOCOL_ERROR),  # SUBSCRIBE without topic filters
        (V311_CONNECT + b"\x82\x02\x00\x01", Reason.MALFORMED_PACKET),  # the same in 3.1.1 is malformed
        (V5_CONNECT + b"\x82\x07\x00\x01\x00\x00\x01a\x03", Reason.MALFORMED_PACKET),  # ... a filter at QoS 3
        (V5_CONNECT + b"\x82\x07\x00\x01\x00\x00\x01a\x30", Reason.PROTOCOL_ERROR),  # ... retain handling 3
        (V311_CONNECT + b"\xf0\x00", Reason.MALFORMED_PACKET),  # AUTH is 5.0's; in 3.1.1 type 15 is reserved
        (V311_CONNECT + b"\x40\x03\x00\x01\x00", Reason.MALFORMED_PACKET),  # a 3.1.1 PUBACK has 2 bytes exactly
        (V5_CONNECT + b"\x40\x03\x00\x01\x05", Reason.PROTOCOL_ERROR),  # a PUBACK reason code that does not exist
        (V5_CONNECT + b"\xc0\x01\x00", Reason.MALFORMED_PACKET),  # PINGREQ with a body
        (V5_CONNECT + b"\x30\x05\x00\x01", Reason.MALFORMED_PACKET),  # the stream ends inside a packet
    ],
)
def test_each_broken_rule_is_refused_with_its_reason_code(data: bytes, reason: int) -> None:
    packets, got = check_any_reads(data, [3, 7])
    assert got == reason
    assert all(isinstance(p, Connect) for p in packets)


def test_a_connect_with_reserved_flag_or_bad_will_bits_is_malformed() -> None:
    good = encode(Connect("c", V311))
    flags_at = good.index(b"MQTT\x04") + 5
    for flags in (0x01, 0x08, 0x20, 0x18 | 0x04):  # reserved bit; will QoS or retain without a will; will QoS 3
        bad = good[:flags_at] + bytes([flags]) + good[flags_at + 1 :]
        assert decode([bad])[1] == Reason.MALFORMED_PACKET


def test_the_error_is_a_dcp_remote_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        Decoder().feed(b"\x30\x00")
    assert isinstance(info.value, MqttError) and "CONNECT" in str(info.value)


@pytest.mark.fuzz
@fuzz_settings(300)
@given(st.binary(max_size=400), cuts, st.sampled_from((None, V311, V5)))
def test_fuzz_random_bytes_yield_packets_or_an_mqtt_error(data: bytes, cut_points: list[int], version: int | None) -> None:
    executed["mqtt decoder"] += 1
    prefix = b"" if version is None else (V5_CONNECT if version == V5 else V311_CONNECT)
    check_any_reads(prefix + data, cut_points)


@pytest.mark.fuzz
@fuzz_settings(300)
@given(seeds, ops, cuts)
def test_fuzz_mutated_streams_yield_packets_or_an_mqtt_error(seed: int, mutations: list[tuple[str, int, int]], cut_points: list[int]) -> None:
    executed["mqtt decoder"] += 1
    version, packets = mqtt_streams.stream(random.Random(seed))
    data, starts = mqtt_streams.encoded(version, packets)
    decoded, reason = check_any_reads(mqtt_streams.mutate(data, starts, mutations), cut_points)
    if reason is None:
        assert len(decoded) >= 1 or not data  # a stream that decodes in full holds its CONNECT at least


# -- topics -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mqtt", "dcp"), [("a/b/c", "a.b.c"), ("sensors", "sensors"), ("é/ü-1", "é.ü-1"), ("a b/c", "a b.c")],
)
def test_topic_names_map_both_ways(mqtt: str, dcp: str) -> None:
    assert to_dcp_topic(mqtt) == dcp and to_mqtt_topic(dcp) == mqtt


@pytest.mark.parametrize(
    ("topic_filter", "patterns"),
    [("a/+/c", ("a.*.c",)), ("a/#", ("a", "a.>")), ("#", (">",)), ("+", ("*",)), ("+/b/#", ("*.b", "*.b.>")), ("a/b", ("a.b",))],
)
def test_filters_map_to_the_patterns_that_name_the_same_topics(topic_filter: str, patterns: tuple[str, ...]) -> None:
    assert to_dcp_patterns(topic_filter) == patterns


@pytest.mark.parametrize(
    ("topic", "reason"),
    [("a.b", Reason.TOPIC_NAME_INVALID), ("a//b", Reason.TOPIC_NAME_INVALID), ("/a", Reason.TOPIC_NAME_INVALID),
     ("a/", Reason.TOPIC_NAME_INVALID), ("", Reason.TOPIC_NAME_INVALID), ("a/+", Reason.TOPIC_NAME_INVALID),
     ("a/#", Reason.TOPIC_NAME_INVALID), ("a*", Reason.TOPIC_NAME_INVALID), ("$SYS/x", Reason.TOPIC_NAME_INVALID),
     ("x" * 256, Reason.TOPIC_NAME_INVALID)],
)
def test_topics_without_a_dcp_form_are_refused_with_topic_name_invalid(topic: str, reason: int) -> None:
    with pytest.raises(MqttError) as info:
        to_dcp_topic(topic)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("topic_filter", "reason"),
    [("a/#/b", Reason.TOPIC_FILTER_INVALID), ("a+", Reason.TOPIC_FILTER_INVALID), ("a/b#", Reason.TOPIC_FILTER_INVALID),
     ("a.b/#", Reason.TOPIC_FILTER_INVALID), ("a//#", Reason.TOPIC_FILTER_INVALID), ("", Reason.TOPIC_FILTER_INVALID),
     ("$share/g/a", Reason.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED), ("$SYS/#", Reason.TOPIC_FILTER_INVALID)],
)
def test_filters_without_a_dcp_form_are_refused_with_their_reason(topic_filter: str, reason: int) -> None:
    with pytest.raises(MqttError) as info:
        to_dcp_patterns(topic_filter)
    assert info.value.reason == reason


def test_dcp_topics_without_an_mqtt_form_are_not_delivered() -> None:
    assert [to_mqtt_topic(t) for t in ("a/b.c", "a+.b", "a#", "a.b")] == [None, None, None, "a/b"]


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [("a/#", "a", True), ("a/#", "a/b/c", True), ("a/+", "a", False), ("a/+", "a/b", True), ("+/+", "a/b", True),
     ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("$SYS/#", "$SYS/x", True), ("a/b", "a/b/c", False)],
)
def test_filter_matching_is_mqtts(topic_filter: str, topic: str, matches: bool) -> None:
    assert filter_matches(topic_filter, topic) is matches


def test_a_subscribe_round_trips_its_5_0_options() -> None:
    sub = Subscribe(9, (Subscription("a/#", 2, True, True, 2), Subscription("b", 0)), ((0x0B, 5),))
    assert Decoder(version=V5).feed(encode(sub)) == [sub]
    assert Decoder(version=V311).feed(encode(SubAck(9, (0x80, 1)), V311)) == [SubAck(9, (0x80, 1))]


def test_the_codec_and_the_mapping_import_no_io_modules() -> None:
    assert loaded(["errors", "mqtt_codec", "mqtt_topics"], ["asyncio", "socket", "ssl"]) == "[]"
