"""The orchestrator and the DataAgent SDK in one process: registries, numbers, recovery.

Brokers and the orchestrator are real servers on OS-chosen loopback ports; agents are
``dcp.DataAgent``s.  Process-level pipelines are in ``test_pipelines.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import dcp
from dcp.control import Message, Route
from tests.conftest import insecure_unless_secured
from tests.waiting import until
from dcp.broker import Broker
from dcp.config import BrokerConfig, OrchestratorConfig
from dcp.orchestrator import BrokerRecord, Orchestrator
from dcp.orchestrator_store import Store
from dcp.routing import KeyLayout, allocate_keys, encode, int_to_bytes

SPEC = {
    "name": "p",
    "source": [{"name": "cam", "capability": "camera", "emits": "video", "params": {"count": 30}}],
    "stage": [{"name": "det", "capability": "detect", "consumes": ["video"], "emits": "faces"}],
    "sink": [{"name": "out", "capability": "collect", "consumes": ["faces"]}],
}


class Plane:
    """An orchestrator and linked brokers b0 - b1 - ..., all in this process."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.do: Orchestrator | None = None
        self.brokers: list[Broker] = []
        self.agents: list[dcp.DataAgent] = []

    async def start_do(self, port: int = 0, **settings: Any) -> Orchestrator:
        self.do = Orchestrator(OrchestratorConfig(listen=f"127.0.0.1:{port}", db=str(self.db), **insecure_unless_secured(settings)))
        await self.do.start()
        return self.do

    @property
    def do_url(self) -> str:
        assert self.do is not None
        return "dcp://%s:%d" % self.do.address

    async def start_brokers(self, n: int, default_keys: bool = False, **settings: Any) -> list[Broker]:
        """``n`` brokers linked in a line; with ``default_keys``, each draws its own key."""
        assert self.do is not None
        keys: list[int | None] = [None] * n if default_keys else list(allocate_keys(n, 16))
        for i, key in enumerate(keys):
            peers = (f"127.0.0.1:{self.brokers[-1].address[1]}",) if self.brokers else ()
            broker = Broker(BrokerConfig(
                listen="127.0.0.1:0", key=key, ports=16, name=f"b{len(self.brokers)}", peers=peers,
                orchestrator="%s:%d" % self.do.address, slow_consumer="pause", **insecure_unless_secured(settings),
            ))
            await broker.start()
            self.brokers.append(broker)
        for broker in self.brokers:
            for link in broker.links.values():
                await link.wait_up(5)
        return self.brokers

    def url(self, i: int) -> str:
        return "dcp://%s:%d" % self.brokers[i].address

    def agent(self, name: str, broker: int | list[int] = 0, **options: Any) -> dcp.DataAgent:
        urls = [self.url(i) for i in ([broker] if isinstance(broker, int) else broker)]
        agent = dcp.DataAgent(name, broker=urls, orchestrator=self.do_url, report_interval_s=0.05, **options)
        self.agents.append(agent)
        return agent

    async def pair(
        self, topic: str = "t", producer_at: int = 0, consumer_at: int = 0, names: tuple[str, str] = ("producer", "consumer")
    ) -> tuple[dcp.DataAgent, dcp.DataAgent, list[bytes]]:
        """A producer of ``topic`` and a consumer keeping its payloads in the list returned; not started."""
        producer, consumer = self.agent(names[0], producer_at), self.agent(names[1], consumer_at)
        got: list[bytes] = []

        @consumer.consume(topic)
        async def take(msg: dcp.Message) -> None:
            got.append(bytes(msg.payload))

        await producer.declare_produces(topic)
        return producer, consumer, got

    async def admin(self, body: dict[str, Any]) -> dict[str, Any]:
        async with dcp.connect(self.do_url, role="admin", name="test", reconnect=False) as admin:
            return await admin.request(body)

    async def close(self) -> None:
        for agent in self.agents:
            await agent.stop()
        for broker in self.brokers:
            await broker.close()
        if self.do is not None:
            await self.do.close()


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    plane = Plane(tmp_path / "do.db")
    await plane.start_do()
    yield plane
    await plane.close()




