"""Load reports (broker -> orchestrator) and the re-planning they cause.

A broker reports its links' round trip, throughput and output queue, and its
attachments' queues, once per LOAD_INTERVAL_S and only what changed much; the
orchestrator turns a link's figures into a cost past the hysteresis, and the trees that
cost changes are planned again with a new epoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import dcp
from dcp import broker as broker_module, topology
from dcp.broker import _changed_much
from dcp.routing import allocate_keys, int_to_bytes
from dcp.topology import HOP_COST_US, simulate
from dcp.views import format_pipelines
from tests.test_orchestrator import Plane
from tests.waiting import until

KEYS = allocate_keys(3, 16)
#: A triangle: b0 port 0 - b1 port 0 (direct), b0 port 1 - b2 port 0, b2 port 1 - b1 port 1 (detour).
TRIANGLE = {
    "b0": [(0, "b1", 0), (1, "b2", 0)],
    "b1": [(0, "b0", 0), (1, "b2", 1)],
    "b2": [(0, "b0", 1), (1, "b1", 1)],
}


def state(name: str) -> dict[str, Any]:
    key = {"b0": KEYS[0], "b1": KEYS[1], "b2": KEYS[2]}
    links = [
        {"port": port, "remote_key": int_to_bytes(key[other]), "remote_port": remote, "state": "up"}
        for port, other, remote in TRIANGLE[name]
    ]
    return {"op": "broker_state", "key": int_to_bytes(key[name]), "ports": 16, "links": links}


def load(port: int, rtt_ms: float, queue: int = 0, rate: float = 100_000.0) -> dict[str, Any]:
    return {"op": "load", "links": [{"port": port, "rtt_ms": rtt_ms, "bytes_per_s": rate, "queue_bytes": queue}], "ports": []}


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    plane = Plane(tmp_path / "do.db")
    await plane.start_do()
    yield plane
    await plane.close()


@pytest.fixture
async def opened(plane: Plane) -> AsyncIterator[dict[str, dcp.Connection]]:
    """The triangle's brokers as clients of the orchestrator, each registered with its state."""
    async with contextlib.AsyncExitStack() as stack:
        conns = {
            name: await stack.enter_async_context(dcp.connect(plane.do_url, role="broker", name=name, reconnect=False))
            for name in TRIANGLE
        }
        for name, conn in conns.items():
            await conn.request(state(name))
        yield conns


def test_only_a_significant_change_is_reported() -> None:
    floors = (1.0, 10_000.0, 16_384.0)
    assert _changed_much(None, (0.2, 0.0, 0.0), floors)  # first figures: always
    assert not _changed_much((0.2, 50_000.0, 0.0), (0.9, 60_000.0, 10_000.0), floors)  # noise under every floor
    assert not _changed_much((100.0, 1e6, 1e6), (120.0, 1.2e6, 1.2e6), floors)  # under 25 %
    assert _changed_much((100.0, 1e6, 1e6), (130.0, 1e6, 1e6), floors)
    assert _changed_much((0.2, 0.0, 0.0), (0.2, 0.0, 100_000.0), floors)  # a queue builds up


