"""Congestion over real links: a triangle of brokers whose direct link is throttled mid-stream.

    sudo .venv/bin/python bench/congestion.py --out bench/results/congestion.md

Needs root, iproute2 (``ip netns``, ``tc``) and the ``tbf`` qdisc.  Four network
namespaces, joined by veth pairs::

                 nsO: dcp orchestrator (10.77.1x.1, a management network of its own)
               /          |           \\
        ns0: b0 ==== 10.77.1.0/24 ==== ns1: b1        direct link  b1 dials b0
        src    \\                      /  sink
                10.77.2.0/24    10.77.3.0/24          detour  b2 dials b0 and b1
                         ns2: b2

Each broker is a ``dcp broker`` process in its namespace (``ip netns exec``), registered
with the orchestrator over the management network, so that its reports never queue
behind the data.  The source agent (``src``, on b0, in ns0) publishes a frame (sequence
number, ``time.monotonic_ns()`` at publish, padding to ``--size``) every
``1/--rate`` s; the sink agent (``sink``, on b1, in ns1) notes when each arrives and
with what hop count: 2 brokers on the direct path, 3 on the detour, so every frame says
which way it came.  CLOCK_MONOTONIC is one clock for every namespace of the host, so
end-to-end latency is receive time minus publish time.

Phases: ``--before-s`` unthrottled; then ``tc qdisc add ... tbf rate --throttle-kbit``
on both ends of the direct link's veth for ``--during-s``; then the qdisc is removed
and it runs ``--after-s`` more.  For frames published in each phase: p50/p99/max
latency, frames lost (published, never received), and duplicates.  Switch time: from
the throttle to the first frame that arrives over the detour (and back: from the
release to the first frame published after it that arrives over the direct link).

Run once per mode: ``replan`` (the default orchestrator: trees by measured link cost)
and ``hops`` (``dcp orchestrator --plan-by-hops``: load reports never change a tree).
The brokers get ``--link-timeout-s 30`` in both modes, so that the direct link is
never cut for a late pong: what moves the stream is the cost, not a link failure.

    .venv/bin/python bench/congestion.py --modes replan --during-s 5 --json out.json

Every namespace, veth and qdisc it made is removed on exit, failure included.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FRAME = struct.Struct("!QQ")  # sequence number, time.monotonic_ns() at publish
TOPIC = "bench/congestion"
DIRECT_HOPS_USED, DETOUR_HOPS_USED = 2, 3  # brokers a frame passes: b0 b1, or b0 b2 b1
LISTENING = re.compile(r"listening on (\S+):(\d+)")
SUBNET = "10.77"


# -- agents (run inside a namespace: python bench/congestion.py source|sink ...) --------


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _stdin_closed() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)


async def source(broker: str, orchestrator: str, rate: float, size: int) -> int:
    """Publish until stdin closes; ``epoch E seq S`` whenever the route changes, then ``sent N``."""
    import dcp

    agent = dcp.DataAgent("src", broker=broker, orchestrator=orchestrator)
    await agent.start()
    await agent.declare_produces(TOPIC)
    await agent.wait_route(TOPIC, consumers=1, timeout=30)
    _say("ready")
    closed = asyncio.ensure_future(_stdin_closed())
    padding = bytes(max(size - FRAME.size, 0))
    loop = asyncio.get_running_loop()
    start, seq, epoch, unsent = loop.time(), 0, -1, 0
    while not closed.done():
        if agent.routes[TOPIC][0] != epoch:
            epoch = agent.routes[TOPIC][0]
            _say(f"epoch {epoch} seq {seq} at {time.monotonic_ns()}")
        if not await agent.publish(TOPIC, (FRAME.pack(seq, time.monotonic_ns()), padding)):
            unsent += 1
        seq += 1
        await asyncio.sleep(max(start + seq / rate - loop.time(), 0))
    _say(f"sent {seq} unsent {unsent}")
    await agent.stop()
    return 0


async def sink(broker: str, orchestrator: str) -> int:
    """``seq sent_ns received_ns hops`` per frame, until stdin closes."""
    import dcp

    agent = dcp.DataAgent("sink", broker=broker, orchestrator=orchestrator)

    @agent.consume(TOPIC)
    async def on_frame(msg: dcp.Message) -> None:
        now = time.monotonic_ns()
        seq, sent = FRAME.unpack_from(msg.payload)
        _say(f"{seq} {sent} {now} {msg.hops}")

    await agent.start()
    _say("ready")
    await _stdin_closed()
    await agent.stop()
    return 0


async def relay(listen_port: int, target: str, delay_ms: float) -> int:
    """A TCP relay that delays every byte by ``delay_ms`` each way (netem is not available)."""
    host, port = target.rsplit(":", 1)
    loop = asyncio.get_running_loop()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                loop.call_later(delay_ms / 1000, writer.write, data)  # FIFO: call_later keeps order for equal delays
            await asyncio.sleep(delay_ms / 1000)
        finally:
            loop.call_later(delay_ms / 1000, writer.close)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    server = await asyncio.start_server(serve, "127.0.0.1", listen_port)
    _say(f"relay listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}")
    await _stdin_closed()
    server.close()
    return 0


# -- namespaces, processes ------------------------------------------------------------


def probe() -> str | None:
    """Why the scenario cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return f"network namespaces and tc need root; this runs with euid {os.geteuid()}"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"iproute2's `{tool}` is not on PATH"
    name = f"dcpprobe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()}"
    try:
        steps = [
            ["ip", "-n", name, "link", "add", "pa", "type", "veth", "peer", "name", "pb"],
            ["ip", "-n", name, "link", "set", "pa", "up"],
            ["tc", "-n", name, "qdisc", "add", "dev", "pa", "root", "tbf", "rate", "1mbit", "burst", "32kbit", "latency", "400ms"],
        ]
        for argv in steps:
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                return f"`{' '.join(argv)}` failed: {done.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _run(*argv: str) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")


