"""Lossless throughput of the SDK's public paths, for before/after claims across checkouts.

One ``dcp broker`` process (``--slow-consumer pause``), one publisher process awaiting
``conn.publish(topic, payload, route)`` for every message for ``--seconds``, and one
subscriber process taking the frames through ``conn.messages()`` (``--receive
iterator``) or ``dcp.connect(..., on_message=...)`` (``--receive callback``), all three
importing ``dcp`` from ``CHECKOUT``; prints one line: MB/s over the subscriber's span
from its first frame to its last, and delivered / sent.  Run it alternately for each
checkout, on the same machine the same day::

    .venv/bin/python bench/public_paths.py /tmp/before --size 1024 --receive iterator
    .venv/bin/python bench/public_paths.py . --size 1024 --receive callback

Only what every version has is used (``connect``, ``publish``, ``messages``,
``route_to``), except ``on_message``, which exists from 2026-12-02 on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SUBSCRIBER = r"""
import asyncio, json, sys, time
import dcp, uvloop

async def main():
    address, receive = sys.argv[1], sys.argv[2]
    got = {"n": 0, "bytes": 0, "first": None, "last": None}

    def take(msg):
        now = time.time_ns()
        got["n"] += 1
        got["bytes"] += len(msg.payload)
        got["first"] = got["first"] or now
        got["last"] = now

    options = {"on_message": take} if receive == "callback" else {}
    conn = await dcp.connect("dcp://" + address, reconnect=False, **options)
    print(conn.route_to(conn.port), flush=True)
    if receive == "iterator":
        async def drain():
            async for msg in conn.messages():
                take(msg)
        task = asyncio.ensure_future(drain())
    seen = -1
    while not got["n"] or got["n"] != seen:  # until a second passes without a frame, after the first
        seen = got["n"]
        await asyncio.sleep(1.0)
    print(json.dumps({"n": got["n"], "bytes": got["bytes"], "span_s": (got["last"] - got["first"]) / 1e9}), flush=True)
    await conn.close()

uvloop.run(main())
"""

PUBLISHER = r"""
import sys, time
import dcp, uvloop

async def main():
    address, route, size, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    conn = await dcp.connect("dcp://" + address, reconnect=False, request_timeout_s=60.0)
    payload, sent, end = bytes(size), 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(100):
            await conn.publish("bench", payload, route)
        sent += 100
    await conn.ping()  # answered once the broker has read everything before it
    await conn.close()
    print(sent, flush=True)

uvloop.run(main())
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", help="the folder whose dcp package the three processes import")
    parser.add_argument("--size", type=int, default=1024, help="payload bytes (default 1024)")
    parser.add_argument("--receive", choices=("iterator", "callback"), default="iterator")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long the publisher sends (default 3)")
    args = parser.parse_args()
    checkout = os.path.abspath(args.checkout)
    env = {**os.environ, "PYTHONPATH": checkout}
    python = sys.executable
    broker = subprocess.Popen(
        [python, "-m", "dcp", "broker", "--listen", "127.0.0.1:0", "--insecure", "--log-level", "info", "--slow-consumer", "pause"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=checkout,
    )
    try:
        assert broker.stderr is not None
        address = next(line.split("listening on ")[1].split()[0] for line in broker.stderr if "listening on" in line)
        sub = subprocess.Popen([python, "-c", SUBSCRIBER, address, args.receive], stdout=subprocess.PIPE, text=True, env=env, cwd=checkout)
        assert sub.stdout is not None
        route = sub.stdout.readline().strip()
        pub = subprocess.run(
            [python, "-c", PUBLISHER, address, route, str(args.size), str(args.seconds)],
            capture_output=True, text=True, env=env, cwd=checkout, check=True,
        )
        got = json.loads(sub.stdout.readline())
        sub.wait(30)
    finally:
        broker.terminate()
        broker.wait(30)
    sent = int(pub.stdout.strip())
    mb_s = got["bytes"] / 2**20 / got["span_s"]
    print(f"{os.path.basename(checkout)} {args.size} B {args.receive}: {mb_s:.1f} MB/s, delivered {got['n']}/{sent}")
    return 0 if got["n"] == sent else 1


if __name__ == "__main__":
    sys.exit(main())