def pipeline_agents(plane: Plane, got: list[bytes], count: int = 30) -> tuple[dcp.DataAgent, ...]:
    cam = plane.agent("camera", 0)

    @cam.capability("camera")
    async def frames(params: dict[str, Any]) -> Any:
        await cam.wait_route("video")
        for i in range(params["count"]):
            yield i.to_bytes(4, "big")

    det = plane.agent("detector", 1)

    @det.capability("detect")
    async def detect(msg: dcp.Message, params: dict[str, Any]) -> bytes:
        return b"face:" + bytes(msg.payload)

    sink = plane.agent("sink", 0)

    @sink.capability("collect")
    async def collect(msg: dcp.Message, params: dict[str, Any]) -> None:
        got.append(bytes(msg.payload))

    return cam, det, sink


async def test_a_deployed_pipeline_flows_across_brokers_and_routes_go_to_producers_only(plane: Plane) -> None:
    await plane.start_brokers(2)
    got: list[bytes] = []
    agents = pipeline_agents(plane, got)
    for agent in agents[1:]:
        await agent.start()
    await agents[0].start()
    reply = await plane.admin({"op": "deploy", "spec": SPEC})
    assert reply["assignments"] == {"cam": ["camera"], "det": ["detector"], "out": ["sink"]}
    await until(lambda: len(got) == 30, "30 faces at the sink")
    assert got == [b"face:" + i.to_bytes(4, "big") for i in range(30)]
    cam, det, sink = agents
    assert set(cam.routes) == {"video"} and set(det.routes) == {"faces"} and sink.routes == {}
    assert cam.consumers["video"] == ["detector"] and det.consumers["faces"] == ["sink"]
    status = (await plane.admin({"op": "status"}))["status"]
    assert {(s["producer"], s["topic"]) for s in status["streams"]} == {("camera", "video"), ("detector", "faces")}
    assert {b["name"]: b["online"] for b in status["brokers"]} == {"b0": True, "b1": True}
    assert plane.do is not None

    def reported(view: list[dict[str, Any]]) -> tuple[int, ...]:
        (pipeline,) = view
        counters = {e["name"]: e["agents"][0] for e in pipeline["elements"]}
        return tuple(counters[e].get(k, 0) for e, k in (("cam", "out"), ("det", "in"), ("det", "out"), ("out", "in")))

    await until(lambda: reported(plane.do.pipelines_view()) == (30, 30, 30, 30), "the agents' reports")
    assert reported((await plane.admin({"op": "pipelines"}))["pipelines"]) == (30, 30, 30, 30)


async def test_an_unrelated_join_pushes_no_new_number_and_a_new_consumer_does(plane: Plane) -> None:
    await plane.start_brokers(2)
    producer = plane.agent("producer", 0)

    @producer.source("sensors.a.temp", interval_s=3600)
    async def never() -> None:
        return None

    first = plane.agent("first", 1)
    seen: list[bytes] = []

    @first.consume("sensors.*.temp")
    async def keep(msg: dcp.Message) -> None:
        seen.append(bytes(msg.payload))

    await first.start()
    await producer.start()
    await producer.wait_route("sensors.a.temp", consumers=1)
    epoch = producer.routes["sensors.a.temp"][0]
    bystander = plane.agent("bystander", 0)

    @bystander.consume("other.>")
    async def ignore(msg: dcp.Message) -> None:
        pass

    await bystander.start()
    await plane.admin({"op": "ping"})  # the DO has handled the registration and recomputed
    assert producer.routes["sensors.a.temp"][0] == epoch
    second = plane.agent("second", 0)

    @second.consume("sensors.>")
    async def keep2(msg: dcp.Message) -> None:
        pass

    await second.start()
    await producer.wait_route("sensors.a.temp", consumers=2)
    assert producer.routes["sensors.a.temp"][0] == epoch + 1
    assert sorted(producer.consumers["sensors.a.temp"]) == ["first", "second"]
    assert await producer.publish("sensors.a.temp", b"t=21")
    await until(lambda: seen == [b"t=21"], "the first consumer's frame")


