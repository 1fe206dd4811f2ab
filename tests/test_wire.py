"""Tests of the sans-I/O wire codec dcp.wire, in the style of h11's tests.

Round trips through every encoder, every way of chunking a stream, fuzzing with random
and mutated streams, and the limits that bound every buffer.
"""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import example, given, settings, strategies as st

from dcp.errors import (
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    RouteTooLarge,
    TruncatedFrame,
)
from dcp.wire import (
    CONTROL,
    DATA,
    DEFAULT_HOPS,
    HEADER,
    HEADER_SIZE,
    HOPS_OFFSET,
    SIGNED_ROUTE,
    VERSION,
    ControlFrame,
    DataEncoder,
    DataFrame,
    Decoder,
    Limits,
    Rejected,
    decode_control,
    encode_control,
    encode_data,
)

from .fuzzing import apply_mutations, executed, fuzz_settings, mutations, seeded_stream, seeds, split

U64 = 2**64 - 1
DEFAULT = Limits()
SMALL = Limits(max_frame=4096, max_topic=64, max_x_bits=256, max_control=1024)


# --------------------------------------------------------------------------- strategies

def topics(limits: Limits = DEFAULT, max_chars: int = 40) -> st.SearchStrategy[str]:
    return st.text(max_size=max_chars).filter(lambda t: len(t.encode()) <= limits.max_topic)


def _randbytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


small_payloads = st.binary(max_size=300)
payloads = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=4096),
    # larger than DataEncoder's default join_limit (8192): the uncopied path
    st.builds(_randbytes, st.integers(8193, 20 * 1024), st.integers(0, 2**32)),
)


@st.composite
def data_frames(
    draw: st.DrawFn,
    limits: Limits = DEFAULT,
    payload: st.SearchStrategy[bytes] = payloads,
    max_route_bits: int = 512,
) -> DataFrame:
    return DataFrame(
        topic=draw(topics(limits, min(40, limits.max_topic))),
        payload=draw(payload),
        route=draw(st.one_of(st.integers(0, 2**64), st.integers(0, 2**max_route_bits))),
        hops=draw(st.integers(0, 255)),
        msg_id=draw(st.integers(0, U64)),
        timestamp_ns=draw(st.integers(0, U64)),
        flags=draw(st.integers(0, 255)) & ~SIGNED_ROUTE,  # signed frames carry a tag: tests/test_route_auth.py
    )


_values = st.one_of(
    st.text(max_size=20),
    st.integers(-(2**63), U64),
    st.binary(max_size=20),
    st.booleans(),
    st.none(),
)
control_bodies = st.builds(
    lambda op, rest: {**rest, "op": op},
    st.text(max_size=12),
    st.dictionaries(st.text(max_size=8), _values, max_size=4),
)
control_frames = control_bodies.map(ControlFrame)


def frames(limits: Limits = DEFAULT, payload: st.SearchStrategy[bytes] = payloads, max_route_bits: int = 512):
    return st.one_of(data_frames(limits, payload, max_route_bits), control_frames)


# --------------------------------------------------------------------------- helpers

def encode_frame(frame, how: str = "encode_data", encoder: DataEncoder | None = None, limits: Limits = DEFAULT) -> bytes:
    if isinstance(frame, ControlFrame):
        return encode_control(frame.body, limits)
    kwargs = dict(hops=frame.hops, msg_id=frame.msg_id, timestamp_ns=frame.timestamp_ns, flags=frame.flags)
    if how == "encode_data":
        return encode_data(frame.topic, frame.payload, frame.route, limits=limits, **kwargs)
    if how == "bytes_topic":
        return encode_data(frame.topic.encode(), frame.payload, frame.route, limits=limits, **kwargs)
    if how == "memoryview":
        return encode_data(frame.topic, memoryview(frame.payload), frame.route, limits=limits, **kwargs)
    assert how == "DataEncoder"
    encoder = encoder or DataEncoder(limits)
    return b"".join(encoder.encode(frame.topic, frame.payload, frame.route, **kwargs))