async def test_a_congested_link_moves_the_tree_to_the_detour_and_back(plane: Plane, opened: dict[str, dcp.Connection], monkeypatch: pytest.MonkeyPatch) -> None:
    """Brokers as clients: b0's direct link to b1 congests, then recovers.  Noise under
    the hysteresis changes nothing; each move is a new epoch; the way back waits for the
    hold-down; a report on a port with no link is ignored."""
    monkeypatch.setattr(topology, "HOLD_DOWN_S", 2.0)
    do = plane.do
    assert do is not None
    reg = {"op": "register", "capabilities": [], "port": 5}
    async with dcp.connect(plane.do_url, role="agent", name="producer", reconnect=False) as producer, \
            dcp.connect(plane.do_url, role="agent", name="consumer", reconnect=False) as consumer:
        await producer.request({**reg, "broker_key": int_to_bytes(KEYS[0]), "consumes": [], "produces": ["t"]})
        await consumer.request({**reg, "broker_key": int_to_bytes(KEYS[1]), "consumes": ["t"], "produces": []})
        await until(lambda: do.streams.get(("producer", "t")) is not None and do.streams[("producer", "t")].consumers == ["consumer"], "the route")

        def visits() -> set[str]:
            stream = do.streams[("producer", "t")]
            return {b for b, n in simulate(do.overlay(), stream.x, ("b0", 5)).visits.items() if n}

        assert visits() == {"b0", "b1"}
        epoch = do.streams[("producer", "t")].epoch
        b0 = opened["b0"]
        for rtt in (0.3, 0.5, 0.2, 0.6):  # noise: under the hysteresis
            b0.send(load(0, rtt))
            await b0.request({"op": "ping"})
        assert do.brokers["b0"].costs[0] == HOP_COST_US + 150  # the first figures; the rest within the hysteresis
        b0.send(load(9, 900.0))  # no link on port 9: ignored
        b0.send({"op": "load", "links": [], "ports": [{"port": 5, "queue_bytes": 70_000}, {"port": 99, "queue_bytes": 1}]})
        await b0.request({"op": "ping"})
        assert 9 not in do.brokers["b0"].costs and do.streams[("producer", "t")].epoch == epoch
        assert do.brokers["b0"].queues == {5: 70_000}  # port 99 is out of the broker's range

        b0.send(load(0, 400.0, queue=1_000_000))  # congested
        await until(lambda: visits() == {"b0", "b1", "b2"}, "the detour")
        assert do.streams[("producer", "t")].epoch == epoch + 1
        status = await plane.admin({"op": "status", "id": 1})
        [direct] = [link for b in status["status"]["brokers"] if b["name"] == "b0" for link in b["links"] if link["port"] == 0]
        assert (direct["rtt_ms"], direct["queue_bytes"], direct["cost_us"]) == (400.0, 1_000_000, do.brokers["b0"].costs[0])

        b0.send(load(0, 0.4))  # recovered
        await b0.request({"op": "ping"})
        assert visits() == {"b0", "b1", "b2"} and do.brokers["b0"].link_costs[0].pending is not None  # held down
        await until(lambda: visits() == {"b0", "b1"}, "the direct link again, once the hold-down is over")
        assert do.streams[("producer", "t")].epoch == epoch + 2


