"""Tests of the sans-I/O wire codec dcp.wire, in the style of h11's tests.

Round trips through every encoder, every way of chunking a stream, fuzzing with random
and mutated streams against a slow reference decoder written from the format's
specification (tests/reference.py), and the limits that bound every buffer.
"""

from __future__ import annotations

import bisect
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
from .reference import reason_of, reference_boundaries, reference_decode

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


def test_a_large_payload_is_read_in_place_into_the_bytearray_that_is_its_payload() -> None:
    big = encode_data("cam", bytes(range(256)) * 400, 77, msg_id=5)  # 102,400 payload bytes
    small = encode_data("cam", b"after", 77, msg_id=6)
    decoder = Decoder()
    lent = decoder.get_buffer()
    lent[:1000] = big[:1000]  # a read that ends inside the payload
    assert decoder.buffer_updated(1000) == []
    rest = decoder.get_buffer()
    assert len(rest) == len(big) - 1000  # the rest of the payload, and not a byte past it
    assert type(rest.obj) is bytearray
    rest[:] = big[1000:]
    (event,) = decoder.buffer_updated(len(rest))
    assert type(event.payload) is bytearray and event.payload is rest.obj
    assert event == DataFrame("cam", bytes(range(256)) * 400, 77, msg_id=5, timestamp_ns=0)
    lent = decoder.get_buffer()  # a read at a frame boundary: two large frames and a small one, whole
    lent[: 2 * len(big) + len(small)] = big + big + small
    events = decoder.buffer_updated(2 * len(big) + len(small))
    assert events == [event, event, DataFrame("cam", b"after", 77, msg_id=6)]
    assert [type(e.payload) for e in events] == [bytearray, bytearray, bytes]


def test_a_stream_that_ends_inside_a_payload_read_in_place_is_truncated() -> None:
    decoder = Decoder()
    frame = encode_data("cam", bytes(100_000), 1)
    lent = decoder.get_buffer()
    lent[:5000] = frame[:5000]
    assert decoder.buffer_updated(5000) == []
    assert decoder.buffered == 5000 and len(decoder.get_buffer()) == len(frame) - 5000  # read in place
    with pytest.raises(TruncatedFrame):
        decoder.feed(b"")


def test_feed_after_eof_is_refused() -> None:
    decoder = Decoder()
    assert decoder.feed(b"") == []
    with pytest.raises(LocalProtocolError):
        decoder.feed(encode_control({"op": "x"}))


# --------------------------------------------------------------------------- fuzz

SENTINEL = encode_control({"op": "sentinel"})
#: The fuzz tests' limits: SMALL, and one whose max_x_bits is no whole number of bytes
#: (X of 8 bytes may be over it: no byte count alone tells).
FUZZ_LIMITS = (SMALL, Limits(max_frame=4096, max_topic=64, max_x_bits=63, max_control=1024))


def ref_norm(event):
    """Events as comparable values: a Rejected one by its error's class, the reason its
    message names (tests/reference.py's REASONS) and msg_id; a control body by its repr
    (a NaN in it is not equal to itself)."""
    if isinstance(event, Rejected):
        return ("rejected", type(event.error), reason_of(event.error), event.msg_id)
    if isinstance(event, ControlFrame):
        return ("control", repr(event.body))
    return event


