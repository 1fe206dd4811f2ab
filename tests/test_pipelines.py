"""Pipelines end to end: an orchestrator process, linked broker processes, agents here.

Every test runs ``dcp orchestrator`` as a process and ``dcp cluster`` (2 or 3 linked
``dcp broker`` processes registered with it via ``--orchestrator``); the data agents run
in the test process.  Nothing waits a fixed time: tests wait on routes, counters and
events, with timeouts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import dcp
from tests.waiting import until
from tests.conftest import DaemonProcess, insecure_flag, start_daemon, tracked

DO_LISTENING = re.compile(r"dcp orchestrator listening on (\S+):(\d+) db=")
START_TIMEOUT_S = 20.0


# --------------------------------------------------------------------------- processes


@dataclass(kw_only=True)
class OrchestratorProcess(DaemonProcess):
    db: Path


def start_orchestrator_process(db: Path, *, port: int = 0, policy_file: Path | None = None, extra: tuple[str, ...] = ()) -> OrchestratorProcess:
    """``python -m dcp orchestrator`` on ``port`` (0: a free one), with the flags ``extra``; returns once it listens."""
    args = ["orchestrator", "--listen", f"127.0.0.1:{port}", "--db", str(db), "--log-level", "info", *insecure_flag(extra),
            *(arg for arg in extra if arg != "--secure")]
    if policy_file is not None:
        args += ["--policy", str(policy_file)]
    process, match, seen = start_daemon(args, DO_LISTENING)
    return OrchestratorProcess(process=process, host=match[1], port=int(match[2]), db=db, log=seen)


@pytest.fixture
def orchestrator_process(tmp_path: Path) -> Iterator[Callable[..., OrchestratorProcess]]:
    """``orchestrator_process(port=0, policy_file=None, db=None)``; killed at teardown if still running."""

    def start(*, port: int = 0, policy_file: Path | None = None, db: Path | None = None) -> OrchestratorProcess:
        return start_orchestrator_process(db or tmp_path / "do.db", port=port, policy_file=policy_file)

    yield from tracked(start)


@dataclass
class Plane:
    """An orchestrator process and a ``dcp cluster`` of brokers registered with it."""

    do: OrchestratorProcess
    cluster: Any  # conftest.ClusterProcess
    n: int

    def broker(self, name: str) -> str:
        return self.cluster.url(name)


@pytest.fixture
def start_plane(orchestrator_process, cluster_process) -> Callable[..., Plane]:  # type: ignore[no-untyped-def]
    """``start_plane(n=3, policy_file=None)``: a DO process, then ``n`` brokers in a line registered with it."""

    def start(n: int = 3, policy_file: Path | None = None) -> Plane:
        do = orchestrator_process(policy_file=policy_file)
        cluster = cluster_process("-n", str(n), "--topology", "line", "--", "--orchestrator", do.address)
        return Plane(do, cluster, n)

    return start


@pytest.fixture
async def agents(start_plane) -> AsyncIterator[Callable[..., dcp.DataAgent]]:  # type: ignore[no-untyped-def]
    """``agents(name, broker_url, do_url)``: a DataAgent reporting every 0.1 s, stopped at teardown
    (before the processes go, since this fixture depends on theirs)."""
    made: list[dcp.DataAgent] = []

    def make(name: str, broker: str, orchestrator: str) -> dcp.DataAgent:
        agent = dcp.DataAgent(name, broker=broker, orchestrator=orchestrator, report_interval_s=0.1)
        made.append(agent)
        return agent

    yield make
    for agent in reversed(made):
        await agent.stop()


# --------------------------------------------------------------------------- helpers




async def request(do_url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with dcp.connect(do_url, role="admin", name="test", reconnect=False) as admin:
        return await admin.request(body)


async def status(do_url: str) -> dict[str, Any]:
    return (await request(do_url, {"op": "status"}))["status"]


async def pipelines(do_url: str) -> list[dict[str, Any]]:
    return (await request(do_url, {"op": "pipelines"}))["pipelines"]


async def wait_overlay(plane: Plane, timeout: float = 15.0) -> None:
    """Until the DO sees every broker online with the line's links up at both ends."""

    async def ready() -> bool:
        try:
            brokers = (await status(plane.do.url))["brokers"]
        except (dcp.DcpError, OSError):
            return False
        online = [b for b in brokers if b["online"]]
        ends = sum(1 for b in online for link in b["links"] if link["state"] == "up")
        return len(online) == plane.n and ends == 2 * (plane.n - 1)

    await until(ready, f"{plane.n} brokers and their links registered with the orchestrator", timeout, interval=0.02)


