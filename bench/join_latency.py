"""Join latency: how soon a consumer that joins a live stream gets its first frame.

Processes: ``dcp orchestrator`` (sqlite in a temporary directory) and ``dcp cluster -n 2``
(two linked ``dcp broker`` processes registered with it via ``--orchestrator``).  The
data agents run in this process, on one uvloop: a producer on b0 publishing a numbered
frame every ``--interval-ms`` (1 ms) on ``bench.join``, a steady consumer on b0 so the
stream is live all along, and then, ``--joins`` (20) times, a new consumer agent on b1
that consumes ``bench.*`` and is stopped after its first frame.

For each join it records, with ``time.perf_counter``:

* ``from start() returned``: the agent is attached to b1 and registered with the
  orchestrator -> its first frame (the orchestrator recomputes the tree, pushes the new
  number to the producer, the producer's next frame crosses b0 -> b1);
* ``from start() called``: the same, plus attaching and registering;
* ``route at producer``: start() called -> the producer holds a number reaching the joiner.

The publishing interval bounds the wait for the next frame after the route arrives.

    .venv/bin/python bench/join_latency.py
    .venv/bin/python bench/join_latency.py --joins 50 --interval-ms 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import dcp
from dcp._loop import run

DO_LISTENING = re.compile(r"dcp orchestrator listening on (\S+):(\d+) db=")
TOPIC = "bench.join"


def _drain(stream: Any) -> None:
    for _ in stream:  # keep the pipe from filling up
        pass


def start_processes(tmp: Path) -> tuple[list[subprocess.Popen[str]], str, dict[str, str]]:
    """The orchestrator and a 2-broker cluster; (processes, orchestrator URL, broker name -> URL)."""
    do = subprocess.Popen(
        [sys.executable, "-m", "dcp", "orchestrator", "--listen", "127.0.0.1:0", "--db", str(tmp / "do.db"), "--log-level", "info",
         "--insecure"],  # loopback only: the bench's agents and admin have no tokens
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert do.stderr is not None
    address = ""
    for line in do.stderr:
        match = DO_LISTENING.search(line)
        if match:
            address = f"{match[1]}:{match[2]}"
            break
    if not address:
        raise RuntimeError("the orchestrator did not start")
    threading.Thread(target=_drain, args=(do.stderr,), daemon=True).start()
    cluster = subprocess.Popen(
        [sys.executable, "-m", "dcp", "cluster", "-n", "2", "--topology", "line", "--json", "--insecure", "--", "--orchestrator", address],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert cluster.stdout is not None and cluster.stderr is not None
    threading.Thread(target=_drain, args=(cluster.stderr,), daemon=True).start()
    line = cluster.stdout.readline()
    if not line:
        do.terminate()
        raise RuntimeError("dcp cluster did not start")
    overlay = json.loads(line)
    brokers = {name: f"dcp://{info['address']}" for name, info in overlay["brokers"].items()}
    return [cluster, do], f"dcp://{address}", brokers


async def wait_brokers(do_url: str, n: int, timeout: float = 20.0) -> None:
    """Until the orchestrator sees ``n`` brokers online with their links up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with dcp.connect(do_url, role="admin", name="bench", reconnect=False) as admin:
                brokers = (await admin.request({"op": "status"}))["status"]["brokers"]
            online = [b for b in brokers if b["online"]]
            if len(online) == n and sum(link["state"] == "up" for b in online for link in b["links"]) == 2 * (n - 1):
                return
        except (dcp.DcpError, OSError):
            pass
        await asyncio.sleep(0.02)
    raise RuntimeError("the brokers did not register with the orchestrator")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


async def measure(do_url: str, brokers: dict[str, str], joins: int, interval_s: float) -> dict[str, list[float]]:
    producer = dcp.DataAgent("bench-producer", broker=brokers["b0"], orchestrator=do_url, report_interval_s=1.0)
    steady = dcp.DataAgent("bench-steady", broker=brokers["b0"], orchestrator=do_url, report_interval_s=1.0)
    steady_count = 0

    @steady.consume(TOPIC)
    async def on_steady(msg: dcp.Message) -> None:
        nonlocal steady_count
        steady_count += 1

    await steady.start()
    await producer.start()
    await producer.declare_produces(TOPIC)
    await producer.wait_route(TOPIC, consumers=1, timeout=10)
    stop = asyncio.Event()

    async def publish() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        i = 0
        while not stop.is_set():
            await producer.publish(TOPIC, b"%012d" % i)
            i += 1
            delay = start + i * interval_s - loop.time()
            await asyncio.sleep(max(delay, 0))

    publisher = asyncio.ensure_future(publish())
    results: dict[str, list[float]] = {"returned": [], "called": [], "route": []}
    try:
        for n in range(joins):
            first = asyncio.get_running_loop().create_future()
            joiner = dcp.DataAgent(f"bench-joiner-{n}", broker=brokers["b1"], orchestrator=do_url, report_interval_s=1.0)

            @joiner.consume("bench.*")
            async def on_frame(msg: dcp.Message, first: asyncio.Future[float] = first) -> None:
                if not first.done():
                    first.set_result(time.perf_counter())

            name = joiner.name

            async def route_reaches_joiner(name: str = name) -> float:
                while name not in producer.consumers.get(TOPIC, []):
                    await producer.route_changed.wait()
                return time.perf_counter()

            routed = asyncio.ensure_future(route_reaches_joiner())
            called = time.perf_counter()
            await joiner.start()
            returned = time.perf_counter()
            got = await asyncio.wait_for(first, 10)
            route_at = await asyncio.wait_for(routed, 10)
            await joiner.stop()
            results["returned"].append(got - returned)
            results["called"].append(got - called)
            results["route"].append(route_at - called)
            # the producer's route drops the joiner again before the next one comes
            while len(producer.consumers.get(TOPIC, [])) != 1:
                await producer.route_changed.wait()
    finally:
        stop.set()
        await publisher
        await producer.stop()
        await steady.stop()
    assert steady_count > 0
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--joins", type=int, default=20, help="consumers joining, one after the other (default: 20)")
    parser.add_argument("--interval-ms", type=float, default=1.0, help="the producer's publishing interval, ms (default: 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        procs, do_url, brokers = start_processes(Path(tmp))
        try:
            run(wait_brokers(do_url, 2))
            results = run(measure(do_url, brokers, args.joins, args.interval_ms / 1000))
        finally:
            for proc in procs:  # the cluster first: its brokers say goodbye to the orchestrator
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    import uvloop

    print(f"environment: {os.cpu_count()} CPU(s), Python {platform.python_version()} ({platform.python_implementation()}), "
          f"uvloop {uvloop.__version__}, {platform.system()} {platform.release()} {platform.machine()}")
    print("setup: orchestrator and 2 linked brokers as processes (dcp orchestrator, dcp cluster -n 2); "
          "agents in this process")
    print(f"producer on b0 every {args.interval_ms:g} ms, a steady consumer on b0; {args.joins} consumers join on b1, one at a time")
    print(f"{'ms':<42} {'p50':>7} {'p90':>7} {'max':>7}")
    for key, label in (("returned", "first frame, from start() returned"), ("called", "first frame, from start() called"),
                       ("route", "route at producer, from start() called")):
        values = [v * 1000 for v in results[key]]
        print(f"{label:<42} {percentile(values, 50):>7.2f} {percentile(values, 90):>7.2f} {max(values):>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
