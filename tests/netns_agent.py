"""Publisher and subscriber processes for ``tests/test_netns.py`` (one per network namespace).

::

    python -m tests.netns_agent sub URL --count N [--linger] [--timeout S]
    python -m tests.netns_agent pub URL --route X --count N --topic T [--seed S]

``sub`` prints ``port P`` once attached, then ``msg_id sha256hex len hops topic`` for
each frame received, then ``done N`` after ``--count`` frames.  Without ``--linger``
it then exits; with it, it keeps printing what arrives until its stdin is closed (so
the test can read the broker's counters while the attachment is still there, and
see any frame that arrives after the expected ones), then prints ``eof K`` (K: all
frames received) and exits.  No ``done`` line within ``--timeout`` seconds: exit 1.

``pub`` publishes ``--count`` payloads made by :func:`payload` (sizes from 0 B to
200 KiB, bytes from a seeded random), waits until the broker has read all of them
(a ping answered after the last frame), and prints ``sent msg_id sha256hex len`` for
each, then ``published N``.

Every line is flushed at once: the test reads them as they come.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import sys

import dcp
from dcp._loop import run

#: Sizes the first frames take, chosen for the broker's read paths: empty, tiny, around
#: one read, around its 64 KiB join limit, and the large-frame path; the rest are random.
EDGE_SIZES = (0, 1, 2, 100, 1000, 4096, 65535, 65536, 65537, 100_000, 200 * 1024)
MAX_SIZE = 200 * 1024


def payload(seed: int, index: int) -> bytes:
    """The ``index``-th payload of run ``seed``: deterministic, so a test can recompute it."""
    rng = random.Random(f"dcp-netns:{seed}:{index}")
    size = EDGE_SIZES[index] if index < len(EDGE_SIZES) else rng.randint(0, MAX_SIZE)
    return rng.randbytes(size)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _read_stdin_to_eof() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)


async def subscribe(url: str, count: int, linger: bool, timeout: float) -> int:
    async with dcp.connect(url, name="netns-sub", reconnect=False) as conn:
        say(f"port {conn.port}")
        received = 0

        def show(msg: dcp.Message) -> None:
            say(f"{msg.msg_id} {digest(bytes(msg.payload))} {len(msg.payload)} {msg.hops} {msg.topic}")

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while received < count:
            left = deadline - loop.time()
            try:
                msg = await conn.next_message(timeout=max(left, 0.001))
            except dcp.DcpTimeout:
                print(f"netns_agent sub: timed out after {timeout} s with {received} of {count} frames", file=sys.stderr)
                return 1
            except dcp.ConnectionClosed as exc:
                print(f"netns_agent sub: connection closed after {received} of {count} frames: {exc}", file=sys.stderr)
                return 1
            show(msg)
            received += 1
        say(f"done {received}")
        if not linger:
            return 0
        eof = asyncio.ensure_future(_read_stdin_to_eof())
        while True:
            nxt = asyncio.ensure_future(conn.next_message())
            finished, _ = await asyncio.wait({eof, nxt}, return_when=asyncio.FIRST_COMPLETED)
            if nxt in finished:
                try:
                    show(nxt.result())
                except dcp.ConnectionClosed as exc:
                    print(f"netns_agent sub: connection closed while lingering: {exc}", file=sys.stderr)
                    await eof
                    say(f"eof {received}")
                    return 1
                received += 1
            if eof in finished:
                nxt.cancel()
                # A frame may have been queued in the same iteration: report it too.
                while conn.pending:
                    show(await conn.next_message(timeout=1))
                    received += 1
                say(f"eof {received}")
                return 0


async def publish(url: str, route: int, count: int, topic: str, seed: int) -> int:
    async with dcp.connect(url, name="netns-pub", reconnect=False) as conn:
        sent = []
        for index in range(count):
            data = payload(seed, index)
            msg_id = await conn.publish(topic, data, route=route)
            sent.append((msg_id, digest(data), len(data)))
        await conn.ping()  # answered only after the broker has read every frame above
        for msg_id, sha, size in sent:
            say(f"sent {msg_id} {sha} {size}")
        say(f"published {count}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netns_agent")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("sub", help="attach, print the port, print what arrives")
    sub.add_argument("url")
    sub.add_argument("--count", type=int, required=True)
    sub.add_argument("--linger", action="store_true", help="after --count frames, go on until stdin is closed")
    sub.add_argument("--timeout", type=float, default=30.0, help="seconds allowed for the --count frames")
    pub = commands.add_parser("pub", help="publish --count deterministic payloads")
    pub.add_argument("url")
    pub.add_argument("--route", type=int, required=True)
    pub.add_argument("--count", type=int, required=True)
    pub.add_argument("--topic", required=True)
    pub.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "sub":
            return run(subscribe(args.url, args.count, args.linger, args.timeout))
        return run(publish(args.url, args.route, args.count, args.topic, args.seed))
    except (dcp.DcpError, OSError) as exc:
        print(f"netns_agent {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