def encode_stream(frame_list, how: str = "encode_data", limits: Limits = DEFAULT) -> bytes:
    encoder = DataEncoder(limits, cache_size=3, join_limit=1000)
    return b"".join(encode_frame(f, how, encoder, limits) for f in frame_list)


def norm(event):
    """Events as comparable values (exceptions do not compare equal)."""
    if isinstance(event, Rejected):
        return ("rejected", type(event.error), str(event.error), event.msg_id)
    return event


def feed_chunks(decoder: Decoder, chunks) -> list:
    events = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
        assert decoder.buffered <= decoder.limits.max_frame
    return events


def data_header(*, version=VERSION, ftype=DATA, flags=0, hops=0, x_len=0, topic_len=0, payload_len=0, msg_id=0, ts=0) -> bytes:
    return HEADER.pack(version, ftype, flags, hops, x_len, topic_len, payload_len, msg_id, ts)


# --------------------------------------------------------------------------- round trip

@given(st.lists(frames(), max_size=6), st.sampled_from(["encode_data", "DataEncoder", "bytes_topic", "memoryview"]))
@settings(max_examples=60)
def test_round_trip(frame_list, how) -> None:
    stream = encode_stream(frame_list, how)
    decoder = Decoder()
    events = decoder.feed(stream) if stream else []
    assert events == frame_list
    for event, frame in zip(events, frame_list):
        assert type(event) is type(frame)
        if isinstance(frame, DataFrame):
            assert type(event.payload) is bytes
            assert (event.topic, event.payload, event.route, event.hops, event.msg_id, event.timestamp_ns, event.flags) == tuple(frame)
        else:
            assert event.body == frame.body
            assert event.op == frame.body["op"]
    assert decoder.buffered == 0
    assert decoder.feed(b"") == []


@given(st.lists(frames(), max_size=6))
@settings(max_examples=30)
def test_all_encoders_produce_identical_bytes(frame_list) -> None:
    reference = encode_stream(frame_list, "encode_data")
    for how in ("DataEncoder", "bytes_topic", "memoryview"):
        assert encode_stream(frame_list, how) == reference


def test_data_encoder_cache_is_keyed_by_topic_and_route() -> None:
    encoder = DataEncoder(cache_size=2)
    a = encoder.encode("t", b"p", 5)
    b = encoder.encode("t", b"p", 6)
    c = encoder.encode("u", b"p", 5)
    d = encoder.encode("t", b"p", 5)  # after the cache was cleared
    assert a == d != b != c
    events = Decoder().feed(b"".join(a + b + c))
    assert [(e.topic, e.route) for e in events] == [("t", 5), ("t", 6), ("u", 5)]


def test_many_distinct_topics() -> None:
    """Topics decode right across the decoder's topic cache, however many there are."""
    names = [f"t/{i}" for i in range(1500)] + ["t/7", "t/1499", "é/ü"] * 3
    stream = b"".join(encode_data(name, name.encode()[::-1], i) for i, name in enumerate(names))
    decoder = Decoder()
    events = feed_chunks(decoder, [stream[i : i + 997] for i in range(0, len(stream), 997)])
    assert [(e.topic, e.payload, e.route) for e in events] == [
        (name, name.encode()[::-1], i) for i, name in enumerate(names)
    ]


def test_defaults_round_trip() -> None:
    [event] = Decoder().feed(encode_data("a/b", b"xyz"))
    assert event == DataFrame("a/b", b"xyz", 0, DEFAULT_HOPS, 0, 0, 0)
    [event] = Decoder().feed(encode_data("", b""))
    assert event == DataFrame("", b"")


# --------------------------------------------------------------------------- chunking

