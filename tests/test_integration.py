"""A real ``dcp broker`` process, one publisher, two subscribers, in both modes.

Each subscriber must get exactly the frames routed to it, byte-identical, in order,
and nothing else.  Frame sizes span one read, many reads and the broker's large-frame
path; a final fence frame to both subscribers marks the end (TCP and the broker keep
order), so no test waits on time.
"""

from __future__ import annotations

import random
import signal

import pytest

import dcp
from dcp.routing import encode
from tests.conftest import admin_stats

SIZES = [0, 1, 10, 100, 1000, 1024, 4000, 16 * 1024, 65 * 1024, 100 * 1024, 300 * 1024]


def make_plan(seed: int, count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    plan = []
    for i in range(count):
        target = rng.choice(["a", "b", "both", "nobody"])
        size = rng.choice(SIZES)
        payload = i.to_bytes(4, "big") + rng.randbytes(max(size - 4, 0))
        plan.append((target, payload[:size] if size >= 4 else payload))
    return plan


async def collect_until_fence(sub: dcp.Connection) -> list[tuple[str, bytes]]:
    got = []
    while True:
        msg = await sub.next_message(timeout=20)
        if msg.topic == "fence":
            return got
        got.append((msg.topic, msg.payload))


@pytest.mark.parametrize("mode", ["stateless", "stateful"])
async def test_each_subscriber_gets_exactly_its_frames_in_order(broker_process, mode: str) -> None:
    # pause: the lossless policy.  The subscribers read on the publisher's event loop,
    # so under "drop" a fast publisher may legitimately overflow their ports.
    broker = broker_process("--mode", mode, "--slow-consumer", "pause")
    assert broker.mode == mode
    plan = make_plan(seed=7, count=400)
    async with dcp.connect(broker.url, name="pub") as pub, dcp.connect(broker.url, name="a") as a, dcp.connect(
        broker.url, name="b"
    ) as b:
        assert pub.broker_key == broker.key
        assert len({pub.port, a.port, b.port}) == 3
        if mode == "stateless":
            key = broker.key
            routes = {
                "a": encode({key: 1 << a.port}),
                "b": encode({key: 1 << b.port}),
                "both": encode({key: 1 << a.port | 1 << b.port}),
                "nobody": 0,
                "fence": encode({key: 1 << a.port | 1 << b.port}),
            }
        else:
            routes = dict.fromkeys(["a", "b", "both", "nobody", "fence"], 0)
            for topic in ("a", "both", "fence"):
                await a.subscribe(topic)
            for topic in ("b", "both", "fence"):
                await b.subscribe(topic)

        for target, payload in plan:
            await pub.publish(target, payload, route=routes[target])
        await pub.publish("fence", b"", route=routes["fence"])

        got_a = await collect_until_fence(a)
        got_b = await collect_until_fence(b)
        assert got_a == [(t, p) for t, p in plan if t in ("a", "both")]
        assert got_b == [(t, p) for t, p in plan if t in ("b", "both")]
        assert a.pending == 0 and b.pending == 0
        assert pub.pending == 0  # never sent back to the publisher

        stats = await admin_stats(broker.url)
        data_frames = len(plan) + 1
        assert stats["frames_in"] == data_frames
        assert stats["frames_out"] == len(got_a) + len(got_b) + 2
        assert stats["drops"]["no_route"] == sum(1 for t, _ in plan if t == "nobody")
        assert stats["drops"]["slow_consumer"] == 0

    code, log = broker.stop(signal.SIGTERM)
    assert code == 0, log
    assert "dcp broker stopped" in log


async def test_hop_limit_is_decremented_and_route_is_delivered(broker_process) -> None:
    broker = broker_process()
    async with dcp.connect(broker.url) as pub, dcp.connect(broker.url) as sub:
        x = encode({broker.key: 1 << sub.port})
        await pub.publish("t", b"payload", route=x, hops=5)
        msg = await sub.next_message(timeout=10)
        assert (msg.topic, msg.payload, msg.route, msg.hops) == ("t", b"payload", x, 4)
        assert msg.msg_id == 1 and msg.timestamp_ns > 0
    code, _ = broker.stop()
    assert code == 0


async def test_sigint_stops_the_broker_gracefully_and_clients_hear_it(broker_process) -> None:
    broker = broker_process()
    async with dcp.connect(broker.url, reconnect=False) as sub:
        code, log = broker.stop(signal.SIGINT)
        assert code == 0, log
        with pytest.raises(dcp.ConnectionClosed):
            await sub.next_message(timeout=10)
    assert "received SIGINT, shutting down" in log