class Lines:
    """A text stream drained by a thread, its lines kept."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self.closed = False
        self.cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait(self, pattern: re.Pattern[str], deadline: float, what: str, start: int = 0) -> re.Match[str]:
        with self.cond:
            index = start
            while True:
                while index < len(self.lines):
                    match = pattern.search(self.lines[index])
                    index += 1
                    if match:
                        return match
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise RuntimeError(f"no {what} ({'stream closed' if self.closed else 'timed out'}); last lines:\n"
                                       + "\n".join(self.lines[-20:]))
                self.cond.wait(left)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[str]
    out: Lines
    err: Lines

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            try:  # an agent: stdin's end is its cue to finish
                self.popen.stdin.close()
                self.popen.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@dataclass
class Triangle:
    """Namespaces nsO, ns0, ns1, ns2 and the processes in them."""

    tag: str = field(default_factory=lambda: f"dcg{os.getpid()}")
    made: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    throttled: list[tuple[str, str]] = field(default_factory=list)  # (namespace, device)

    def ns(self, host: str) -> str:
        return f"{self.tag}{host}"

    def veth(self, a: str, b: str) -> str:
        return f"c{os.getpid() % 10**7}{a}{b}"[:15]

    def build(self) -> None:
        for host in "O012":
            _run("ip", "netns", "add", self.ns(host))
            self.made.append(self.ns(host))
            _run("ip", "-n", self.ns(host), "link", "set", "lo", "up")
        pairs = [("0", "1", 1), ("0", "2", 2), ("2", "1", 3), ("O", "0", 10), ("O", "1", 11), ("O", "2", 12)]
        for a, b, net in pairs:
            _run("ip", "link", "add", self.veth(a, b), "netns", self.ns(a), "type", "veth",
                 "peer", "name", self.veth(b, a), "netns", self.ns(b))
            for host, dev, last in ((a, self.veth(a, b), 1), (b, self.veth(b, a), 2)):
                _run("ip", "-n", self.ns(host), "addr", "add", f"{SUBNET}.{net}.{last}/24", "dev", dev)
                _run("ip", "-n", self.ns(host), "link", "set", dev, "up")

    def start(self, name: str, host: str, argv: list[str], stdin: bool = False) -> Proc:
        popen = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *argv],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)},
        )
        proc = Proc(name, popen, Lines(popen.stdout), Lines(popen.stderr))
        self.procs.append(proc)
        return proc

    def throttle(self, kbit: int) -> None:
        """tbf on both ends of the direct link (b0's end carries the stream)."""
        for host, dev in ((("0", self.veth("0", "1"))), ("1", self.veth("1", "0"))):
            _run("tc", "-n", self.ns(host), "qdisc", "add", "dev", dev, "root", "tbf",
                 "rate", f"{kbit}kbit", "burst", "16kb", "latency", "200ms")
            self.throttled.append((self.ns(host), dev))

    def release(self) -> None:
        while self.throttled:
            ns, dev = self.throttled.pop()
            _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root")

    def teardown(self) -> list[str]:
        problems = []
        for proc in reversed(self.procs):
            proc.stop()
        try:
            self.release()
        except RuntimeError as exc:
            problems.append(str(exc))
        for ns in self.made:  # veths and their qdiscs go with the namespaces
            done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if done.returncode != 0:
                problems.append(f"ip netns del {ns}: {done.stderr.strip()}")
        self.made.clear()
        return problems


# -- the scenario ---------------------------------------------------------------------


@dataclass
class Settings:
    mode: str = "replan"  # or "hops"
    rate: float = 200.0
    size: int = 1000
    throttle_kbit: int = 800
    before_s: float = 4.0
    during_s: float = 10.0
    after_s: float = 6.0
    link_timeout_s: float = 30.0
    detour_delay_ms: float = 5.0
    until_detour: bool = False  # end the throttle once a frame came over the detour (polled), or after during_s


def _dcp(*args: str) -> list[str]:
    return [sys.executable, "-m", "dcp", *args]


def scenario(settings: Settings) -> dict[str, Any]:
    """Run it once; the raw observations (times in monotonic ns)."""
    tri = Triangle()
    try:
        tri.build()
        deadline = time.monotonic() + 60
        do = tri.start("orchestrator", "O", _dcp("orchestrator", "--listen", "0.0.0.0:0", "--db", ":memory:", "--insecure",
                                                 *(["--plan-by-hops"] if settings.mode == "hops" else [])))
        do_port = do.err.wait(LISTENING, deadline, "orchestrator listening")[2]
        ports: dict[str, str] = {}
        relayed = ""
        for index in "012":
            if index == "2":  # b2 dials b0 through a delaying relay in ns2
                delayer = tri.start("relay", "2", [sys.executable, str(Path(__file__).resolve()), "relay", "0",
                                                   f"{SUBNET}.2.1:{ports['0']}", "--delay-ms", str(settings.detour_delay_ms)],
                                    stdin=True)
                relayed = f"127.0.0.1:{delayer.out.wait(LISTENING, deadline, 'relay listening')[2]}"
            peers = {"0": [], "1": [f"{SUBNET}.1.1:{ports.get('0')}"],
                     "2": [relayed, f"{SUBNET}.3.2:{ports.get('1')}"]}[index]
            broker = tri.start(f"b{index}", index, _dcp(
                "broker", "--listen", "0.0.0.0:0", "--name", f"b{index}", "--ports", "64", "--insecure",
                "--orchestrator", f"{SUBNET}.1{index}.1:{do_port}", "--link-timeout-s", str(settings.link_timeout_s),
                *[arg for peer in peers for arg in ("--peer", peer)]))
            ports[index] = broker.err.wait(LISTENING, deadline, f"b{index} listening")[2]
        link_up = re.compile(r"link up")
        for proc in (p for p in tri.procs if p.name in ("b0", "b1", "b2")):  # every broker has two links up
            proc.err.wait(link_up, deadline, f"a link up at {proc.name}")
            line_at = next(i for i, line in enumerate(proc.err.lines) if link_up.search(line))
            proc.err.wait(link_up, deadline, f"a second link up at {proc.name}", start=line_at + 1)
        ready = re.compile(r"^ready$")
        sink_proc = tri.start("sink", "1", [sys.executable, str(Path(__file__).resolve()), "sink",
                                            f"dcp://127.0.0.1:{ports['1']}", f"dcp://{SUBNET}.11.1:{do_port}"], stdin=True)
        sink_proc.out.wait(ready, deadline, "sink ready")
        src = tri.start("src", "0", [sys.executable, str(Path(__file__).resolve()), "source",
                                     f"dcp://127.0.0.1:{ports['0']}", f"dcp://{SUBNET}.10.1:{do_port}",
                                     "--rate", str(settings.rate), "--size", str(settings.size)], stdin=True)
        src.out.wait(ready, deadline, "source ready")
        # The first routes may be planned before the orchestrator has heard of every
        # link: the run starts once a frame came over the direct link (and a frame
        # published after that did too: the route is the direct one).
        at = _wait_for_path(sink_proc.out, DIRECT_HOPS_USED, deadline)
        started = time.monotonic_ns()
        if at is None or _wait_for_path(sink_proc.out, DIRECT_HOPS_USED, deadline, at + 1) is None:
            raise RuntimeError("no frame over the direct link within the setup time")
        time.sleep(settings.before_s)  # the phases are durations of the run itself, not synchronisation
        throttled = time.monotonic_ns()
        tri.throttle(settings.throttle_kbit)
        if settings.until_detour:
            _wait_for_path(sink_proc.out, DETOUR_HOPS_USED, time.monotonic() + settings.during_s)
        else:
            time.sleep(settings.during_s)
        released = time.monotonic_ns()
        tri.release()
        time.sleep(settings.after_s)
        src.stop(30)
        sent_line = src.out.wait(re.compile(r"^sent (\d+) unsent (\d+)$"), time.monotonic() + 30, "the source's count")
        stopped = time.monotonic_ns()
        drain_deadline = time.monotonic() + 10  # the last frames still in flight
        while time.monotonic() < drain_deadline:
            with sink_proc.out.cond:
                last = sink_proc.out.lines[-1].split() if sink_proc.out.lines else []
            if last and last[0].isdigit() and int(last[0]) >= int(sent_line[1]) - 1:
                break
            time.sleep(0.05)
        frames = [tuple(int(v) for v in line.split()) for line in list(sink_proc.out.lines) if line and line[0].isdigit()]
        epochs = [(int(m[1]), int(m[2]), int(m[3])) for line in src.out.lines
                  if (m := re.match(r"^epoch (\d+) seq (\d+) at (\d+)$", line))]
        costs = [line.split("] ", 1)[-1] for line in do.err.lines if "now costs" in line]
        return {"settings": settings.__dict__, "started": started, "throttled": throttled, "released": released,
                "stopped": stopped, "sent": int(sent_line[1]), "unsent": int(sent_line[2]), "frames": frames,
                "epochs": epochs, "costs": costs}
    finally:
        problems = tri.teardown()
        if problems:
            print("cleanup problems: " + "; ".join(problems), file=sys.stderr)


def _wait_for_path(lines: Lines, used: int, deadline: float, index: int = 0) -> int | None:
    """Until the sink printed a frame that passed ``used`` brokers (after line ``index``):
    the index of its line, or None at ``deadline``."""
    from dcp.wire import DEFAULT_HOPS

    hops = str(DEFAULT_HOPS - used)
    with lines.cond:
        while time.monotonic() < deadline and not lines.closed:
            for at in range(index, len(lines.lines)):
                line = lines.lines[at]
                if line[:1].isdigit() and line.rsplit(" ", 1)[-1] == hops:
                    return at
            index = len(lines.lines)
            lines.cond.wait(max(deadline - time.monotonic(), 0))
    return None


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def analyse(raw: dict[str, Any]) -> dict[str, Any]:
    """Per phase latency figures, losses, duplicates; switch times, ms."""
    from dcp.wire import DEFAULT_HOPS

    direct, detour = DEFAULT_HOPS - DIRECT_HOPS_USED, DEFAULT_HOPS - DETOUR_HOPS_USED
    frames = raw["frames"]  # (seq, sent_ns, received_ns, hops)
    seen: dict[int, int] = {}
    for seq, *_ in frames:
        seen[seq] = seen.get(seq, 0) + 1
    first_sent = {seq: sent for seq, sent, _, _ in frames}
    # publish times of the frames never received: interpolated from the rate
    start_ns = min(first_sent.values()) - min(first_sent) * 1e9 / raw["settings"]["rate"] if first_sent else raw["started"]
    phases: dict[str, Any] = {}
    bounds = {"before": (raw["started"], raw["throttled"]), "during": (raw["throttled"], raw["released"]), "after": (raw["released"], 1 << 63)}
    for phase, (lo, hi) in bounds.items():
        latencies = [(got - sent) / 1e6 for _, sent, got, _ in frames if lo <= sent < hi]
        published = [seq for seq in range(raw["sent"]) if lo <= first_sent.get(seq, start_ns + seq * 1e9 / raw["settings"]["rate"]) < hi]
        phases[phase] = {
            "frames": len(published), "received": len(latencies), "lost": sum(1 for seq in published if seq not in seen),
            "p50_ms": _pct(latencies, 0.5), "p99_ms": _pct(latencies, 0.99), "max_ms": max(latencies, default=float("nan")),
            "detour_share": sum(1 for _, sent, _, hops in frames if lo <= sent < hi and hops == detour) / max(len(latencies), 1),
        }
    on_detour = [got for _, sent, got, hops in frames if hops == detour and got >= raw["throttled"]]
    back = [got for _, sent, got, hops in frames if hops == direct and sent >= raw["released"]]
    in_order = sorted({frame[0]: frame for frame in frames}.values())
    moves = sum(1 for (a, b) in zip(in_order, in_order[1:]) if a[3] != b[3])  # path changes, in publish order
    return {
        "mode": raw["settings"]["mode"], "settings": raw["settings"], "phases": phases,
        "duplicates": sum(n - 1 for n in seen.values()), "sent": raw["sent"], "unsent": raw["unsent"],
        "to_detour_ms": (min(on_detour) - raw["throttled"]) / 1e6 if on_detour else None,
        "back_to_direct_ms": (min(back) - raw["released"]) / 1e6 if back else None,
        "path_changes": moves, "epochs": len(raw["epochs"]), "costs": raw["costs"],
        "before_all_direct": all(hops == direct for _, sent, _, hops in frames if raw["started"] <= sent < raw["throttled"]),
        "warm_up_frames": sum(1 for _, sent, _, _ in frames if sent < raw["started"]),
    }


def _ms(value: float | None) -> str:
    return "never" if value is None else "n/a" if value is None or value != value else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| mode | phase | frames | lost | dup (whole run) | p50 ms | p99 ms | max ms | over detour |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        for phase, fig in result["phases"].items():
            lines.append(f"| {result['mode']} | {phase} | {fig['frames']} | {fig['lost']} | "
                         f"{result['duplicates'] if phase == 'before' else ''} | {_ms(fig['p50_ms'])} | {_ms(fig['p99_ms'])} | "
                         f"{_ms(fig['max_ms'])} | {fig['detour_share']:.0%} |")
    lines.append("")
    lines.append("| mode | throttle to first frame over the detour, ms | release to first new frame over the direct link, ms | "
                 "path changes (in publish order) | routes the source got (epochs) |")
    lines.append("|---|---:|---:|---:|---:|")
    for result in results:
        lines.append(f"| {result['mode']} | {_ms(result['to_detour_ms'])} | {_ms(result['back_to_direct_ms'])} | "
                     f"{result['path_changes']} | {result['epochs']} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role")
    relay_parser = sub.add_parser("relay")
    relay_parser.add_argument("port", type=int)
    relay_parser.add_argument("target")
    relay_parser.add_argument("--delay-ms", type=float, default=5.0)
    for role in ("source", "sink"):
        agent = sub.add_parser(role)
        agent.add_argument("broker")
        agent.add_argument("orchestrator")
        agent.add_argument("--rate", type=float, default=200.0)
        agent.add_argument("--size", type=int, default=1000)
    defaults = Settings()
    parser.add_argument("--modes", default="replan,hops", help="comma-separated: replan (trees by link cost), hops (--plan-by-hops)")
    parser.add_argument("--rate", type=float, default=defaults.rate, help="frames per second (default: %(default)s)")
    parser.add_argument("--size", type=int, default=defaults.size, help="frame payload bytes (default: %(default)s)")
    parser.add_argument("--throttle-kbit", type=int, default=defaults.throttle_kbit, help="tbf rate on the direct link (default: %(default)s)")
    parser.add_argument("--before-s", type=float, default=defaults.before_s)
    parser.add_argument("--during-s", type=float, default=defaults.during_s)
    parser.add_argument("--after-s", type=float, default=defaults.after_s)
    parser.add_argument("--until-detour", action="store_true",
                        help="release the throttle as soon as a frame came over the detour (at most --during-s)")
    parser.add_argument("--json", help="write the analysed results (list, one per mode) to this file")
    parser.add_argument("--out", help="write the markdown report to this file")
    args = parser.parse_args()
    if args.role == "source":
        from dcp._loop import run
        return run(source(args.broker, args.orchestrator, args.rate, args.size))
    if args.role == "relay":
        return asyncio.run(relay(args.port, args.target, args.delay_ms))
    if args.role == "sink":
        from dcp._loop import run
        return run(sink(args.broker, args.orchestrator))
    why = probe()
    if why:
        print(f"congestion: cannot run here: {why}", file=sys.stderr)
        return 77
    results = []
    for mode in args.modes.split(","):
        settings = Settings(mode, args.rate, args.size, args.throttle_kbit, args.before_s, args.during_s, args.after_s,
                            until_detour=args.until_detour)
        result = analyse(scenario(settings))
        results.append(result)
        print("\n".join(table([result])), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.out:
        Path(args.out).write_text(report(results, sys.argv[1:]))
    return 0


def report(results: list[dict[str, Any]], argv: list[str]) -> str:
    s = results[0]["settings"]
    uname = platform.uname()
    lines = [
        "# Congestion over real links: a throttled direct link, and the detour",
        "",
        f"Command: `.venv/bin/python bench/congestion.py {' '.join(argv)}` (as root)",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {os.cpu_count()} CPU(s) shared with other work, "
        f"{uname.system} {uname.release} {uname.machine}, Python {platform.python_version()}.",
        "",
        f"Triangle b0-b1 (direct), b0-b2-b1 (detour), each broker a `dcp broker` process in its own network "
        f"namespace, veth links (b2 dials b0 through a TCP relay adding {s['detour_delay_ms']:g} ms each way, so the "
        f"detour is clearly the longer path); orchestrator in a fourth namespace on a management network. "
        f"Source on b0, sink on b1: {s['rate']:g} frames/s of {s['size']} B. After {s['before_s']:g} s, "
        f"`tc qdisc add dev <direct veth> root tbf rate {s['throttle_kbit']}kbit burst 16kb latency 200ms` on both "
        f"ends of the direct link (below the stream's rate: its queue and round trip grow); removed after "
        f"{s['during_s']:g} s; {s['after_s']:g} s more. Latency: receive minus publish time, one host clock. "
        "Phases by publish time. `replan`: the default orchestrator (trees by measured link cost); "
        "`hops`: `dcp orchestrator --plan-by-hops` (load reports never change a tree). Brokers run with "
        f"`--link-timeout-s {s['link_timeout_s']:g}` so the direct link is never cut: only its cost can move the stream.",
        "",
        *table(results),
        "",
    ]
    for result in results:
        lines.append(f"Link costs the `{result['mode']}` orchestrator planned with (its log):")
        lines.append("")
        lines.extend(f"    {line}" for line in result["costs"][:12] or ["(none)"])
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
