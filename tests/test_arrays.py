"""numpy payloads: sent without a copy, received as a view (``dcp.arrays``, ``dcp.wire.uncopied``).

"Without a copy" is checked two ways: the buffer handed to the transport is the array's
own memory (a recording transport), and publishing a 4 MiB array over a real socket
allocates nothing near 4 MiB (tracemalloc, which sees numpy's and Python's allocations;
the same probe is shown to see a copy).
"""

from __future__ import annotations

import asyncio
import tracemalloc
from typing import Any

import pytest

from tests.extras import import_or_skip

np = import_or_skip("numpy")

import msgpack  # noqa: E402
from hypothesis import given, strategies as st  # noqa: E402

import dcp  # noqa: E402
from dcp import arrays  # noqa: E402
from dcp._loop import CoalescedWriter  # noqa: E402
from dcp.wire import DataEncoder, Decoder, DataFrame, encode_data, uncopied  # noqa: E402
from tests.conftest import url_of  # noqa: E402


def address(buffer: Any) -> int:
    """Where ``buffer``'s memory starts."""
    return int(np.frombuffer(buffer, np.uint8).ctypes.data) if len(memoryview(buffer).cast("B")) else 0


def same_memory(a: Any, b: Any) -> bool:
    return bool(np.shares_memory(np.frombuffer(a, np.uint8), np.asarray(b)))


ARRAYS = {
    "complex64 I/Q": np.arange(64 * 256, dtype=np.complex64).reshape(64, 256) * (1 - 2j),
    "uint8 image": np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3),
    "float64 Fortran": np.asfortranarray(np.linspace(0, 1, 35).reshape(5, 7)),
    "bool": np.array([True, False, True]),
    "0-d int16": np.array(-7, dtype=np.int16),
    "empty": np.zeros((0, 4), np.float32),
    "big-endian": np.arange(6, dtype=">i4").reshape(2, 3),
    "datetime": np.array(["2026-01-01", "2026-06-30"], dtype="datetime64[ns]"),
    "strided crop": np.arange(100, dtype=np.float32).reshape(10, 10)[2:7, 3:9],
}


@pytest.mark.parametrize("name", list(ARRAYS))
@pytest.mark.parametrize("received_as", [bytes, bytearray])
def test_pack_then_unpack_gives_the_array_and_meta_back(name: str, received_as: type) -> None:
    array = ARRAYS[name]
    header, data = arrays.pack(array, frame=3, sensor="radar-1", params={"fc": 77e9})
    payload = received_as(b"".join((header, data)))
    got, meta = arrays.unpack(payload)
    assert got.dtype == array.dtype and got.shape == array.shape
    assert np.array_equal(got, array)
    assert meta == {"frame": 3, "sensor": "radar-1", "params": {"fc": 77e9}}
    assert got.flags.aligned


@pytest.mark.parametrize("name", [n for n in ARRAYS if n != "strided crop" and ARRAYS[n].size])
def test_pack_sends_the_arrays_own_memory(name: str) -> None:
    array = ARRAYS[name]
    _, data = arrays.pack(array)
    assert same_memory(data, array)


def test_a_strided_view_is_copied_once_into_one_block() -> None:
    crop = ARRAYS["strided crop"]
    _, data = arrays.pack(crop)
    assert not same_memory(data, crop) and bytes(data) == np.ascontiguousarray(crop).tobytes()


@pytest.mark.parametrize("received_as", [bytes, bytearray])
def test_unpack_is_a_view_of_the_payload_not_a_copy(received_as: type) -> None:
    array = ARRAYS["complex64 I/Q"]
    payload = received_as(b"".join(arrays.pack(array)))
    got, _ = arrays.unpack(payload)
    assert same_memory(payload, got)
    assert address(payload) + len(payload) - array.nbytes == got.ctypes.data  # the data is the payload's tail
    assert got.flags.writeable is (received_as is bytearray)  # a bytes payload gives a read-only array


