"""Every timeout and connection error names the address and what was awaited.

The servers that never answer are loopback listeners on OS-chosen ports that read and
say nothing; the short timeouts here are what each test is about, not a wait for
something else to happen.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

import dcp
from dcp.broker import Broker
from dcp.errors import ConnectionClosed, DcpTimeout

from .conftest import url_of
from .loopback import LoopbackServer


class Silent(LoopbackServer):
    """Accepts connections and reads them, answering nothing."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass


@pytest.fixture
async def silent_servers() -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """``await silent_servers()``: ``dcp://HOST:PORT`` of a new server that never answers."""
    servers: list[Silent] = []

    async def start() -> str:
        servers.append(Silent())
        return f"dcp://{await servers[-1].start()}"

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def silent(silent_servers: Callable[[], Awaitable[str]]) -> str:
    return await silent_servers()


async def test_an_agent_not_attached_in_time_names_the_brokers_it_dialled(silent_servers: Callable[[], Awaitable[str]]) -> None:
    first, second, orchestrator = [await silent_servers() for _ in range(3)]
    agent = dcp.DataAgent("cam", broker=[first, second], orchestrator=orchestrator)
    with pytest.raises(DcpTimeout) as info:
        await agent.start(timeout=0.2)
    assert isinstance(info.value, TimeoutError)  # what start() raised before, so old callers still catch it
    assert str(info.value) == (
        f"data agent 'cam': not attached to a broker within 0.2 s (dialling {first}, {second}; the log says why each try failed)"
    )
    assert agent.orchestrator is None  # it never got as far as the orchestrator


async def test_an_agent_not_registered_in_time_names_the_orchestrator_and_its_broker(broker: Broker, silent: str) -> None:
    agent = dcp.DataAgent("cam", broker=url_of(broker), orchestrator=silent)
    with pytest.raises(DcpTimeout) as info:
        await agent.start(timeout=0.2)
    assert str(info.value) == (
        f"data agent 'cam': not registered with the orchestrator at {silent} within 0.2 s "
        f"(attached to the broker at {url_of(broker)})"
    )


async def test_a_request_without_an_answer_names_the_server_and_the_request(silent: str) -> None:
    with pytest.raises(DcpTimeout, match=f"^{silent} did not answer 'hello' within 0.2 s$"):
        await dcp.connect(silent, reconnect=False, request_timeout_s=0.2)


async def test_waiting_for_a_message_or_on_a_closed_connection_names_the_broker(broker: Broker) -> None:
    url = url_of(broker)
    conn = await dcp.connect(url, name="sub", reconnect=False)
    with pytest.raises(DcpTimeout, match=f"^no message from {url} within 0.01 s$"):
        await conn.next_message(timeout=0.01)
    await conn.close()
    with pytest.raises(ConnectionClosed, match=f"^the connection to {url} is closed$"):
        await conn.publish("t", b"late")
    with pytest.raises(ConnectionClosed, match=f"^the connection to {url} is closed$"):
        await conn.next_message(timeout=1)


async def test_a_link_not_up_in_time_names_the_peer_it_dials(make_broker, silent: str) -> None:  # type: ignore[no-untyped-def]
    peer = silent.removeprefix("dcp://")
    link = (await make_broker(link_timeout_s=0.1)).add_link(peer)
    with pytest.raises(DcpTimeout, match=f"^link on port {link.port} to {peer} not up after 0.2s .*; it keeps redialling until unlinked$"):
        await link.wait_up(0.2)


async def test_wait_route_says_how_far_the_route_got() -> None:
    agent = dcp.DataAgent("camera", broker="dcp://127.0.0.1:1", orchestrator="dcp://127.0.0.1:2")  # never started: no route comes
    with pytest.raises(dcp.DcpTimeout, match=r"camera: 'video' routes to 0 agent\(s\), not 2, 0.05 s after asking \(the orchestrator at dcp://127.0.0.1:2"):
        await agent.wait_route("video", consumers=2, timeout=0.05)