def _check_fuzz(stream: bytes, cuts, limits: Limits = SMALL) -> None:
    """Fed in the reads ``cuts`` makes, ``stream`` gives the events of the reference
    decoding (tests/reference.py), or, where that fails, a prefix of them and an error of
    the same class, and no other exception; after each read the decoder holds the
    incomplete frame that read ends in and nothing more; and after a clean end, a
    Rejected frame included, the next frame decodes."""
    executed["decoder"] += 1
    expected, error = reference_decode(stream, limits)
    ends = [0, *reference_boundaries(stream, limits)]
    decoder = Decoder(limits)
    events = []
    fed = 0
    try:
        for chunk in split(stream, cuts):
            events += decoder.feed(chunk)
            fed += len(chunk)
            assert decoder.buffered == fed - ends[bisect.bisect_right(ends, fed) - 1] <= limits.max_frame
        events += decoder.feed(b"")
    except ProtocolError as exc:
        assert error is not None, f"the decoder failed ({exc!r}) where the reference does not"
        assert type(exc) is error, f"the decoder failed with {exc!r}, the reference with {error.__name__}"
        assert [ref_norm(e) for e in events] == [ref_norm(e) for e in expected[: len(events)]]
        with pytest.raises(ProtocolError):
            decoder.feed(b"\x01" * HEADER_SIZE)
        with pytest.raises(ProtocolError):
            decoder.feed(b"")
        return
    assert error is None, f"the decoder took a stream that the reference refuses ({error.__name__})"
    assert [ref_norm(e) for e in events] == [ref_norm(e) for e in expected]
    for event in events:
        if isinstance(event, DataFrame):
            assert type(event.payload) is bytes
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
    assert [ref_norm(e) for e in after] == [*map(ref_norm, events), ("control", repr({"op": "sentinel"}))]
    _check_fuzz_buffered(stream, cuts, limits, expected, error, ends)


def _check_fuzz_buffered(stream: bytes, cuts, limits: Limits, expected, error, ends) -> None:
    """The same stream through the BufferedProtocol way in (``get_buffer`` and
    ``buffer_updated``), with a small read buffer and a small in-place threshold so that
    small frames take the in-place path: the same events and errors, a payload of 40
    bytes or more read in place is a bytearray, and what the decoder holds stays what
    the last read left incomplete."""
    decoder = Decoder(limits, in_place_payload=40, read_size=97)
    events = []
    fed = 0
    try:
        for chunk in split(stream, cuts):
            view = memoryview(chunk)
            while view:
                lent = decoder.get_buffer()
                n = min(len(lent), len(view))
                lent[:n] = view[:n]
                view = view[n:]
                events += decoder.buffer_updated(n)
                fed += n
                assert decoder.buffered == fed - ends[bisect.bisect_right(ends, fed) - 1] <= limits.max_frame
        events += decoder.feed(b"")
    except ProtocolError as exc:
        assert error is not None and type(exc) is error, f"buffered: {exc!r}, the reference: {error}"
        assert [ref_norm(e) for e in events] == [ref_norm(e) for e in expected[: len(events)]]
        return
    assert error is None, f"the buffered decoder took a stream that the reference refuses ({error.__name__})"
    assert [ref_norm(e) for e in events] == [ref_norm(e) for e in expected]
    for event in events:
        if isinstance(event, DataFrame):  # bytes, or a bytearray read in place
            assert type(event.payload) is bytes or (type(event.payload) is bytearray and len(event.payload) >= 40)


@pytest.mark.fuzz
@fuzz_settings(100)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8), st.sampled_from(FUZZ_LIMITS))
def test_fuzz_random_bytes(stream, cuts, limits) -> None:
    _check_fuzz(stream, cuts, limits)


@pytest.mark.fuzz
@fuzz_settings(100)
@given(st.binary(max_size=300), st.lists(st.integers(0, 330), max_size=8), st.sampled_from(FUZZ_LIMITS))
def test_fuzz_random_bytes_after_valid_header_start(stream, cuts, limits) -> None:
    _check_fuzz(bytes([VERSION]) + stream, cuts, limits)


# Valid streams with what a decoder must skip or refuse (tests/fuzzing.py), mutated.
# Few topics and routes, so X and topic repeat: the decoder takes a shortcut when they do.
@pytest.mark.fuzz
@fuzz_settings(150)
@given(seeds, mutations(min_size=1), st.lists(st.integers(0, 3000), max_size=8), st.sampled_from(FUZZ_LIMITS))
# a bad control body before an over-long topic: the errors come in stream order (found by this test)
@example(0, [("flip", 0, 0), ("flip", 0, 0), ("delete", 5300, 0)], [], SMALL)
def test_fuzz_mutated_streams(seed, ops, cuts, limits) -> None:
    _check_fuzz(apply_mutations(seeded_stream(seed), ops), cuts, limits)


@pytest.mark.fuzz
@fuzz_settings(100)
@given(seeds, mutations(("length", "shift"), min_size=1, max_size=2), st.lists(st.integers(0, 3000), max_size=4),
       st.sampled_from(FUZZ_LIMITS))
