"""Shared work and requests: replicas that share a stream, request/reply to capabilities.

The pure parts (dcp.shares; the planner's numbers replayed by dcp.topology.simulate) are
tested by property; the rest with a real orchestrator and brokers: in this process on
OS-chosen loopback ports, and over processes (an orchestrator process and a ``dcp
cluster`` of two brokers) for the balance and the key affinity.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

import dcp
from dcp.broker import Broker
from dcp.config import BrokerConfig, OrchestratorConfig
from dcp.errors import ProtocolError
from dcp.orchestrator import Orchestrator
from dcp.planner import AgentView, Planner
from dcp.routing import allocate_keys
from dcp.shares import (
    REPLIES, Choices, Group, RequestEnvelope, pack_reply, pack_request, request_topic, unpack_reply, unpack_request,
)
from dcp.topology import Overlay, OverlayLink, simulate
from tests.test_pipelines import Plane, agents, orchestrator_process, start_plane, wait_overlay  # noqa: F401 (fixtures)
from tests.waiting import until

# --------------------------------------------------------------------------- choosing, pure


def test_round_robin_takes_each_member_in_turn_in_every_group() -> None:
    choices = Choices([Group("a", "round_robin", ("a0", "a1")), Group("b", "round_robin", ("b0", "b1", "b2"))], list(range(6)))
    picks = [choices.pick() for _ in range(600)]
    for group, size in ((0, 2), (1, 3)):
        taken = collections.Counter(choices.member(index, group) for index in picks)
        assert set(taken.values()) == {600 // size}  # exactly balanced
    assert choices.member(5, 0) == "a1" and choices.member(5, 1) == "b2"  # 5 = 1 + 2 * 2: the first group is the fastest digit


@settings(max_examples=50)
@given(keys=st.lists(st.binary(min_size=1, max_size=16), min_size=1, max_size=50, unique=True), size=st.integers(2, 6), gone=st.data())
def test_a_key_keeps_its_member_and_only_the_keys_of_a_member_that_goes_move(keys: list[bytes], size: int, gone: st.DataObject) -> None:
    members = tuple(f"m{i}" for i in range(size))
    before = Choices([Group("g", "key", members)], list(range(size)))
    chosen = {key: before.member(before.pick(key)) for key in keys}
    assert all(before.member(before.pick(key)) == chosen[key] for key in keys)  # stable, whatever the turn
    leaving = gone.draw(st.sampled_from(members))
    rest = tuple(m for m in members if m != leaving)
    after = Choices([Group("g", "key", rest)], list(range(len(rest))))
    for key in keys:
        now = after.member(after.pick(key))
        assert now == chosen[key] or chosen[key] == leaving


def test_choices_refuse_numbers_that_do_not_match_the_groups() -> None:
    with pytest.raises(ValueError):
        Choices([Group("g", "round_robin", ("a", "b"))], [1, 2, 3])
    with pytest.raises(ValueError):
        Choices([Group("g", "round_robin", ())], [])


@given(correlation=st.integers(0, 2**64 - 1), x=st.integers(0, 2**300), key=st.integers(1, 2**130), tag=st.one_of(st.none(), st.binary(min_size=1, max_size=40)), body=st.binary(max_size=64))
def test_request_and_reply_envelopes_round_trip(correlation: int, x: int, key: int, tag: bytes | None, body: bytes) -> None:
    envelope = RequestEnvelope(correlation, x, key, tag)
    parsed, rest = unpack_request(pack_request(envelope) + body)
    assert (parsed, bytes(rest)) == (envelope, body)
    assert unpack_reply(pack_reply(correlation, 1) + body)[:2] == (correlation, 1)


@given(st.binary(max_size=80))
def test_any_bytes_are_an_envelope_or_a_protocol_error(data: bytes) -> None:
    for unpack in (unpack_request, unpack_reply):
        try:
            unpack(data)
        except ProtocolError:
            pass


def test_a_capability_that_cannot_be_a_topic_cannot_be_requested() -> None:
    assert request_topic("detect.faces") == "_req.detect.faces"
    with pytest.raises(dcp.ConfigError):
        request_topic("detect.*")


# --------------------------------------------------------------------------- the planner's numbers, replayed

KEYS = allocate_keys(3, 16)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3), broadcast=st.integers(0, 2), spread=st.data())
def test_each_number_reaches_every_consumer_and_exactly_one_member_of_each_group(
    sizes: list[int], broadcast: int, spread: st.DataObject
) -> None:
    overlay = Overlay({f"b{i}": KEYS[i] for i in range(3)}, [OverlayLink("b0", 15, "b1", 15), OverlayLink("b1", 14, "b2", 14)])
    planner = Planner()
    planner.set_overlay(overlay)
    port = iter(range(1, 14))
    where = {}

    def place(name: str) -> tuple[str, int]:
        where[name] = (spread.draw(st.sampled_from(["b0", "b1", "b2"]), label=name), next(port))
        return where[name]

    planner.set_agent("producer", AgentView(place("producer"), True, produces=("t",)))
    for i in range(broadcast):
        planner.set_agent(f"all{i}", AgentView(place(f"all{i}"), True, consumes=("t",)))
    for g, size in enumerate(sizes):
        for m in range(size):
            planner.set_agent(f"g{g}m{m}", AgentView(place(f"g{g}m{m}"), True, shares=(("t", f"group{g}", "round_robin"),)))
    planner.step()
    stream = planner.streams[("producer", "t")]
    choices = Choices([Group(g.name, g.mode, g.members) for g in stream.groups], stream.variants)
    assert len(stream.variants) == len(set(stream.variants)) == eval("*".join(map(str, sizes)))
    for index, x in enumerate(stream.variants):
        expected = {where[f"all{i}"] for i in range(broadcast)} | {where[choices.member(index, g)] for g in range(len(sizes))}
        delivered = simulate(overlay, x, where["producer"]).endpoints
        assert dict(delivered) == {at: 1 for at in expected}


def test_a_request_stream_carries_each_responders_way_back() -> None:
    overlay = Overlay({f"b{i}": KEYS[i] for i in range(3)}, [OverlayLink("b0", 15, "b1", 15), OverlayLink("b1", 14, "b2", 14)])
    planner = Planner()
    planner.set_overlay(overlay)
    planner.set_agent("asker", AgentView(("b0", 1), True, produces=("_req.classify",)))
    for i, broker in enumerate(["b1", "b2"]):
        planner.set_agent(f"r{i}", AgentView((broker, 2), True, shares=(("_req.classify", "_req.classify", "round_robin"),)))
    planner.step()
    [group] = planner.streams[("asker", "_req.classify")].groups
    assert group.members == ("r0", "r1")
    for member, x in zip(group.members, group.replies):
        assert dict(simulate(overlay, x, (f"b{1 + int(member[1])}", 2)).endpoints) == {("b0", 1): 1}


# --------------------------------------------------------------------------- in this process


class Plane1:
    """An orchestrator and two linked brokers in this process."""

    def __init__(self, do: Orchestrator, brokers: list[Broker]) -> None:
        self.do, self.brokers = do, brokers
        host, port = do.address
        self.do_url = f"dcp://{host}:{port}"
        self.urls = ["dcp://%s:%d" % broker.address for broker in brokers]
        self.made: list[dcp.DataAgent] = []

    def agent(self, name: str, broker: int = 0, **options: Any) -> dcp.DataAgent:
        agent = dcp.DataAgent(name, broker=self.urls[broker], orchestrator=self.do_url, report_interval_s=0.1, **options)
        self.made.append(agent)
        return agent


@pytest.fixture
async def plane() -> AsyncIterator[Plane1]:
    do = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=":memory:", insecure=True, grace_s=0.3))
    await do.start()
    host, port = do.address
    first = Broker(BrokerConfig(listen="127.0.0.1:0", insecure=True, orchestrator=f"{host}:{port}"))
    await first.start()
    second = Broker(BrokerConfig(listen="127.0.0.1:0", insecure=True, orchestrator=f"{host}:{port}", peers=("%s:%d" % first.address,)))
    await second.start()
    made = Plane1(do, [first, second])
    await until(lambda: len(do.brokers) == 2 and all(len(b.links) == 1 for b in do.brokers.values())
                and all(link["state"] == "up" for b in do.brokers.values() for link in b.links), "two brokers linked at the orchestrator")
    yield made
    for agent in reversed(made.made):
        await agent.stop()
    for broker in reversed(made.brokers):
        await broker.close()
    await do.close()


def offer(agent: dcp.DataAgent, capability: str, counts: collections.Counter[str], seen: list[bytes] | None = None) -> None:
    @agent.capability(capability)
    async def handle(msg: Any, params: Any) -> bytes:
        counts[agent.name] += 1
        if seen is not None:
            seen.append(bytes(msg.payload))
        return bytes(msg.payload)[::-1]


async def test_a_lost_replica_gives_its_share_to_the_others_with_a_new_epoch_and_nothing_twice(plane: Plane1) -> None:
    counts: collections.Counter[str] = collections.Counter()
    seen: list[bytes] = []
    source = plane.agent("source")
    replicas = [plane.agent(f"worker{i}", broker=i % 2) for i in range(3)]
    for replica in replicas:
        offer(replica, "work", counts, seen)
    for agent in (source, *replicas):
        await agent.start()
    await source.declare_produces("jobs")
    plane.do.deploy({"name": "p", "sink": [{"name": "w", "capability": "work", "consumes": ["jobs"], "replicas": 3}]})
    await source.wait_route("jobs", consumers=3)
    epoch = source.routes["jobs"][0]
    for n in range(30):
        assert await source.publish("jobs", b"a%d" % n)
    await until(lambda: len(seen) == 30, "the first 30 frames handled")
    assert set(counts.values()) == {10}
    await replicas[2].stop()
    await until(lambda: source.routes["jobs"][0] > epoch and source.consumers["jobs"] == ["worker0", "worker1"], "the share of the lost replica moved")
    for n in range(30):
        assert await source.publish("jobs", b"b%d" % n)
    await until(lambda: len(seen) == 60, "the next 30 frames handled")
    assert collections.Counter(seen) == {**{b"a%d" % n: 1 for n in range(30)}, **{b"b%d" % n: 1 for n in range(30)}}
    assert counts["worker2"] == 10 and counts["worker0"] + counts["worker1"] == 50
    deployed = (plane.do.pipelines_view())[0]["elements"][0]["warnings"]
    assert deployed == ["2 of 3 replicas running: no other connected agent offers 'work' (each frame goes to one of those running)"]


async def test_share_all_keeps_the_broadcast(plane: Plane1) -> None:
    counts: collections.Counter[str] = collections.Counter()
    source = plane.agent("source")
    replicas = [plane.agent(f"copy{i}", broker=i % 2) for i in range(2)]
    for replica in replicas:
        offer(replica, "keep", counts)
    for agent in (source, *replicas):
        await agent.start()
    await source.declare_produces("jobs")
    plane.do.deploy({"name": "p", "sink": [{"name": "k", "capability": "keep", "consumes": ["jobs"], "replicas": 2, "share": "all"}]})
    await source.wait_route("jobs", consumers=2)
    assert "jobs" not in source.choices
    for n in range(10):
        await source.publish("jobs", b"%d" % n)
    await until(lambda: counts == {"copy0": 10, "copy1": 10}, "every frame at both")


async def test_a_request_crosses_brokers_and_its_reply_comes_back(plane: Plane1) -> None:
    counts: collections.Counter[str] = collections.Counter()
    responders = [plane.agent(f"classifier{i}", broker=i) for i in range(2)]
    for responder in responders:
        offer(responder, "classify", counts)
    asker = plane.agent("asker", broker=1)
    for agent in (*responders, asker):
        await agent.start()
    replies = [await asker.request("classify", b"face %d" % n, timeout=10) for n in range(10)]
    assert replies == [(b"face %d" % n)[::-1] for n in range(10)]
    assert counts == {"classifier0": 5, "classifier1": 5}  # in turn
    with pytest.raises(dcp.RemoteError) as refused:  # nobody offers it: no timeout to wait out
        await asker.request("translate", b"x", timeout=60)
    assert refused.value.code == "no_responder" and "translate" in str(refused.value)


def slow_responder(plane: Plane1) -> tuple[dcp.DataAgent, asyncio.Event]:
    """An agent whose capability ``wait`` answers once the event is set."""
    release = asyncio.Event()
    responder = plane.agent("slow")

    @responder.capability("wait")
    async def wait(msg: Any, params: Any) -> bytes:
        await release.wait()
        return b"late"

    return responder, release


async def test_a_failing_handler_a_timeout_a_late_reply_and_the_bound_on_waiting_requests(plane: Plane1) -> None:
    responder, release = slow_responder(plane)

    @responder.capability("fail")
    async def fail(msg: Any, params: Any) -> bytes:
        raise ValueError("no face in " + bytes(msg.payload).decode())

    asker = plane.agent("asker", broker=1, max_requests=1)
    await responder.start()
    await asker.start()
    with pytest.raises(dcp.RemoteError) as failed:
        await asker.request("fail", b"frame 7")
    assert (failed.value.code, failed.value.message) == ("request_failed", "ValueError: no face in frame 7")
    waiting = asyncio.ensure_future(asker.request("wait", b"", timeout=0.5))
    await until(lambda: asker.requests_sent == 2, "the request sent")
    with pytest.raises(dcp.DcpTimeout, match="1 requests waiting already"):
        await asker.request("fail", b"", timeout=0.2)  # the one slot is taken
    with pytest.raises(dcp.DcpTimeout, match="no reply from slow"):
        await waiting
    release.set()
    await until(lambda: asker.replies_unknown == 1, "the late reply dropped and counted")


async def test_a_reply_to_a_requester_that_left_is_dropped_by_the_broker_and_counted(plane: Plane1) -> None:
    responder, release = slow_responder(plane)
    asker = plane.agent("asker")
    await responder.start()
    await asker.start()
    pending = asyncio.ensure_future(asker.request("wait", b"", timeout=30))
    await until(lambda: asker.requests_sent == 1, "the request sent")
    await asker.stop()
    with pytest.raises(dcp.ConnectionClosed):
        await pending
    broker = plane.brokers[0]
    before = broker.drops["unattached_port"]
    release.set()
    await until(lambda: broker.drops["unattached_port"] == before + 1, "the reply dropped at the broker")
    assert responder.requests_served == 1


async def test_a_reply_with_an_unknown_correlation_id_is_dropped_and_counted(plane: Plane1) -> None:
    asker = plane.agent("asker")
    await asker.start()
    assert asker.broker is not None and asker.broker.port is not None
    async with dcp.connect(plane.urls[0], name="forger") as forger:
        await forger.publish(REPLIES, pack_reply(12345) + b"forged", route=forger.route_to(asker.broker.port))
    await until(lambda: asker.replies_unknown == 1, "the forged reply counted")


# --------------------------------------------------------------------------- over processes


async def test_round_robin_balances_and_a_key_stays_with_its_replica_over_processes(start_plane, agents) -> None:  # type: ignore[no-untyped-def]
    plane: Plane = start_plane(n=2)
    await wait_overlay(plane)
    counts: collections.Counter[str] = collections.Counter()
    keyed: dict[bytes, set[str]] = collections.defaultdict(set)
    source = agents("source", plane.broker("b0"), plane.do.url)
    workers = [agents(f"worker{i}", plane.broker(f"b{i % 2}"), plane.do.url) for i in range(3)]
    for worker in workers:
        @worker.capability("work")
        async def work(msg: Any, params: Any, name: str = worker.name) -> None:
            counts[name] += 1
            key, _, _ = bytes(msg.payload).partition(b":")
            keyed[key].add(name)

    for agent in (source, *workers):
        await agent.start()
    await source.declare_produces("rr")
    await source.declare_produces("keyed")
    async with dcp.connect(plane.do.url, role="admin", name="test", reconnect=False) as admin:
        for name, topic, share in (("rr", "rr", "round_robin"), ("k", "keyed", "key")):
            await admin.request({"op": "deploy", "spec": {
                "name": name, "sink": [{"name": "w", "capability": "work", "consumes": [topic], "replicas": 3, "share": share}]}})
    await source.wait_route("rr", consumers=3)
    await source.wait_route("keyed", consumers=3)
    for n in range(600):
        assert await source.publish("rr", b"rr:%d" % n)
    await until(lambda: sum(counts.values()) == 600, lambda: f"600 frames handled, got {dict(counts)}", timeout=20)
    assert all(180 <= count <= 220 for count in counts.values()), counts  # within 10 % of 200 each
    counts.clear()
    keys = [b"camera-%d" % i for i in range(12)]
    for n in range(240):
        assert await source.publish("keyed", b"%s:%d" % (keys[n % 12], n), key=keys[n % 12])
    await until(lambda: sum(counts.values()) == 240, lambda: f"240 keyed frames handled, got {dict(counts)}", timeout=20)
    assert all(len(keyed[key]) == 1 for key in keys), dict(keyed)  # each key stayed with one replica
    assert len({next(iter(keyed[key])) for key in keys}) > 1  # and the keys spread over the replicas


def test_the_shared_faces_example_handles_every_frame_once_over_processes() -> None:
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "faces_shared.py"
    result = subprocess.run(
        [sys.executable, str(example), "--replicas", "2", "--frames", "40", "--work-ms", "1"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "frames per detector {'detector-0': 20, 'detector-1': 20}" in result.stdout