@given(st.lists(frames(payload=small_payloads), min_size=1, max_size=5), st.data())
@settings(max_examples=60)
def test_chunking_gives_same_events(frame_list, data) -> None:
    stream = encode_stream(frame_list)
    whole = Decoder().feed(stream)
    assert whole == frame_list

    decoder = Decoder()
    one_by_one = feed_chunks(decoder, (stream[i : i + 1] for i in range(len(stream))))
    assert one_by_one == whole
    assert decoder.feed(b"") == []

    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    decoder = Decoder()
    assert feed_chunks(decoder, split(stream, cuts)) == whole
    assert decoder.buffered == 0
    assert decoder.feed(b"") == []


@given(data_frames(payload=st.builds(_randbytes, st.integers(8193, 20 * 1024), st.integers(0, 2**32))),
       st.lists(st.integers(0, 25 * 1024), max_size=40))
@settings(max_examples=20)
def test_chunking_large_frame(frame, cuts) -> None:
    stream = encode_frame(frame) + encode_control({"op": "fence"})
    decoder = Decoder()
    events = feed_chunks(decoder, split(stream, cuts))
    assert events == [frame, ControlFrame({"op": "fence"})]
    assert decoder.feed(b"") == []


@given(st.lists(frames(payload=small_payloads), min_size=1, max_size=4), st.data())
@settings(max_examples=60)
def test_eof_inside_frame_raises_truncated(frame_list, data) -> None:
    stream = encode_stream(frame_list)
    end = data.draw(st.integers(1, len(stream) - 1), label="end")
    boundaries = set()
    pos = 0
    for f in frame_list:
        pos += len(encode_frame(f))
        boundaries.add(pos)
    decoder = Decoder()
    decoder.feed(stream[:end])
    if end in boundaries:
        assert decoder.feed(b"") == []
    else:
        with pytest.raises(TruncatedFrame) as info:
            decoder.feed(b"")
        assert isinstance(info.value, ProtocolError)
        with pytest.raises(ProtocolError):
            decoder.feed(b"more")


@given(st.lists(frames(payload=small_payloads), min_size=1, max_size=4),
       st.lists(st.integers(0, 2000), max_size=10),
       st.sampled_from([bytes, bytearray, memoryview]))
@settings(max_examples=40)
@example([DataFrame("", b"")] * 2, [], memoryview)  # a memoryview has no startswith: the memo compare raised AttributeError
def test_feed_accepts_buffers_and_copies_them(frame_list, cuts, kind) -> None:
    """Chunks given as bytearray/memoryview decode alike, and the decoder keeps no view
    of them: scribbling over a chunk after feed() changes nothing."""
    stream = encode_stream(frame_list)
    decoder = Decoder()
    events = []
    for chunk in split(stream, cuts):
        buf = bytearray(chunk)
        events += decoder.feed(kind(buf) if kind is not bytes else bytes(buf))
        buf[:] = b"\xee" * len(buf)  # would corrupt what the decoder holds if it kept a view
    assert events == frame_list
    assert decoder.feed(b"") == []


def test_truncated_is_protocol_error() -> None:
    assert issubclass(TruncatedFrame, RemoteProtocolError)
    assert issubclass(TruncatedFrame, ProtocolError)
    decoder = Decoder()
    assert decoder.feed(b"\x01") == []
    assert decoder.buffered == 1
    with pytest.raises(TruncatedFrame):
        decoder.feed(b"")


def test_feed_after_eof_is_refused() -> None:
    decoder = Decoder()
    assert decoder.feed(b"") == []
    with pytest.raises(LocalProtocolError):
        decoder.feed(encode_control({"op": "x"}))


# --------------------------------------------------------------------------- fuzz

