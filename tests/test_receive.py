"""The SDK's three ways to receive: ``messages()``, ``batches()`` and ``on_message=``.

Each must hand over exactly the frames routed to the connection, once each, in
order, byte-identical, across sizes from empty to several reads (a payload of
``IN_PLACE_PAYLOAD`` bytes or more arrives as the bytearray the socket read it
into).  A fence frame marks the end, so no test waits on time.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import pytest

import dcp
from dcp.broker import Broker
from dcp.wire import IN_PLACE_PAYLOAD
from tests.conftest import url_of
from tests.waiting import until

SIZES = [0, 1, 100, 1024, 16 * 1024, IN_PLACE_PAYLOAD - 1, IN_PLACE_PAYLOAD, 100 * 1024, 300 * 1024]


def plan(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice(SIZES)) for _ in range(count)]


async def receive_until_fence(way: str, url: str, start: Callable[[dcp.Connection], asyncio.Future[None]]) -> list[dcp.Message]:
    """Attach, let ``start`` publish to us, and collect what comes until the fence."""
    got: list[dcp.Message] = []
    fenced = asyncio.get_running_loop().create_future()

    def take(msg: dcp.Message) -> None:
        if msg.topic == "fence":
            fenced.set_result(None)
        else:
            got.append(msg)

    async with dcp.connect(url, name="sub", on_message=take if way == "on_message" else None) as sub:
        await start(sub)
        if way == "messages":
            async for msg in sub.messages():
                take(msg)
                if fenced.done():
                    break
        elif way == "batches":
            async for batch in sub.batches():
                assert batch, "a batch holds at least one frame"
                for msg in batch:
                    take(msg)
                if fenced.done():
                    break
        await asyncio.wait_for(fenced, 20)
        assert sub.received == len(got) + 1
    return got


@pytest.mark.parametrize("way", ["messages", "batches", "on_message"])
async def test_every_way_to_receive_hands_over_each_frame_once_in_order(make_broker, way: str) -> None:  # type: ignore[no-untyped-def]
    broker: Broker = await make_broker(slow_consumer="pause")
    payloads = plan(seed=11, count=120)

    async with dcp.connect(url_of(broker), name="pub") as pub:

        async def publish_to(sub: dcp.Connection) -> None:
            route = sub.route_to(sub.port)
            for payload in payloads:
                await pub.publish("data", payload, route)
            await pub.publish("fence", b"", route)

        got = await receive_until_fence(way, url_of(broker), lambda sub: asyncio.ensure_future(publish_to(sub)))
    assert [bytes(m.payload) for m in got] == payloads
    assert [m.msg_id for m in got] == list(range(1, len(payloads) + 1))
    for msg in got:  # bytes, or for a large payload the bytearray read in place
        assert type(msg.payload) is bytes or (type(msg.payload) is bytearray and len(msg.payload) >= IN_PLACE_PAYLOAD)
    assert any(type(m.payload) is bytearray for m in got)


async def test_an_on_message_callback_that_raises_is_counted_and_logged_and_the_frames_go_on(broker, caplog) -> None:  # type: ignore[no-untyped-def]
    seen: list[bytes] = []

    def fragile(msg: dcp.Message) -> None:
        seen.append(bytes(msg.payload))
        if msg.payload != b"last":
            raise ValueError(f"cannot take {bytes(msg.payload)!r}")

    caplog.set_level(logging.ERROR, logger="dcp.client")
    async with dcp.connect(url_of(broker), name="sub", on_message=fragile) as sub, dcp.connect(url_of(broker)) as pub:
        route = sub.route_to(sub.port)
        for i in range(9):
            await pub.publish("t", b"%d" % i, route)
        await pub.publish("t", b"last", route)
        await until(lambda: len(seen) == 10, lambda: f"only {seen} came")
        assert seen == [b"%d" % i for i in range(9)] + [b"last"]
        assert sub.callback_errors == 9 and sub.received == 10
        assert sub.status is dcp.Status.OPEN
    logged = [r for r in caplog.records if "on_message callback raised" in r.getMessage()]
    assert [r.args for r in logged] == [(1,), (2,), (4,), (8,)]  # 1st, 2nd, 4th, 8th: bounded
    assert all(r.exc_info and r.exc_info[0] is ValueError for r in logged)


async def test_a_connection_with_on_message_has_no_queue_to_iterate(broker) -> None:  # type: ignore[no-untyped-def]
    async with dcp.connect(url_of(broker), on_message=lambda msg: None) as conn:
        with pytest.raises(dcp.ConfigError, match="on_message"):
            conn.messages()
        with pytest.raises(dcp.ConfigError, match="on_message"):
            conn.batches()
        with pytest.raises(dcp.ConfigError, match="on_message"):
            await conn.next_message(timeout=1)


async def test_batches_end_when_the_connection_is_closed_by_us(broker) -> None:  # type: ignore[no-untyped-def]
    async with dcp.connect(url_of(broker)) as conn:
        batches = conn.batches()
        waiting = asyncio.ensure_future(batches.__anext__())
        await asyncio.sleep(0)  # the iterator waits for a frame
        await conn.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, 10)