async def test_restart_recovers_pipelines_assignments_and_epochs(plane: Plane) -> None:
    await plane.start_brokers(2)
    got: list[bytes] = []
    agents = pipeline_agents(plane, got)
    for agent in agents:
        await agent.start()
    await plane.admin({"op": "deploy", "spec": SPEC})
    await until(lambda: len(got) == 30, "the first run")
    assert plane.do is not None
    epochs = {key: s.epoch for key, s in plane.do.streams.items()}
    port = plane.do.address[1]
    await plane.do.close()
    recovered = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=str(plane.db), insecure=True))
    assert list(recovered.pipelines) == ["p"]
    assert recovered.assignments == {("p", "cam"): ["camera"], ("p", "det"): ["detector"], ("p", "out"): ["sink"]}
    assert {key: s.epoch for key, s in recovered.streams.items()} == epochs
    assert set(recovered.agents) == {"camera", "detector", "sink"} and set(recovered.brokers) == {"b0", "b1"}
    recovered.store.close()
    # The same port: brokers and agents come back by themselves.
    await plane.start_do(port)
    assert plane.do is not None
    await until(lambda: all(a.conn is not None for a in plane.do.agents.values()), "agents re-registered")
    await until(lambda: all(b.conn is not None for b in plane.do.brokers.values()), "brokers re-registered")
    det = agents[1]
    assert await det.publish("faces", b"after the restart")
    await until(lambda: got[-1:] == [b"after the restart"], "a frame routed after the restart")
    assert len(got) == 31


async def test_an_agent_fails_over_to_its_next_broker_and_gets_its_streams_back(plane: Plane) -> None:
    await plane.start_brokers(2)
    producer = plane.agent("producer", [0, 1], failover_attempts=2)

    @producer.source("t", interval_s=3600)
    async def never() -> None:
        return None

    got: list[bytes] = []
    consumer = plane.agent("consumer", 1)

    @consumer.consume("t")
    async def keep(msg: dcp.Message) -> None:
        got.append(bytes(msg.payload))

    await consumer.start()
    await producer.start()
    await producer.wait_route("t")
    assert producer.broker is not None and producer.broker.url == plane.url(0)
    await producer.publish("t", b"via b0")
    await until(lambda: got == [b"via b0"], "the first frame")
    epoch = producer.routes["t"][0]
    await plane.brokers[0].close()  # b0 goes away for good
    await until(lambda: producer.broker is not None and producer.broker.url == plane.url(1) and producer.broker.port is not None, "failover to b1")
    # b0's departure may first withdraw the route (b1 is cut off from b0); wait for the
    # number computed from the new attachment, which reaches the consumer again.
    await until(
        lambda: producer.routes["t"][0] > epoch and producer.routes["t"][1] != 0 and producer.consumers["t"] == ["consumer"],
        "a new number for the new attachment",
    )
    assert await producer.publish("t", b"via b1")
    await until(lambda: got == [b"via b0", b"via b1"], "delivery after the failover")


async def test_registration_errors_are_clear(plane: Plane) -> None:
    await plane.start_brokers(1)
    async with dcp.connect(plane.do_url, role="agent", name="bad", reconnect=False) as conn:
        with pytest.raises(dcp.RemoteError, match="pattern 'a\\*'"):
            await conn.request({"op": "register", "consumes": ["a*"], "produces": [], "capabilities": [], "broker_key": b"\x01", "port": 0})
        with pytest.raises(dcp.RemoteError, match="broker_key"):
            await conn.request({"op": "register", "consumes": [], "produces": [], "capabilities": []})
        with pytest.raises(dcp.RemoteError, match="admin"):
            await conn.request({"op": "deploy", "spec": SPEC})
    async with dcp.connect(plane.do_url, role="broker", name="twin", reconnect=False) as conn:
        with pytest.raises(dcp.RemoteError, match="its own key"):
            await conn.request({"op": "broker_state", "key": plane.brokers[0].key.to_bytes(3, "big"), "links": []})


async def test_brokers_with_default_settings_share_one_data_plane(plane: Plane) -> None:
    """No hand-picked keys: four brokers started with defaults draw keys of their own,
    and every stream crossing them is routed and delivered."""
    brokers = await plane.start_brokers(4, default_keys=True)
    assert len({b.key for b in brokers}) == 4
    # a producer on each broker, its consumer on the broker at the other end
    pairs = [await plane.pair(f"t{i}", i, 3 - i, (f"p{i}", f"c{i}")) for i in range(4)]
    for producer, consumer, _ in pairs:
        await consumer.start()
        await producer.start()
    for i, (producer, consumer, _) in enumerate(pairs):
        await until(lambda: producer.consumers.get(f"t{i}") == [consumer.name], f"the route of t{i}")
        assert await producer.publish(f"t{i}", b"%d" % i)
    await until(lambda: [got for _, _, got in pairs] == [[b"%d" % i] for i in range(4)], "every stream delivered once")


async def register_broker(plane: Plane, name: str, key: int, ports: int = 16) -> None:
    """Register a broker named ``name`` with ``key``, as a broker process would."""
    async with dcp.connect(plane.do_url, role="broker", name=name, reconnect=False) as conn:
        await conn.request({"op": "broker_state", "key": int_to_bytes(key), "ports": ports, "links": []})


