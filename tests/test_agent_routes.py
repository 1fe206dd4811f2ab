"""The DataAgent's routes, without an orchestrator: which pushed route it keeps, and where it uses X.

A route push goes straight to the agent's push handler, as the orchestrator's would;
the agent's broker connection and a subscriber are real connections to a broker on
an OS-chosen loopback port.  X means something only at the broker it was computed
for (the route's ``broker_key``), so an agent attached elsewhere must not send it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

import dcp
from dcp.control import parse_answer
from dcp.broker import Broker
from dcp.routing import encode, int_to_bytes

from .conftest import url_of


@dataclass
class Attached:
    agent: dcp.DataAgent
    conn: dcp.Connection  # the agent's broker connection
    sub: dcp.Connection  # on another port of the same broker
    x: int  # reaches sub at this broker

    def push(self, epoch: int, **extra: object) -> None:
        body = {"op": "route", "topic": "t", "x": int_to_bytes(self.x), "epoch": epoch, "consumers": ["sub"], **extra}
        self.agent._on_push(parse_answer(body))  # as the connection hands a push over, parsed


@pytest.fixture
async def attached(broker: Broker) -> AsyncIterator[Attached]:
    agent = dcp.DataAgent("producer", broker=url_of(broker))  # not started: no orchestrator
    async with dcp.connect(url_of(broker), name="producer") as conn, dcp.connect(url_of(broker), name="sub") as sub:
        assert sub.port is not None and conn.broker_key == broker.key
        agent.broker = conn
        yield Attached(agent, conn, sub, encode({broker.key: 1 << sub.port}))


def other_key(broker: Broker) -> int:
    return broker.key + 2  # any key but this broker's: X was computed for another broker


async def test_a_route_computed_for_another_broker_is_not_used(attached: Attached, broker: Broker) -> None:
    agent = attached.agent
    attached.push(1, broker_key=int_to_bytes(other_key(broker)))
    assert (agent.routes["t"], agent.route_brokers["t"]) == ((1, attached.x), other_key(broker))
    assert await agent.publish("t", b"computed elsewhere") is False
    assert (agent.unrouted, agent.published, attached.conn.published) == (1, 0, 0)
    attached.push(2, broker_key=int_to_bytes(broker.key))  # the number for this broker
    assert await agent.publish("t", b"computed here") is True
    assert (agent.unrouted, agent.published, attached.conn.published) == (1, 1, 1)
    msg = await attached.sub.next_message(timeout=10)
    assert bytes(msg.payload) == b"computed here"  # the first frame never went out


async def test_a_route_without_a_broker_key_clears_the_one_before(attached: Attached, broker: Broker) -> None:
    agent = attached.agent
    attached.push(1, broker_key=int_to_bytes(other_key(broker)))
    assert await agent.publish("t", b"computed elsewhere") is False
    attached.push(2)  # no broker_key: usable wherever the agent is attached
    assert (agent.routes["t"], agent.route_brokers) == ((2, attached.x), {})
    assert await agent.publish("t", b"unbound") is True
    assert (agent.unrouted, agent.published, attached.conn.published) == (1, 1, 1)
    msg = await attached.sub.next_message(timeout=10)
    assert bytes(msg.payload) == b"unbound"
