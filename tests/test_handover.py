"""Graceful hand-over: a broker's going_away, ``Connection.drain()`` and ``Connection.flush()``.

Real brokers and a real orchestrator, in this process, on loopback ports the OS
chooses.  A broker that shuts down sends ``going_away`` on every connection and then
reads nothing more: an agent leaves it at once for the next broker of its list and
never redials it; a plain connection (one URL) redials it with the backoff and writes
first what it had not written to it yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

import dcp
from dcp.broker import Broker, BrokerConnection
from dcp.client import Status
from dcp.config import OrchestratorConfig
from dcp.control import GoingAway
from dcp.orchestrator import Orchestrator
from dcp.wire import encode_control

from .conftest import url_of
from .waiting import until

TOPIC = "handover"
FRAME = 64 * 1024  # large enough that a burst outgrows the kernel's socket buffers
BURST = 400  # frames of FRAME bytes: 25 MiB, more than loopback sockets hold
GOING_AWAY = encode_control(GoingAway().to_body())


@pytest.fixture
async def orchestrator() -> AsyncIterator[Orchestrator]:
    do = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=":memory:", insecure=True))
    await do.start()
    yield do
    await do.close()


class StandIn:
    """Listens on the address of a broker that has shut down and counts who dials it."""

    def __init__(self) -> None:
        self.dialled = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.dialled += 1
        writer.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def server_side(broker: Broker, name: str) -> BrokerConnection:
    (conn,) = [c for c in broker._connections if c.name == name]
    return conn


async def test_an_agent_told_going_away_moves_to_the_next_broker_and_never_redials_the_leaving_one(
    make_broker, orchestrator: Orchestrator  # type: ignore[no-untyped-def]
) -> None:
    leaving, next_one = await make_broker(), await make_broker()
    host, port = orchestrator.address
    agent = dcp.DataAgent("mover", broker=[url_of(leaving), url_of(next_one)], orchestrator=f"dcp://{host}:{port}")
    await agent.start()
    stand_in = StandIn()
    try:
        first = agent.broker
        assert first is not None and first.url == url_of(leaving)
        address = leaving.address
        await leaving.close()  # going_away on every connection, then closed
        # The agent's redials, were there any, would reach the stand-in from now on (the
        # first backoff delay is 50 ms, and the old behaviour redialled three times).
        await stand_in.start(*address)
        await until(lambda: agent.broker is not None and agent.broker.url == url_of(next_one) and agent.broker.status is Status.OPEN,
                    "the agent attached to the next broker")
        await until(lambda: orchestrator.agents["mover"].broker_key == next_one.key, "the agent registered at the next broker")
        assert first.went_away and first.status is Status.CLOSED and first.connects == 1  # it never came back
        assert stand_in.dialled == 0
    finally:
        await agent.stop()
        await stand_in.close()


async def test_a_failover_connection_ends_at_going_away_while_the_broker_still_listens(broker: Broker) -> None:
    async with dcp.connect(url_of(broker), name="mover", failover=True) as conn:
        server_side(broker, "mover").close(GOING_AWAY)  # what Broker.close() does to each connection
        with pytest.raises(dcp.ConnectionClosed) as info:
            await conn.next_message(timeout=10)
        assert "going away" in str(info.value.__cause__)
        assert conn.went_away and conn.status is Status.CLOSED and conn.connects == 1
        with pytest.raises(dcp.ConnectionClosed):
            await conn.publish(TOPIC, b"too late", route=1)
    assert broker.attached == 0  # a redial would have found it listening


async def test_a_plain_connection_keeps_what_it_had_not_written_and_writes_it_to_the_broker_it_redials(broker: Broker) -> None:
    async with dcp.connect(url_of(broker), name="sub") as sub, dcp.connect(url_of(broker), name="pub") as pub:
        assert sub.port is not None
        route = sub.route_to(sub.port)
        await pub.publish(TOPIC, b"before", route=route)
        assert (await sub.next_message(timeout=10)).payload == b"before"
        server_side(broker, "pub").close(GOING_AWAY)  # in pub's socket now, read at the next poll
        # Published in this loop iteration: still in pub's coalescing buffer when the
        # going_away is read, and the broker reads nothing after it.
        await pub.publish(TOPIC, b"kept 1", route=route)
        await pub.publish(TOPIC, b"kept 2", route=route)
        await pub.publish(TOPIC, b"after", route=route)  # kept as well, or waits for the reconnect
        got = [bytes((await sub.next_message(timeout=10)).payload) for _ in range(3)]
        assert got == [b"kept 1", b"kept 2", b"after"]
        assert pub.connects == 2 and pub.unwritten == 0


async def burst(pub: dcp.Connection, route: int) -> None:
    """BURST frames, published without yielding to the loop: what the kernel does not
    take at once stays in the transport's buffer."""
    for seq in range(BURST):
        await pub.publish(TOPIC, seq.to_bytes(4, "big") * (FRAME // 4), route=route)


async def sequence_numbers(sub: dcp.Connection, count: int) -> list[int]:
    return [int.from_bytes((await sub.next_message(timeout=30)).payload[:4], "big") for _ in range(count)]


async def test_drain_refuses_new_frames_and_loses_none_of_those_buffered(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(slow_consumer="pause")  # lossless: a burst must not be dropped on the way
    async with dcp.connect(url_of(broker), name="sub") as sub, \
            dcp.connect(url_of(broker), name="pub", write_buffer_bytes=BURST * FRAME * 2) as pub:
        assert sub.port is not None
        route = sub.route_to(sub.port)
        await burst(pub, route)
        assert pub.unwritten > 0  # the precondition: there is something to hand over
        draining = asyncio.ensure_future(pub.drain(timeout=60))
        await until(lambda: pub.status is not Status.OPEN, "the drain started")
        with pytest.raises(dcp.ConnectionClosed, match="draining"):
            await pub.publish(TOPIC, b"refused", route=route)
        await draining
        assert pub.status is Status.CLOSED
        assert await sequence_numbers(sub, BURST) == list(range(BURST))
        await pub.drain()  # idempotent


async def test_flush_returns_once_the_os_has_every_byte_and_times_out_with_a_clear_error(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = await make_broker(slow_consumer="pause", out_buffer_bytes=64 * 1024)
    async with dcp.connect(url_of(broker), name="sub", max_pending=2) as sub, \
            dcp.connect(url_of(broker), name="pub", write_buffer_bytes=BURST * FRAME * 2) as pub:
        assert sub.port is not None
        route = sub.route_to(sub.port)
        await burst(pub, route)
        # sub takes nothing yet: it stops reading at 2 frames, the broker stops reading pub.
        with pytest.raises(dcp.DcpTimeout, match="not all written"):
            await pub.flush(timeout=0.5)
        assert pub.unwritten > 0 and pub.status is Status.OPEN
        taking = asyncio.ensure_future(sequence_numbers(sub, BURST))
        await pub.flush(timeout=60)
        assert pub.unwritten == 0
        assert await taking == list(range(BURST))
        await pub.publish(TOPIC, b"\0\0\0\0still open", route=route)  # the flush left publishing as it was
        assert (await sub.next_message(timeout=10)).payload == b"\0\0\0\0still open"