def test_fuzz_length_fields(seed, ops, cuts, limits) -> None:
    """Overwrite a byte of a header's length fields (x_len, topic_len, payload_len), or
    move the boundary between X and topic."""
    _check_fuzz(apply_mutations(seeded_stream(seed), ops), cuts, limits)


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
@example(max_frame=100, slack=0, op_len=80)  # an 86-byte map in a 114-byte frame: encode_control once let it through (found by this test)
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


def test_the_hop_limit_is_the_byte_at_hops_offset() -> None:
    """Brokers patch byte HOPS_OFFSET in place (their decrement is tested through a
    broker in tests/test_limits.py and tests/test_broker_protocol.py); here: that byte,
    and no other, is what the decoder reads as the hop limit."""
    frame = bytearray(encode_data("t", b"p", 9, hops=10))
    assert frame[HOPS_OFFSET] == 10
    frame[HOPS_OFFSET] = 200
    [event] = Decoder().feed(frame)
    assert event == DataFrame("t", b"p", 9, 200)


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


# --------------------------------------------------------------------------- pinned by mutation testing (docs/mutation.md)

from array import array  # noqa: E402

from dcp.wire import ROUTE_TAG_SIZE  # noqa: E402


def raw_frame(x_field: bytes, topic: bytes, payload: bytes = b"p", *, flags: int = 0, ftype: int = DATA, msg_id: int = 0) -> bytes:
    """A frame written byte by byte, so that X may be non-minimal and the route tag anything."""
    return HEADER.pack(VERSION, ftype, flags, DEFAULT_HOPS, len(x_field), len(topic), len(payload), msg_id, 0) + x_field + topic + payload


def error_of(call, kind: type[Exception] = ProtocolError) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(kind) as info:
        call()
    return str(info.value)


def test_limits_accept_their_bounds() -> None:
    Limits(max_frame=HEADER_SIZE + 1, max_control=1)
    Limits(max_frame=2**32 - 1)
    Limits(max_topic=1)
    Limits(max_topic=0xFFFF)
    Limits(max_x_bits=1)
    Limits(max_x_bits=0xFFFF * 8)
    Limits(max_frame=1000, max_control=1000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_frame": HEADER_SIZE, "max_control": 1}, "max_frame must be in (28, 4294967295]"),
        ({"max_frame": 2**32}, "max_frame must be in (28, 4294967295]"),
        ({"max_topic": 0}, "max_topic must be in (0, 65535]"),
        ({"max_topic": 0x10000}, "max_topic must be in (0, 65535]"),
        ({"max_x_bits": 0}, "max_x_bits must be in (0, 524280]"),
        ({"max_x_bits": 0xFFFF * 8 + 1}, "max_x_bits must be in (0, 524280]"),
        ({"max_control": 0}, "max_control must be in (0, max_frame]"),
        ({"max_frame": 1000, "max_control": 1001}, "max_control must be in (0, max_frame]"),
    ],
)
def test_limits_refuse_values_out_of_range(kwargs: dict[str, int], message: str) -> None:
    assert error_of(lambda: Limits(**kwargs), ValueError) == message


def test_a_frame_of_exactly_max_frame_bytes_decodes_in_any_reads() -> None:
    limits = Limits(max_frame=100, max_control=50)
    frame = encode_data("t", b"p" * 70, 5, limits=limits)
    assert len(frame) == 100 and limits.frame_length(HEADER.unpack_from(frame)) == 100
    for cut in range(1, 100):
        decoder = Decoder(limits)
        assert decoder.feed(frame[:cut]) + decoder.feed(frame[cut:]) == [DataFrame("t", b"p" * 70, 5)]
    assert error_of(lambda: encode_data("tt", b"p" * 70, 5, limits=limits)) == "frame of 101 bytes exceeds max_frame=100"