async def test_brokers_report_their_links_load(plane: Plane, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real brokers: each link's round trip reaches the orchestrator, and is planned with."""
    monkeypatch.setattr(broker_module, "LOAD_INTERVAL_S", 0.05)
    do = plane.do
    assert do is not None
    await plane.start_brokers(2)
    await until(lambda: all(do.brokers.get(b) is not None and do.brokers[b].link_load for b in ("b0", "b1")), "load reports of both links")
    for name, broker in (("b0", plane.brokers[0]), ("b1", plane.brokers[1])):
        [(port, (rtt_ms, rate, queue))] = do.brokers[name].link_load.items()
        assert port in broker.links and 0 <= rtt_ms < 1000 and rate >= 0 and queue >= 0
        assert do.overlay().cost(name, port) == do.brokers[name].costs[port] >= HOP_COST_US


async def test_pipelines_show_budget_estimate_and_measure_and_an_unmet_budget(plane: Plane, opened: dict[str, dcp.Connection]) -> None:
    """Budgets per pipeline and per edge: the estimate is the planned path's cost; when
    every path is over the budget, the view says so."""
    do = plane.do
    assert do is not None
    reg = {"op": "register", "consumes": [], "produces": [], "port": 5}
    async with dcp.connect(plane.do_url, role="agent", name="cam", reconnect=False) as cam, \
            dcp.connect(plane.do_url, role="agent", name="store", reconnect=False) as store:
        await cam.request({**reg, "capabilities": ["camera"], "broker_key": int_to_bytes(KEYS[0])})
        await store.request({**reg, "capabilities": ["keep"], "broker_key": int_to_bytes(KEYS[1])})
        spec = {
            "name": "p", "max_latency_ms": 50,
            "source": [{"name": "cam", "capability": "camera", "emits": "video"}],
            "sink": [{"name": "out", "capability": "keep", "consumes": ["video"], "max_latency_ms": 5}],
        }
        await plane.admin({"op": "deploy", "id": 1, "spec": spec})
        store.send({"op": "report", "elements": {"p/out": {"in": 3, "latency_ms": 0.7}}, "published": 0, "unrouted": 0,
                    "lost": 0, "dropped": 0, "pending": 0})
        await store.request({"op": "ping"})
        [view] = (await plane.admin({"op": "pipelines", "id": 2}))["pipelines"]
        out = view["elements"][1]
        assert out["latency"]["budget_ms"] == 5 and out["latency"]["estimate_ms"] == HOP_COST_US / 1000
        assert out["latency"]["measured_ms"] == 0.7 and not out["warnings"]
        assert (view["latency"]["budget_ms"], view["latency"]["estimate_ms"], view["latency"]["measured_ms"]) == (50, 0.2, 0.7)
        opened["b0"].send({"op": "load", "ports": [], "links": [
            {"port": port, "rtt_ms": 20.0, "bytes_per_s": 1e6, "queue_bytes": 0} for port in (0, 1)
        ]})
        await opened["b0"].request({"op": "ping"})
        await until(lambda: do.planner.overlay.cost("b0", 0) > HOP_COST_US, "the costs planned with")
        [view] = (await plane.admin({"op": "pipelines", "id": 3}))["pipelines"]
        out = view["elements"][1]
        assert out["latency"]["estimate_ms"] == 10.2
        assert out["warnings"] == ["latency budget of 5 ms unmet: estimated 10.2 ms"] and not view["warnings"]
        text = format_pipelines([view])
        assert "latency budget 50 ms, estimate 10.2 ms, measured 0.7 ms" in text
        assert "latency in budget 5 ms, estimate 10.2 ms, measured 0.7 ms" in text


async def test_an_element_with_a_budget_goes_first_to_an_agent_its_producers_reach_within_it(
    plane: Plane, opened: dict[str, dcp.Connection]
) -> None:
    """Two agents offer ``keep``: "a-far" on b1, one hop from the camera's b0, and "z-near"
    on b0.  With a budget under a hop's cost, the one the camera reaches within it gets the
    sink, though it comes later by name; then, without a budget, the other one (it holds
    fewer elements)."""
    do = plane.do
    assert do is not None
    reg = {"op": "register", "consumes": [], "produces": []}
    async with dcp.connect(plane.do_url, role="agent", name="cam", reconnect=False) as cam, \
            dcp.connect(plane.do_url, role="agent", name="a-far", reconnect=False) as far, \
            dcp.connect(plane.do_url, role="agent", name="z-near", reconnect=False) as near:
        await cam.request({**reg, "capabilities": ["camera"], "broker_key": int_to_bytes(KEYS[0]), "port": 5})
        await far.request({**reg, "capabilities": ["keep"], "broker_key": int_to_bytes(KEYS[1]), "port": 5})
        await near.request({**reg, "capabilities": ["keep"], "broker_key": int_to_bytes(KEYS[0]), "port": 6})
        await until(lambda: do.planner.overlay.keys.keys() >= {"b0", "b1"}, "the overlay planned with")
        for name, budget in (("tight", HOP_COST_US / 1000 / 2), ("plain", None)):  # both hold nothing at first: the budget decides
            sink: dict[str, Any] = {"name": "out", "capability": "keep", "consumes": [f"{name}.video"]}
            if budget is not None:
                sink["max_latency_ms"] = budget
            spec = {"name": name, "source": [{"name": "cam", "capability": "camera", "emits": f"{name}.video"}], "sink": [sink]}
            deployed = await plane.admin({"op": "deploy", "id": 1, "spec": spec})
            assert deployed["assignments"]["out"] == (["a-far"] if budget is None else ["z-near"]), (name, deployed)