def reference_events(stream: bytes, limits: Limits) -> tuple[list, bool]:
    """The events of ``stream`` decoded a frame at a time, each by a fresh decoder (no
    state, no shortcut shared between frames), and whether the stream fails."""
    events: list = []
    pos = 0
    try:
        while pos < len(stream):
            if len(stream) - pos < HEADER_SIZE:
                raise TruncatedFrame("stream ends inside a header")
            end = pos + limits.frame_length(HEADER.unpack_from(stream, pos))
            if end > len(stream):
                raise TruncatedFrame("stream ends inside a frame")
            events += Decoder(limits).feed(stream[pos:end])
            pos = end
    except ProtocolError:
        return events, True
    return events, False


SENTINEL = encode_control({"op": "sentinel"})


def _check_fuzz(stream: bytes, cuts, limits: Limits = SMALL) -> None:
    """Fed in the reads ``cuts`` makes, ``stream`` gives the events of a frame-at-a-time
    decoding, or, where that fails, a prefix of them and a ProtocolError, and no other
    exception; the decoder never holds more than one frame; and after a clean end, a
    Rejected frame included, the next frame decodes."""
    executed["decoder"] += 1
    expected, fails = reference_events(stream, limits)
    decoder = Decoder(limits)
    events = []
    try:
        for chunk in split(stream, cuts):
            events += decoder.feed(chunk)
            assert decoder.buffered <= limits.max_frame
        events += decoder.feed(b"")
    except ProtocolError:
        assert fails, "the decoder failed where a frame-at-a-time decoding does not"
        assert [norm(e) for e in events] == [norm(e) for e in expected[: len(events)]]
        with pytest.raises(ProtocolError):
            decoder.feed(b"\x01" * HEADER_SIZE)
        with pytest.raises(ProtocolError):
            decoder.feed(b"")
        return
    assert not fails, "the decoder took a stream that a frame-at-a-time decoding refuses"
    assert [norm(e) for e in events] == [norm(e) for e in expected]
    for event in events:
        if isinstance(event, DataFrame):
            assert len(event.topic.encode()) <= limits.max_topic
            assert event.route.bit_length() <= limits.max_x_bits
            assert 0 <= event.hops <= 255 and 0 <= event.flags <= 255
            assert HEADER_SIZE + len(event.payload) <= limits.max_frame
        elif isinstance(event, ControlFrame):
            assert isinstance(event.body, dict) and isinstance(event.body["op"], str)
        else:
            assert isinstance(event, Rejected)
            assert isinstance(event.error, RemoteProtocolError)
    after = Decoder(limits).feed(stream + SENTINEL)
    assert [norm(e) for e in after] == [*map(norm, events), ControlFrame({"op": "sentinel"})]


@pytest.mark.fuzz
@fuzz_settings(100)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_fuzz_random_bytes(stream, cuts) -> None:
    _check_fuzz(stream, cuts)


@pytest.mark.fuzz
@fuzz_settings(100)
@given(st.binary(max_size=300), st.lists(st.integers(0, 330), max_size=8))
def test_fuzz_random_bytes_after_valid_header_start(stream, cuts) -> None:
    _check_fuzz(bytes([VERSION]) + stream, cuts)


# Valid streams with what a decoder must skip or refuse (tests/fuzzing.py), mutated.
# Few topics and routes, so X and topic repeat: the decoder takes a shortcut when they do.
@pytest.mark.fuzz
@fuzz_settings(150)
@given(seeds, mutations(min_size=1), st.lists(st.integers(0, 3000), max_size=8))
def test_fuzz_mutated_streams(seed, ops, cuts) -> None:
    _check_fuzz(apply_mutations(seeded_stream(seed), ops), cuts)


@pytest.mark.fuzz
@fuzz_settings(100)
@given(seeds, mutations(("length", "shift"), min_size=1, max_size=2), st.lists(st.integers(0, 3000), max_size=4))
def test_fuzz_length_fields(seed, ops, cuts) -> None:
    """Overwrite a byte of a header's length fields (x_len, topic_len, payload_len), or
    move the boundary between X and topic."""
    _check_fuzz(apply_mutations(seeded_stream(seed), ops), cuts)