def test_rejection_boundaries_and_reasons() -> None:
    limits = Limits(max_x_bits=16, max_control=10)

    def header(ftype: int, x_len: int = 0, topic_len: int = 0, size: int = 0) -> tuple[int, ...]:
        return HEADER.unpack(HEADER.pack(VERSION, ftype, 0, 0, x_len, topic_len, size, 7, 0))

    assert limits.rejection(header(DATA, 3, 1), 2**16 - 1) is None
    error = limits.rejection(header(DATA, 3, 1), 2**16)
    assert type(error) is RouteTooLarge and str(error) == "topology number of 17 bits exceeds max_x_bits=16"
    assert limits.rejection(header(CONTROL, size=10), 0) is None
    error = limits.rejection(header(CONTROL, size=11), 0)
    assert type(error) is FrameTooLarge and str(error) == "control frame of 11 bytes exceeds max_control=10"
    for x_len, topic_len in [(1, 0), (0, 1)]:
        error = limits.rejection(header(CONTROL, x_len, topic_len, 5), 0)
        assert type(error) is RemoteProtocolError and str(error) == "control frame carries a topology number or topic"
    assert str(limits.rejection(header(9), 0)) == "unknown frame type 9"


def test_a_control_frame_of_exactly_max_control_bytes() -> None:
    body = {"op": "x", "pad": "p" * 20}
    size = len(msgpack.packb(body))
    exact = Limits(max_frame=HEADER_SIZE + size, max_control=size)
    assert Decoder(exact).feed(encode_control(body, exact)) == [ControlFrame(body)]
    assert error_of(lambda: encode_control(body, Limits(max_control=size - 1))) == f"control frame of {size} bytes exceeds max_control={size - 1}"
    frame_short = Limits(max_frame=HEADER_SIZE + size - 1, max_control=HEADER_SIZE + size - 1)
    assert error_of(lambda: encode_control(body, frame_short)) == (
        f"control frame of {HEADER_SIZE + size} bytes exceeds max_frame={HEADER_SIZE + size - 1}"
    )
    assert error_of(lambda: encode_control({"op": 1})) == "a control frame needs a string 'op'"


def test_a_decoder_decodes_control_frames_up_to_its_own_max_control() -> None:
    body = {"op": "big", "pad": "p" * 70_000}  # over the default max_control
    limits = Limits(max_control=100_000)
    assert Decoder(limits).feed(encode_control(body, limits)) == [ControlFrame(body)]


def test_decode_control_bounds_the_whole_payload_by_max_control() -> None:
    body = {"op": "x", **{f"k{i}": i for i in range(20)}}  # small items, 100 bytes in all
    payload = msgpack.packb(body)
    assert decode_control(payload, Limits(max_control=len(payload))) == ControlFrame(body)
    message = error_of(lambda: decode_control(payload, Limits(max_control=len(payload) - 1)))
    assert message.startswith("control frame is not valid msgpack: ")
    assert error_of(lambda: decode_control(b"\x80\x80", Limits(max_control=1))).startswith("control frame is not valid msgpack: ")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (msgpack.packb({"op": "x"})[:-1], "control frame holds a truncated msgpack value"),
        (msgpack.packb({"op": "x"}) + b"\x00", "control frame has bytes after its msgpack map"),
        (msgpack.packb(["op"]), "control frame is not a map with a string 'op'"),
        (msgpack.packb({"op": 1}), "control frame is not a map with a string 'op'"),
    ],
)
def test_decode_control_errors_in_full(payload: bytes, message: str) -> None:
    assert error_of(lambda: decode_control(payload), RemoteProtocolError) == message
    assert error_of(lambda: decode_control(b"\xc1"), RemoteProtocolError).startswith("control frame is not valid msgpack: ")


def test_the_signed_route_flag_comes_only_with_a_tag() -> None:
    assert error_of(lambda: encode_data("t", b"", 5, flags=SIGNED_ROUTE)) == (
        "the SIGNED_ROUTE flag comes with a route tag (tag=), not from flags"
    )
    tag = bytes(range(ROUTE_TAG_SIZE))
    signed = encode_data("t", b"p", 5, flags=SIGNED_ROUTE, tag=tag)
    assert signed == encode_data("t", b"p", 5, tag=tag)
    assert Decoder().feed(signed) == [DataFrame("t", b"p", 5, flags=SIGNED_ROUTE)]


