"""The ``requests`` figure of ``dcp bench``: request/reply round trips.

dcp: an orchestrator and two linked brokers, each a process (``--insecure``, loopback),
a responder process (a DataAgent offering ``echo``, which returns the request's
payload) and a requester process, both through the public API only (``agent.request``).
"one broker": requester and responder on the first broker; "two brokers": the responder
on the second, so the request and its reply each cross the link.  NATS, when it is a
target and answers: the same responder loop with nats-py (``msg.respond``) and
``nc.request``.  Per size the requester sends ``requests_warmup`` requests, then
``requests_count`` one after another, and the cell is their round trip's p50, p90, p99
and max.

    python -m dcp.bench.requests responder --broker URL --orchestrator URL
    python -m dcp.bench.requests requester --target dcp-stateless --broker URL --orchestrator URL --sizes 100 --count 500 --warmup 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from .mqtt_stack import start_daemon, stop_daemons
from .targets import DEFAULT_ADDRESSES

__all__ = ["measure", "main"]

_NATS = "nats"


def _percentiles(samples_us: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples_us)

    def pick(q: float) -> float:
        return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 1)

    return {"p50_us": pick(0.50), "p90_us": pick(0.90), "p99_us": pick(0.99), "max_us": round(ordered[-1], 1)}


def _process(role: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dcp.bench.requests", role, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def _line(process: subprocess.Popen[str], what: str) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"{what} exited with {process.wait()}: {(process.stderr.read() if process.stderr else '')[-500:]}")
    return json.loads(line)


def _cells(target: str, brokers: int, requester: list[str], responder: list[str] | None, sizes: Sequence[int], count: int, warmup: int) -> list[dict[str, Any]]:
    """Start the responder (if any), run the requester, stop the responder: one cell per size."""
    answering = _process(*responder) if responder else None
    try:
        if answering is not None:
            _line(answering, f"{target} responder")
        asking = _process("requester", *requester, "--sizes", *map(str, sizes), "--count", str(count), "--warmup", str(warmup))
        out, err = asking.communicate(timeout=120 + count * len(sizes) * 0.05)
        if asking.returncode != 0:
            raise RuntimeError(f"{target} requester exited with {asking.returncode}: {err[-500:]}")
        samples = json.loads(out)
    finally:
        if answering is not None and answering.stdin is not None:
            answering.stdin.close()  # it stops once its stdin closes
            answering.wait(20)
    return [
        {"target": target, "brokers": brokers, "size": size, "count": count, **_percentiles(samples[str(size)])}
        for size in sizes
    ]


def measure(sizes: Sequence[int], count: int, warmup: int, targets: Sequence[str], skipped: dict[str, str], workdir: Path, steps: Callable[[str], None]) -> dict[str, Any]:
    """The figure's cells: dcp on one broker and across two when ``dcp-stateless`` is a
    target, NATS when ``nats`` is one and answers."""
    cells: list[dict[str, Any]] = []
    if "dcp-stateless" in targets and "dcp-stateless" not in skipped:
        daemons: list[subprocess.Popen[str]] = []
        try:
            orchestrator = start_daemon("orchestrator", ["--db", ":memory:", "--insecure"], daemons)
            first = start_daemon("broker", ["--insecure", "--orchestrator", orchestrator], daemons)
            second = start_daemon("broker", ["--insecure", "--orchestrator", orchestrator, "--peer", first], daemons)
            for brokers, responder_at in ((1, first), (2, second)):
                steps(f"requests dcp-stateless, {brokers} broker(s)")
                at = ["--orchestrator", f"dcp://{orchestrator}"]
                cells += _cells(
                    "dcp-stateless", brokers, ["--target", "dcp-stateless", "--broker", f"dcp://{first}", *at],
                    ["responder", "--broker", f"dcp://{responder_at}", *at], sizes, count, warmup,
                )
        finally:
            stop_daemons(daemons)
    if _NATS in targets:
        if _NATS in skipped:
            cells.append({"target": _NATS, "brokers": 1, "skipped": skipped[_NATS]})
        else:
            steps("requests nats")
            address = DEFAULT_ADDRESSES[_NATS]
            cells += _cells(
                _NATS, 1, ["--target", _NATS, "--address", address], ["nats-responder", "--address", address], sizes, count, warmup,
            )
    return {"sizes": list(sizes), "count": count, "warmup": warmup, "cells": cells}


# -- the processes --------------------------------------------------------------------------------


async def _until_stdin_closes() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def _dcp_responder(broker: str, orchestrator: str) -> None:
    import dcp

    agent = dcp.DataAgent(f"echo-{os.getpid()}", broker=broker, orchestrator=orchestrator)

    @agent.capability("echo")
    async def echo(msg: dcp.Message, params: dict[str, Any]) -> bytes | bytearray:
        return msg.payload

    async with agent:
        print(json.dumps({"ready": True}), flush=True)
        await _until_stdin_closes()


async def _nats_responder(address: str) -> None:
    import nats

    nc = await nats.connect(f"nats://{address}")

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe("echo", cb=echo)
    await nc.flush()
    print(json.dumps({"ready": True}), flush=True)
    await _until_stdin_closes()
    await nc.close()


async def _requester(args: argparse.Namespace) -> None:
    ask: Callable[[bytes], Awaitable[bytes]]
    if args.target == _NATS:
        import nats

        nc = await nats.connect(f"nats://{args.address}")

        async def ask(payload: bytes) -> bytes:
            return bytes((await nc.request("echo", payload, timeout=10)).data)

        close: Callable[[], Awaitable[None]] = nc.close
    else:
        import dcp

        agent = dcp.DataAgent(f"asker-{os.getpid()}", broker=args.broker, orchestrator=args.orchestrator)
        await agent.start()

        async def ask(payload: bytes) -> bytes:
            return await agent.request("echo", payload, timeout=10)

        close = agent.stop
    samples: dict[str, list[float]] = {}
    try:
        for size in args.sizes:
            payload = os.urandom(size)
            for _ in range(args.warmup):
                await ask(payload)
            taken = samples[str(size)] = []
            for _ in range(args.count):
                started = time.perf_counter()
                reply = await ask(payload)
                taken.append((time.perf_counter() - started) * 1e6)
                if len(reply) != size:
                    raise RuntimeError(f"a reply of {len(reply)} bytes to a request of {size}")
    finally:
        await close()
    print(json.dumps(samples), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    from .._loop import run

    parser = argparse.ArgumentParser(prog="python -m dcp.bench.requests", description=__doc__.split("\n\n")[0])
    roles = parser.add_subparsers(dest="role", required=True)
    responder = roles.add_parser("responder")
    responder.add_argument("--broker", required=True)
    responder.add_argument("--orchestrator", required=True)
    nats_responder = roles.add_parser("nats-responder")
    nats_responder.add_argument("--address", required=True)
    requester = roles.add_parser("requester")
    requester.add_argument("--target", required=True, choices=("dcp-stateless", _NATS))
    requester.add_argument("--broker")
    requester.add_argument("--orchestrator")
    requester.add_argument("--address")
    requester.add_argument("--sizes", type=int, nargs="+", required=True)
    requester.add_argument("--count", type=int, required=True)
    requester.add_argument("--warmup", type=int, default=0)
    args = parser.parse_args(argv)
    if args.role == "responder":
        run(_dcp_responder(args.broker, args.orchestrator))
    elif args.role == "nats-responder":
        run(_nats_responder(args.address))
    else:
        run(_requester(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