# --------------------------------------------------------------------------- limits

@pytest.mark.parametrize(
    ("limits", "header"),
    [
        (SMALL, data_header(payload_len=SMALL.max_frame - HEADER_SIZE + 1)),
        (SMALL, data_header(x_len=2000, topic_len=10, payload_len=2100)),
        (SMALL, data_header(ftype=CONTROL, payload_len=5000)),
        (SMALL, data_header(ftype=9, payload_len=10**6)),
        (DEFAULT, data_header(payload_len=2**32 - 1)),
        (DEFAULT, data_header(x_len=0xFFFF, topic_len=0xFF, payload_len=DEFAULT.max_frame)),
    ],
)
def test_frame_too_large_raised_at_header(limits: Limits, header: bytes) -> None:
    decoder = Decoder(limits)
    assert decoder.feed(header[:-1]) == []
    assert decoder.buffered == HEADER_SIZE - 1
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(header[-1:])
    assert "max_frame" in str(info.value)
    with pytest.raises(ProtocolError):
        decoder.feed(b"\x00" * 100)


def test_frame_at_max_frame_is_accepted() -> None:
    payload = b"p" * (SMALL.max_frame - HEADER_SIZE - 1 - 1)
    frame = encode_data("t", payload, 1, limits=SMALL)
    assert len(frame) == SMALL.max_frame
    assert Decoder(SMALL).feed(frame) == [DataFrame("t", payload, 1)]


def test_topic_over_max_topic_raises() -> None:
    header = data_header(topic_len=SMALL.max_topic + 1, payload_len=0)
    decoder = Decoder(SMALL)
    with pytest.raises(FrameTooLarge, match="max_topic"):
        decoder.feed(header)
    frame = encode_data("t" * (DEFAULT.max_topic), b"")
    with pytest.raises(FrameTooLarge, match="max_topic"):
        Decoder(SMALL).feed(frame)


