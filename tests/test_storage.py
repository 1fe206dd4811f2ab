"""The storage function (``dcp.storage.StorageAgent``) and the cooperative sensing example.

An orchestrator and a broker run in this process on OS-chosen ports; the agents are
real ``DataAgent``s.  The example runs as a subprocess, as a user would run it.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import dcp
from tests.waiting import until
from dcp.config import OrchestratorConfig
from dcp.orchestrator import Orchestrator
from dcp.storage import StorageAgent

from .conftest import url_of

ROOT = Path(__file__).resolve().parents[1]




class Plane:
    """An orchestrator and one broker; agents made here are stopped at the end."""

    def __init__(self, do: Orchestrator, broker_url: str) -> None:
        self.do = do
        self.broker_url = broker_url
        self.agents: list[dcp.DataAgent] = []

    @property
    def do_url(self) -> str:
        return "dcp://%s:%d" % self.do.address

    def agent(self, name: str, **options: Any) -> dcp.DataAgent:
        agent = dcp.DataAgent(name, broker=self.broker_url, orchestrator=self.do_url, **options)
        self.agents.append(agent)
        return agent

    def storage(self, path: Path, name: str = "dsf", **options: Any) -> StorageAgent:
        agent = StorageAgent(name, path, broker=self.broker_url, orchestrator=self.do_url, **options)
        self.agents.append(agent)
        return agent

    async def publisher(self, *topics: str, consumers: int = 1) -> dcp.DataAgent:
        """An agent producing ``topics``, started (so registered), once each routes to ``consumers`` agents."""
        agent = self.agent(f"pub-{len(self.agents)}")
        agent.produces.update(topics)
        await agent.start()
        for topic in topics if consumers else ():
            await agent.wait_route(topic, consumers)
        return agent

    async def deploy(self, spec: dict[str, Any]) -> dict[str, Any]:
        async with dcp.connect(self.do_url, role="admin", name="test", reconnect=False) as admin:
            return await admin.request({"op": "deploy", "spec": spec})


@pytest.fixture
async def plane(make_broker) -> AsyncIterator[Plane]:  # type: ignore[no-untyped-def]
    do = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=":memory:", insecure=True))
    await do.start()
    broker = await make_broker(orchestrator="%s:%d" % do.address, slow_consumer="pause")
    plane = Plane(do, url_of(broker))
    yield plane
    for agent in plane.agents:
        await agent.stop()
    await do.close()


def payloads(n: int, tag: bytes) -> list[bytes]:
    """Distinct payloads of varied sizes, every byte value included."""
    return [tag + bytes([i % 256]) + bytes(range(256))[: (i * 37) % 256] + b"\x00" * (i % 3) for i in range(n)]


def raw_rows(path: Path) -> list[tuple[str, bytes]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT topic, payload FROM frames ORDER BY seq").fetchall()
    finally:
        db.close()


async def test_stores_exactly_the_frames_of_its_topics_byte_identical_in_order(plane: Plane, tmp_path: Path) -> None:
    dsf = plane.storage(tmp_path / "s.db", topics=("sensors.>",))
    await dsf.start()
    watcher = plane.agent("watcher")
    seen_other: list[bytes] = []

    @watcher.consume("other.>")
    async def keep(msg: dcp.Message) -> None:
        seen_other.append(bytes(msg.payload))

    await watcher.start()
    pub = await plane.publisher("sensors.a.temp", "sensors.b.hum", "other.x")
    assert pub.consumers["sensors.a.temp"] == ["dsf"] and pub.consumers["other.x"] == ["watcher"]
    sent: list[tuple[str, bytes]] = []
    for i, payload in enumerate(payloads(60, b"s")):
        topic = ("sensors.a.temp", "sensors.b.hum", "other.x")[i % 3]
        assert await pub.publish(topic, payload)
        if not topic.startswith("other."):
            sent.append((topic, payload))
    # A frame of a topic it does not store, sent to the DSF's port anyway (by the number
    # of a stored topic): the DSF ignores it.  The stored frame after it proves it arrived.
    assert pub.broker is not None
    await pub.broker.publish("other.y", b"misrouted", route=pub.routes["sensors.a.temp"][1])
    assert await pub.publish("sensors.a.temp", b"last")
    sent.append(("sensors.a.temp", b"last"))
    await until(lambda: dsf.stored == len(sent) and len(seen_other) == 20, "every frame stored or watched")
    assert dsf.count() == len(sent) == 41
    assert dsf.count("sensors.a.*") == 21 and dsf.count("sensors.*.hum") == 20 and dsf.count("other.>") == 0
    rows = dsf.query()
    assert [(topic, payload) for topic, _, _, payload in rows] == sent
    assert all(type(payload) is bytes for *_, payload in rows)
    published_ns = [ns for _, _, ns, _ in rows]
    assert published_ns == sorted(published_ns) and published_ns[0] > 0
    assert [msg_id for _, msg_id, _, _ in rows] == sorted(msg_id for _, msg_id, _, _ in rows)
    elements = dsf.counters()["elements"]
    assert sum(c["in"] for c in elements.values()) == len(sent)  # the misrouted frame matched no element


async def test_query_by_time_range_and_pattern(plane: Plane, tmp_path: Path) -> None:
    dsf = plane.storage(tmp_path / "s.db", topics=("a.>", "b"))
    await dsf.start()
    pub = await plane.publisher("a.one", "a.two", "b")
    sent = []
    for i in range(30):
        topic = ("a.one", "a.two", "b")[i % 3]
        payload = f"{topic}:{i}".encode()
        assert await pub.publish(topic, payload)
        sent.append((topic, payload))
    await until(lambda: dsf.stored == 30, "30 frames stored")
    rows = dsf.query()
    times = [ns for _, _, ns, _ in rows]
    assert [(t, p) for t, _, _, p in rows] == sent
    # [start, end): the frame published at start is in, the one at end is out.
    middle = dsf.query(times[10], times[20])
    assert [(t, p) for t, _, _, p in middle] == sent[10:20]
    assert [(t, p) for t, _, _, p in dsf.query(start_ns=times[25])] == sent[25:]
    assert [(t, p) for t, _, _, p in dsf.query(end_ns=times[5])] == sent[:5]
    assert [(t, p) for t, _, _, p in dsf.query(times[10], times[20], "a.*")] == [s for s in sent[10:20] if s[0] != "b"]
    assert [p for _, _, _, p in dsf.query(topic_pattern="a.two")] == [p for t, p in sent if t == "a.two"]
    assert dsf.query(times[-1] + 1) == [] and dsf.query(topic_pattern="c.>") == []
    assert dsf.count("a.>") == 20 and dsf.count("b") == 10 and dsf.count("a") == 0
    with pytest.raises(dcp.ConfigError):
        dsf.query(topic_pattern="a*")


async def test_replay_publishes_exactly_the_range_byte_identical_in_order(plane: Plane, tmp_path: Path) -> None:
    dsf = plane.storage(tmp_path / "s.db", topics=("sensors.>",))
    await dsf.start()
    player = plane.agent("player")
    replayed: list[tuple[str, bytes]] = []

    @player.consume("replay.>")
    async def keep(msg: dcp.Message) -> None:
        replayed.append((msg.topic, bytes(msg.payload)))

    await player.start()
    pub = await plane.publisher("sensors.a.temp", "sensors.b.temp")
    sent = []
    for i, payload in enumerate(payloads(40, b"r")):
        topic = ("sensors.a.temp", "sensors.b.temp")[i % 2]
        assert await pub.publish(topic, payload)
        sent.append((topic, payload))
    await until(lambda: dsf.stored == 40, "40 frames stored")
    times = [ns for _, _, ns, _ in dsf.query()]
    want = [p for t, p in sent[8:30] if t == "sensors.a.temp"]
    assert "replay.a" not in dsf.produces
    count = await dsf.replay(times[8], times[30], "replay.a", topic_pattern="sensors.a.temp")
    assert count == len(want) == 11 and dsf.replayed == 11
    assert dsf.consumers["replay.a"] == ["player"]
    await until(lambda: len(replayed) == len(want), "the replayed frames")
    assert replayed == [("replay.a", p) for p in want]
    # Paced: 10 frames at 200 Hz take at least 9 intervals.  Into a topic already declared.
    began = time.monotonic()
    count = await dsf.replay(None, times[10], "replay.a", rate_hz=200)
    assert count == 10 and time.monotonic() - began >= 9 / 200
    await until(lambda: len(replayed) == len(want) + 10, "the paced replay")
    assert replayed[len(want):] == [("replay.a", p) for _, p in sent[:10]]
    assert dsf.count() == 40  # the DSF is not a consumer of its own replay
    # Nobody consumes void.topic: no route, a clear timeout, nothing sent.
    with pytest.raises(dcp.DcpTimeout) as info:
        await dsf.replay(None, None, "void.topic", route_timeout_s=0.2)
    assert str(info.value) == (
        f"'void.topic' does not route to 1 consumer(s) after 0.2 s (no such route from the orchestrator at {dsf.orchestrator_url})"
    )
    assert dsf.replayed == 21


async def test_data_survives_a_clean_stop_and_a_new_agent_on_the_same_file(plane: Plane, tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    # Nothing is written before the stop: a flush only at 10 000 frames or 60 s.
    dsf = plane.storage(path, topics=("t",), batch_frames=10_000, flush_interval_s=60)
    await dsf.start()
    pub = await plane.publisher("t")
    first = payloads(25, b"1")
    for payload in first:
        assert await pub.publish("t", payload)
    await until(lambda: dsf.stored == 25, "25 frames at the DSF")
    assert raw_rows(path) == []  # still buffered
    await dsf.stop()
    assert raw_rows(path) == [("t", p) for p in first]
    assert dsf.count() == 25  # reads the file once closed
    again = plane.storage(path)  # the same name and file; "t" comes from a pipeline this time
    await again.start()
    assert again.count() == 25
    await plane.deploy({"name": "keep", "source": [{"name": "t", "topic": "t"}],
                        "sink": [{"name": "store", "capability": "store", "consumes": ["t"]}]})
    await pub.wait_route("t", 1)
    second = payloads(5, b"2")
    for payload in second:
        assert await pub.publish("t", payload)
    await until(lambda: again.stored == 5, "5 more frames")
    assert again.count() == 30
    await again.stop()
    assert raw_rows(path) == [("t", p) for p in first + second]


async def test_a_store_sink_of_a_pipeline_and_declared_topics_store_each_frame_once(plane: Plane, tmp_path: Path) -> None:
    dsf = plane.storage(tmp_path / "s.db", topics=("sensors.>",))
    await dsf.start()
    pub = await plane.publisher("cam.video", "sensors.t", consumers=0)
    reply = await plane.deploy({
        "name": "archive",
        "source": [{"name": "cam", "topic": "cam.video"}, {"name": "s", "topic": "sensors.t"}],
        "sink": [{"name": "store", "capability": "store", "consumes": ["cam.>", "sensors.>"]}],
    })
    assert reply["assignments"] == {"store": ["dsf"]}
    await pub.wait_route("cam.video", 1)
    await pub.wait_route("sensors.t", 1)
    sent = []
    for i in range(20):
        topic = ("cam.video", "sensors.t")[i % 2]
        assert await pub.publish(topic, b"%d" % i)
        sent.append((topic, b"%d" % i))
    await until(lambda: dsf.count() == 20 and dsf.counters()["elements"].get("archive/store", {}).get("in") == 20,
                "20 frames stored")
    assert [(t, p) for t, _, _, p in dsf.query()] == sent  # once each, though both elements got sensors.t
    assert dsf.stored == 20


async def test_a_64_bit_message_id_round_trips_and_a_closed_store_still_reads(tmp_path: Path) -> None:
    dsf = StorageAgent("dsf", tmp_path / "s.db", topics=("t",))
    big = (1 << 64) - 1  # msg_id is unsigned 64 bits on the wire; sqlite's INTEGER is signed
    await dsf._store(dcp.Message("t", b"x", msg_id=big, timestamp_ns=10))
    await dsf._store(dcp.Message("t", b"y", msg_id=1, timestamp_ns=5))
    assert dsf.query() == [("t", 1, 5, b"y"), ("t", big, 10, b"x")]
    assert dsf.query(start_ns=6) == [("t", big, 10, b"x")]
    dsf.close()
    assert dsf.count("t") == 2 and dsf.query(end_ns=6) == [("t", 1, 5, b"y")]


def test_the_sensing_example_runs_and_loses_nothing() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sensing.py"), "--count", "10", "--interval", "0.01"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    fused_lines = [line for line in out.splitlines() if line.startswith("fused ")]
    replay_lines = [line for line in out.splitlines() if line.startswith("replay ")]
    assert len(fused_lines) == 10 and fused_lines[0].startswith("fused   #0 ")
    shown, published = map(int, re.search(r"fused values: (\d+) displayed of (\d+) published", out).groups())  # type: ignore[union-attr]
    assert shown == published == 10
    stored, readings, fused, total = map(int, re.search(r"stored: (\d+) frames \((\d+) readings \+ (\d+) fused\) of (\d+) published", out).groups())  # type: ignore[union-attr]
    assert (stored, readings, fused, total) == (40, 30, 10, 40)
    replayed, asked, received = map(int, re.search(r"replayed: (\d+) of (\d+) requested, (\d+) received", out).groups())  # type: ignore[union-attr]
    assert replayed == asked == received == len(replay_lines) == 5
    assert "byte-identical: yes" in out
    assert [line.split(maxsplit=1)[1] for line in replay_lines] == [line.split(maxsplit=1)[1] for line in fused_lines[2:7]]
    assert re.search(r"drops: agents unrouted=0, lost=0, dropped=0; brokers none", out)
    assert re.search(r"fusion\s+sensing/fuse\s+30\s+10 ", out) and re.search(r"dsf\s+sensing/store\s+40\s+0 ", out)
