"""Broker failover under load, measured: SIGKILL a broker mid-stream, its agents move on.

Real processes: ``dcp orchestrator``, and two ``dcp broker`` processes registered with
it, b1 linked to b0.  The data agents run here: the source and the consumer ``near``
are attached to b0 with ``[b0, b1]`` as their broker list, the consumer ``far`` to b1.
The source publishes a sequenced frame (sequence number and send time) about every
2 ms for the whole test; both consumers record (sequence number, receive time).

b0 is killed with SIGKILL (no going-away, no flush).  The agents give up on it, attach
to b1, re-register; the orchestrator computes new numbers and pushes them to the
source; delivery resumes.  The test measures, per consumer, the gap (last frame
received before the kill to the first one after it) and what was lost, and asserts:
delivery resumes within 2 s, no duplicates, strictly increasing order, and every frame
published under the number the orchestrator computed for the new attachment arrives.
The contract is at most once: the frames in flight and in b0's buffers, and those the
source publishes while it has no broker, are lost (README, "Delivery contract").

Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import asyncio
import signal
import struct
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import dcp
from dcp.routing import allocate_keys
from tests import test_pipelines
from tests.test_pipelines import Plane, gaps, status, wait_overlay
from tests.waiting import until

# The DO process fixture of the pipeline tests (imported by name, pytest finds it here).
orchestrator_process = test_pipelines.orchestrator_process

TOPIC = "failover.frames"
FRAME = struct.Struct("!QQ")  # sequence number, send time (time.monotonic_ns(); the agents share this process)
INTERVAL_S = 0.002
WARM_FRAMES = 250  # frames each consumer gets before the kill, and again after it
GAP_BOUND_S = 2.0  # the failover bound held here: delivery resumes within 2 s


@dataclass
class Sent:
    seq: int
    at: float  # time.monotonic() when publish() was called
    took: float  # how long publish() took, seconds
    ok: bool  # the agent handed it to a broker connection (False: counted lost or unrouted)
    epoch: int  # of the route it was published with
    consumers: tuple[str, ...]  # whom that route was computed for
    via: str  # the broker the agent was attached to (or last attached to) when it was called


class SequencedSource:
    """Publishes frame 0, 1, 2, ... through ``agent.publish`` every ``interval_s``, and
    records for each whether the agent sent it and with which route epoch."""

    def __init__(self, agent: dcp.DataAgent, topic: str, interval_s: float) -> None:
        self.agent, self.topic, self.interval_s = agent, topic, interval_s
        self.sent: list[Sent] = []
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        seq = 0
        while not self._stop:
            epoch = self.agent.routes.get(self.topic, (0, 0))[0]  # publish() reads the route before it awaits
            consumers = tuple(self.agent.consumers.get(self.topic, ()))
            via = self.agent.broker.url if self.agent.broker is not None else ""
            at = time.monotonic()
            ok = await self.agent.publish(self.topic, FRAME.pack(seq, time.monotonic_ns()))
            self.sent.append(Sent(seq, at, time.monotonic() - at, ok, epoch, consumers, via))
            seq += 1
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        self._stop = True
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


@dataclass
class Receiver:
    """What one consumer got: (sequence number, time.monotonic() when its handler ran)."""

    name: str
    agent: str
    got: list[tuple[int, float]] = field(default_factory=list)

    async def on_frame(self, msg: dcp.Message) -> None:
        self.got.append((FRAME.unpack_from(msg.payload)[0], time.monotonic()))

    def seqs(self) -> list[int]:
        return [s for s, _ in self.got]

    def since(self, t: float) -> int:
        return sum(1 for _, at in self.got if at >= t)


@dataclass
class Measures:
    """What one consumer saw across the kill."""

    gap_s: float  # last frame received before the kill -> first one after it
    resumed_s: float  # the kill -> the first frame after it
    lost: list[tuple[int, int]]  # runs of sequence numbers never received
    lost_in_flight: int  # of those, sent to b0: in the dying connection, the sockets or b0's buffers
    lost_refused: int  # published while the source had no broker (the agent counts them as lost)
    lost_stale: int  # sent to the new broker with a number computed before the source moved there
    duplicates: int
    in_order: bool
    unnamed: int  # frames received that were sent with a number not computed for this consumer
    before_kill: list[int]  # sequence numbers received before the kill
    missing_after_recovery: list[int]

    @classmethod
    def of(cls, receiver: Receiver, sent: list[Sent], killed_at: float, recovery_seq: int, dead: str) -> Measures:
        seqs = receiver.seqs()
        have = set(seqs)
        last = sent[-1].seq
        before = [(s, at) for s, at in receiver.got if at < killed_at]
        after = [at for _, at in receiver.got if at >= killed_at]
        missing = [s for s in range(last + 1) if s not in have]
        refused = sum(1 for s in missing if not sent[s].ok)
        in_flight = sum(1 for s in missing if sent[s].ok and sent[s].via == dead)
        return cls(
            gap_s=after[0] - before[-1][1] if before and after else float("inf"),
            resumed_s=after[0] - killed_at if after else float("inf"),
            lost=gaps(seqs, last),
            lost_in_flight=in_flight,
            lost_refused=refused,
            lost_stale=len(missing) - refused - in_flight,
            duplicates=len(seqs) - len(have),
            in_order=all(a < b for a, b in zip(seqs, seqs[1:])),
            unnamed=sum(1 for s in have if receiver.agent not in sent[s].consumers),
            before_kill=[s for s, _ in before],
            missing_after_recovery=[s for s in range(recovery_seq, last + 1) if s not in have],
        )

    def line(self, name: str, published: int) -> str:
        lost = self.lost_in_flight + self.lost_refused + self.lost_stale
        return (
            f"{name}: gap {self.gap_s * 1000:.0f} ms (first frame {self.resumed_s * 1000:.0f} ms after the kill); "
            f"lost {lost} of {published} (runs {self.lost}): {self.lost_in_flight} sent to b0, "
            f"{self.lost_refused} published while the source had no broker, {self.lost_stale} sent to b1 with an old number; "
            f"{self.duplicates} duplicates; {self.unnamed} received through a number that did not name it; "
            f"{'in order' if self.in_order else 'OUT OF ORDER'}"
        )


async def test_a_killed_broker_under_load_fails_over_within_two_seconds(orchestrator_process, broker_process) -> None:  # type: ignore[no-untyped-def]
    do = orchestrator_process()
    keys = allocate_keys(2, 64)
    doomed = broker_process("--name", "b0", "--ports", "64", "--key", str(keys[0]), "--orchestrator", do.address)
    survivor = broker_process("--name", "b1", "--ports", "64", "--key", str(keys[1]), "--orchestrator", do.address, "--peer", doomed.address)
    await wait_overlay(Plane(do, None, 2))

    src = dcp.DataAgent("src", broker=[doomed.url, survivor.url], orchestrator=do.url)
    near = dcp.DataAgent("near", broker=[doomed.url, survivor.url], orchestrator=do.url)
    far = dcp.DataAgent("far", broker=survivor.url, orchestrator=do.url)
    receivers = {"near": Receiver("near (b0, then b1)", "near"), "far": Receiver("far (b1)", "far")}
    near.consume(TOPIC)(receivers["near"].on_frame)
    far.consume(TOPIC)(receivers["far"].on_frame)
    await src.declare_produces(TOPIC)
    source = SequencedSource(src, TOPIC, INTERVAL_S)

    async with AsyncExitStack() as stack:  # the agents stop before the processes do
        for agent in (far, near, src):
            stack.push_async_callback(agent.stop)
            await agent.start()
        stack.callback(source.cancel)
        await src.wait_route(TOPIC, consumers=2)
        source.start()
        await until(lambda: all(len(r.got) >= WARM_FRAMES for r in receivers.values()), f"{WARM_FRAMES} frames at each consumer")

        epoch_at_kill = src.routes[TOPIC][0]
        killed_at = time.monotonic()
        doomed.process.kill()  # SIGKILL: b0 flushes nothing and says nothing
        rc, _ = await asyncio.to_thread(doomed.stop, signal.SIGKILL)
        assert rc == -signal.SIGKILL

        await until(
            lambda: all(r.since(killed_at) >= WARM_FRAMES for r in receivers.values()),
            lambda: f"{WARM_FRAMES} frames at each consumer after the kill; got "
            f"{ {name: r.since(killed_at) for name, r in receivers.items()} }, source at {src.broker.url if src.broker else None}, "
            f"route {src.routes.get(TOPIC, (0, 0))[0]} -> {src.consumers.get(TOPIC)}",
            timeout=20,
        )
        await source.stop()
        sent = source.sent
        last_ok = max(s.seq for s in sent if s.ok)
        await until(
            lambda: all(r.got and r.got[-1][0] == last_ok for r in receivers.values()),
            "the last frame at both consumers",
        )
        final_epoch = src.routes[TOPIC][0]
        final_consumers = sorted(src.consumers[TOPIC])
        st = await status(do.url)

    # The numbers the orchestrator computed for the new attachment reach both consumers.
    assert src.broker is not None and src.broker.url == survivor.url
    assert final_epoch > epoch_at_kill and final_consumers == ["far", "near"], (epoch_at_kill, final_epoch, final_consumers)
    at = {a["name"]: a["broker"] for a in st["agents"]}
    assert at == {"src": "b1", "near": "b1", "far": "b1"}, st["agents"]
    under_final = [s for s in sent if s.epoch == final_epoch]
    recovery = under_final[0]
    assert all(s.ok for s in under_final), "the source refused a frame after it had its new number"
    summary = [
        f"source: {len(sent)} frames every {INTERVAL_S * 1000:.0f} ms; one publish() waited "
        f"{max(s.took for s in sent) * 1000:.0f} ms (the redials of b0); it held the new number (epoch {epoch_at_kill} -> {final_epoch}) "
        f"{(recovery.at - killed_at) * 1000:.0f} ms after the kill, from frame {recovery.seq} on; agent counters "
        f"lost={src.lost} unrouted={src.unrouted}"
    ]
    measures = {name: Measures.of(r, sent, killed_at, recovery.seq, doomed.url) for name, r in receivers.items()}
    summary += [m.line(receivers[name].name, len(sent)) for name, m in measures.items()]
    print("\nbroker failover (SIGKILL of b0 under load):\n  " + "\n  ".join(summary))
    said = "\n".join(summary)
    for name, m in measures.items():
        assert m.duplicates == 0, f"{name}: duplicates\n{said}"
        assert m.unnamed == 0, f"{name}: got frames through a number computed for another broker\n{said}"
        assert m.in_order, f"{name}: out of order\n{said}"
        assert m.before_kill == list(range(len(m.before_kill))), f"{name}: lost frames before the kill\n{said}"
        assert m.missing_after_recovery == [], f"{name}: frames published after the recovery are missing\n{said}"
        assert m.gap_s < GAP_BOUND_S, f"{name}: delivery resumed after {m.gap_s:.3f} s, over {GAP_BOUND_S} s\n{said}"

    # Clean shutdown of what is left.
    for proc in (survivor, do):
        rc, log = await asyncio.to_thread(proc.stop)
        assert rc == 0, log