def test_topic_at_max_topic_is_accepted() -> None:
    topic = "é" * (SMALL.max_topic // 2)
    assert Decoder(SMALL).feed(encode_data(topic, b"x", limits=SMALL)) == [DataFrame(topic, b"x")]


@given(st.integers(SMALL.max_x_bits + 1, 1000), st.integers(0, U64))
@settings(max_examples=30)
def test_route_too_large_is_rejected_and_stream_continues(bits: int, msg_id: int) -> None:
    route = (1 << (bits - 1)) | 1
    too_big = encode_data("big", b"payload", route, msg_id=msg_id)  # DEFAULT limits allow it
    ok = encode_data("ok", b"after", (1 << SMALL.max_x_bits) - 1, limits=SMALL)
    stream = encode_control({"op": "before"}) + too_big + ok
    decoder = Decoder(SMALL)
    events = decoder.feed(stream)
    assert len(events) == 3
    assert events[0] == ControlFrame({"op": "before"})
    assert isinstance(events[1], Rejected)
    assert isinstance(events[1].error, RouteTooLarge)
    assert events[1].msg_id == msg_id
    assert str(bits) in str(events[1].error)
    assert events[2] == DataFrame("ok", b"after", (1 << SMALL.max_x_bits) - 1)
    assert decoder.feed(b"") == []


@pytest.mark.parametrize("ftype", [0, 3, 9, 255])
def test_unknown_frame_type_is_rejected_and_stream_continues(ftype: int) -> None:
    body = b"\x07\x08" + b"abc" + b"data"
    frame = data_header(ftype=ftype, x_len=2, topic_len=3, payload_len=4, msg_id=77) + body
    stream = frame + encode_data("next", b"n") + frame
    decoder = Decoder(SMALL)
    events = feed_chunks(decoder, [stream[i : i + 5] for i in range(0, len(stream), 5)])
    assert [type(e) for e in events] == [Rejected, DataFrame, Rejected]
    assert type(events[0].error) is RemoteProtocolError
    assert f"unknown frame type {ftype}" in str(events[0].error)
    assert events[0].msg_id == 77
    assert events[1] == DataFrame("next", b"n")
    assert decoder.feed(b"") == []


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version_raises(version: int) -> None:
    frame = bytearray(encode_data("t", b"p"))
    frame[0] = version
    decoder = Decoder()
    with pytest.raises(RemoteProtocolError, match="version"):
        decoder.feed(bytes(frame))
    with pytest.raises(ProtocolError):
        decoder.feed(encode_data("t", b"p"))


def test_wrong_version_after_good_frames() -> None:
    bad = bytearray(encode_control({"op": "x"}))
    bad[0] = 2
    decoder = Decoder()
    assert decoder.feed(encode_data("a", b"b")) == [DataFrame("a", b"b")]
    with pytest.raises(RemoteProtocolError):
        decoder.feed(bytes(bad))


def _control(payload: bytes, **header) -> bytes:
    return data_header(ftype=CONTROL, payload_len=len(payload), **header) + payload


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        msgpack.packb([1, 2, 3]),
        msgpack.packb("op"),
        msgpack.packb(7),
        msgpack.packb({}),
        msgpack.packb({"op": 1}),
        msgpack.packb({"op": b"bytes"}, use_bin_type=True),
        msgpack.packb({"op": None}),
        msgpack.packb({"nop": "x"}),
        msgpack.packb({1: "x", "op": "y"}),
        b"\xc1",  # never-used msgpack byte
        msgpack.packb({"op": "x"})[:-1],  # truncated
        b"\x81\xa2op\xa1\xff",  # invalid UTF-8 in a str
        b"\x91" * 3000,  # deeply nested arrays
    ],
)
def test_bad_control_frame_raises(payload: bytes) -> None:
    limits = Limits(max_control=8192)
    decoder = Decoder(limits)
    with pytest.raises(RemoteProtocolError):
        decoder.feed(encode_data("before", b"") + _control(payload))
    with pytest.raises(ProtocolError):
        decoder.feed(b"")
    with pytest.raises(RemoteProtocolError):
        decode_control(payload, limits)


@pytest.mark.parametrize("trailer", [b"\x00", b"\xc0", msgpack.packb({"op": "again"}), b"\xff" * 10])
def test_control_frame_with_trailing_bytes_raises(trailer: bytes) -> None:
    payload = msgpack.packb({"op": "x"}) + trailer
    with pytest.raises(RemoteProtocolError, match="after its msgpack map"):
        Decoder().feed(_control(payload))


@pytest.mark.parametrize(("x_len", "topic_len"), [(1, 1), (1, 0), (0, 1)])
def test_control_frame_with_topic_or_route_is_rejected(x_len: int, topic_len: int) -> None:
    payload = msgpack.packb({"op": "x"})
    header = data_header(ftype=CONTROL, x_len=x_len, topic_len=topic_len, payload_len=len(payload), msg_id=5)
    bad = header + b"\x01" * x_len + b"t" * topic_len + payload
    events = Decoder().feed(bad + encode_control({"op": "ok"}))
    assert isinstance(events[0], Rejected) and events[0].msg_id == 5
    assert type(events[0].error) is RemoteProtocolError
    assert events[1] == ControlFrame({"op": "ok"})


def test_control_frame_over_max_control_is_rejected() -> None:
    body = {"op": "x", "blob": b"\x00" * 2000}
    frame = encode_control(body)  # DEFAULT limits allow it
    decoder = Decoder(SMALL)
    events = decoder.feed(frame + encode_control({"op": "ok"}, SMALL))
    assert isinstance(events[0], Rejected) and isinstance(events[0].error, FrameTooLarge)
    assert events[1] == ControlFrame({"op": "ok"})


