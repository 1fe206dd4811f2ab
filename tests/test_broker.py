"""Broker behaviour over real loopback sockets: routing rules, bad input, slow consumers.

Raw peers speak the wire protocol by hand so they can misbehave; well-behaved peers
use the SDK.  Every "nothing else is lost" claim is checked by traffic that crosses
the broker after the misbehaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from typing import Any

import pytest

import dcp
from dcp import wire
from dcp.broker import Broker
from dcp.routing import encode
from dcp.wire import HEADER, ControlFrame, DataFrame, Decoder, encode_control, encode_data

from .conftest import admin_stats, url_of


class RawPeer:
    """A hand-driven connection: send any bytes, read frames, see the close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = Decoder()
        self.events: list[wire.Event] = []
        self.port = -1

    @classmethod
    async def open(cls, broker: Broker, hello: bool = True, rcvbuf: int | None = None) -> RawPeer:
        host, port = broker.address
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock)
        peer = cls(reader, writer)
        if hello:
            peer.send(encode_control({"op": "hello", "id": 1, "name": "raw"}))
            welcome = await peer.next_control()
            assert welcome["op"] == "welcome"
            peer.port = welcome["port"]
        return peer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def next_event(self, timeout: float = 10) -> wire.Event | None:
        """The next frame, or None at EOF."""
        while not self.events:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                return None
            self.events.extend(self.decoder.feed(data))
        return self.events.pop(0)

    async def next_control(self) -> dict[str, Any]:
        event = await self.next_event()
        assert isinstance(event, ControlFrame), event
        return event.body

    async def expect_closed(self) -> None:
        assert await self.next_event() is None

    def close(self) -> None:
        self.writer.close()


def header(ftype: int = wire.DATA, hops: int = 8, x_len: int = 0, topic_len: int = 0, payload_len: int = 0, version: int = 1) -> bytes:
    return HEADER.pack(version, ftype, 0, hops, x_len, topic_len, payload_len, 0, 0)


async def assert_flowing(pub: dcp.Connection, sub: dcp.Connection, key: int, tag: bytes) -> None:
    """A frame from pub reaches sub: the broker and these clients are unharmed."""
    await pub.publish("check", tag, route=encode({key: 1 << sub.port}))
    msg = await sub.next_message(timeout=10)
    assert (msg.topic, msg.payload) == ("check", tag)


@pytest.fixture
async def pair(broker: Broker):  # type: ignore[no-untyped-def]
    async with dcp.connect(url_of(broker), name="pub") as pub, dcp.connect(url_of(broker), name="sub") as sub:
        yield pub, sub


# -- routing rules -------------------------------------------------------------------


