"""What a topology number costs per tree size: header bytes and the forward decision.

The routing contract (docs/design.md, costs) bounds ``bits(X) <= sum(bits(m_b))``
over the tree, so the header and the ``X mod m`` a broker computes per frame grow
with the tree, while a stateful broker's table lookup does not.  This script
measures both sides for trees of N brokers, in the worst case for X: a line overlay
of N brokers (keys from ``allocate_keys(N, 64)``, 64 ports each) with a subscriber on
one local port of every broker, so every broker is in the tree (built with
:func:`dcp.topology.build_tree`).

Per size it reports the bytes and bits of X, the orchestrator's encode time, and the
time of one forward decision:

* stateless: ``(int.from_bytes(frame[a:b], "big") % key) & attached & ~ingress``,
  what a broker does with the X bytes of a frame it received;
* stateful: ``table.get(frame[c:d], 0) & attached & ~ingress``, a topic looked up in a
  dict of 1000 topics, the topic sliced out of the frame as a fresh ``bytes`` (so its
  hash is computed every time, as for a frame off the wire).

Times are the median over ``--repeat`` timeit repeats (about 20 ms each, the two
decisions interleaved so that load changes hit both alike), in ns per decision, on one
core, the interpreter's ``timeit`` loop overhead included on both sides alike.

    .venv/bin/python bench/routing_cost.py
    .venv/bin/python bench/routing_cost.py --sizes 1 10 100 --json /tmp/routing_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import timeit
from pathlib import Path
from typing import Any

from dcp.routing import allocate_keys, int_to_bytes, x_bits, x_bytes
from dcp.topology import Overlay, OverlayLink, Tree, build_tree

TOPICS = 1000
TOPIC = "sensors/camera/{:04d}/frames"


def line_tree(n: int, keys: list[int]) -> tuple[Overlay, Tree]:
    """A line of n brokers: port 1 of broker i is linked to port 0 of broker i+1.

    The source enters broker 0 on port 2; every broker has a subscriber on port 3.
    """
    names = [f"b{i:03d}" for i in range(n)]
    links = [OverlayLink(names[i], 1, names[i + 1], 0) for i in range(n - 1)]
    overlay = Overlay(dict(zip(names, keys)), links)
    return overlay, build_tree(overlay, (names[0], 2), [(name, 3) for name in names])


def per_call_ns(stmts: list[str], env: dict[str, Any], repeat: int, target_s: float = 0.02) -> list[float]:
    """Median ns per execution of each statement; the repeats interleave the statements,
    so a change of load on the machine hits them alike."""
    timers = [timeit.Timer(stmt, globals=env) for stmt in stmts]
    numbers = []
    for timer in timers:
        number = 1
        while (elapsed := timer.timeit(number)) < 0.002:  # also the warm-up
            number *= 10
        numbers.append(max(1, round(number * target_s / elapsed)))
    samples: list[list[float]] = [[] for _ in stmts]
    for _ in range(repeat):
        for timer, number, out in zip(timers, numbers, samples):
            out.append(timer.timeit(number) / number * 1e9)
    return [statistics.median(out) for out in samples]


def measure(n: int, repeat: int) -> dict[str, float | int]:
    keys = allocate_keys(n, 64)
    start = time.perf_counter()
    overlay, tree = line_tree(n, keys)
    build_ms = (time.perf_counter() - start) * 1e3
    assert tree.brokers == set(overlay.keys)

    # The last broker of the line: its bitmap is the local subscriber only (fan-out 1);
    # the cost of X mod m hardly depends on which key, they are all 65 bits.
    last = max(overlay.keys)
    key = overlay.keys[last]
    xb = int_to_bytes(tree.x)
    topic = TOPIC.format(42).encode()
    header = b"\x00" * 16
    frame = header + xb + topic + b"payload" * 8
    a, b = len(header), len(header) + len(xb)
    c, d = b, b + len(topic)
    table = {TOPIC.format(i).encode(): 1 << 3 for i in range(TOPICS)}
    attached = (1 << 64) - 1
    not_ingress = ~(1 << 0)
    env = dict(frame=frame, a=a, b=b, c=c, d=d, key=key, table=table, attached=attached, ni=not_ingress)
    stateless_stmt = 'int.from_bytes(frame[a:b], "big") % key & attached & ni'
    stateful_stmt = "table.get(frame[c:d], 0) & attached & ni"
    assert eval(stateless_stmt, env) == eval(stateful_stmt, env) == 1 << 3  # same decision

    stateless_ns, stateful_ns = per_call_ns([stateless_stmt, stateful_stmt], env, repeat)

    residues = {overlay.keys[broker]: bitmap for broker, bitmap in tree.bitmaps.items()}
    encode_env = {"residues": residues}
    exec("from dcp.routing import encode", encode_env)
    return {
        "brokers": n,
        "x_bytes": x_bytes(tree.x),
        "x_bits": x_bits(tree.x),
        "bound_bits": sum(k.bit_length() for k in keys),
        "depth": tree.depth,
        "build_ms": build_ms,
        "encode_us": per_call_ns(["encode(residues)"], encode_env, repeat)[0] / 1e3,
        "stateless_ns": stateless_ns,
        "stateful_ns": stateful_ns,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 5, 10, 30, 100], help="tree sizes (brokers)")
    parser.add_argument("--repeat", type=int, default=11, help="timeit repeats per measurement (median reported)")
    parser.add_argument("--json", type=Path, help="also write the rows and the environment as JSON here")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.sizes) or args.repeat < 1:
        parser.error("sizes and --repeat must be at least 1")

    env = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    print(
        f"Python {env['python']} ({env['implementation']}), {env['machine']}, {env['cpus']} CPUs, {env['platform']}; "
        f"median of {args.repeat} repeats; stateful table of {TOPICS} topics"
    )
    print()
    print("| brokers | X bytes | X bits | bound bits | depth | encode µs | stateless ns | stateful ns | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for n in args.sizes:
        row = measure(n, args.repeat)
        rows.append(row)
        print(
            f"| {row['brokers']} | {row['x_bytes']} | {row['x_bits']} | {row['bound_bits']} | {row['depth']} "
            f"| {row['encode_us']:.1f} | {row['stateless_ns']:.0f} | {row['stateful_ns']:.0f} "
            f"| {row['stateless_ns'] / row['stateful_ns']:.2f} |",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