def test_invalid_utf8_topic_is_rejected_and_the_stream_goes_on() -> None:
    # Brokers forward topics untouched, so one bad publisher must not cost a
    # subscriber its connection: the frame is skipped, the next one decodes.
    frame = data_header(topic_len=2, payload_len=1) + b"\xff\xfe" + b"p"
    events = Decoder().feed(frame + encode_data("ok", b"next"))
    assert isinstance(events[0], Rejected) and "UTF-8" in str(events[0].error)
    assert events[1] == DataFrame("ok", b"next")


def test_limits_validation() -> None:
    for kwargs in (
        dict(max_frame=HEADER_SIZE),
        dict(max_frame=2**32),
        dict(max_topic=0),
        dict(max_topic=2**16),
        dict(max_x_bits=0),
        dict(max_x_bits=2**16 * 8),
        dict(max_control=0),
        dict(max_frame=1000, max_control=1001),
    ):
        with pytest.raises(ValueError):
            Limits(**kwargs)


# --------------------------------------------------------------------------- encoder errors

@pytest.mark.parametrize(
    ("kwargs", "limits"),
    [
        (dict(hops=256), DEFAULT),
        (dict(hops=-1), DEFAULT),
        (dict(flags=256), DEFAULT),
        (dict(flags=-1), DEFAULT),
        (dict(route=-1), DEFAULT),
        (dict(route=2**DEFAULT.max_x_bits), DEFAULT),
        (dict(route=2**SMALL.max_x_bits), SMALL),
        (dict(topic="t" * (DEFAULT.max_topic + 1)), DEFAULT),
        (dict(topic="é" * 33), SMALL),
        (dict(payload=b"x" * (SMALL.max_frame - HEADER_SIZE)), SMALL),
        (dict(payload=b"x" * 5000, route=2**200), SMALL),
        (dict(msg_id=2**64), DEFAULT),
        (dict(msg_id=-1), DEFAULT),
        (dict(timestamp_ns=2**64), DEFAULT),
        (dict(timestamp_ns=-1), DEFAULT),
    ],
)
def test_encode_data_errors(kwargs: dict, limits: Limits) -> None:
    args = {"topic": "t", "payload": b"p", **kwargs}
    with pytest.raises(LocalProtocolError):
        encode_data(limits=limits, **args)
    encoder = DataEncoder(limits)
    with pytest.raises(LocalProtocolError):
        encoder.encode(**args)
    # the encoder stays usable
    assert Decoder(limits).feed(b"".join(encoder.encode("t", b"p"))) == [DataFrame("t", b"p")]


def test_encode_data_boundaries_accepted() -> None:
    frame = encode_data("t", b"", 2**DEFAULT.max_x_bits - 1, hops=255, flags=255 & ~SIGNED_ROUTE, msg_id=U64, timestamp_ns=U64)
    [event] = Decoder().feed(frame)
    assert event == DataFrame("t", b"", 2**DEFAULT.max_x_bits - 1, 255, U64, U64, 255 & ~SIGNED_ROUTE)


@pytest.mark.parametrize("body", [{}, {"op": 1}, {"op": None}, {"op": b"x"}, {"nop": "x"}])
def test_encode_control_needs_string_op(body: dict) -> None:
    with pytest.raises(LocalProtocolError, match="op"):
        encode_control(body)


def test_encode_control_over_max_control() -> None:
    with pytest.raises(LocalProtocolError, match="max_control"):
        encode_control({"op": "x", "blob": b"\x00" * SMALL.max_control}, SMALL)


@given(
    max_frame=st.integers(HEADER_SIZE + 1, 600),
    slack=st.integers(0, 60),
    op_len=st.integers(0, 700),
)
def test_encode_control_and_decoder_agree_on_limits(max_frame: int, slack: int, op_len: int) -> None:
    """A control frame that encode_control accepts under some limits decodes under them.

    Limits allows max_control == max_frame, so this needs encode_control to check the
    whole frame (header included) against max_frame, as encode_data does.
    """
    limits = Limits(max_frame=max_frame, max_control=max(1, max_frame - slack))
    body = {"op": "x" * op_len}
    try:
        frame = encode_control(body, limits)
    except LocalProtocolError:
        return
    assert Decoder(limits).feed(frame) == [ControlFrame(body)]


