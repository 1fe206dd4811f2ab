"""Rolling restart: each of two brokers stopped with SIGTERM and started again, under load.

Processes: ``dcp orchestrator`` (sqlite in a temporary directory) and two ``dcp broker``
processes registered with it (64 ports each, b1 linked to b0).  The data agents run in
this process, on one uvloop, and use only the public API:

* ``src`` (brokers ``[b0, b1]``) publishes a sequenced frame (sequence number, send
  time) every ``--interval-ms`` (2 ms) on ``bench.rolling``;
* ``near`` (``[b0, b1]``) and ``far`` (``[b1, b0]``) consume it.

After a warm-up, b0 gets SIGTERM: it says ``going_away`` on every connection, and the
agents on it move to b1 at once and re-register; b0 is started again on the same
address with the same key, and once the orchestrator sees both brokers and their link
up again and both consumers are receiving, b1 gets the same treatment (everyone moves
to b0).  ``--signal KILL`` does the same with SIGKILL (no going_away: the agents find
out by redialling), for comparison.

For each consumer and each restart it reports the frames lost (published then, never
received) and the gap: the longest interval without a frame, from the last frame
before the signal until the consumer is steady again.

    .venv/bin/python bench/rolling_restart.py
    .venv/bin/python bench/rolling_restart.py --signal KILL --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

import dcp

DO_LISTENING = re.compile(r"dcp orchestrator listening on (\S+):(\d+) db=")
BROKER_LISTENING = re.compile(r"listening on (\S+):(\d+) mode=\w+ key=(\d+)")
TOPIC = "bench.rolling"
FRAME = struct.Struct("!QQ")  # sequence number, time.monotonic_ns() at publish
STEADY_FRAMES = 250  # frames each consumer gets before a restart, and again after it


def _drain(stream: Any) -> None:
    for _ in stream:  # keep the pipe from filling up
        pass


def spawn(argv: list[str], listening: re.Pattern[str]) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """Run ``python -m dcp ARGV`` and return once its log shows ``listening``; its stderr
    is drained from then on, so it never blocks on a full pipe."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dcp", *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        match = listening.search(line)
        if match:
            threading.Thread(target=_drain, args=(process.stderr,), daemon=True).start()
            return process, match
    process.wait()
    raise RuntimeError(f"dcp {argv[0]} exited with {process.returncode}:\n{''.join(seen)}")