def test_a_payload_of_wide_items_counts_its_bytes() -> None:
    payload = memoryview(array("I", [1, 2, 3]))
    frame = encode_data("t", payload, 5)
    assert HEADER.unpack_from(frame)[6] == 3 * payload.itemsize
    assert Decoder().feed(frame) == [DataFrame("t", payload.tobytes(), 5)]
    head, tail = DataEncoder(join_limit=0).encode("t", payload, 5)
    assert HEADER.unpack_from(head)[6] == 3 * payload.itemsize and tail is payload


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hops": 256}, "field out of range: hops=256, flags=0 (0..255); msg_id=0, timestamp_ns=0 (64 bits)"),
        ({"topic": "a" * 256}, "topic of 256 bytes exceeds max_topic=255"),
        ({"route": -1}, "route must be a non-negative int, got -1"),
        ({"route": "5"}, "route must be a non-negative int, got '5'"),
        ({"route": 2**131_072}, "route of 131073 bits exceeds max_x_bits=131072"),
        ({"tag": b"t" * 23}, "a route tag has 24 bytes, got 23"),
    ],
)
def test_encoder_errors_in_full(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"topic": "t", "payload": b"p", "route": 5, **kwargs}
    assert error_of(lambda: encode_data(**args), LocalProtocolError) == message  # type: ignore[arg-type]


def test_a_failed_or_ended_decoder_says_so() -> None:
    failed = Decoder()
    with pytest.raises(RemoteProtocolError):
        failed.feed(b"\x09" + bytes(HEADER_SIZE - 1))
    assert error_of(lambda: failed.feed(b"x"), RemoteProtocolError) == "decoder already failed"
    ended = Decoder()
    assert ended.feed(b"") == []
    assert error_of(lambda: ended.feed(b"x"), LocalProtocolError) == "data fed after EOF"
    cut = Decoder()
    assert cut.feed(encode_data("t", b"p")[:10]) == []
    assert error_of(lambda: cut.feed(b""), TruncatedFrame) == "stream ended inside a frame (10 bytes held)"


def test_a_frame_that_repeats_only_part_of_the_last_route_is_decoded_afresh() -> None:
    """The decoder remembers the last X and topic; a frame that only starts with their bytes is not them."""
    stream = [
        (raw_frame(b"\x05", b"ab"), DataFrame("ab", b"p", 5)),
        (raw_frame(b"\x05a", b"bc"), DataFrame("bc", b"p", 0x0561)),  # same bytes, another X/topic split
        (raw_frame(b"\x05", b"ab"), DataFrame("ab", b"p", 5)),
        (raw_frame(b"\x05", b"abc"), DataFrame("abc", b"p", 5)),  # same X, a longer topic
        (raw_frame(b"\x05" + bytes(24), b"t"), DataFrame("t", b"p", 5 << 192)),  # 25 bytes of X
        (raw_frame(b"\x05" + bytes(24), b"t", flags=SIGNED_ROUTE), DataFrame("t", b"p", 5, flags=SIGNED_ROUTE)),  # 1 and a tag
        (raw_frame(b"\x05" + bytes(24), b"t"), DataFrame("t", b"p", 5 << 192)),
    ]
    assert Decoder().feed(b"".join(frame for frame, _ in stream)) == [event for _, event in stream]


def test_the_route_memo_compares_the_frame_not_the_start_of_the_read() -> None:
    # the first frame's X is its own first 4 header bytes (version, type, flags, hops)
    first = raw_frame(bytes([VERSION, DATA, 0, DEFAULT_HOPS]), b"")
    second = raw_frame(b"\x02\x00\x00\x00", b"")
    assert Decoder().feed(first + second) == [DataFrame("", b"p", 0x01010020), DataFrame("", b"p", 0x02000000)]


def test_rejected_frames_keep_their_msg_id_and_reason() -> None:
    short_signed = raw_frame(b"\x01\x02\x03", b"t", flags=SIGNED_ROUTE, msg_id=41)
    bad_topic = raw_frame(b"\x05", b"\xff", msg_id=42)
    events = Decoder().feed(short_signed + bad_topic + encode_data("t", b"ok", 5))
    assert [(type(e.error), str(e.error), e.msg_id) for e in events[:2]] == [
        (RemoteProtocolError, "a signed route shorter than its tag", 41),
        (RemoteProtocolError, "topic is not valid UTF-8", 42),
    ]
    assert events[2:] == [DataFrame("t", b"ok", 5)]