def test_pack_refuses_what_dtype_str_cannot_carry() -> None:
    with pytest.raises(ValueError, match="plain dtypes"):
        arrays.pack(np.array([object(), 1], dtype=object))
    with pytest.raises(ValueError, match="plain dtypes"):
        arrays.pack(np.zeros(2, dtype=[("range", "f4"), ("doppler", "f4")]))


GOOD = b"".join(arrays.pack(np.arange(4, dtype=np.int64)))
NOT_PACKED = {
    "another magic": b"XXXX" + GOOD[4:],
    "shorter than a prefix": GOOD[:5],
    "a byte short": GOOD[:-1],
    "a byte over": GOOD + b"\0",
    "a header past the end": GOOD[:4] + (10**6).to_bytes(4, "big") + GOOD[8:],
    "object dtype": GOOD.replace(b"<i8", b"|O8"),
    "unknown dtype": GOOD.replace(b"<i8", b"<q9"),
    "a map that is not one": GOOD[:8] + b"\xc1" + GOOD[9:],
}


def test_the_payload_the_rejections_start_from_is_good() -> None:
    assert arrays.unpack(GOOD).array.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("name", list(NOT_PACKED))
def test_unpack_rejects_what_pack_did_not_make(name: str) -> None:
    with pytest.raises(ValueError, match="dcp array payload"):
        arrays.unpack(NOT_PACKED[name])


@given(st.binary(max_size=200))
def test_unpack_raises_only_value_error(payload: bytes) -> None:
    for candidate in (payload, b"dcpA" + payload):
        try:
            arrays.unpack(candidate)
        except ValueError:
            pass


@given(
    st.one_of(st.text(max_size=12), st.sampled_from([",", "(2,)i4", "i4,f8", "|O8", "|V0", "<M8[xx]", "<U0", "<f8"])),
    st.lists(st.integers(-2, 2**40), max_size=4),
    st.binary(max_size=64),
)
def test_unpack_of_any_header_raises_only_value_error(dtype: str, shape: list[int], data: bytes) -> None:
    body = msgpack.packb({"dtype": dtype, "shape": shape, "order": "C", "meta": {}})
    payload = b"dcpA" + len(body).to_bytes(4, "big") + body + bytes(-(8 + len(body)) % 16) + data
    try:
        got = arrays.unpack(payload).array
    except ValueError:
        return
    assert got.nbytes == len(data) and list(got.shape) == shape


# -- the send path: what the writers get is the caller's memory

def test_uncopied_keeps_bytes_and_views_any_other_buffer_flat() -> None:
    data = b"abc"
    assert uncopied(data) == (data, 3) and uncopied(data)[0] is data
    image = ARRAYS["uint8 image"]
    view, size = uncopied(image)
    assert isinstance(view, memoryview) and view.ndim == 1 and len(view) == size == image.nbytes
    assert same_memory(view, image)
    parts, size = uncopied(arrays.pack(image))
    assert isinstance(parts, tuple) and size == sum(len(p) for p in parts) and same_memory(parts[1], image)


@pytest.mark.parametrize("payload", [np.arange(10.0)[::2], "text", 42, np.asfortranarray(np.ones((3, 3)))])
def test_a_payload_that_is_not_one_c_ordered_block_is_refused(payload: Any) -> None:
    with pytest.raises(dcp.LocalProtocolError, match="C-contiguous buffer"):
        uncopied(payload)