@dataclass
class BrokerProcess:
    """A ``dcp broker`` that can be stopped and started again on the same address and key."""

    name: str
    argv: list[str]
    address: str = ""
    key: str = ""
    process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        listen, key = (self.address, ["--key", self.key]) if self.address else ("127.0.0.1:0", [])
        self.process, match = spawn(["broker", "--listen", listen, "--name", self.name, *key, *self.argv], BROKER_LISTENING)
        self.address, self.key = f"{match[1]}:{match[2]}", match[3]

    def stop(self, sig: int) -> float:
        """Signal it; return how long it took to exit, seconds."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(sig)
        self.process.wait(30)
        return time.monotonic() - started

    @property
    def url(self) -> str:
        return f"dcp://{self.address}"


@dataclass
class Consumer:
    name: str
    got: list[tuple[int, float]] = field(default_factory=list)  # (sequence number, time.monotonic())

    async def on_frame(self, msg: dcp.Message) -> None:
        self.got.append((FRAME.unpack_from(msg.payload)[0], time.monotonic()))

    def since(self, t: float) -> int:
        return sum(1 for _, at in self.got if at >= t)


@dataclass
class Restart:
    broker: str
    signalled: float  # time.monotonic()
    steady: float  # both consumers receiving again, and the overlay whole
    exit_s: float  # signal -> the process exited
    last_seq: int  # the last one published before steady: the frames of this restart end here


async def overlay_whole(do_url: str) -> bool:
    """Whether the orchestrator sees both brokers online and their link up at both ends."""
    try:
        async with dcp.connect(do_url, role="admin", name="bench", reconnect=False) as admin:
            brokers = (await admin.request({"op": "status"}))["status"]["brokers"]
    except (dcp.DcpError, OSError):
        return False
    online = [b for b in brokers if b["online"]]
    return len(online) == 2 and sum(link["state"] == "up" for b in online for link in b["links"]) == 2


async def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def measure(do_url: str, brokers: dict[str, BrokerProcess], sig: int, rounds: int, interval_s: float) -> dict[str, Any]:
    b0, b1 = brokers["b0"], brokers["b1"]
    src = dcp.DataAgent("src", broker=[b0.url, b1.url], orchestrator=do_url)
    consumers = {"near": Consumer("near"), "far": Consumer("far")}
    agents = {
        "near": dcp.DataAgent("near", broker=[b0.url, b1.url], orchestrator=do_url),
        "far": dcp.DataAgent("far", broker=[b1.url, b0.url], orchestrator=do_url),
    }
    for name, agent in agents.items():
        agent.consume(TOPIC)(consumers[name].on_frame)
        await agent.start()
    await src.start()
    await src.declare_produces(TOPIC)
    await src.wait_route(TOPIC, consumers=2)
    sent: list[bool] = []  # by sequence number: the agent handed it to a broker connection
    stop = asyncio.Event()

    async def publish() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not stop.is_set():
            sent.append(await src.publish(TOPIC, FRAME.pack(len(sent), time.monotonic_ns())))
            await asyncio.sleep(max(start + len(sent) * interval_s - loop.time(), 0))

    async def steady_since(t: float) -> bool:
        return all(c.since(t) >= STEADY_FRAMES for c in consumers.values())

    publisher = asyncio.ensure_future(publish())
    restarts: list[Restart] = []
    try:
        began = time.monotonic()
        await wait_for(lambda: steady_since(began), "the warm-up")
        for broker in [b0, b1] * rounds:
            signalled = time.monotonic()
            exit_s = await asyncio.to_thread(broker.stop, sig)
            await asyncio.to_thread(broker.start)
            await wait_for(lambda: overlay_whole(do_url), f"{broker.name} back in the overlay")
            back = time.monotonic()
            await wait_for(lambda: steady_since(back), f"frames after {broker.name} is back")
            restarts.append(Restart(broker.name, signalled, time.monotonic(), exit_s, len(sent) - 1))
    finally:
        stop.set()
        await publisher
        for agent in (src, *agents.values()):
            await agent.stop()
    return {"sent": sent, "restarts": restarts, "consumers": consumers, "src": src.counters()}


async def run(do_url: str, brokers: dict[str, BrokerProcess], sig: int, rounds: int, interval_s: float) -> dict[str, Any]:
    await wait_for(lambda: overlay_whole(do_url), "both brokers in the overlay")
    return await measure(do_url, brokers, sig, rounds, interval_s)


def report(result: dict[str, Any], sig: int, interval_s: float) -> list[str]:
    sent, restarts, consumers = result["sent"], result["restarts"], result["consumers"]
    lines = [f"source: {len(sent)} frames every {interval_s * 1000:g} ms; not sent (no broker, or no number for it yet): "
             f"lost={result['src']['lost']} unrouted={result['src']['unrouted']}"]
    header = f"{'restart (' + signal.Signals(sig).name + ')':<22} {'exit':>7}"
    for name in consumers:
        header += f" | {name + ' lost':>10} {name + ' gap':>10}"
    lines.append(header)
    have = {name: {seq for seq, _ in consumer.got} for name, consumer in consumers.items()}
    first = 0  # the frames of a restart: from the end of the one before (those in flight at the signal included)
    for restart in restarts:
        row = f"{restart.broker:<22} {restart.exit_s * 1000:>5.0f}ms"
        for name, consumer in consumers.items():
            lost = sum(1 for seq in range(first, restart.last_seq + 1) if seq not in have[name])
            times = [at for _, at in consumer.got]
            before = [at for at in times if at < restart.signalled]
            window = before[-1:] + [at for at in times if restart.signalled <= at <= restart.steady]
            gap = max((b - a for a, b in zip(window, window[1:])), default=float("inf"))
            row += f" | {lost:>10} {gap * 1000:>8.0f}ms"
        lines.append(row + f"   (not sent by src: {sent[first:restart.last_seq + 1].count(False)})")
        first = restart.last_seq + 1
    for name, consumer in consumers.items():
        seqs = [seq for seq, _ in consumer.got]
        in_order = all(a < b for a, b in zip(seqs, seqs[1:]))
        lines.append(f"{name}: lost {len(sent) - len(have[name])} of {len(sent)} in all, {len(seqs) - len(set(seqs))} duplicates, "
                     f"{'in order' if in_order else 'OUT OF ORDER'}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signal", choices=("TERM", "KILL"), default="TERM", help="how each broker is stopped (default: TERM)")
    parser.add_argument("--rounds", type=int, default=1, help="restarts of each broker, in turn (default: 1)")
    parser.add_argument("--interval-ms", type=float, default=2.0, help="the source's publishing interval, ms (default: 2)")
    args = parser.parse_args()
    sig = signal.Signals[f"SIG{args.signal}"]
    with tempfile.TemporaryDirectory() as tmp:
        do, match = spawn(["orchestrator", "--listen", "127.0.0.1:0", "--db", str(Path(tmp) / "do.db"), "--insecure"], DO_LISTENING)
        do_url = f"dcp://{match[1]}:{match[2]}"
        common = ["--ports", "64", "--orchestrator", do_url.removeprefix("dcp://"), "--insecure"]
        brokers = {"b0": BrokerProcess("b0", common)}
        brokers["b0"].start()
        brokers["b1"] = BrokerProcess("b1", [*common, "--peer", brokers["b0"].address])
        brokers["b1"].start()
        try:
            result = uvloop.run(run(do_url, brokers, sig, args.rounds, args.interval_ms / 1000))
        finally:
            for proc in [*(b.process for b in brokers.values()), do]:
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
    print(f"environment: {os.cpu_count()} CPU(s), Python {platform.python_version()}, uvloop {uvloop.__version__}, "
          f"{platform.system()} {platform.release()} {platform.machine()}")
    print("setup: orchestrator and 2 linked brokers as processes; src [b0, b1], near [b0, b1], far [b1, b0] in this process")
    print("\n".join(report(result, sig, args.interval_ms / 1000)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