def test_a_long_x_field_with_leading_zero_bytes_is_counted_in_bits() -> None:
    limits = Limits(max_x_bits=16)  # X fields up to 2 bytes pass without counting bits
    for x_field, x in [(b"\x00\x00\x05", 5), (b"\x00\xff\xff", 0xFFFF)]:
        assert Decoder(limits).feed(raw_frame(x_field, b"t")) == [DataFrame("t", b"p", x)]
    [rejected] = Decoder(limits).feed(raw_frame(b"\x01\x00\x00", b"t", msg_id=9))
    assert isinstance(rejected.error, RouteTooLarge) and rejected.msg_id == 9


# --------------------------------------------------------------------------- second mutation run (docs/mutation.md)

from dcp.wire import Reassembly, scan  # noqa: E402


def test_a_reassembly_needs_0_until_the_header_is_whole_and_holds_nothing_once_the_frame_is() -> None:
    frame = encode_data("t", b"0123456789", 5)
    held = Reassembly(Limits())
    assert (held.pieces, held.size, held.need) == ([], 0, 0)
    held.hold(frame[:10])
    assert (held.pieces, held.size, held.need) == ([frame[:10]], 10, 0)
    assert held.add(frame[10:20]) is None
    assert (held.size, held.need) == (20, 0)
    assert held.add(frame[20:30]) is None
    assert (held.size, held.need) == (30, len(frame))
    tail = frame[30:] + b"next"
    done = held.add(tail)
    assert done is not None
    pieces, used = done
    assert (b"".join(pieces), used) == (frame, len(frame) - 30)
    assert (held.pieces, held.size, held.need) == ([], 0, 0)
    held.hold(frame[:28])
    assert held.need == len(frame)
    assert held.truncated() is not None and (held.pieces, held.size, held.need) == ([], 0, 0)


def test_scan_marks_a_data_frame_that_repeats_the_flags_lengths_and_route_bytes_of_the_data_frame_before_it() -> None:
    a = raw_frame(b"\x05", b"t", b"1")
    a_other_payload = raw_frame(b"\x05", b"t", b"22")
    ping = encode_control({"op": "ping"})
    split_otherwise = raw_frame(b"\x05t", b"")  # the same route bytes, X and topic split otherwise
    flagged = raw_frame(b"\x05t", b"", flags=0x02)  # another flags byte
    other_hops = HEADER.pack(VERSION, DATA, 0x02, 7, 2, 0, 1, 0, 0) + b"\x05tp"  # only the hop limit differs
    unknown = raw_frame(b"", b"", ftype=3)
    stream = a + a_other_payload + ping + ping + a + split_otherwise + flagged + other_hops + unknown + unknown + flagged[:30]
    found: list = []
    end = scan(stream, 0, Limits(), found)
    assert end == len(stream) - 30  # the incomplete last frame is not found
    starts = [0]
    for f in (a, a_other_payload, ping, ping, a, split_otherwise, flagged, other_hops, unknown):
        starts.append(starts[-1] + len(f))
    assert [(start, header[1], repeat) for start, header, repeat in found] == [
        (starts[0], DATA, False),
        (starts[1], DATA, True),
        (starts[2], CONTROL, False),
        (starts[3], CONTROL, False),  # only data frames repeat
        (starts[4], DATA, True),  # the data frame before it, a control frame between
        (starts[5], DATA, False),
        (starts[6], DATA, False),
        (starts[7], DATA, True),
        (starts[8], 3, False),
        (starts[9], 3, False),
    ]
    assert [header for _, header, _ in found][7] == HEADER.unpack_from(other_hops)
    later: list = []
    assert scan(stream, starts[1], Limits(), later) == end  # a new call: the first data frame is not a repeat
    assert later[0] == (starts[1], HEADER.unpack_from(a_other_payload), False)