@pytest.mark.parametrize("key, why", [
    (2, r"above 2\*\*16, got 2"),
    (1 << 16, r"above 2\*\*16"),
    ("b0 * 3", "is not a prime"),
])
async def test_a_key_that_cannot_route_is_refused_and_planning_goes_on(plane: Plane, key: Any, why: str) -> None:
    (b0,) = await plane.start_brokers(1)
    assert plane.do is not None
    await until(lambda: "b0" in plane.do.brokers, "b0 registered")  # type: ignore[union-attr]
    key = b0.key * 3 if key == "b0 * 3" else key
    with pytest.raises(dcp.RemoteError, match=why) as info:
        await register_broker(plane, "evil", key)
    assert info.value.code == "bad_key"
    producer, consumer, got = await plane.pair("t")
    await consumer.start()
    await producer.start()
    await until(lambda: producer.consumers.get("t") == ["consumer"], "the route of t, planned after the refusal")
    assert await producer.publish("t", b"routed")
    await until(lambda: got == [b"routed"], "the frame")


async def test_a_recovered_overlay_with_clashing_keys_still_plans(plane: Plane) -> None:
    """Records from before the checks (sqlite) may clash: planning leaves the clashing
    broker out and keeps the others, links and all."""
    b0, b1 = await plane.start_brokers(2)
    assert plane.do is not None
    await until(lambda: len(plane.do.overlay().links) == 1, "b0 - b1 registered and linked")  # type: ignore[union-attr]
    plane.do.brokers["old"] = BrokerRecord("old", b1.key * 5, "127.0.0.1:1", 16, [], gone_at=time.monotonic())
    overlay = plane.do.overlay()
    assert overlay.keys == {"b0": b0.key, "b1": b1.key} and len(overlay.links) == 1
    plane.do.brokers["old"].key = 2
    assert plane.do.overlay().keys == {"b0": b0.key, "b1": b1.key}


async def test_a_broker_back_under_a_new_name_takes_over_its_key(plane: Plane) -> None:
    key = allocate_keys(1, 16)[0]
    await register_broker(plane, "before", key)  # then its connection ends
    await register_broker(plane, "after", key)
    status = (await plane.admin({"op": "status"}))["status"]
    assert [(b["name"], b["key"]) for b in status["brokers"]] == [("after", str(key))]
    async with dcp.connect(plane.do_url, role="broker", name="after", reconnect=False) as conn:
        await conn.request({"op": "broker_state", "key": int_to_bytes(key), "ports": 16, "links": []})
        with pytest.raises(dcp.RemoteError, match="already has key") as info:
            await register_broker(plane, "third", key)  # "after" is connected now
    assert info.value.code == "same_key"


async def test_deploy_errors_name_the_field(plane: Plane) -> None:
    await plane.start_brokers(2)
    got: list[bytes] = []
    for agent in pipeline_agents(plane, got):
        await agent.start()
    bad = {**SPEC, "stage": [{"name": "det", "capability": "nobody-has-it", "consumes": ["video"], "emits": "faces"}]}
    with pytest.raises(dcp.RemoteError, match=r"stage\[0\]\.capability: no registered data agent offers 'nobody-has-it'"):
        await plane.admin({"op": "deploy", "spec": bad})
    await plane.admin({"op": "deploy", "spec": SPEC})
    with pytest.raises(dcp.RemoteError, match="already deployed"):
        await plane.admin({"op": "deploy", "spec": SPEC})
    await plane.admin({"op": "undeploy", "name": "p"})
    with pytest.raises(dcp.RemoteError, match="no pipeline named 'p'"):
        await plane.admin({"op": "undeploy", "name": "p"})


async def test_batches_and_windows(plane: Plane) -> None:
    await plane.start_brokers(1)
    producer = plane.agent("producer")

    @producer.source("n", interval_s=3600)
    async def never() -> None:
        return None

    batches: list[list[bytes]] = []
    windows: list[int] = []
    consumer = plane.agent("consumer")

    @consumer.process("n", batch=4, batch_timeout_s=0.05)
    async def batched(msgs: list[dcp.Message]) -> None:
        batches.append([bytes(m.payload) for m in msgs])

    @consumer.aggregate("n", window_s=0.05, emits="n.count")
    async def count(msgs: list[dcp.Message]) -> bytes:
        windows.append(len(msgs))
        return str(len(msgs)).encode()

    await consumer.start()
    await producer.start()
    await producer.wait_route("n")
    for i in range(10):
        await producer.publish("n", bytes([i]))
    await until(lambda: sum(map(len, batches)) == 10 and sum(windows) == 10, "every frame batched and windowed")
    assert [len(b) for b in batches[:2]] == [4, 4] and batches[2] == [bytes([8]), bytes([9])]  # the last by timeout
    assert [bytes([i]) for i in range(10)] == [p for b in batches for p in b]
    assert consumer.unrouted == len(windows)  # nobody consumes n.count: counted, not sent


