"""The broker's framing and forwarding, driven through a fake transport (no sockets).

Properties over any split of the publisher's byte stream into reads: every target
port gets exactly the frames routed to it, byte-identical but for the hop limit
(decremented), in order, and no other port gets any.  A live-socket fuzz test then
throws random and mutated bytes at a real broker while real clients keep talking.
"""

from __future__ import annotations

import asyncio
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcp
from dcp.broker import Broker, BrokerConnection
from dcp.config import BrokerConfig
from dcp.routing import encode
from dcp.wire import HOPS_OFFSET, ControlFrame, Decoder, encode_control, encode_data

from .conftest import url_of


class FakeTransport:
    """Records what the broker writes; never pushes back."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> None:
        return None

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def attached(broker: Broker) -> BrokerConnection:
    conn = BrokerConnection(broker)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    conn.data_received(encode_control({"op": "hello", "id": 1}))
    conn.transport.written.clear()  # type: ignore[union-attr]
    return conn


def fresh_broker(**settings: object) -> Broker:
    broker = Broker(BrokerConfig(**settings))  # type: ignore[arg-type]
    broker._no_connections = asyncio.Event()
    return broker


frame_plans = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "both", "none", "hops0"]),
        st.one_of(st.binary(max_size=64), st.integers(0, 200_000).map(lambda n: b"\x5a" * n)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=frame_plans, cuts=st.lists(st.integers(0, 1_000_000), max_size=20), mode=st.sampled_from(["stateless", "stateful"]))
def test_any_read_split_forwards_exactly_the_routed_frames(plan, cuts, mode) -> None:  # type: ignore[no-untyped-def]
    broker = fresh_broker(mode=mode)
    pub, a, b = attached(broker), attached(broker), attached(broker)
    if mode == "stateful":
        for conn, topics in ((a, [b"a", b"both", b"hops0"]), (b, [b"b", b"both", b"hops0"])):
            for topic in topics:
                broker.subscribe(conn, topic)
    routes = {
        "a": 1 << a.port,
        "b": 1 << b.port,
        "both": 1 << a.port | 1 << b.port,
        "none": 0,
        "hops0": 1 << a.port | 1 << b.port,
    }
    frames = [
        encode_data(target, payload, encode({broker.key: routes[target]}) if mode == "stateless" else 0, hops=0 if target == "hops0" else 7, msg_id=i)
        for i, (target, payload) in enumerate(plan)
    ]
    stream = b"".join(frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for start, stop in zip(points, points[1:]):
        pub.data_received(stream[start:stop])

    def expected(port_name: str) -> bytes:
        out = bytearray()
        for (target, _), frame in zip(plan, frames):
            if target == port_name or target == "both":
                patched = bytearray(frame)
                patched[HOPS_OFFSET] -= 1
                out += patched
        return bytes(out)

    assert bytes(a.transport.written) == expected("a")  # type: ignore[union-attr]
    assert bytes(b.transport.written) == expected("b")  # type: ignore[union-attr]
    pub_events = Decoder().feed(bytes(pub.transport.written))  # type: ignore[union-attr]
    assert all(isinstance(e, ControlFrame) and e.body["code"] == "hop_limit" for e in pub_events)
    assert broker.drops["hop_limit"] == sum(1 for t, _ in plan if t == "hops0")
    assert broker.frames_in == len(plan)
    assert not pub.transport.closed  # type: ignore[union-attr]


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        action = rng.random()
        pos = rng.randrange(len(out) + 1)
        if action < 0.5 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif action < 0.75:
            out[pos:pos] = rng.randbytes(rng.randint(1, 16))
        else:
            del out[pos : pos + rng.randint(1, 16)]
    return bytes(out)


async def test_live_broker_survives_random_and_mutated_streams(broker: Broker) -> None:
    """Hostile connections come and go; a publisher and a subscriber lose nothing."""
    rng = random.Random(2024)
    host, port = broker.address
    async with dcp.connect(url_of(broker)) as pub, dcp.connect(url_of(broker)) as sub:
        route = encode({broker.key: 1 << sub.port})
        valid = encode_control({"op": "hello", "id": 1}) + b"".join(
            encode_data("fuzz", rng.randbytes(rng.randint(0, 300)), route, msg_id=i) for i in range(5)
        )
        sent = 0
        for round_ in range(150):
            reader, writer = await asyncio.open_connection(host, port)
            garbage = rng.randbytes(rng.randint(1, 200)) if round_ % 3 == 0 else mutate(valid, rng)
            writer.write(garbage)
            writer.write_eof()
            await reader.read()  # the broker answers or closes; either way this peer is done
            writer.close()
            await pub.publish("ok", b"%d" % round_, route=route)
            sent += 1
        # Mutated frames may legally route copies to sub (their X still names its port);
        # the publisher's frames must all be there, in order.
        got = []
        while len(got) < sent:
            msg = await sub.next_message(timeout=10)
            if msg.topic == "ok":
                got.append(msg.payload)
        assert got == [b"%d" % i for i in range(sent)]
        assert await pub.ping() > 0
        stats = await pub.stats()
        assert {c["port"] for c in stats["connections"]} == {pub.port, sub.port}
