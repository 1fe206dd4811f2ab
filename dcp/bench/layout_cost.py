"""What X costs with a broker's key layout, beside one key per broker (today's article layout).

A broker of ``P`` ports with one key needs a modulus above ``2**P``: every stream that
crosses it carries ``P`` bits of X and every frame costs one ``X mod m`` on a
``P``-bit number, whatever the fan-out.  With a :class:`dcp.routing.KeyLayout` (banks
of 64 ports, directories, a root) X carries residues only for the nodes a stream
uses.  This script builds, per fan-out and broker count, the delivery tree of one
stream over a line of brokers of ``--ports`` ports each (links and subscribers on
random ports, the same for both layouts) and reports:

* X bytes with one key per broker, and with layouts (with the keys it uses);
* the forward decision at each broker of the tree (median over them), from the X
  bytes of a frame: ``int.from_bytes(...) % m & attached & ~ingress`` with one key;
  with a layout, ``layout.decode`` (a number seen for the first time) and the
  memoised decision (the forwarder's ``decoded`` dict, every later frame);
* the orchestrator's ``encode`` time for both.

One key above ``2**10000`` takes minutes to find (``nextprime``), so the one-key
moduli are pairwise coprime odd numbers just above ``2**P`` instead: X's size and
the cost of ``X mod m`` depend on the modulus' size only.

    .venv/bin/python bench/layout_cost.py
    .venv/bin/python bench/layout_cost.py --ports 10000 --fan-outs 1 10 100 1000 --brokers 1 10 --json /tmp/layout.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from math import gcd
from pathlib import Path
from typing import Any

from dcp.bench.routing_cost import per_call_ns
from dcp.routing import KeyLayout, encode, int_to_bytes, x_bytes
from dcp.topology import Overlay, OverlayLink, Tree, build_tree


def coprime_moduli(n: int, ports: int) -> list[int]:
    """``n`` pairwise coprime odd numbers just above ``2**ports``: one-key stand-ins."""
    found: list[int] = []
    candidate = (1 << ports) + 1
    while len(found) < n:
        if all(gcd(candidate, m) == 1 for m in found):
            found.append(candidate)
        candidate += 2
    return found


def stream(brokers: int, ports: int, fan_out: int, rng: random.Random) -> tuple[list[OverlayLink], tuple[str, int], list[tuple[str, int]]]:
    """A line of brokers with links on random ports, a source on the first and ``fan_out``
    subscribers on random free ports, dealt from the last broker back (so one subscriber
    is a stream across every broker)."""
    names = [f"b{i:02d}" for i in range(brokers)]
    free = {name: list(range(ports)) for name in names}
    for name in names:
        rng.shuffle(free[name])
    links = [OverlayLink(names[i], free[names[i]].pop(), names[i + 1], free[names[i + 1]].pop()) for i in range(brokers - 1)]
    source = (names[0], free[names[0]].pop())
    spread = [names[(brokers - 1 - i) % brokers] for i in range(fan_out)]  # the farthest broker first: one subscriber crosses the line
    subscribers = [(name, free[name].pop()) for name in spread]
    return links, source, subscribers


def decisions(overlay: Overlay, tree: Tree, layouts: bool, repeat: int) -> list[list[float]]:
    """Per broker of the tree: ns of the decision(s) on the frame's X bytes (one key: one
    figure; layouts: decode, memoised)."""
    xb = int_to_bytes(tree.x)
    frame = b"\x00" * 16 + xb + b"topic" + b"payload"
    a, b = 16, 16 + len(xb)
    rows = []
    for broker, bitmap in tree.bitmaps.items():
        layout = overlay.layouts[broker]
        env: dict[str, Any] = dict(
            frame=frame, a=a, b=b, layout=layout, key=layout.root, attached=(1 << layout.ports) - 1, ni=~(1 << 0),
            decoded={int.from_bytes(frame[a:b], "big"): bitmap},
        )
        if layouts:
            stmts = ['layout.decode(int.from_bytes(frame[a:b], "big")) & attached & ni', 'decoded.get(int.from_bytes(frame[a:b], "big"), -1) & attached & ni']
        else:
            stmts = ['int.from_bytes(frame[a:b], "big") % key & attached & ni']
        for stmt in stmts:
            assert eval(stmt, env) == bitmap & ~1, (broker, stmt)  # the decision is the tree's
        rows.append(per_call_ns(stmts, env, repeat, target_s=0.005))
    return rows


def measure(brokers: int, ports: int, fan_out: int, repeat: int, seed: int) -> dict[str, Any]:
    links, source, subscribers = stream(brokers, ports, fan_out, random.Random(seed))
    names = [f"b{i:02d}" for i in range(brokers)]
    one_key = Overlay(dict(zip(names, coprime_moduli(brokers, ports))), links)
    layout_rng = random.Random(seed)
    many = Overlay({name: KeyLayout.random(ports, rng=layout_rng) for name in names}, links)
    row: dict[str, Any] = {"brokers": brokers, "ports": ports, "fan_out": fan_out}
    for label, overlay, layouts in (("one_key", one_key, False), ("layout", many, True)):
        start = time.perf_counter()
        tree = build_tree(overlay, source, subscribers)
        row[f"{label}_build_ms"] = (time.perf_counter() - start) * 1e3
        residues = {k: r for broker, bitmap in tree.bitmaps.items() for k, r in overlay.layouts[broker].residues(bitmap).items()}
        row[f"{label}_x_bytes"] = x_bytes(tree.x)
        row[f"{label}_keys"] = len(residues)
        row[f"{label}_encode_us"] = per_call_ns(["encode(residues)"], {"encode": encode, "residues": residues}, repeat, 0.005)[0] / 1e3
        per_broker = decisions(overlay, tree, layouts, repeat)
        if layouts:
            row["layout_decode_ns"] = statistics.median(r[0] for r in per_broker)
            row["layout_memo_ns"] = statistics.median(r[1] for r in per_broker)
        else:
            row["one_key_ns"] = statistics.median(r[0] for r in per_broker)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=10_000, help="ports of every broker (default: the broker default)")
    parser.add_argument("--fan-outs", type=int, nargs="+", default=[1, 10, 100, 1000], help="subscribers of the stream")
    parser.add_argument("--brokers", type=int, nargs="+", default=[1, 10], help="brokers in the line")
    parser.add_argument("--repeat", type=int, default=7, help="timeit repeats per measurement (median reported)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the port choices and keys")
    parser.add_argument("--json", type=Path, help="also write the rows and the environment as JSON here")
    args = parser.parse_args(argv)
    if args.ports < 2 or min(args.fan_outs) < 1 or min(args.brokers) < 1 or args.repeat < 1:
        parser.error("--ports must be at least 2; fan-outs, brokers and --repeat at least 1")
    env = {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(), "platform": platform.platform(),
    }
    print(f"Python {env['python']}, {env['machine']}, {env['cpus']} CPUs; {args.ports} ports per broker; median of {args.repeat} repeats")
    print()
    print("| brokers | fan-out | X bytes, one key | X bytes, layout | keys used | decision ns, one key | decode ns, layout | memoised ns, layout | encode µs, one key | encode µs, layout |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for brokers in args.brokers:
        for fan_out in args.fan_outs:
            row = measure(brokers, args.ports, fan_out, args.repeat, args.seed)
            rows.append(row)
            print(
                f"| {brokers} | {fan_out:,} | {row['one_key_x_bytes']:,} | {row['layout_x_bytes']:,} | {row['layout_keys']} "
                f"| {row['one_key_ns']:,.0f} | {row['layout_decode_ns']:,.0f} | {row['layout_memo_ns']:,.0f} "
                f"| {row['one_key_encode_us']:,.1f} | {row['layout_encode_us']:,.1f} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "arguments": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
