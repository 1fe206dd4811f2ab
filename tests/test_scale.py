"""2,000 data agents on one orchestrator and four brokers with default settings.

The orchestrator and the brokers are processes (``python -m dcp``), the brokers linked
in a line (b1 dials b0, ...) and started with nothing but their name, the orchestrator
and the peer; the agents are ``dcp.DataAgent``s in this process, on its uvloop, each
with its own connections to a broker and to the orchestrator.  Agent i is attached to
broker ``i % 4``, produces ``scale.<i>`` and consumes ``scale.<i+1 mod N>``: N streams,
each crossing brokers.  Every stream must be routed to its consumer, and one frame
per stream must arrive exactly once, at its consumer only.

``DCP_SCALE_AGENTS=N`` runs it with N agents instead (10,000 for a larger look:
``DCP_SCALE_AGENTS=10000 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_scale.py``).
"""

from __future__ import annotations

import asyncio
import os
import resource
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import dcp
from tests.conftest import BrokerProcess
from tests.test_pipelines import start_orchestrator_process
from tests.waiting import until

AGENTS = int(os.environ.get("DCP_SCALE_AGENTS", "2000"))
BROKERS = 4
IN_FLIGHT = 200  # start() calls at a time: the servers' accept backlogs are not what this test is about
ROUTED_WITHIN_S = 180.0
# loopback, no tokens in this test
INSECURE = ("--insecure",)


def raise_fd_limit(needed: int) -> None:
    """Soft limit to hard (the daemons started afterwards inherit it); skip if that is not enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} file descriptors; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def wait_plane(do_url: str, brokers: int, timeout: float) -> None:
    """Until the orchestrator has every broker online and every link up at both ends."""

    async def ready() -> bool:
        async with dcp.connect(do_url, role="admin", name="test", reconnect=False) as admin:
            status = (await admin.request({"op": "status"}))["status"]
        online = [b for b in status["brokers"] if b["online"]]
        return len(online) == brokers and sum(link["state"] == "up" for b in online for link in b["links"]) == 2 * (brokers - 1)

    await until(ready, "the brokers registered with the orchestrator, linked", timeout=timeout, interval=0.05)


async def test_2000_agents_are_all_routed_and_every_stream_delivered_exactly_once(
    tmp_path: Path, broker_process: Callable[..., BrokerProcess]
) -> None:
    n = AGENTS
    raise_fd_limit(2 * n + 1000)  # this process holds two connections per agent; the orchestrator one
    do = start_orchestrator_process(tmp_path / "do.db", extra=INSECURE)
    try:
        await two_thousand_agents(n, do, broker_process)
    finally:
        do.stop()


async def two_thousand_agents(n: int, do: Any, broker_process: Callable[..., BrokerProcess]) -> None:
    brokers: list[BrokerProcess] = []
    for i in range(BROKERS):
        peer = ("--peer", brokers[-1].address) if brokers else ()
        brokers.append(broker_process("--name", f"b{i}", "--orchestrator", do.address, *peer, *INSECURE))
    await wait_plane(do.url, BROKERS, timeout=60)

    def topic(i: int) -> str:
        return f"scale.{i}"

    received: dict[int, Counter[str]] = {}
    agents: list[dcp.DataAgent] = []
    for i in range(n):
        agent = dcp.DataAgent(f"a{i}", broker=brokers[i % BROKERS].url, orchestrator=do.url, report_interval_s=5.0)
        got = received[i] = Counter()

        @agent.consume(topic((i + 1) % n))
        async def on_frame(msg: dcp.Message, got: Counter[str] = got) -> None:
            got[msg.payload.decode()] += 1

        await agent.declare_produces(topic(i))
        agents.append(agent)

    gate = asyncio.Semaphore(IN_FLIGHT)

    async def start(agent: dcp.DataAgent) -> None:
        async with gate:
            await agent.start(timeout=60)

    try:
        await asyncio.gather(*(start(agent) for agent in agents))

        def unrouted() -> list[str]:
            """Producers whose route does not name their consumer (agent i-1) yet."""
            return [
                agent.name for i, agent in enumerate(agents)
                if not agent.routes.get(topic(i), (0, 0))[1] or f"a{(i - 1) % n}" not in agent.consumers.get(topic(i), [])
            ]

        await until(lambda: not unrouted(), lambda: f"every stream routed; not yet: {len(unrouted())}, e.g. {unrouted()[:5]}",
                    timeout=ROUTED_WITHIN_S, interval=0.2)
        for i, agent in enumerate(agents):
            assert agent.consumers[topic(i)] == [f"a{(i - 1) % n}"], agent.name
            assert await agent.publish(topic(i), f"a{i}".encode()), agent.name

        def missing() -> list[int]:
            return [i for i in range(n) if not received[i]]

        await until(lambda: not missing(), lambda: f"a frame at every consumer; none yet at {len(missing())}, e.g. {missing()[:5]}",
                    timeout=30, interval=0.1)
        await asyncio.sleep(0.5)  # a duplicate would come right behind
        wrong: dict[str, Any] = {
            agents[i].name: dict(got) for i, got in received.items() if got != Counter({f"a{(i + 1) % n}": 1})
        }
        assert not wrong, f"{len(wrong)} consumers did not get exactly their one frame, e.g. {dict(list(wrong.items())[:5])}"
        for agent in agents:
            assert agent.counters()["unrouted"] == 0 and agent.counters()["lost"] == 0, agent.name
    finally:
        await asyncio.gather(*(agent.stop() for agent in agents), return_exceptions=True)