def test_each_decorator_declares_its_own_element() -> None:
    agent = dcp.DataAgent("a")

    @agent.aggregate("x.*", window_s=0.5, emits="x.mean")
    async def mean(msgs: list[dcp.Message]) -> bytes:
        return b""

    @agent.process("x.>", batch=3)
    async def keep(msgs: list[dcp.Message]) -> None:
        return None

    declared = {key: (e.kind, e.consumes, e.emits, e.batch, e.window_s) for key, e in agent.elements.items()}
    assert declared == {"process:mean": ("stage", ("x.*",), "x.mean", 1, 0.5), "process:keep": ("sink", ("x.>",), None, 3, None)}


async def test_spec_params_batch_an_assigned_stage(plane: Plane) -> None:
    await plane.start_brokers(2)
    got: list[bytes] = []
    cam, det, sink = pipeline_agents(plane, got)
    sizes: list[int] = []

    @det.capability("detect")
    async def detect_batch(msgs: list[dcp.Message], params: dict[str, Any]) -> bytes:
        sizes.append(len(msgs))
        return b"batch of %d" % len(msgs)

    for agent in (det, sink, cam):
        await agent.start()
    spec = {**SPEC, "stage": [{**SPEC["stage"][0], "params": {"batch": 8, "batch_timeout_s": 0.05}}]}
    await plane.admin({"op": "deploy", "spec": spec})
    await until(lambda: sum(sizes) == 30, "every frame in a batch")
    assert sizes[:3] == [8, 8, 8] and sizes[3] == 6
    await until(lambda: len(got) == 4, "one output per batch")


async def test_standard_functions_compress_sample_and_decompress_in_a_pipeline(plane: Plane) -> None:
    from dcp.functions import offer_standard_functions

    await plane.start_brokers(2)
    cam = plane.agent("camera", 0)

    @cam.capability("camera")
    async def frames(params: dict[str, Any]) -> Any:
        for i in range(1, 41):
            yield bytes([i]) * 1000

    workers = [plane.agent(f"worker-{i}", i % 2) for i in range(3)]
    for worker in workers:
        offer_standard_functions(worker)
    got: list[bytes] = []
    sink = plane.agent("sink", 1)

    @sink.capability("collect")
    async def collect(msg: dcp.Message, params: dict[str, Any]) -> None:
        got.append(bytes(msg.payload))

    for agent in (*workers, sink, cam):
        await agent.start()
    spec = {
        "name": "dpf",
        "source": [{"name": "cam", "capability": "camera", "emits": "raw"}],
        "stage": [
            {"name": "thin", "capability": "sample", "consumes": ["raw"], "emits": "thin", "params": {"every": 4}},
            {"name": "zip", "capability": "compress", "consumes": ["thin"], "emits": "thin.z", "params": {"level": 9}},
            {"name": "unzip", "capability": "decompress", "consumes": ["thin.z"], "emits": "out"},
        ],
        "sink": [{"name": "out", "capability": "collect", "consumes": ["out"]}],
    }
    reply = await plane.admin({"op": "deploy", "spec": spec})
    assert len({agents[0] for element, agents in reply["assignments"].items() if element != "cam" and element != "out"}) == 3
    await until(lambda: len(got) == 10, "every fourth frame")
    assert got == [bytes([i]) * 1000 for i in range(4, 41, 4)]  # msg ids count from 1
    zipped = next(w for w in workers if "dpf/zip" in w.elements).elements["dpf/zip"]
    assert (zipped.received, zipped.emitted, zipped.errors) == (10, 10, 0)


# -- routes: who is a consumer, epochs, the publish policy, the source broker --------------------


@pytest.fixture
async def bare_plane(tmp_path: Path) -> AsyncIterator[Plane]:
    """A Plane whose orchestrator each test starts itself, with its own settings."""
    plane = Plane(tmp_path / "do.db")
    yield plane
    await plane.close()


