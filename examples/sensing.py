"""Cooperative sensing on dcp, in one process: ``python examples/sensing.py``.

What runs (all on loopback, on ports the OS picks):

* a data orchestrator (its sqlite file in a temporary directory);
* two linked brokers, ``edge-a`` and ``edge-b`` (``edge-b`` dials ``edge-a``);
* three sensor agents ``sensor-1..3``, spread over both brokers, each publishing
  ``--count`` synthetic temperature readings (a seeded sine plus noise, JSON) on
  ``sensors.<id>.temp``, one every ``--interval`` seconds;
* ``fusion``, offering capability ``fuse``: for every round of readings (all sensors'
  reading number *n*) it publishes on ``fused.temp`` the mean of the last ``window``
  rounds; rounds rather than a time window, so the output does not depend on timing;
* ``dsf``, a :class:`dcp.storage.StorageAgent` offering ``store``: it keeps
  ``sensors.>`` and ``fused.temp`` in sqlite;
* ``printer``, offering ``display`` (prints every fused value) and consuming
  ``replay.temp``.

The pipeline (``sensing.toml`` beside this file) is deployed through an admin
connection to the orchestrator, as ``dcp deploy`` does.  Once every reading is in,
the DSF replays the middle half of the fused values into ``replay.temp``, and the
printer shows them again, byte for byte.  A summary of counters ends the run; the
exit status is 0 only if nothing was lost: stored == published, replayed == asked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

import dcp
from dcp.auth import issue_token, load_secret
from dcp.broker import Broker
from dcp.config import BrokerConfig, OrchestratorConfig
from dcp.orchestrator import Orchestrator
from dcp.spec import load_spec
from dcp.storage import StorageAgent

SPEC = Path(__file__).with_name("sensing.toml")
SENSORS = (1, 2, 3)


def encode(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def reading(sensor: int, seq: int, seed: int) -> float:
    """The ``seq``-th reading of ``sensor``: the same for the same seed, on any run."""
    noise = random.Random(f"{seed}/{sensor}/{seq}").gauss(0.0, 0.1)
    return round(20.0 + 0.5 * sensor + 1.5 * math.sin(2 * math.pi * seq / 16 + sensor) + noise, 3)


class Fusion:
    """Mean of the last ``window`` complete rounds; a round is complete once all sensors reported it."""

    def __init__(self, sensors: int, window: int) -> None:
        self.sensors = sensors
        self.window = window
        self.rounds: dict[int, list[float]] = {}
        self.next = 0  # the first round not fused yet

    def add(self, value: dict[str, Any]) -> list[bytes]:
        self.rounds.setdefault(int(value["seq"]), []).append(float(value["celsius"]))
        fused = []
        while len(self.rounds.get(self.next, ())) == self.sensors:
            readings = [c for seq in range(self.next - self.window + 1, self.next + 1) for c in self.rounds.get(seq, ())]
            fused.append(encode({"seq": self.next, "celsius": round(sum(readings) / len(readings), 3), "readings": len(readings)}))
            self.rounds.pop(self.next - self.window + 1, None)
            self.next += 1
        return fused


def add_sensor(agent: dcp.DataAgent, i: int, count: int, interval: float, seed: int, done: asyncio.Event) -> None:
    """Make ``agent`` sensor ``i``: ``count`` readings on ``sensors.<i>.temp``, then ``done``."""
    topic = f"sensors.{i}.temp"

    @agent.source(topic)
    async def readings() -> Any:
        await agent.wait_route(topic, consumers=2)  # the fusion stage and the storage
        for seq in range(count):
            yield encode({"sensor": i, "seq": seq, "celsius": reading(i, seq, seed)})
            await asyncio.sleep(interval)
        done.set()


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll counters that other tasks move; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def show(prefix: str, payload: bytes) -> None:
    value = json.loads(payload)
    print(f"{prefix:<7} #{value['seq']:<3} {value['celsius']:7.3f} C  (mean of {value['readings']} readings)")


async def run(count: int, interval: float, seed: int) -> int:
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dcp-sensing-") as tmp:
        secret_file = Path(tmp) / "secret"  # shared by the orchestrator and the brokers; tokens for the agents and the admin
        secret_file.write_text(secrets.token_hex(32))
        secret_file.chmod(0o600)
        secret = load_secret(secret_file)

        def token(name: str, role: str = "agent") -> str:
            return issue_token(secret, name, role, int(time.time()) + 3600)

        do = Orchestrator(OrchestratorConfig(listen="127.0.0.1:0", db=str(Path(tmp) / "orchestrator.db"), secret_file=str(secret_file)))
        await do.start()
        do_addr = "%s:%d" % do.address
        do_url = f"dcp://{do_addr}"
        brokers: list[Broker] = []
        for name in ("edge-a", "edge-b"):  # keys of their own, drawn at random
            peers = tuple("%s:%d" % b.address for b in brokers)
            broker = Broker(BrokerConfig(listen="127.0.0.1:0", name=name, orchestrator=do_addr, peers=peers,
                                         slow_consumer="pause", secret_file=str(secret_file)))
            await broker.start()
            brokers.append(broker)
        for broker in brokers:
            for link in broker.links.values():
                await link.wait_up(5)
        urls = ["dcp://%s:%d" % b.address for b in brokers]
        print(f"orchestrator {do_addr}; brokers " + ", ".join(f"{b.name} (key {b.key})" for b in brokers) + ", linked")

        agents: list[dcp.DataAgent] = []

        def agent(name: str, on: int, cls: Any = dcp.DataAgent, **options: Any) -> Any:
            a = cls(name, broker=urls[on], orchestrator=do_url, report_interval_s=0.1, token=token(name), **options)
            agents.append(a)
            return a

        finished = [asyncio.Event() for _ in SENSORS]
        for i, done in zip(SENSORS, finished):
            add_sensor(agent(f"sensor-{i}", (i + 1) % 2), i, count, interval, seed, done)

        fusion = agent("fusion", 1)
        fusers: dict[int, Fusion] = {}  # one state per assigned element (keyed by its params)

        @fusion.capability("fuse")
        async def fuse(msg: dcp.Message, params: dict[str, Any]) -> list[bytes]:
            state = fusers.setdefault(id(params), Fusion(int(params.get("sensors", 3)), int(params.get("window", 4))))
            return state.add(json.loads(msg.payload))

        dsf = agent("dsf", 0, StorageAgent, path=Path(tmp) / "dsf.db")
        printer = agent("printer", 1)
        displayed: list[bytes] = []
        replayed: list[bytes] = []

        @printer.capability("display")
        async def display(msg: dcp.Message, params: dict[str, Any]) -> None:
            displayed.append(bytes(msg.payload))
            show("fused", msg.payload)

        @printer.consume("replay.temp")
        async def show_replay(msg: dcp.Message) -> None:
            replayed.append(bytes(msg.payload))
            show("replay", msg.payload)

        for a in agents:
            await a.start()
        spec = load_spec(SPEC)
        async with dcp.connect(do_url, role="admin", name="sensing-example", reconnect=False, token=token("sensing-example", "admin")) as admin:
            reply = await admin.request({"op": "deploy", "spec": spec.to_dict()})
        placed = ", ".join(f"{element} -> {', '.join(names)}" for element, names in sorted(reply["assignments"].items()))
        print(f"deployed {reply['pipeline']!r} from {SPEC.name}: {placed}")
        print(f"{len(SENSORS)} sensors x {count} readings every {interval * 1000:g} ms")

        ok = True
        try:
            for done in finished:
                await asyncio.wait_for(done.wait(), 10 + count * interval)
            sent = sum(a.counters()["published"] for a in agents if a.name.startswith("sensor-"))
            await until(lambda: sent == len(SENSORS) * count and displayed and len(displayed) == fusion.published
                        and dsf.stored == sent + fusion.published and len(displayed) == count,
                        "every reading fused, displayed and stored")
        except TimeoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            ok = False

        fused_rows = dsf.query(topic_pattern="fused.temp")
        want = len(fused_rows) // 2
        first = len(fused_rows) // 4
        rows = fused_rows[first:first + want]
        got = 0
        if rows:
            start_ns = rows[0][2]
            end_ns = fused_rows[first + want][2] if first + want < len(fused_rows) else None
            t0 = min(row[2] for row in dsf.query(topic_pattern="sensors.>"))
            print(f"replaying fused.temp published {(start_ns - t0) / 1e6:.1f} ms .. "
                  f"{((end_ns or rows[-1][2] + 1) - t0) / 1e6:.1f} ms into the run: {want} values, into replay.temp")
            got = await dsf.replay(start_ns, end_ns, "replay.temp", topic_pattern="fused.temp", rate_hz=1 / interval)
            try:
                await until(lambda: len(replayed) >= got, "the replayed values at the printer")
            except TimeoutError as exc:
                print(f"error: {exc}", file=sys.stderr)
                ok = False

        for a in agents:
            await a.stop()
        logging.getLogger("dcp.link").setLevel(logging.ERROR)  # links going down is what closing brokers does
        for broker in reversed(brokers):
            await broker.close()
        await do.close()

        print("summary")
        print(f"  {'agent':<9} {'element':<24} {'in':>5} {'out':>5} {'latency mean/max ms':>20}")
        for a in agents:
            for key, c in a.counters()["elements"].items():
                print(f"  {a.name:<9} {key:<24} {c['in']:>5} {c['out']:>5} {c['latency_ms']:>11.3f} / {c['latency_max_ms']:.3f}")
        readings_published = sum(a.counters()["published"] for a in agents if a.name.startswith("sensor-"))
        published = readings_published + fusion.published
        counters = [a.counters() for a in agents]
        agent_drops = {k: sum(c[k] for c in counters) for k in ("unrouted", "lost", "dropped")}
        broker_drops = {k: v for b in brokers for k, v in b.drops.items() if v}
        stored_readings, stored_fused = dsf.count("sensors.>"), dsf.count("fused.temp")
        stored = dsf.count()
        identical = replayed == [row[3] for row in rows]
        print(f"  fused values: {len(displayed)} displayed of {fusion.published} published")
        print("  drops: agents " + ", ".join(f"{k}={v}" for k, v in agent_drops.items())
              + f"; brokers {', '.join(f'{k}={v}' for k, v in broker_drops.items()) or 'none'}")
        print(f"  stored: {stored} frames ({stored_readings} readings + {stored_fused} fused) of {published} published")
        print(f"  replayed: {got} of {want} requested, {len(replayed)} received on replay.temp, "
              f"byte-identical: {'yes' if identical else 'no'}")
        print(f"  ran in {time.monotonic() - began:.2f} s")
        ok = (ok and stored == published and stored_readings == readings_published and got == want == len(replayed)
              and identical and not any(agent_drops.values()) and not broker_drops)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20, help="readings per sensor (default 20)")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between readings (default 0.02)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the synthetic readings (default 1)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    if args.count < 1 or args.interval <= 0:
        parser.error("--count must be >= 1 and --interval > 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(name)s %(levelname)s %(message)s")
    return uvloop.run(run(args.count, args.interval, args.seed))


if __name__ == "__main__":
    sys.exit(main())
