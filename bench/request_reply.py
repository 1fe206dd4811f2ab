"""Request/reply round trips: dcp (``agent.request``) on one broker and across two, beside
NATS request/reply when a NATS server answers on 127.0.0.1:4222 (``bench/peers start``).

Processes: ``dcp orchestrator`` and two linked ``dcp broker`` processes; the responder
is a process of its own (a DataAgent offering ``echo``, which returns the request's
payload), and the requester runs here; both use only the public API.  For each payload
size the requester sends ``--count`` requests one after another (after a warm-up of a
tenth as many) and reports the round trip's p50, p99 and max.  "one broker": requester
and responder on b0; "two brokers": the responder on b1, so the request and its reply
each cross the link.  NATS: the same responder loop with nats-py (``nc.request``).

    .venv/bin/python bench/request_reply.py
    .venv/bin/python bench/request_reply.py --count 5000 --sizes 100 102400
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import uvloop

import dcp
from rolling_restart import BROKER_LISTENING, DO_LISTENING, spawn

RESPONDER = textwrap.dedent("""
    import asyncio, sys, uvloop, dcp

    async def main(broker: str, orchestrator: str) -> None:
        agent = dcp.DataAgent("responder", broker=broker, orchestrator=orchestrator)

        @agent.capability("echo")
        async def echo(msg, params):
            return msg.payload

        await agent.start()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the bench closes our stdin
        await agent.stop()

    uvloop.run(main(sys.argv[1], sys.argv[2]))
""")

NATS_RESPONDER = textwrap.dedent("""
    import asyncio, sys, nats, uvloop

    async def main() -> None:
        nc = await nats.connect("nats://127.0.0.1:4222")

        async def echo(msg):
            await msg.respond(msg.data)

        await nc.subscribe("echo", cb=echo)
        await nc.flush()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await nc.close()

    uvloop.run(main())
""")


def start_responder(code: str, *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the responder exited with {process.wait()}")
    return process


def stop_responder(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.close()
    process.wait(20)


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return f"p50 {pick(0.5):7.3f} ms  p99 {pick(0.99):7.3f} ms  max {ordered[-1] * 1000:7.3f} ms"


async def measure(ask, size: int, count: int) -> list[float]:  # type: ignore[no-untyped-def]
    payload = os.urandom(size)
    for _ in range(max(count // 10, 10)):
        await ask(payload)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        reply = await ask(payload)
        samples.append(time.perf_counter() - started)
        assert len(reply) == size
    return samples


async def dcp_rows(sizes: list[int], count: int, workdir: Path) -> list[tuple[str, int, list[float]]]:
    do, match = spawn(["orchestrator", "--insecure", "--listen", "127.0.0.1:0", "--db", str(workdir / "do.db")], DO_LISTENING)
    orchestrator = f"{match[1]}:{match[2]}"
    b0, m0 = spawn(["broker", "--insecure", "--listen", "127.0.0.1:0", "--orchestrator", orchestrator], BROKER_LISTENING)
    b1, m1 = spawn(["broker", "--insecure", "--listen", "127.0.0.1:0", "--orchestrator", orchestrator, "--peer", f"{m0[1]}:{m0[2]}"], BROKER_LISTENING)
    urls = [f"dcp://{m[1]}:{m[2]}" for m in (m0, m1)]
    rows = []
    try:
        for where, responder_at in (("dcp, one broker", 0), ("dcp, two brokers", 1)):
            responder = start_responder(RESPONDER, urls[responder_at], f"dcp://{orchestrator}")
            asker = dcp.DataAgent(f"asker-{responder_at}", broker=urls[0], orchestrator=f"dcp://{orchestrator}")
            await asker.start()
            try:
                for size in sizes:
                    rows.append((where, size, await measure(lambda p: asker.request("echo", p, timeout=10), size, count)))
            finally:
                await asker.stop()
                stop_responder(responder)
    finally:
        for process in (b1, b0, do):
            process.terminate()
            process.wait(20)
    return rows


async def nats_rows(sizes: list[int], count: int) -> list[tuple[str, int, list[float]]]:
    try:
        import nats  # the bench extra
        async def quiet(exc: Exception) -> None:
            pass

        nc = await nats.connect("nats://127.0.0.1:4222", connect_timeout=1, allow_reconnect=False, error_cb=quiet)
    except Exception as exc:  # not installed, or no server: reported, not measured
        print(f"NATS: not measured ({type(exc).__name__}: {exc}); bench/peers start runs a server")
        return []
    responder = start_responder(NATS_RESPONDER)
    rows = []
    try:
        async def ask(payload: bytes) -> bytes:
            return (await nc.request("echo", payload, timeout=10)).data

        for size in sizes:
            rows.append(("nats", size, await measure(ask, size, count)))
    finally:
        await nc.close()
        stop_responder(responder)
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="requests per cell")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 100 * 1024], help="payload bytes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        rows = await dcp_rows(args.sizes, args.count, Path(workdir))
    rows += await nats_rows(args.sizes, args.count)
    print(f"{platform.node()}, {os.cpu_count()} CPUs, {args.count} requests per cell, one at a time")
    for where, size, samples in rows:
        print(f"{where:18s} {size:>7d} B  {percentiles(samples)}")


if __name__ == "__main__":
    uvloop.run(main())