def record_routes(agent: dcp.DataAgent) -> list[dict[str, Any]]:
    """The route pushes ``agent`` gets, as the orchestrator sent them (set before ``start``)."""
    pushes: list[dict[str, Any]] = []
    handle = agent._on_push

    def spy(push: Message) -> None:
        if isinstance(push, Route):
            pushes.append(push.to_body())
        handle(push)

    agent._on_push = spy  # type: ignore[method-assign]
    return pushes


async def test_an_agent_consuming_what_it_produces_is_not_a_consumer_of_its_own_stream(
    plane: Plane, caplog: pytest.LogCaptureFixture
) -> None:
    (b0,) = await plane.start_brokers(1)
    looped, other = plane.agent("looped", 0), plane.agent("other", 0)
    got: list[bytes] = []

    @looped.consume("t")
    async def own(msg: dcp.Message) -> None:
        pass

    @other.consume("t")
    async def take(msg: dcp.Message) -> None:
        got.append(bytes(msg.payload))

    await looped.declare_produces("t")
    await other.start()  # registered before looped: looped's first route already sees it
    await looped.start()
    await looped.wait_route("t")
    assert looped.consumers["t"] == ["other"]
    assert other.broker is not None and other.broker.port is not None
    assert looped.routes["t"][1] == encode({b0.key: 1 << other.broker.port})  # other's port only, not looped's
    assert plane.do is not None and plane.do.streams[("looped", "t")].consumers == ["other"]
    # Not even tried as a consumer: the tree builder would refuse its own (source) port,
    # and the orchestrator would warn that looped "cannot get" t.
    assert [r.getMessage() for r in caplog.records if r.name == "dcp.orchestrator" and r.levelno >= logging.WARNING] == []
    assert await looped.publish("t", b"one")
    await until(lambda: got == [b"one"], "the other consumer's frame")


async def test_a_route_withdrawn_when_its_stream_stops_carries_a_higher_epoch(plane: Plane) -> None:
    await plane.start_brokers(1)
    cam, sink = plane.agent("camera", 0), plane.agent("sink", 0)
    got: list[bytes] = []

    @cam.capability("camera")
    async def frames(params: dict[str, Any]) -> Any:
        yield b"first"

    @sink.capability("collect")
    async def collect(msg: dcp.Message, params: dict[str, Any]) -> None:
        got.append(bytes(msg.payload))

    await sink.start()
    await cam.start()
    spec = {
        "name": "w",
        "source": [{"name": "cam", "capability": "camera", "emits": "video"}],
        "sink": [{"name": "out", "capability": "collect", "consumes": ["video"]}],
    }
    await plane.admin({"op": "deploy", "spec": spec})
    await until(lambda: got == [b"first"], "the source's frame at the sink")
    epoch, x = cam.routes["video"]
    assert x != 0 and cam.consumers["video"] == ["sink"]
    await plane.admin({"op": "undeploy", "name": "w"})  # nobody produces video any more
    await until(lambda: cam.routes["video"][1] == 0, "the withdrawn route (X = 0)")
    assert cam.routes["video"] == (epoch + 1, 0) and cam.consumers["video"] == []
    assert plane.do is not None
    stream = plane.do.streams[("camera", "video")]
    assert (stream.epoch, stream.x, stream.consumers) == (epoch + 1, 0, [])


