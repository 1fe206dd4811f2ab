"""``dcp demo``: a broker, one publisher and two subscribers in one process.

The publisher computes each frame's topology number with :func:`dcp.routing.encode`
from the ports the subscribers got, so each frame reaches exactly the subscribers it
names; the demo prints every frame as it flows and the broker's counters at the end.
"""

from __future__ import annotations

import asyncio
import time

from .broker import Broker
from .client import Connection, connect
from .config import BrokerConfig
from .routing import encode, ports_of

__all__ = ["run_demo"]


async def _receive(conn: Connection, label: str, expected: int, seen: list[str]) -> None:
    for _ in range(expected):
        msg = await conn.next_message(timeout=10)
        latency_us = (time.time_ns() - msg.timestamp_ns) / 1000
        print(f"  {label:<6} <- {msg.topic:<14} #{msg.msg_id:<3} {msg.payload.decode():<28} {latency_us:8.0f} us")
        seen.append(label)


async def run_demo(count: int = 12, interval_s: float = 0.05) -> int:
    broker = Broker(BrokerConfig(listen="127.0.0.1:0"))
    await broker.start()
    host, port = broker.address
    url = f"dcp://{host}:{port}"
    print(f"broker listening on {host}:{port} (stateless, key {broker.key})")
    async with connect(url, name="left") as left, connect(url, name="right") as right, connect(url, name="camera") as camera:
        key = camera.broker_key
        assert key is not None and left.port is not None and right.port is not None
        routes = {
            "left": encode({key: 1 << left.port}),
            "right": encode({key: 1 << right.port}),
            "both": encode({key: (1 << left.port) | (1 << right.port)}),
        }
        print(f"subscribers: left on port {left.port}, right on port {right.port}; publisher on port {camera.port}")
        for name, x in routes.items():
            print(f"  route {name:<5} X = {x:<4} -> ports {ports_of(x % key)}")
        plan = [list(routes)[i % 3] for i in range(count)]
        expect_left = sum(1 for name in plan if name in ("left", "both"))
        expect_right = sum(1 for name in plan if name in ("right", "both"))
        seen: list[str] = []
        receivers = asyncio.gather(
            _receive(left, "left", expect_left, seen), _receive(right, "right", expect_right, seen)
        )
        for i, name in enumerate(plan):
            await camera.publish(f"camera.{name}", f"frame {i} for {name}".encode(), route=routes[name])
            await asyncio.sleep(interval_s)
        await receivers
    await broker.close()
    print(f"summary: published {count}, delivered left={seen.count('left')} right={seen.count('right')}")
    print(f"broker: {broker.summary()}")
    return 0
