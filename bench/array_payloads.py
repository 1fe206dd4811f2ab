"""numpy payloads sent as they are against the same bytes copied first, in MB/s.

One ``dcp broker`` (a process, ``--slow-consumer pause``: lossless), and in this
process a publisher and a subscriber on the public SDK.  For each array size and way
of sending, the publisher publishes float32 arrays of that size as fast as the SDK's
flow control lets it, and the subscriber reads each one back as an array
(``dcp.arrays.unpack``: a view of the payload).  The ways of sending:

* ``array``: ``publish(topic, arrays.pack(a))``: a small header, then the array's own
  memory, which the socket reads (no copy in Python);
* ``bytes``: ``publish(topic, b"".join(arrays.pack(a)))``: the same payload made into
  one ``bytes`` first, one copy per frame, as a codec that returns bytes costs.

It prints, per cell, over ``--repeat`` runs (the two ways in turn): MB/s from the first
publish to the last frame received (median, min-max), and this process's CPU seconds
per GB sent (publisher and subscriber; the broker is the other process).  Where the
broker bounds the rate, the copy shows in the CPU column more than in MB/s.  Needs
numpy (the ``examples`` extra).

    .venv/bin/python bench/array_payloads.py          # 64 KiB, 1 MiB, 4 MiB; 512 MiB a run, 5 runs (about 11 s)
    .venv/bin/python bench/array_payloads.py --sizes 1048576 --mib 128 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import time

import numpy as np
import uvloop

import dcp
from dcp import arrays

LISTENING = re.compile(r"listening on (\S+):(\d+)")
WAYS = {
    "array": lambda a: arrays.pack(a),
    "bytes": lambda a: b"".join(arrays.pack(a)),
}


def start_broker() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcp", "broker", "--listen", "127.0.0.1:0", "--slow-consumer", "pause", "--insecure"],
        stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        match = LISTENING.search(line)
        if match:
            return proc, f"dcp://{match[1]}:{match[2]}"
    raise RuntimeError("the broker did not start")


async def one_run(url: str, size: int, way: str, count: int) -> tuple[float, float]:
    """(MB/s, CPU s per GB) of ``count`` frames of ``size`` bytes sent ``way``."""
    array = np.random.default_rng(size).standard_normal(size // 4).astype(np.float32)
    done = asyncio.get_running_loop().create_future()
    received = [0]

    def take(msg: dcp.Message) -> None:
        got = arrays.unpack(msg.payload).array
        assert got.nbytes == size
        received[0] += 1
        if received[0] == count:
            done.set_result(time.perf_counter())

    async with dcp.connect(url, name="sub", on_message=take) as sub, dcp.connect(url, name="pub") as pub:
        route = sub.route_to(sub.port)
        make = WAYS[way]
        cpu, began = time.process_time(), time.perf_counter()
        for _ in range(count):
            await pub.publish("arrays", make(array), route)
        ended = await asyncio.wait_for(done, 120)
        cpu = time.process_time() - cpu
    sent = size * count
    return sent / (ended - began) / 1e6, cpu / (sent / 1e9)


async def main_async(args: argparse.Namespace) -> None:
    proc, url = start_broker()
    try:
        print(f"numpy {np.__version__}, dcp broker {url} (--slow-consumer pause); {args.mib} MiB a run, median of {args.repeat}")
        print()
        print("| array | way | MB/s, median (min-max) | CPU s/GB (pub + sub), median |")
        print("|---:|---|---:|---:|")
        for size in args.sizes:
            count = max(1, args.mib * 1024 * 1024 // size)
            runs: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
            for way in WAYS:
                await one_run(url, size, way, max(1, count // 8))  # warm-up
            for _ in range(args.repeat):
                for way in WAYS:  # in turn: a drift of the machine weighs on both alike
                    runs[way].append(await one_run(url, size, way, count))
            for way, cell in runs.items():
                rates = [rate for rate, _ in cell]
                print(f"| {size // 1024} KiB | {way} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) "
                      f"| {statistics.median(cpu for _, cpu in cell):.2f} |", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64 * 1024, 1024 * 1024, 4 * 1024 * 1024],
                        help="array sizes, bytes (multiples of 4; default: 64 KiB, 1 MiB, 4 MiB)")
    parser.add_argument("--mib", type=int, default=512, help="MiB sent per run (default: 512)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per cell, the two ways in turn (default: 5)")
    args = parser.parse_args(argv)
    if any(size <= 0 or size % 4 for size in args.sizes) or args.mib < 1 or args.repeat < 1:
        parser.error("--sizes: positive multiples of 4; --mib, --repeat >= 1")
    uvloop.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