async def test_a_policy_denying_publish_gives_a_refused_route_with_no_consumers(bare_plane: Plane, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "allow"\n\n[[rule]]\nagent = "producer"\naction = "deny"\npublish = ["t"]\n')
    plane = bare_plane
    await plane.start_do(policy_file=str(policy))
    (b0,) = await plane.start_brokers(1)
    producer, consumer, got = await plane.pair("t")
    pushes = record_routes(producer)
    await consumer.start()  # registered first: a consumer the policy must keep the stream from
    await producer.start()
    await until(lambda: pushes, "the route of t")
    (route,) = pushes
    assert {k: route.get(k) for k in ("topic", "x", "epoch", "consumers", "refused", "broker_key")} == {
        "topic": "t", "x": b"", "epoch": 1, "consumers": [],
        "refused": "rule 0 (deny publish 't' for 'producer')", "broker_key": int_to_bytes(b0.key),
    }
    assert await producer.publish("t", b"denied") is False
    assert producer.broker is not None
    assert (producer.unrouted, producer.published, producer.broker.published) == (1, 0, 0)
    status = (await plane.admin({"op": "status"}))["status"]
    assert status["streams"] == [
        {"producer": "producer", "topic": "t", "epoch": 1, "x_bytes": 0, "consumers": [],
         "refused": "rule 0 (deny publish 't' for 'producer')"},
    ]
    assert got == []


async def test_a_producer_without_consumers_that_moves_brokers_gets_a_route_naming_the_new_one(plane: Plane) -> None:
    b0, b1 = await plane.start_brokers(2)
    producer = plane.agent("producer", [0, 1], failover_attempts=2)
    await producer.declare_produces("t")
    await producer.start()
    await until(lambda: "t" in producer.routes, "the first route of t")
    epoch = producer.routes["t"][0]
    assert (producer.routes["t"][1], producer.consumers["t"], producer.route_brokers["t"]) == (0, [], b0.key)
    await b0.close()
    assert plane.do is not None
    do = plane.do
    await until(lambda: do.agents["producer"].broker_key == b1.key, "the producer registered at b1")
    await plane.admin({"op": "ping"})  # the DO has recomputed since
    stream = do.streams[("producer", "t")]
    assert (stream.broker, stream.epoch, stream.x, stream.consumers) == ("b1", epoch + 1, 0, [])
    await until(lambda: producer.routes["t"][0] == epoch + 1, "the route computed at b1")
    assert (producer.routes["t"], producer.route_brokers["t"]) == ((epoch + 1, 0), b1.key)


# -- broker reports: attachments as deltas, key layouts -------------------------------------


async def test_a_broker_reports_attachments_in_a_state_then_as_changes(plane: Plane) -> None:
    """An agent away from the orchestrator counts while its broker reports it attached:
    a later state without ``attached`` leaves that as it was; ``ports_changed`` detaching
    its port drops it from the route, attaching it again brings it back."""
    do = plane.do
    assert do is not None
    key = allocate_keys(1, 16)[0]
    reg = {"op": "register", "capabilities": [], "broker_key": int_to_bytes(key)}
    async with dcp.connect(plane.do_url, role="broker", name="b0", reconnect=False) as broker, \
            dcp.connect(plane.do_url, role="agent", name="producer", reconnect=False) as producer:
        attached = [{"port": 1, "name": "away"}, {"port": 2, "name": "producer"}]
        await broker.request({"op": "broker_state", "key": int_to_bytes(key), "ports": 16, "links": [], "attached": attached})
        await producer.request({**reg, "consumes": [], "produces": ["t"], "port": 2})
        async with dcp.connect(plane.do_url, role="agent", name="away", reconnect=False) as away:
            await away.request({**reg, "consumes": ["t"], "produces": [], "port": 1})
            await until(lambda: do.streams[("producer", "t")].consumers == ["away"], "the route to away")
        await until(lambda: do.agents["away"].conn is None, "away disconnected")
        await broker.request({"op": "broker_state", "key": int_to_bytes(key), "ports": 16, "links": []})  # attached: as before
        await broker.request({"op": "ping"})
        assert do.brokers["b0"].attached == {1: "away", 2: "producer"}
        assert do.streams[("producer", "t")].consumers == ["away"]
        epoch = do.streams[("producer", "t")].epoch
        await broker.request({"op": "ports_changed", "attached": [], "detached": [1]})
        await until(lambda: do.streams[("producer", "t")].consumers == [], "away dropped with its port")
        assert do.streams[("producer", "t")].epoch == epoch + 1 and do.streams[("producer", "t")].x == 0
        await broker.request({"op": "ports_changed", "attached": [{"port": 1, "name": "away"}], "detached": []})
        await until(lambda: do.streams[("producer", "t")].consumers == ["away"], "away back on its port")


async def test_a_broker_with_many_keys_owns_them_all_and_they_are_stored(plane: Plane) -> None:
    do = plane.do
    assert do is not None
    layout = KeyLayout.random(200)
    assert len(layout.keys) > 1
    async with dcp.connect(plane.do_url, role="broker", name="big", reconnect=False) as big:
        await big.request({
            "op": "broker_state", "key": int_to_bytes(layout.root), "keys": [int_to_bytes(k) for k in layout.keys],
            "ports": 200, "links": [],
        })
        assert do.brokers["big"].keys == list(layout.keys)
        assert do.overlay().layouts == {"big": layout}
        bank = layout.keys[-1]  # a prime above 2**64: a good key for a broker of 64 ports, but big's
        with pytest.raises(dcp.RemoteError, match=f"broker 'big' already has key {bank}") as info:
            await register_broker(plane, "other", bank, ports=64)
        assert info.value.code == "same_key"
        with pytest.raises(dcp.RemoteError, match="keys: the first must be the root key") as info:
            await register_broker_keys(plane, "mixed", layout.keys[1], list(layout.keys), 200)
        assert info.value.code == "bad_key"
    (stored,) = do.store.load()["brokers"]
    assert (stored["name"], stored["key"], stored["keys"], stored["ports"]) == ("big", layout.root, list(layout.keys), 200)


async def register_broker_keys(plane: Plane, name: str, key: int, keys: list[int], ports: int) -> None:
    async with dcp.connect(plane.do_url, role="broker", name=name, reconnect=False) as conn:
        await conn.request({
            "op": "broker_state", "key": int_to_bytes(key), "keys": [int_to_bytes(k) for k in keys], "ports": ports, "links": [],
        })


def test_a_store_from_before_key_layouts_gains_its_keys_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE brokers (name TEXT PRIMARY KEY, key TEXT NOT NULL, address TEXT NOT NULL, ports INTEGER NOT NULL, links TEXT NOT NULL)")
    db.execute("INSERT INTO brokers VALUES ('b0', '65537', '127.0.0.1:1', 16, '[]')")
    db.commit()
    db.close()
    store = Store(path)
    assert store.load()["brokers"] == [{"name": "b0", "key": 65537, "address": "127.0.0.1:1", "ports": 16, "links": [], "keys": None}]
    store.save_broker("b1", 7, "127.0.0.1:2", 2, [], keys=[7, 11])
    store.close()
    store = Store(path)  # and opened again, nothing to migrate
    assert [b["keys"] for b in store.load()["brokers"]] == [None, [7, 11]]
    store.close()


def test_a_status_too_large_for_a_frame_is_refused_and_its_summary_is_not(tmp_path: Path) -> None:
    """Thousands of agents list into more than a control frame: the full status is
    refused with ``too_large``, saying what to ask for; the summary gives the counts."""
    from dcp import control
    from dcp.errors import BadRequest
    from dcp.orchestrator import AgentRecord, OrchestratorConnection

    do = Orchestrator(OrchestratorConfig(db=str(tmp_path / "do.db"), insecure=True))
    try:
        conn = OrchestratorConnection(do)
        assert len(conn._on_status(control.Status()).status["agents"]) == 0
        for i in range(3000):
            do.agents[f"agent-{i:05d}"] = AgentRecord(f"agent-{i:05d}", ["detect"], ["cam.*"], [f"cam.{i}"], 12345, i)
        with pytest.raises(BadRequest, match="summary=true") as info:
            conn._on_status(control.Status())
        assert info.value.code == "too_large"
        summary = conn._on_status(control.Status(summary=True)).status
        assert (summary["agents"], summary["streams"], summary["planning"]["pending"] >= 0) == (3000, 0, True)
    finally:
        do.store.close()


async def _dcp_status(plane: Plane, *flags: str) -> str:
    """What ``dcp status`` prints about ``plane``, run as a process (this loop keeps serving)."""
    assert plane.do is not None
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dcp", "status", "--orchestrator", "%s:%d" % plane.do.address, *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_dcp_status_shows_brokers_links_agents_pipelines_and_streams(plane: Plane) -> None:
    await plane.start_brokers(2)
    producer, consumer, _ = await plane.pair("t", producer_at=0, consumer_at=1)
    await consumer.start()
    await producer.start()
    await producer.wait_route("t", consumers=1)
    status = json.loads(await _dcp_status(plane, "--json"))
    assert sorted((b["name"], b["online"], [link["state"] for link in b["links"]]) for b in status["brokers"]) == [
        ("b0", True, ["up"]), ("b1", True, ["up"]),
    ]
    assert sorted((a["name"], a["online"], a["broker"]) for a in status["agents"]) == [("consumer", True, "b1"), ("producer", True, "b0")]
    assert [(s["producer"], s["topic"], len(s["consumers"])) for s in status["streams"]] == [("producer", "t", 1)]
    assert status["pipelines"] == []
    text = await _dcp_status(plane)
    for expected in ("brokers: 2 (2 online)", "links 1/1 up", "agents: 2 (2 online)", "pipelines: 0", "streams: 1", "producer/t"):
        assert expected in text, text
    summary = json.loads(await _dcp_status(plane, "--json", "--summary"))
    assert (summary["agents"], summary["streams"]) == (2, 1)