async def test_the_same_route_bytes_split_otherwise_between_x_and_topic_route_otherwise(broker: Broker, pair) -> None:  # type: ignore[no-untyped-def]
    """The broker repeats a frame's decision for the next frames with the same X and topic
    bytes; moving the X/topic boundary over the same bytes makes another X."""
    _pub, sub = pair
    raw = await RawPeer.open(broker)
    x = encode({broker.key: 1 << sub.port})
    x_b = x.to_bytes((x.bit_length() + 7) // 8, "big")
    first = encode_data("", b"routed", x)
    shifted = bytearray(first)
    HEADER.pack_into(shifted, 0, *HEADER.unpack_from(first)[:4], 0, len(x_b), 6, 0, 0)  # X = 0, topic = x's bytes
    raw.send(first + bytes(shifted) + first)  # one write: most likely one read
    got = [(await sub.next_message(timeout=10)).payload for _ in range(2)]
    assert got == [b"routed", b"routed"]
    await assert_flowing(_pub, sub, broker.key, b"fence")  # nothing else came before it
    assert broker.drops["no_route"] == 1
    raw.close()


async def test_never_back_to_ingress_and_unattached_bits_are_counted(broker: Broker, pair) -> None:  # type: ignore[no-untyped-def]
    pub, sub = pair
    stray = 40
    assert broker._ports[stray] is None
    x = encode({broker.key: (1 << pub.port) | (1 << sub.port) | (1 << stray)})
    await pub.publish("t", b"once", route=x)
    assert (await sub.next_message(timeout=10)).payload == b"once"
    await assert_flowing(pub, sub, broker.key, b"fence")
    assert pub.pending == 0
    assert [sub.pending, (await admin_stats(url_of(broker)))["drops"]["unattached_port"]] == [0, 1]


async def test_large_frames_are_forwarded_whole_with_hops_decremented(broker: Broker, pair) -> None:  # type: ignore[no-untyped-def]
    pub, sub = pair
    payload = bytes(range(256)) * 1200  # 300 KB: many reads, the broker's large-frame path
    await pub.publish("big", payload, route=encode({broker.key: 1 << sub.port}), hops=9)
    msg = await sub.next_message(timeout=10)
    assert (msg.payload == payload, msg.hops) == (True, 8)


async def test_close_right_after_publishing_sends_every_frame(broker: Broker) -> None:
    """Small publishes are gathered into one write per loop iteration; close() flushes them."""
    async with dcp.connect(url_of(broker), name="sub") as sub:
        pub = await dcp.connect(url_of(broker), name="pub")
        x = encode({broker.key: 1 << sub.port})
        for i in range(500):
            await pub.publish("t", i.to_bytes(4, "big"), route=x)
        await pub.close()  # no yield to the loop since the first publish
        got = [int.from_bytes((await sub.next_message(timeout=10)).payload, "big") for _ in range(500)]
        assert got == list(range(500))


async def test_subscribe_on_a_stateless_broker_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    _pub, sub = pair
    with pytest.raises(dcp.RemoteError) as info:
        await sub.subscribe("t")
    assert info.value.code == "wrong_mode"


async def test_stateful_unsubscribe_stops_delivery(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(mode="stateful")
    async with dcp.connect(url_of(broker)) as pub, dcp.connect(url_of(broker)) as sub:
        await sub.subscribe("a")
        await sub.subscribe("fence")
        await pub.publish("a", b"1")
        await pub.ping()  # the broker has read "1" before the unsubscribe
        await sub.unsubscribe("a")
        await pub.publish("a", b"2")
        await pub.publish("fence", b"")
        assert (await sub.next_message(timeout=10)).payload == b"1"
        assert (await sub.next_message(timeout=10)).topic == "fence"
        assert sub.pending == 0


async def test_all_ports_taken_is_a_clear_refusal(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(ports=2)
    async with dcp.connect(url_of(broker)), dcp.connect(url_of(broker)):
        with pytest.raises(dcp.RemoteError) as info:
            await dcp.connect(url_of(broker), reconnect=False)
        assert info.value.code == "no_free_port"


async def test_a_default_broker_routes_to_ports_in_its_root_and_in_its_banks(broker: Broker) -> None:
    """Past port 63 a port is in a bank: route_to names it through the root's bitmap of
    banks; every subscriber gets one copy and the one left out none."""
    assert broker.config.ports == 10_000 and len(broker.layout.keys) == 160
    async with contextlib.AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(dcp.connect(url_of(broker), name=f"c{i}")) for i in range(130)]
        pub, low, mid, high = conns[0], conns[1], conns[70], conns[129]
        assert (low.port, mid.port, high.port) == (1, 70, 129)  # root, bank 0, bank 1
        assert pub.broker_layout == broker.layout
        await pub.publish("t", b"three", route=pub.route_to(low.port, mid.port, high.port))
        await pub.publish("t", b"one", route=pub.route_to(high.port))
        for sub, expected in ((low, [b"three"]), (mid, [b"three"]), (high, [b"three", b"one"])):
            await pub.ping()  # the broker forwarded both before this pong
            await sub.ping()
            assert [(await sub.next_message(timeout=5)).payload for _ in expected] == expected
            assert sub.pending == 0
        await conns[2].ping()
        assert conns[2].pending == 0
    assert broker.drops["unattached_port"] == 0 and broker.drops["no_route"] == 0


# -- bad input: an error frame, that connection closed, nothing else lost -----------


@pytest.mark.parametrize(
    "garbage, code",
    [
        (b"\xff" * 64, "malformed_frame"),  # wrong version
        (header(payload_len=wire.DEFAULT_LIMITS.max_frame), "frame_too_large"),  # body never sent
        (header(topic_len=300), "frame_too_large"),
        (header(wire.CONTROL, payload_len=3) + b"\x93\x01\x02", "malformed_frame"),  # msgpack array, not a map
        (header(wire.CONTROL, payload_len=2) + b"\xc1\xc1", "malformed_frame"),  # not msgpack
    ],
)
async def test_untrusted_stream_is_closed_with_an_error_frame(broker: Broker, pair, garbage: bytes, code: str) -> None:  # type: ignore[no-untyped-def]
    pub, sub = pair
    await assert_flowing(pub, sub, broker.key, b"before")
    raw = await RawPeer.open(broker)
    raw.send(garbage)
    error = await raw.next_control()
    assert (error["op"], error["code"], error["fatal"]) == ("error", code, True)
    await raw.expect_closed()
    await assert_flowing(pub, sub, broker.key, b"after")


async def test_data_before_hello_is_refused(broker: Broker, pair) -> None:  # type: ignore[no-untyped-def]
    pub, sub = pair
    raw = await RawPeer.open(broker, hello=False)
    raw.send(encode_data("t", b"x", encode({broker.key: 1 << sub.port})))
    error = await raw.next_control()
    assert (error["code"], error["fatal"]) == ("malformed_frame", True)
    assert "hello" in error["message"]
    await raw.expect_closed()
    await assert_flowing(pub, sub, broker.key, b"after")
    assert sub.pending == 0


@pytest.mark.parametrize(
    "frame, code, settings",
    [
        (lambda route: encode_data("t", b"x", route, hops=0), "hop_limit", {}),
        (lambda route: encode_data("t", b"x", 1 << 100), "route_too_large", {"max_x_bits": 64}),
        (lambda route: header(9, payload_len=5) + b"12345", "rejected", {}),
    ],
)
async def test_unforwardable_frame_is_dropped_and_the_stream_goes_on(make_broker, frame, code: str, settings: dict) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(**settings)
    async with dcp.connect(url_of(broker)) as sub:
        raw = await RawPeer.open(broker)
        route = encode({broker.key: 1 << sub.port})
        raw.send(frame(route) + encode_data("t", b"good", route))
        error = await raw.next_control()
        assert (error["code"], error["fatal"], error["count"]) == (code, False, 1)
        msg = await sub.next_message(timeout=10)
        assert msg.payload == b"good"
        assert sub.pending == 0
        assert broker.drops[code] == 1
        raw.close()


async def test_repeated_bad_frames_get_one_error_frame_per_interval(broker: Broker, pair) -> None:  # type: ignore[no-untyped-def]
    pub, sub = pair
    raw = await RawPeer.open(broker)
    raw.send(encode_data("t", b"x", 1 << sub.port, hops=0) * 100 + encode_control({"op": "ping", "id": 7}))
    error = await raw.next_control()
    assert error["code"] == "hop_limit"
    assert (await raw.next_control())["op"] == "pong"  # no 99 more error frames in between
    assert broker.drops["hop_limit"] == 100


async def test_truncated_frame_is_counted_and_never_forwarded(broker: Broker, pair) -> None:  # type: ignore[no-untyped-def]
    pub, sub = pair
    raw = await RawPeer.open(broker)
    frame = encode_data("t", b"z" * 1000, encode({broker.key: 1 << sub.port}))
    raw.send(frame[:500])
    raw.writer.write_eof()
    await raw.expect_closed()
    await assert_flowing(pub, sub, broker.key, b"after")
    assert sub.pending == 0
    assert broker.drops["truncated"] == 1


async def test_unknown_control_op_gets_an_error_reply(broker: Broker) -> None:
    raw = await RawPeer.open(broker)
    raw.send(encode_control({"op": "launch", "id": 5}))
    reply = await raw.next_control()
    assert (reply["op"], reply["re"], reply["code"], reply["fatal"]) == ("error", 5, "unknown_op", False)
    raw.send(encode_control({"op": "ping", "id": 6}))
    assert (await raw.next_control())["re"] == 6


# -- slow consumers ------------------------------------------------------------------


async def test_stalled_consumer_drops_are_counted_and_bounded_and_others_lose_nothing(make_broker) -> None:  # type: ignore[no-untyped-def]
    bound = 64 * 1024
    broker = await make_broker(out_buffer_bytes=bound)
    stalled = await RawPeer.open(broker, rcvbuf=16 * 1024)  # attached, never reads again
    async with dcp.connect(url_of(broker)) as pub, dcp.connect(url_of(broker)) as fast:
        route = encode({broker.key: 1 << fast.port | 1 << stalled.port})
        payload = b"p" * 1024
        total = 0
        for batch in range(20):  # 20 MB to the stalled port: far past every socket buffer
            for i in range(1000):
                await pub.publish("t", payload, route=route)
            for i in range(1000):  # the fast consumer keeps up: it gets every frame
                msg = await fast.next_message(timeout=10)
                assert msg.msg_id == total + i + 1
            total += 1000
            buffered = next(c for c in broker._connections if c.port == stalled.port).transport.get_write_buffer_size()
            assert buffered <= bound + 256 * 1024  # the bound plus at most one read's worth
        stats = await admin_stats(url_of(broker))
        stalled_stats = next(c for c in stats["connections"] if c["port"] == stalled.port)
        assert stats["drops"]["slow_consumer"] == stalled_stats["dropped"] > 0
        assert stalled_stats["frames_out"] + stalled_stats["dropped"] == total
        fast_stats = next(c for c in stats["connections"] if c["port"] == fast.port)
        assert (fast_stats["frames_out"], fast_stats["dropped"]) == (total, 0)
    stalled.close()


async def test_pause_policy_holds_the_publisher_and_loses_nothing(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(out_buffer_bytes=64 * 1024, slow_consumer="pause")
    slow = await RawPeer.open(broker, rcvbuf=16 * 1024)
    slow.reader._limit = 2**30  # type: ignore[attr-defined]
    count, size = 20_000, 1024
    async with dcp.connect(url_of(broker), write_buffer_bytes=64 * 1024) as pub:
        route = encode({broker.key: 1 << slow.port})

        async def publish_all() -> None:
            for _ in range(count):
                await pub.publish("t", b"q" * size, route=route)
            await pub.ping()

        publishing = asyncio.create_task(publish_all())
        publisher_conn = next(c for c in broker._connections if c.name == "")
        # The publisher is held: the broker stopped reading it, and its task cannot finish.
        while not publisher_conn.reading_paused:
            await asyncio.sleep(0)  # yield to the loop (no timing involved)
            assert not publishing.done()
        received = 0
        while received < count:
            event = await slow.next_event()
            assert isinstance(event, DataFrame)
            assert event.msg_id == received + 1
            received += 1
        await asyncio.wait_for(publishing, 10)
        assert broker.drops["slow_consumer"] == 0
    slow.close()


# -- the SDK's own contract --------------------------------------------------------------


async def test_client_reconnects_and_restores_stateful_subscriptions(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(mode="stateful")
    host, port = broker.address
    backoff = dcp.Backoff(initial_s=0.01, max_s=0.05)
    async with dcp.connect(url_of(broker), reconnect=backoff) as sub:
        await sub.subscribe("news")
        await broker.close()
        restarted = await make_broker(mode="stateful", listen=f"{host}:{port}")
        await sub.wait_connected(timeout=10)
        assert sub.connects == 2
        async with dcp.connect(url_of(restarted)) as pub:
            await pub.publish("news", b"after restart")
            assert (await sub.next_message(timeout=10)).payload == b"after restart"


async def test_publish_waits_for_the_reconnect(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker()
    host, port = broker.address
    async with dcp.connect(url_of(broker), reconnect=dcp.Backoff(initial_s=0.01, max_s=0.05)) as pub:
        await broker.close()
        restarted = await make_broker(listen=f"{host}:{port}")
        async with dcp.connect(url_of(restarted)) as sub:
            await pub.publish("t", b"held until reconnected", route=encode({restarted.key: 1 << sub.port}))
            assert (await sub.next_message(timeout=10)).payload == b"held until reconnected"


async def test_without_reconnect_a_lost_connection_is_closed_for_good(broker: Broker) -> None:
    conn = await dcp.connect(url_of(broker), reconnect=False)
    await broker.close()
    with pytest.raises(dcp.ConnectionClosed):
        await conn.next_message(timeout=10)
    with pytest.raises(dcp.ConnectionClosed):
        await conn.publish("t", b"x")
    assert conn.status is dcp.Status.CLOSED


async def test_messages_iteration_ends_when_closed_and_close_is_idempotent(broker: Broker) -> None:
    conn = await dcp.connect(url_of(broker))

    async def drain() -> list[dcp.Message]:
        return [msg async for msg in conn.messages()]

    draining = asyncio.create_task(drain())
    assert await conn.ping() > 0
    await conn.close()
    await conn.close()
    assert await asyncio.wait_for(draining, 10) == []


@pytest.mark.parametrize(("overflow", "kept"), [("drop", range(10)), ("drop-newest", range(10)), ("drop-oldest", range(41, 51))])
async def test_client_drop_overflow_counts_what_it_drops(broker: Broker, overflow: str, kept: range) -> None:
    async with dcp.connect(url_of(broker)) as pub, dcp.connect(url_of(broker), max_pending=10, overflow=overflow) as sub:
        route = encode({broker.key: 1 << sub.port})
        for i in range(51):
            await pub.publish("t", b"%d" % i, route=route)
        await pub.ping()
        await sub.ping()  # the broker wrote everything before this pong
        assert (sub.pending, sub.dropped, sub.received) == (10, 41, 10 if overflow != "drop-oldest" else 51)
        assert [(await sub.next_message()).payload for _ in range(10)] == [b"%d" % i for i in kept]


async def test_publish_checks_limits_locally(broker: Broker) -> None:
    async with dcp.connect(url_of(broker)) as pub:
        with pytest.raises(dcp.LocalProtocolError):
            await pub.publish("t" * 300, b"x")
        with pytest.raises(dcp.LocalProtocolError):
            await pub.publish("t", b"x" * (broker.limits.max_frame + 1))
        with pytest.raises(dcp.LocalProtocolError):
            await pub.publish("t", b"x", route=1 << broker.limits.max_x_bits)
        assert await pub.ping() > 0  # nothing invalid reached the broker


async def test_connect_refused_raises_at_once() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(OSError):
        await dcp.connect(f"dcp://127.0.0.1:{port}")
    with pytest.raises(dcp.ConfigError):
        dcp.connect("http://127.0.0.1:1")


def test_connect_spells_out_the_options_of_a_connection() -> None:
    """connect() lists Connection's options for users and type checkers: the same names,
    kinds, defaults and types, and a misspelt one is a TypeError at the call."""
    assert inspect.signature(dcp.connect).parameters == inspect.signature(dcp.Connection).parameters
    assert all(p.kind is p.KEYWORD_ONLY for name, p in inspect.signature(dcp.connect).parameters.items() if name != "url")
    assert all(f"{name}:" in (dcp.connect.__doc__ or "") for name in inspect.signature(dcp.connect).parameters)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nmae'"):
        dcp.connect("dcp://127.0.0.1:1", nmae="camera")  # type: ignore[call-arg]


async def test_good_frames_before_a_bad_one_in_the_same_read_are_delivered(broker: Broker, pair) -> None:  # type: ignore[no-untyped-def]
    _pub, sub = pair
    raw = await RawPeer.open(broker)
    route = encode({broker.key: 1 << sub.port})
    raw.send(encode_data("t", b"one", route) + encode_data("t", b"two", route) + b"\xff" * 40)
    assert (await raw.next_control())["code"] == "malformed_frame"
    await raw.expect_closed()
    assert [(await sub.next_message(timeout=10)).payload for _ in range(2)] == [b"one", b"two"]