async def dcp_cli(*args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    """Run ``python -m dcp ARGS`` without blocking the loop (the agents live on it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dcp", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def payload(i: int) -> bytes:
    """Frame ``i`` of a deterministic stream: its sequence number, then 32 bytes that depend on it."""
    return b"%08d:" % i + hashlib.sha256(b"frame %d" % i).digest()


def seq(data: bytes | memoryview) -> int:
    return int(bytes(data[:8]))


def stage_a(data: bytes) -> bytes:
    return b"A[" + data + b"]"


def stage_b(data: bytes) -> bytes:
    return b"B(" + data[::-1] + b")"


def element_rows(view: list[dict[str, Any]], pipeline: str) -> dict[str, list[dict[str, Any]]]:
    """element name -> its agents' rows (with counters), for one pipeline of a ``pipelines`` view."""
    for item in view:
        if item["name"] == pipeline:
            return {element["name"]: element["agents"] for element in item["elements"]}
    return {}


def gaps(seqs: list[int], last: int) -> list[tuple[int, int]]:
    """The runs (first, last) of 0..last missing from ``seqs``."""
    have = set(seqs)
    runs: list[tuple[int, int]] = []
    for i in range(last + 1):
        if i not in have:
            if runs and runs[-1][1] == i - 1:
                runs[-1] = (runs[-1][0], i)
            else:
                runs.append((i, i))
    return runs


class Counter:
    """Sequence numbers received by one handler, and when the first came."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.first_at: float | None = None
        self.first = asyncio.Event()

    def add(self, data: bytes | memoryview) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()
            self.first.set()
        self.seqs.append(seq(data))


class NumberedSource:
    """A source generator: waits for its route, then yields payload(0), payload(1), ... every
    ``interval_s`` until ``stop()``; ``last`` is the last one handed out (published by the
    agent before the generator resumes)."""

    def __init__(self, agent: dcp.DataAgent, topic: str, interval_s: float = 0.002, consumers: int = 1) -> None:
        self.agent, self.topic, self.interval_s, self.consumers = agent, topic, interval_s, consumers
        self.last = -1
        self._stop = False
        self.done = asyncio.Event()

    async def generate(self, params: dict[str, Any] | None = None) -> AsyncIterator[bytes]:
        try:
            await self.agent.wait_route(self.topic, consumers=self.consumers, timeout=15)
            i = 0
            while not self._stop:
                self.last = i
                yield payload(i)
                i += 1
                await asyncio.sleep(self.interval_s)
        finally:
            self.done.set()

    async def stop(self, timeout: float = 5.0) -> int:
        self._stop = True
        await asyncio.wait_for(self.done.wait(), timeout)
        return self.last


# --------------------------------------------------------------------------- 1. a 3-stage pipeline


async def test_three_stage_pipeline_over_three_brokers_delivers_exactly_what_the_spec_implies(start_plane, agents) -> None:  # type: ignore[no-untyped-def]
    """source (b0) -> A (b1) -> B (b2) -> sink (b0): A gets all N in order, B exactly A's
    outputs, the sink exactly B's; the orchestrator's counters say the same."""
    n = 200
    plane = start_plane(3)
    await wait_overlay(plane)
    do = plane.do.url
    go = asyncio.Event()
    source = agents("src", plane.broker("b0"), do)
    a = agents("stage-a", plane.broker("b1"), do)
    b = agents("stage-b", plane.broker("b2"), do)
    sink = agents("sink", plane.broker("b0"), do)
    got: dict[str, list[bytes]] = {"A": [], "B": [], "out": []}

    @source.capability("numbers")
    async def numbers(params: dict[str, Any]) -> AsyncIterator[bytes]:
        await go.wait()  # until A and B hold their routes too: a stage gets its number over its own connection
        for i in range(params["count"]):
            yield payload(i)

    @a.capability("wrap")
    async def wrap(msg: dcp.Message, params: dict[str, Any]) -> bytes:
        got["A"].append(bytes(msg.payload))
        return stage_a(bytes(msg.payload))

    @b.capability("reverse")
    async def reverse(msg: dcp.Message, params: dict[str, Any]) -> bytes:
        got["B"].append(bytes(msg.payload))
        return stage_b(bytes(msg.payload))

    @sink.capability("collect")
    async def collect(msg: dcp.Message, params: dict[str, Any]) -> None:
        got["out"].append(bytes(msg.payload))

    for agent in (source, a, b, sink):
        await agent.start()
    spec = {
        "name": "chain",
        "source": [{"name": "gen", "capability": "numbers", "emits": "c.raw", "params": {"count": n}}],
        "stage": [
            {"name": "A", "capability": "wrap", "consumes": ["c.raw"], "emits": "c.mid"},
            {"name": "B", "capability": "reverse", "consumes": ["c.mid"], "emits": "results.c.final"},
        ],
        "sink": [{"name": "out", "capability": "collect", "consumes": ["results.*.final"]}],
    }
    await request(do, {"op": "deploy", "spec": spec})
    await source.wait_route("c.raw", timeout=10)
    await a.wait_route("c.mid", timeout=10)
    await b.wait_route("results.c.final", timeout=10)
    go.set()
    sent = [payload(i) for i in range(n)]
    await until(lambda: len(got["out"]) >= n, f"{n} frames at the sink")
    assert got["A"] == sent
    assert got["B"] == [stage_a(p) for p in sent]
    assert got["out"] == [stage_b(stage_a(p)) for p in sent]

    expected = {"gen": (0, n), "A": (n, n), "B": (n, n), "out": (n, 0)}

    def counters(view: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
        return {name: (rs[0].get("in", -1), rs[0].get("out", -1)) for name, rs in element_rows(view, "chain").items() if rs}

    async def reported() -> bool:
        return counters(await pipelines(do)) == expected

    await until(reported, "the agents' reports to reach the orchestrator")
    rc, out, err = await dcp_cli("pipelines", "--orchestrator", do, "--json")
    assert rc == 0, err
    view = json.loads(out)
    assert [p["name"] for p in view] == ["chain"]
    assert counters(view) == expected
    rows = element_rows(view, "chain")
    assert {name: [r["agent"] for r in rs] for name, rs in rows.items()} == {
        "gen": ["src"], "A": ["stage-a"], "B": ["stage-b"], "out": ["sink"]
    }
    for rs in rows.values():
        assert rs[0]["online"] is True and rs[0]["errors"] == rs[0]["dropped"] == rs[0]["unrouted"] == 0, rs
    rc, out, err = await dcp_cli("pipelines", "--orchestrator", do)
    assert rc == 0, err
    assert "pipeline chain" in out and "stage-a" in out
    # nothing arrived twice in the meantime
    assert [len(got[k]) for k in ("A", "B", "out")] == [n, n, n]


# --------------------------------------------------------------------------- 2. a consumer joins mid-stream


async def test_second_consumer_joins_mid_stream_without_loss_or_duplicates(start_plane, agents) -> None:  # type: ignore[no-untyped-def]
    plane = start_plane(3)
    await wait_overlay(plane)
    do = plane.do.url
    producer = agents("temp-producer", plane.broker("b0"), do)
    source = NumberedSource(producer, "sensors.a.temp", interval_s=0.002)
    producer.source("sensors.a.temp")(source.generate)
    first, second = Counter(), Counter()
    c1 = agents("temp-consumer-1", plane.broker("b1"), do)
    c2 = agents("temp-consumer-2", plane.broker("b2"), do)

    @c1.consume("sensors.*.temp")
    async def on_c1(msg: dcp.Message) -> None:
        first.add(msg.payload)

    @c2.consume("sensors.a.temp")
    async def on_c2(msg: dcp.Message) -> None:
        second.add(msg.payload)

    await c1.start()
    await producer.start()
    await until(lambda: len(first.seqs) >= 100, "consumer 1 to receive 100 frames")
    epoch_before = producer.routes["sensors.a.temp"][0]

    called = time.perf_counter()
    await c2.start()
    returned = time.perf_counter()
    await asyncio.wait_for(second.first.wait(), 10)
    assert second.first_at is not None
    from_call, from_return = second.first_at - called, second.first_at - returned
    print(f"\njoin latency: first frame {from_return * 1000:.1f} ms after start() returned, "
          f"{from_call * 1000:.1f} ms after start() was called")
    await until(lambda: len(second.seqs) >= 100, "consumer 2 to receive 100 frames")

    last = await source.stop()
    await until(lambda: first.seqs[-1:] == [last] and second.seqs[-1:] == [last], "the last frame at both consumers")
    assert producer.routes["sensors.a.temp"][0] > epoch_before
    assert sorted(producer.consumers["sensors.a.temp"]) == ["temp-consumer-1", "temp-consumer-2"]
    assert first.seqs == list(range(last + 1)), "consumer 1 got every frame once, in order, across the recomputation"
    k = second.seqs[0]
    assert 0 < k <= last
    assert second.seqs == list(range(k, last + 1)), "consumer 2 got a contiguous run from its first frame on"
    assert producer.unrouted == producer.lost == 0


# --------------------------------------------------------------------------- 3. a pattern meets a later producer


async def test_pattern_consumer_gets_a_producer_that_registers_later(start_plane, agents) -> None:  # type: ignore[no-untyped-def]
    plane = start_plane(2)
    await wait_overlay(plane)
    do = plane.do.url
    got = Counter()
    consumer = agents("everything-sensors", plane.broker("b1"), do)

    @consumer.consume("sensors.>")
    async def on_frame(msg: dcp.Message) -> None:
        assert msg.topic == "sensors.b.humidity"
        got.add(msg.payload)

    await consumer.start()

    async def registered() -> bool:
        return any(a["name"] == "everything-sensors" and a["online"] for a in (await status(do))["agents"])

    await until(registered, "the consumer to register")
    assert (await status(do))["streams"] == []

    producer = agents("humidity", plane.broker("b0"), do)
    n = 50

    @producer.source("sensors.b.humidity")
    async def humidity() -> AsyncIterator[bytes]:
        await producer.wait_route("sensors.b.humidity", timeout=10)
        for i in range(n):
            yield payload(i)

    await producer.start()
    await until(lambda: len(got.seqs) >= n, f"{n} humidity frames at the sensors.> consumer")
    assert got.seqs == list(range(n))
    streams = (await status(do))["streams"]
    assert [(s["producer"], s["topic"], s["consumers"]) for s in streams] == [
        ("humidity", "sensors.b.humidity", ["everything-sensors"])
    ]


# --------------------------------------------------------------------------- 4. orchestrator restart


async def test_orchestrator_restart_keeps_the_flow_and_recovers_its_state(start_plane, agents, orchestrator_process) -> None:  # type: ignore[no-untyped-def]
    plane = start_plane(3)
    await wait_overlay(plane)
    do = plane.do.url
    source_agent = agents("ticker", plane.broker("b0"), do)
    source = NumberedSource(source_agent, "r.tick", interval_s=0.003)
    source_agent.capability("tick")(source.generate)
    kept, late = Counter(), Counter()
    sink = agents("keeper", plane.broker("b1"), do)

    @sink.capability("keep")
    async def keep(msg: dcp.Message, params: dict[str, Any]) -> None:
        kept.add(msg.payload)

    latecomer = agents("latecomer", plane.broker("b2"), do)

    @latecomer.consume("r.tick")
    async def on_late(msg: dcp.Message) -> None:
        late.add(msg.payload)

    await source_agent.start()
    await sink.start()
    spec = {
        "name": "restartable",
        "source": [{"name": "tick", "capability": "tick", "emits": "r.tick"}],
        "sink": [{"name": "keep", "capability": "keep", "consumes": ["r.tick"]}],
    }
    await request(do, {"op": "deploy", "spec": spec})
    await until(lambda: len(kept.seqs) >= 30, "the sink to receive 30 frames")

    port = plane.do.port
    rc, log = await asyncio.to_thread(plane.do.stop)
    assert rc == 0, log
    down_at = len(kept.seqs)
    await until(lambda: len(kept.seqs) >= down_at + 100, "100 more frames while the orchestrator is down")

    plane.do = await asyncio.to_thread(orchestrator_process, port=port)
    assert plane.do.port == port
    assert "recovered" in "".join(plane.do.log)
    await wait_overlay(plane)

    async def back() -> bool:
        view = await pipelines(do)
        rows = element_rows(view, "restartable")
        return rows.get("tick", [{}])[0].get("online") is True and rows.get("keep", [{}])[0].get("online") is True

    await until(back, "the pipeline with both agents online again")
    rc, out, err = await dcp_cli("pipelines", "--orchestrator", do, "--json")
    assert rc == 0, err
    rows = element_rows(json.loads(out), "restartable")
    assert [r["agent"] for r in rows["tick"]] == ["ticker"] and [r["agent"] for r in rows["keep"]] == ["keeper"]

    await latecomer.start()
    await until(lambda: len(late.seqs) >= 30, "a consumer joining after the restart to receive 30 frames")
    last = await source.stop()
    await until(lambda: kept.seqs[-1:] == [last] and late.seqs[-1:] == [last], "the last frame at both consumers")
    assert kept.seqs == list(range(last + 1)), (
        f"the sink got every frame once, in order, through the restart; missing: {gaps(kept.seqs, last)}; "
        f"unrouted at the source: {source_agent.unrouted}; orchestrator log after the restart:\n{''.join(plane.do.log)}"
    )
    assert late.seqs == list(range(late.seqs[0], last + 1))
    assert source_agent.unrouted == source_agent.lost == 0


async def test_agents_back_before_their_brokers_after_an_orchestrator_restart_lose_no_frame(
    tmp_path: Path, orchestrator_process, broker_process, agents
) -> None:  # type: ignore[no-untyped-def]
    """After a restart the DO knows the brokers from sqlite but hears from the agents first
    (their reconnect backoff tops out at 1 s, the brokers' at 5 s).  It must not tell a
    producer to route nowhere because its broker has not re-registered yet.  The order is
    forced here by stopping the broker processes (SIGSTOP) while the orchestrator restarts."""
    from dcp.routing import allocate_keys

    do = orchestrator_process()
    keys = allocate_keys(2, 64)
    b0 = broker_process("--name", "b0", "--ports", "64", "--key", str(keys[0]), "--orchestrator", do.address)
    b1 = broker_process("--name", "b1", "--ports", "64", "--key", str(keys[1]), "--orchestrator", do.address, "--peer", f"{b0.host}:{b0.port}")
    plane = Plane(do, None, 2)
    await wait_overlay(plane)
    producer = agents("early-producer", b0.url, do.url)
    source = NumberedSource(producer, "e.frames", interval_s=0.003)
    producer.source("e.frames")(source.generate)
    got = Counter()
    consumer = agents("early-consumer", b1.url, do.url)

    @consumer.consume("e.frames")
    async def on_frame(msg: dcp.Message) -> None:
        got.add(msg.payload)

    await consumer.start()
    await producer.start()
    await until(lambda: len(got.seqs) >= 30, "30 frames at the consumer")

    port = do.port
    rc, log = await asyncio.to_thread(do.stop)
    assert rc == 0, log
    brokers = [b0.process, b1.process]
    for proc in brokers:
        proc.send_signal(signal.SIGSTOP)
    try:
        plane.do = do = await asyncio.to_thread(orchestrator_process, port=port)

        async def agents_back() -> bool:
            st = await status(do.url)
            online = {a["name"] for a in st["agents"] if a["online"]}
            return online == {"early-producer", "early-consumer"} and not any(b["online"] for b in st["brokers"])

        await until(agents_back, "both agents to re-register while their brokers are stopped")
        mark = source.last
        await until(lambda: source.last >= mark + 50, "50 more frames produced")
    finally:
        for proc in brokers:
            proc.send_signal(signal.SIGCONT)
    await wait_overlay(plane)
    mark = source.last
    await until(lambda: len(got.seqs) > 0 and got.seqs[-1] >= mark, "frames produced after the brokers came back")
    last = await source.stop()
    await until(lambda: got.seqs[-1:] == [last], "the last frame at the consumer")
    assert producer.unrouted == 0, f"{producer.unrouted} frames published with no route after the restart"
    assert got.seqs == list(range(last + 1)), "the consumer got every frame once, in order, through the restart"


# --------------------------------------------------------------------------- 5. policy


async def test_policy_file_keeps_a_denied_agent_from_consuming(tmp_path: Path, start_plane, agents) -> None:  # type: ignore[no-untyped-def]
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(textwrap.dedent("""\
        default = "allow"

        [[rule]]
        agent = "spy*"
        action = "deny"
        consume = ["secret.>"]
    """))
    plane = start_plane(2, policy_file=policy_file)
    await wait_overlay(plane)
    do = plane.do.url
    allowed, spied = Counter(), Counter()
    ok = agents("analyst", plane.broker("b1"), do)
    spy = agents("spy-1", plane.broker("b1"), do)

    @ok.consume("secret.>")
    async def on_ok(msg: dcp.Message) -> None:
        allowed.add(msg.payload)

    @spy.consume("secret.>")
    async def on_spy(msg: dcp.Message) -> None:
        spied.add(msg.payload)

    @spy.capability("exfiltrate")
    async def exfiltrate(msg: dcp.Message, params: dict[str, Any]) -> None:
        spied.add(msg.payload)

    producer = agents("vault", plane.broker("b0"), do)
    n = 100

    @producer.source("secret.plans")
    async def plans() -> AsyncIterator[bytes]:
        await producer.wait_route("secret.plans", timeout=10)
        for i in range(n):
            yield payload(i)

    await spy.start()  # registered before the producer and the allowed consumer, so every recomputation sees it
    await ok.start()
    await producer.start()
    await until(lambda: len(allowed.seqs) >= n, f"{n} frames at the allowed consumer")
    assert allowed.seqs == list(range(n))
    assert producer.consumers["secret.plans"] == ["analyst"]
    streams = (await status(do))["streams"]
    assert [(s["producer"], s["topic"], s["consumers"]) for s in streams] == [("vault", "secret.plans", ["analyst"])]
    # The spy and the analyst sit on the same broker: a frame for the analyst passed the spy's
    # broker, so had the number included the spy it would have arrived by now.
    assert spied.seqs == []

    spec = {
        "name": "leak",
        "source": [{"name": "plans", "topic": "secret.plans"}],
        "sink": [{"name": "exfil", "capability": "exfiltrate", "consumes": ["secret.>"]}],
    }
    with pytest.raises(dcp.RemoteError) as refused:
        await request(do, {"op": "deploy", "spec": spec})
    message = str(refused.value)
    assert "sink[0]" in message and "policy" in message, message
    assert "spy-1" in message
    assert await pipelines(do) == []
    assert spied.seqs == []


# --------------------------------------------------------------------------- 6. deploy validation over the wire


@pytest.mark.parametrize(
    ("spec", "field", "why"),
    [
        (
            """
            name = "unknown-cap"
            [[source]]
            name = "gen"
            capability = "relay-source"
            emits = "v.a"
            [[stage]]
            name = "mystery"
            capability = "no-such-capability"
            consumes = ["v.a"]
            emits = "v.b"
            """,
            "stage[0].capability",
            "no-such-capability",
        ),
        (
            """
            name = "loop"
            [[stage]]
            name = "ping"
            capability = "relay"
            consumes = ["v.x"]
            emits = "v.y"
            [[stage]]
            name = "pong"
            capability = "relay"
            consumes = ["v.y"]
            emits = "v.x"
            """,
            "pipeline",
            "cycle",
        ),
        (
            """
            name = "orphan"
            [[stage]]
            name = "waiting"
            capability = "relay"
            consumes = ["nobody.makes.this"]
            emits = "v.z"
            """,
            "stage[0].consumes",
            "no producer",
        ),
    ],
    ids=["unknown-capability", "cycle", "no-producer"],
)
async def test_deploy_command_reports_the_invalid_field(tmp_path: Path, start_plane, agents, spec: str, field: str, why: str) -> None:  # type: ignore[no-untyped-def]
    plane = start_plane(2)
    do = plane.do.url
    relay = agents("relay", plane.broker("b1"), do)

    @relay.capability("relay")
    async def forward(msg: dcp.Message, params: dict[str, Any]) -> bytes:
        return bytes(msg.payload)

    @relay.capability("relay-source")
    async def generate(params: dict[str, Any]) -> AsyncIterator[bytes]:
        yield b"never"

    await relay.start()
    path = tmp_path / "spec.toml"
    path.write_text(textwrap.dedent(spec))
    rc, out, err = await dcp_cli("deploy", str(path), "--orchestrator", do)
    assert rc == 1, (out, err)
    assert err.startswith("dcp deploy: ")
    assert f"{field}: " in err and why in err, err
    assert await pipelines(do) == []


# --------------------------------------------------------------------------- 7. undeploy


async def test_undeploy_command_stops_the_source_and_removes_the_pipeline(tmp_path: Path, start_plane, agents) -> None:  # type: ignore[no-untyped-def]
    plane = start_plane(2)
    await wait_overlay(plane)
    do = plane.do.url
    source_agent = agents("emitter", plane.broker("b0"), do)
    source = NumberedSource(source_agent, "u.ticks", interval_s=0.002)
    source_agent.capability("emit")(source.generate)
    got = Counter()
    sink = agents("receiver", plane.broker("b1"), do)

    @sink.capability("receive")
    async def receive(msg: dcp.Message, params: dict[str, Any]) -> None:
        got.add(msg.payload)

    await source_agent.start()
    await sink.start()
    path = tmp_path / "spec.toml"
    path.write_text(textwrap.dedent("""\
        name = "ticks"
        [[source]]
        name = "emit"
        capability = "emit"
        emits = "u.ticks"
        [[sink]]
        name = "receive"
        capability = "receive"
        consumes = ["u.ticks"]
    """))
    rc, out, err = await dcp_cli("deploy", str(path), "--orchestrator", do)
    assert rc == 0, err
    assert "deployed ticks" in out and "emit: emitter" in out and "receive: receiver" in out
    await until(lambda: len(got.seqs) >= 30, "the sink to receive 30 frames")
    assert "ticks/emit" in source_agent.elements and "ticks/receive" in sink.elements

    rc, out, err = await dcp_cli("undeploy", "ticks", "--orchestrator", do)
    assert rc == 0, err
    assert out.strip() == "undeployed ticks"
    await asyncio.wait_for(source.done.wait(), 5)  # the source's generator was stopped (unassigned)
    assert "ticks/emit" not in source_agent.elements and "ticks/receive" not in sink.elements
    published = source_agent.published
    # Frames in flight when the sink's element went are dropped there: a gapless prefix arrived.
    assert got.seqs == list(range(len(got.seqs))) and len(got.seqs) <= published
    received = len(got.seqs)

    rc, out, err = await dcp_cli("pipelines", "--orchestrator", do, "--json")
    assert rc == 0, err
    assert json.loads(out) == []
    rc, out, err = await dcp_cli("pipelines", "--orchestrator", do)
    assert rc == 0, err
    assert out.strip() == "no pipelines deployed"

    streams = (await status(do))["streams"]
    assert [(s["producer"], s["topic"], s["x_bytes"], s["consumers"]) for s in streams] == [
        ("emitter", "u.ticks", 0, [])
    ], "the source's stream routes nowhere now"
    assert source_agent.routes["u.ticks"][1] == 0
    assert source_agent.published == published and len(got.seqs) == received, "nothing flowed after the undeploy"
    rc, out, err = await dcp_cli("undeploy", "ticks", "--orchestrator", do)
    assert rc == 1 and "no pipeline named 'ticks'" in err, err


async def test_a_redeployed_pipeline_flows_again(start_plane, agents) -> None:  # type: ignore[no-untyped-def]
    """Undeploy, then deploy the same spec to the same agents: the source gets a route again
    (epochs never go back, so the agent does not take the new number for a stale one)."""
    plane = start_plane(2)
    await wait_overlay(plane)
    do = plane.do.url
    source_agent = agents("emitter", plane.broker("b0"), do)
    sink = agents("receiver", plane.broker("b1"), do)
    runs: list[NumberedSource] = []
    got: list[Counter] = []

    @source_agent.capability("emit")
    async def emit(params: dict[str, Any]) -> AsyncIterator[bytes]:
        async for item in runs[-1].generate(params):
            yield item

    @sink.capability("receive")
    async def receive(msg: dcp.Message, params: dict[str, Any]) -> None:
        got[-1].add(msg.payload)

    await source_agent.start()
    await sink.start()
    spec = {
        "name": "again",
        "source": [{"name": "emit", "capability": "emit", "emits": "a.ticks"}],
        "sink": [{"name": "receive", "capability": "receive", "consumes": ["a.ticks"]}],
    }
    for attempt in range(2):
        runs.append(NumberedSource(source_agent, "a.ticks", interval_s=0.002))
        got.append(Counter())
        await request(do, {"op": "deploy", "spec": spec})
        await until(lambda: len(got[-1].seqs) >= 30, f"deploy #{attempt + 1}: 30 frames at the sink")
        last = await runs[-1].stop()  # stop the flow first: undeploying drops what is in flight
        await until(
            lambda: got[-1].seqs[-1:] == [last],
            lambda: f"deploy #{attempt + 1}: the last frame ({last}) at the sink (got up to {got[-1].seqs[-1:]}, "
            f"{source_agent.unrouted} unrouted, routes {source_agent.routes})",
        )
        await request(do, {"op": "undeploy", "name": "again"})
        assert got[-1].seqs == list(range(last + 1))
    assert source_agent.unrouted == 0


async def test_a_deployed_source_loses_none_of_its_first_frames(start_plane, agents) -> None:  # type: ignore[no-untyped-def]
    """A source's first frames must not be published before the agent has the stream's route.
    The DO sends ``assign`` before the ``route`` of that stream, so this was a race (about one
    deploy in three lost its first frames) until sources waited for their route: deploy ten
    pipelines whose source yields at once and count the frames published unrouted."""
    plane = start_plane(2)
    await wait_overlay(plane)
    do = plane.do.url
    source_agent = agents("burster", plane.broker("b0"), do)
    sink = agents("catcher", plane.broker("b1"), do)
    per_run, runs = 20, 10
    got: dict[str, list[int]] = {}

    @source_agent.capability("burst")
    async def burst(params: dict[str, Any]) -> AsyncIterator[bytes]:
        for i in range(per_run):
            yield payload(i)

    @sink.capability("catch")
    async def catch(msg: dcp.Message, params: dict[str, Any]) -> None:
        got.setdefault(msg.topic, []).append(seq(msg.payload))

    await source_agent.start()
    await sink.start()
    for run in range(runs):
        topic = f"burst.r{run}"
        spec = {
            "name": f"burst-{run}",
            "source": [{"name": "emit", "capability": "burst", "emits": topic}],
            "sink": [{"name": "catch", "capability": "catch", "consumes": [topic]}],
        }
        await request(do, {"op": "deploy", "spec": spec})
        done = per_run * (run + 1)
        await until(lambda: source_agent.published + source_agent.unrouted >= done, f"run {run}: the source to finish")
        await until(lambda: sum(map(len, got.values())) >= source_agent.published, f"run {run}: the published frames at the sink")
        await request(do, {"op": "undeploy", "name": f"burst-{run}"})
    lost = {topic: per_run - len(seqs) for topic, seqs in got.items() if len(seqs) < per_run}
    lost.update({f"burst.r{run}": per_run for run in range(runs) if f"burst.r{run}" not in got})
    assert source_agent.unrouted == 0 and not lost, (
        f"{source_agent.unrouted} of {per_run * runs} frames published before the route arrived; lost per run: {lost}"
    )