class RecordingTransport:
    """What a writer hands the transport, as handed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Any]]] = []

    def write(self, data: Any) -> None:
        self.calls.append(("write", [data]))

    def writelines(self, data: Any) -> None:
        self.calls.append(("writelines", list(data)))

    def is_closing(self) -> bool:
        return False

    def sent(self) -> bytes:
        return b"".join(bytes(part) for _, parts in self.calls for part in parts)


async def test_the_writer_hands_a_large_array_over_uncopied_and_copies_a_small_one_in() -> None:
    transport = RecordingTransport()
    writer = CoalescedWriter(transport)  # type: ignore[arg-type]
    encoder = DataEncoder()
    large = ARRAYS["complex64 I/Q"]
    small = np.array([5], dtype=np.uint8)  # bytearray += ndarray would broadcast and add, not append
    for payload in (small, large, arrays.pack(large), arrays.pack(small)):
        body, size = uncopied(payload)
        head, tail = encoder.head("t", size, route=7)
        writer.write_frame(head, tail, body, size)
    writer.flush()
    handed = [part for _, parts in transport.calls for part in parts]
    assert sum(same_memory(part, large) for part in handed) == 2  # the bare array and the packed one
    frames = [e for e in Decoder().feed(transport.sent()) if isinstance(e, DataFrame)]
    assert [bytes(f.payload) for f in frames[:2]] == [small.tobytes(), large.tobytes()]
    assert np.array_equal(arrays.unpack(frames[2].payload).array, large)
    assert np.array_equal(arrays.unpack(frames[3].payload).array, small)


def test_encode_data_takes_arrays_and_parts() -> None:
    image = ARRAYS["uint8 image"]
    assert encode_data("t", image, 5) == encode_data("t", image.tobytes(), 5)
    assert encode_data("t", arrays.pack(image), 5) == encode_data("t", b"".join(arrays.pack(image)), 5)


# -- end to end, through a broker

def run_now(coro: Any) -> Any:
    """Run ``coro`` to its end at once, outside the loop's schedule: it must not wait."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError(f"{coro} waited")


def peak_allocated(action: Any) -> int:
    """The peak of Python's and numpy's allocations (bytes) while ``action()`` runs."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_arrays_of_every_size_arrive_as_published(broker) -> None:  # type: ignore[no-untyped-def]
    sizes = [1, 2, 3, 2048, 2049, 100_000]  # float32: 4 bytes .. 8 KiB (copied into the write buffer) .. over it
    sent = [np.arange(n, dtype=np.float32) + 0.5 for n in sizes]
    async with dcp.connect(url_of(broker), name="sub") as sub, dcp.connect(url_of(broker), name="pub") as pub:
        route = sub.route_to(sub.port)
        for array in sent:
            await pub.publish("bare", array, route)
            await pub.publish("packed", arrays.pack(array, n=len(array)), route)
        got = [await asyncio.wait_for(sub.next_message(), 20) for _ in range(2 * len(sent))]
    assert [m.topic for m in got] == ["bare", "packed"] * len(sent)
    for array, bare, packed in zip(sent, got[::2], got[1::2]):
        assert np.array_equal(np.frombuffer(bare.payload, np.float32), array)
        assert np.array_equal(arrays.unpack(packed.payload).array, array)
        assert arrays.unpack(packed.payload).meta == {"n": len(array)}


async def test_publishing_a_4_mib_array_allocates_no_copy_of_it(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(slow_consumer="pause")
    array = np.random.default_rng(0).standard_normal(512 * 1024)  # 4 MiB of float64
    async with dcp.connect(url_of(broker), name="sub") as sub, dcp.connect(url_of(broker), name="pub") as pub:
        route = sub.route_to(sub.port)
        for payload in (array, arrays.pack(array, frame=1)):
            peak = peak_allocated(lambda: run_now(pub.publish("x", payload, route)))
            assert peak < array.nbytes // 16, f"publish allocated {peak} bytes for a {array.nbytes}-byte array"
        first = await asyncio.wait_for(sub.next_message(), 20)
        second = await asyncio.wait_for(sub.next_message(), 20)
    assert bytes(first.payload) == array.tobytes()
    got, meta = arrays.unpack(second.payload)
    assert np.array_equal(got, array) and meta == {"frame": 1} and same_memory(second.payload, got)
    assert peak_allocated(lambda: bytes(memoryview(array))) >= array.nbytes  # the probe does see a copy