def test_encode_control_frame_over_max_frame_example() -> None:
    """Minimal case of the property above: an 84-byte map fits max_control=100 but the
    112-byte frame does not fit max_frame=100, so encode_control must refuse it."""
    limits = Limits(max_frame=100, max_control=100)
    body = {"op": "x" * 80}  # 84 packed bytes <= max_control, 112-byte frame > max_frame
    with pytest.raises(LocalProtocolError, match="max_frame"):
        encode_control(body, limits)


# --------------------------------------------------------------------------- fixed header

def test_header_constants() -> None:
    assert HEADER_SIZE == 28 == HEADER.size
    assert HOPS_OFFSET == 3
    assert (VERSION, DATA, CONTROL) == (1, 1, 2)


@given(data_frames())
@settings(max_examples=50)
def test_header_layout(frame: DataFrame) -> None:
    encoded = encode_data(*frame[:3], hops=frame.hops, msg_id=frame.msg_id, timestamp_ns=frame.timestamp_ns, flags=frame.flags)
    topic_b = frame.topic.encode()
    x_b = frame.route.to_bytes((frame.route.bit_length() + 7) // 8, "big")
    assert encoded[HOPS_OFFSET] == frame.hops
    assert encoded[0] == VERSION and encoded[1] == DATA and encoded[2] == frame.flags
    assert HEADER.unpack_from(encoded) == (
        VERSION, DATA, frame.flags, frame.hops, len(x_b), len(topic_b), len(frame.payload), frame.msg_id, frame.timestamp_ns
    )
    assert encoded[HEADER_SIZE:] == x_b + topic_b + frame.payload
    assert encoded.endswith(frame.payload)
    assert encoded[len(encoded) - len(frame.payload):] == frame.payload
    assert len(encoded) == HEADER_SIZE + len(x_b) + len(topic_b) + len(frame.payload)


def test_control_header_layout() -> None:
    body = {"op": "sub", "topic": "a"}
    encoded = encode_control(body)
    packed = msgpack.packb(body, use_bin_type=True)
    assert HEADER.unpack_from(encoded) == (VERSION, CONTROL, 0, 0, 0, 0, len(packed), 0, 0)
    assert encoded[HEADER_SIZE:] == packed


def test_hops_rewrite_in_place() -> None:
    """A broker decrements hops by patching byte HOPS_OFFSET; the decoder sees it."""
    frame = bytearray(encode_data("t", b"p", 9, hops=10))
    frame[HOPS_OFFSET] -= 1
    [event] = Decoder().feed(frame)
    assert event.hops == 9 and event.route == 9


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_large_payload_not_copied(kind) -> None:
    encoder = DataEncoder(join_limit=100)
    payload = kind(b"z" * 101)
    parts = encoder.encode("t", payload, 3, hops=4)
    assert len(parts) == 2
    assert parts[-1] is payload
    assert parts[0] == encode_data("t", b"z" * 101, 3, hops=4)[:-101]
    assert HEADER.unpack_from(parts[0])[6] == 101
    assert Decoder().feed(b"".join(parts)) == [DataFrame("t", b"z" * 101, 3, 4)]


def test_default_join_limit() -> None:
    encoder = DataEncoder()
    small = b"s" * 8192
    big = b"b" * 8193
    [joined] = encoder.encode("t", small)
    assert joined.endswith(small)
    head, tail = encoder.encode("t", big)
    assert tail is big
    assert not head.endswith(b"b")


def test_topic_that_is_not_utf8_encodable_is_a_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError, match="not encodable"):
        encode_data("\ud800", b"")
