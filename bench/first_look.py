"""First look at one broker: latency and throughput, stateless vs stateful.

Three processes per measurement: a ``dcp broker``, a subscriber and a publisher,
all using the public SDK.  Latency: frames at a fixed interval, each stamped by the
publisher (``timestamp_ns``, same host clock), received minus sent at the subscriber.
Throughput: the publisher sends as fast as the SDK's flow control lets it; the
subscriber counts bytes between its first and last frame.  The broker runs with
``--slow-consumer pause`` for throughput, so the figure is lossless delivery.

    python bench/first_look.py                      # the default table
    python bench/first_look.py --sizes 1024 131072 --count 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time

import dcp
from dcp._loop import run
from dcp.routing import encode

LISTENING = re.compile(r"listening on (\S+):(\d+) mode=(\w+) key=(\d+)")


def broker_process(mode: str, slow_consumer: str) -> tuple[subprocess.Popen[str], str, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcp", "broker", "--listen", "127.0.0.1:0", "--mode", mode, "--slow-consumer", slow_consumer, "--insecure"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        match = LISTENING.search(line)
        if match:
            # stop reading: the broker logs only attach/detach lines after this
            return proc, f"dcp://{match.group(1)}:{match.group(2)}", int(match.group(4))
    raise RuntimeError("broker did not start")


async def subscriber(url: str, count: int, mode: str, ready_file: str) -> dict[str, float]:
    async with dcp.connect(url, name="sub", max_pending=100_000) as conn:
        if mode == "stateful":
            await conn.subscribe("bench")
        with open(ready_file, "w") as fh:
            fh.write(str(conn.port))
        latencies = []
        received = nbytes = 0
        first = last = 0.0
        async for msg in conn.messages():
            now = time.time_ns()
            if received == 0:
                first = time.perf_counter()
            received += 1
            nbytes += len(msg.payload)
            latencies.append(now - msg.timestamp_ns)
            if msg.topic == "bench.end" or received >= count:
                last = time.perf_counter()
                break
        return {"received": received, "bytes": nbytes, "seconds": last - first, "latencies_ns": latencies}


async def publisher(url: str, route: int, size: int, count: int, interval_s: float) -> None:
    payload = os.urandom(size)
    async with dcp.connect(url, name="pub") as conn:
        publish = conn.publish
        if interval_s > 0:
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(count):
                await publish("bench", payload, route=route)
                delay = start + (i + 1) * interval_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
        else:
            for _ in range(count):
                await publish("bench", payload, route=route)
        await conn.ping()  # everything written has left this process


def child(argv: list[str]) -> None:
    role, url = argv[0], argv[1]
    if role == "sub":
        count, mode, ready = int(argv[2]), argv[3], argv[4]
        result = run(subscriber(url, count, mode, ready))
        json.dump(result, sys.stdout)
    else:
        route, size, count, interval = int(argv[2]), int(argv[3]), int(argv[4]), float(argv[5])
        run(publisher(url, route, size, count, interval))


def measure(mode: str, size: int, count: int, interval_s: float) -> dict[str, float]:
    broker, url, key = broker_process(mode, "pause" if interval_s == 0 else "drop")
    ready = f"/tmp/dcp-bench-ready-{os.getpid()}"
    if os.path.exists(ready):
        os.unlink(ready)
    try:
        sub = subprocess.Popen([sys.executable, __file__, "--child", "sub", url, str(count), mode, ready], stdout=subprocess.PIPE, text=True)
        while not os.path.exists(ready) or not open(ready).read():
            if sub.poll() is not None:
                raise RuntimeError("subscriber died")
            time.sleep(0.01)  # process start-up rendezvous, not part of the measurement
        port = int(open(ready).read())
        route = encode({key: 1 << port}) if mode == "stateless" else 0
        pub = subprocess.Popen([sys.executable, __file__, "--child", "pub", url, str(route), str(size), str(count), str(interval_s)])
        out, _ = sub.communicate(timeout=600)
        pub.wait(timeout=60)
        result = json.loads(out)
    finally:
        broker.terminate()
        broker.wait()
    lat = sorted(result.pop("latencies_ns"))
    result["p50_us"] = lat[len(lat) // 2] / 1000 if lat else float("nan")
    result["p99_us"] = lat[int(len(lat) * 0.99)] / 1000 if lat else float("nan")
    result["mb_s"] = result["bytes"] / result["seconds"] / 1e6 if result["seconds"] else float("nan")
    result["msgs_s"] = result["received"] / result["seconds"] if result["seconds"] else float("nan")
    result["delivered"] = result["received"] / count
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1024, 100 * 1024])
    parser.add_argument("--modes", nargs="+", default=["stateless", "stateful"])
    parser.add_argument("--count", type=int, default=50_000, help="frames per throughput run (fewer for large frames)")
    parser.add_argument("--latency-count", type=int, default=1000)
    parser.add_argument("--interval-ms", type=float, default=1.0)
    args = parser.parse_args()
    print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f} python={sys.version.split()[0]} dcp={dcp.__version__}")
    print(f"{'mode':<10} {'size':>7} {'p50 us':>8} {'p99 us':>8} {'MB/s':>8} {'msg/s':>9} {'delivered':>9}")
    for size in args.sizes:
        for mode in args.modes:
            lat = measure(mode, size, args.latency_count, args.interval_ms / 1000)
            count = max(2000, min(args.count, int(args.count * 1024 / max(size, 1024)) * 8))
            thr = measure(mode, size, count, 0)
            print(
                f"{mode:<10} {size:>7} {lat['p50_us']:>8.0f} {lat['p99_us']:>8.0f} {thr['mb_s']:>8.1f} "
                f"{thr['msgs_s']:>9.0f} {thr['delivered']:>9.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
