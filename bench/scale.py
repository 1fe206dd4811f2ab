"""Scale: thousands of data agents on one orchestrator and a few brokers, as processes.

Processes: one ``dcp orchestrator`` (sqlite in a temporary directory), ``--brokers``
``dcp broker`` processes with default settings (``--ports`` only when given here),
registered with it through ``--orchestrator`` and linked at run time by an admin
client (``--topology``), and ``--workers`` worker processes, each holding its share
of the ``dcp.DataAgent`` connections on one uvloop.  Only the public API is used:
``dcp.DataAgent``, ``dcp.connect`` and the orchestrator's admin ops.  This process
measures the orchestrator from outside: /proc, pings, its ``status`` map.

Agents ``a0 .. a{N-1}``; agent i is attached to broker ``i % brokers`` and held by the
worker of its contiguous block of ``N / workers`` agents.  Two variants:

* exact: agent i produces ``s.<i>`` and consumes ``s.<(i+1) mod N>``: N streams in a
  ring, one consumer each (agent i-1);
* wildcard: agent i is in group ``g = i // G`` (``--group-size``), produces
  ``g.<g>.<i>`` and consumes the pattern ``g.<(g+1) mod N/G>.*``: N streams, each with
  the G agents of the previous group as consumers.

Per run (each agent count, each variant; fresh processes every time):

Workers take their agents out of the cyclic garbage collector (``gc.freeze()``) once
built, every 0.5 s while starting them, and once started, as any process holding
thousands of long-lived objects should:
otherwise a full collection over a worker's 2,500 agents stalls it for 0.3-0.6 s (seen
at 10,000 agents), and the burst and join figures count the harness's pauses.

* burst: every worker starts all its agents at once (``--concurrency`` caps the
  start() calls in flight per worker; 0: no cap).  ``all_routed_s`` is the time
  from the burst command to the last producer holding a route (X != 0) whose
  consumers include every expected agent; ``all_started_s`` to the last start()
  returned (attached to its broker and registered).  ``--time-limit-s`` bounds it:
  a burst that does not finish is reported with its progress, not as an error.
* delivery: every producer publishes one frame whose payload is its index; every
  consumer counts frames per source; missing, duplicate and unexpected deliveries.
* join: ``--joins`` agents added one at a time after the burst.  Joiner k is a
  twin of an existing agent t (same produced topic, same consumed pattern, another
  broker), chosen so that t's consumers and producers are in the same worker.
  From the moment its ``start()`` is called (it connects to its broker):
  ``registered_ms``: start() returned (attached, registered with the orchestrator);
  ``route_ms``: it holds a route for its topic naming every expected consumer;
  ``in_route_ms``: its name is in the route of every producer of the topics it consumes.
* orchestrator: CPU time (utime + stime, /proc/PID/stat) over the burst, per agent
  registration and per route push (route pushes: the sum of the producers' final
  epochs, each a new number pushed); RSS at the end of the burst and its peak
  (VmHWM); the CPU it uses afterwards with nothing happening but the agents'
  reports; an admin connection pinging it every ``--ping-interval-ms`` (a round
  trip longer than that is the loop stalling, or this machine being busy):
  p50, p99 and max per phase; its ``status`` map's scalar entries (``planning`` ...).

Fan-out (``--fanout``; fresh orchestrator and brokers): ``--fanout-subscribers``
DataAgents consuming ``fan.data`` spread over 1 broker, or over several brokers
linked as a line or a star, and one publishing agent on the first broker publishing
``--fanout-frames`` numbered frames as fast as it can; delivered exactly once is
checked per subscriber; deliveries per second from the first publish to the last
frame received.

The benchmark reports; it asserts nothing.  Examples::

    .venv/bin/python bench/scale.py --agents 1000 --out bench/results/scale.json
    .venv/bin/python bench/scale.py --agents 1000 10000 --variants exact wildcard --time-limit-s 600
    .venv/bin/python bench/scale.py --agents 200 --joins 10 --fanout 1 --fanout-subscribers 100   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

import dcp

GOALS = {
    "all_routed_s_at_10000": 60.0,
    "join_p99_ms": 50.0,
    "max_loop_stall_ms": 20.0,
    "orchestrator_rss_mb": 500.0,
}
DO_LISTENING = re.compile(r"dcp orchestrator listening on (\S+):(\d+)")
BROKER_LISTENING = re.compile(r"dcp broker listening on (\S+):(\d+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")
now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process of this host


def die_with_parent() -> None:
    """In a child, before exec: SIGTERM when this process goes (no daemons left behind by a killed run)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def percentiles(values: list[float]) -> dict[str, Any]:
    """count, p50, p99 (nearest rank), max, rounded."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(1, -(-len(ordered) * q // 100)).__int__() - 1]

    return {"count": len(ordered), "p50": round(rank(50), 3), "p99": round(rank(99), 3), "max": round(ordered[-1], 3)}


# -- the topic scheme, shared by the main process and the workers -----------------------------


class Scheme:
    def __init__(self, n: int, wildcard: bool, group: int) -> None:
        self.n, self.wildcard, self.group = n, wildcard, group
        self.groups = n // group if wildcard else n

    def topic(self, i: int) -> str:
        return f"g.{i // self.group}.{i}" if self.wildcard else f"s.{i}"

    def pattern(self, i: int) -> str:
        return f"g.{(i // self.group + 1) % self.groups}.*" if self.wildcard else f"s.{(i + 1) % self.n}"

    def consumers_of(self, i: int) -> list[int]:
        """The agents whose pattern matches agent i's topic."""
        if not self.wildcard:
            return [(i - 1) % self.n]
        g = (i // self.group - 1) % self.groups
        return list(range(g * self.group, (g + 1) * self.group))

    def sources_of(self, j: int) -> list[int]:
        """The agents whose topic agent j's pattern matches."""
        if not self.wildcard:
            return [(j + 1) % self.n]
        g = (j // self.group + 1) % self.groups
        return list(range(g * self.group, (g + 1) * self.group))


# -- worker processes: hold agents, answer commands (JSON lines on stdin/stdout) ---------------


class Worker:
    def __init__(self) -> None:
        self.out = sys.stdout
        self.agents: dict[int, dcp.DataAgent] = {}
        self.received: dict[int, Counter[int]] = {}
        self.started: dict[int, float] = {}
        self.routed: dict[int, float] = {}
        self.failed: dict[int, str] = {}
        self.joiners: list[dcp.DataAgent] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.fan_counts: dict[int, bytearray] = {}
        self.fan_last: dict[int, float] = {}
        self.fan_first: dict[int, float] = {}

    def emit(self, **event: Any) -> None:
        self.out.write(json.dumps(event) + "\n")
        self.out.flush()

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def agent(self, name: str, broker: str) -> dcp.DataAgent:
        return dcp.DataAgent(name, broker=broker, orchestrator=self.job["do"], report_interval_s=self.job["report_interval_s"])

    # init -----------------------------------------------------------------------------

    async def init(self, job: dict[str, Any]) -> None:
        self.job = job
        brokers = job["brokers"]
        if job["kind"] == "scale":
            self.scheme = Scheme(job["n"], job["wildcard"], job["group"])
            for i in job["agents"]:
                self.agents[i] = await self.make_agent(f"a{i}", i, brokers[i % len(brokers)], counts=True)
        else:  # fanout subscribers
            frames = job["frames"]
            for i in job["agents"]:
                agent = self.agent(f"sub{i}", brokers[i % len(brokers)])
                counts = self.fan_counts[i] = bytearray(frames)

                @agent.consume("fan.data")
                async def on_frame(msg: dcp.Message, i: int = i, counts: bytearray = counts) -> None:
                    seq = int.from_bytes(msg.payload[:8], "big")
                    if seq < len(counts):
                        counts[seq] = min(counts[seq] + 1, 255)
                    t = now()
                    self.fan_first.setdefault(i, t)
                    self.fan_last[i] = t

                self.agents[i] = agent
        self.emit(ev="ready", agents=len(self.agents))

    async def make_agent(self, name: str, i: int, broker: str, counts: bool) -> dcp.DataAgent:
        """An agent doing what agent i does (its twin, when ``name`` is another)."""
        agent = self.agent(name, broker)
        received = self.received.setdefault(i, Counter()) if counts else Counter()

        @agent.consume(self.scheme.pattern(i))
        async def on_frame(msg: dcp.Message, received: Counter[int] = received) -> None:
            received[int(msg.payload)] += 1

        await agent.declare_produces(self.scheme.topic(i))  # before start(): one registration says it all
        return agent

    # the burst ------------------------------------------------------------------------

    def routed_ok(self, agent: dcp.DataAgent, i: int) -> bool:
        topic = self.scheme.topic(i)
        x = agent.routes.get(topic, (0, 0))[1]
        have = set(agent.consumers.get(topic, ()))
        return bool(x) and all(f"a{j}" in have for j in self.scheme.consumers_of(i))

    async def watch(self, i: int) -> None:
        agent = self.agents[i]
        while not self.routed_ok(agent, i):
            await agent.route_changed.wait()
        self.routed[i] = now()

    async def burst(self, concurrency: int, timeout: float) -> None:
        gate = asyncio.Semaphore(concurrency) if concurrency else None
        watchers = [asyncio.ensure_future(self.watch(i)) for i in self.agents]

        async def start(i: int) -> None:
            try:
                if gate is None:
                    await self.agents[i].start(timeout=timeout)
                else:
                    async with gate:
                        await self.agents[i].start(timeout=timeout)
                self.started[i] = now()
            except Exception as exc:  # reported, the burst goes on
                self.failed[i] = f"{type(exc).__name__}: {exc}"

        async def freeze_meanwhile() -> None:
            while True:  # what starting them makes, as it comes (see the module's docstring)
                await asyncio.sleep(0.5)
                gc.freeze()

        gc.freeze()  # the agents built
        freezing = asyncio.ensure_future(freeze_meanwhile())
        await asyncio.gather(*(start(i) for i in self.agents))
        freezing.cancel()
        gc.freeze()
        self.emit(ev="started", t=max(self.started.values(), default=None), started=len(self.started), failed=len(self.failed),
                  errors=sorted(set(self.failed.values()))[:5])
        await asyncio.gather(*watchers)
        self.emit(ev="routed", t=max(self.routed.values()), routed=len(self.routed))

    async def progress(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.emit(ev="progress", started=len(self.started), routed=len(self.routed), failed=len(self.failed))

    # delivery -------------------------------------------------------------------------

    async def publish(self) -> None:
        ok = unrouted = 0
        errors: Counter[str] = Counter()
        for i, agent in self.agents.items():
            try:
                if await agent.publish(self.scheme.topic(i), str(i).encode()):
                    ok += 1
                else:
                    unrouted += 1
            except Exception as exc:  # e.g. a route the broker's limits refuse: counted, not fatal
                errors[f"{type(exc).__name__}: {re.sub(r'[0-9]+', 'N', str(exc))}"] += 1
        self.emit(ev="published", ok=ok, not_sent=unrouted, errors=dict(errors))

    def deliveries(self) -> None:
        expected = received = missing = duplicates = unexpected = 0
        samples: list[str] = []
        for j in self.agents:
            got = self.received[j]
            want = set(self.scheme.sources_of(j))
            expected += len(want)
            for source in want:
                count = got.get(source, 0)
                received += min(count, 1)
                if count == 0:
                    missing += 1
                    if len(samples) < 10:
                        samples.append(f"a{j} missing a{source}")
                elif count > 1:
                    duplicates += count - 1
                    if len(samples) < 10:
                        samples.append(f"a{j} got a{source} {count} times")
            for source, count in got.items():
                if source not in want:
                    unexpected += count
                    if len(samples) < 10:
                        samples.append(f"a{j} got unexpected a{source}")
        pushes = sum(agent.routes.get(self.scheme.topic(i), (0, 0))[0] for i, agent in self.agents.items())
        self.emit(ev="deliveries", expected=expected, received=received, missing=missing, duplicates=duplicates,
                  unexpected=unexpected, samples=samples, route_pushes=pushes)

    # joins ----------------------------------------------------------------------------

    async def join(self, k: int, t: int, broker: str, timeout: float) -> None:
        scheme = self.scheme
        name = f"j{k}"
        joiner = await self.make_agent(name, t, broker, counts=False)
        self.joiners.append(joiner)
        topic = scheme.topic(t)
        expected = [f"a{j}" for j in scheme.consumers_of(t)]

        async def own_route() -> float:
            while not (joiner.routes.get(topic, (0, 0))[1] and set(expected) <= set(joiner.consumers.get(topic, ()))):
                await joiner.route_changed.wait()
            return now()

        async def in_routes() -> float:
            for s in scheme.sources_of(t):
                producer = self.agents[s]
                while name not in producer.consumers.get(scheme.topic(s), ()):
                    await producer.route_changed.wait()
            return now()

        own = asyncio.ensure_future(own_route())
        other = asyncio.ensure_future(in_routes())
        called = now()
        try:
            await joiner.start(timeout=timeout)
            returned = now()
            route_at, in_at = await asyncio.wait_for(asyncio.gather(own, other), timeout)
        except Exception as exc:
            own.cancel()
            other.cancel()
            self.emit(ev="joined", k=k, error=f"{type(exc).__name__}: {exc}")
            return
        self.emit(ev="joined", k=k, registered_ms=(returned - called) * 1000, route_ms=(route_at - called) * 1000,
                  in_route_ms=(in_at - called) * 1000)

    # fan-out --------------------------------------------------------------------------

    async def fan_start(self) -> None:
        failed = []
        results = await asyncio.gather(*(a.start(timeout=60) for a in self.agents.values()), return_exceptions=True)
        failed = [repr(r) for r in results if isinstance(r, BaseException)]
        self.emit(ev="fan_started", failed=len(failed), errors=failed[:5])

    def fan_result(self) -> None:
        received = missing = duplicates = 0
        for counts in self.fan_counts.values():
            for c in counts:
                if c == 0:
                    missing += 1
                else:
                    received += 1
                    duplicates += c - 1
        self.emit(ev="fan_result", received=received, missing=missing, duplicates=duplicates,
                  first=min(self.fan_first.values(), default=None), last=max(self.fan_last.values(), default=None))

    # ---------------------------------------------------------------------------------

    async def stop(self) -> None:
        everyone = [*self.agents.values(), *self.joiners]
        await asyncio.gather(*(a.stop() for a in everyone), return_exceptions=True)
        self.emit(ev="stopped")

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            cmd = json.loads(line)
            op = cmd["cmd"]
            if op == "init":
                await self.init(cmd)
            elif op == "burst":
                self.spawn(self.burst(cmd["concurrency"], cmd["timeout"]))
                self.spawn(self.progress())
            elif op == "publish":
                await self.publish()
            elif op == "deliveries":
                self.deliveries()
            elif op == "join":
                self.spawn(self.join(cmd["k"], cmd["t"], cmd["broker"], cmd["timeout"]))
            elif op == "fan_start":
                self.spawn(self.fan_start())
            elif op == "fan_result":
                self.fan_result()
            elif op == "stop":
                for task in list(self.tasks):
                    task.cancel()
                await self.stop()
                return


def worker_main() -> None:
    import logging

    raise_fd_limit()
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    uvloop.run(Worker().serve())


# -- the main process: daemons, workers, measurements -----------------------------------------


class Daemon:
    """A ``dcp`` daemon process whose log goes to a file."""

    def __init__(self, name: str, argv: list[str], listening: re.Pattern[str], tmp: Path) -> None:
        self.name = name
        self.log_path = tmp / f"{name}.log"
        self.started = now()
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dcp", *argv], stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            cwd=PACKAGE_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent,
        )
        self.pid = self.process.pid
        self.listening = listening
        self.address = ""

    async def wait_listening(self, timeout: float) -> float:
        deadline = now() + timeout
        while now() < deadline:
            match = self.listening.search(self.log_path.read_text(errors="replace"))
            if match:
                self.address = f"{match[1]}:{match[2]}"
                return now() - self.started
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited before listening:\n{self.tail()}")
            await asyncio.sleep(0.02)
        raise RuntimeError(f"{self.name} not listening after {timeout} s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-lines:])

    def problems(self) -> dict[str, Any]:
        """Warnings and errors it logged: how many, and the first few."""
        bad = [line for line in self.log_path.read_text(errors="replace").splitlines()
               if " WARNING " in line or " ERROR " in line or "Traceback" in line]
        return {"count": len(bad), "first": [line[:300] for line in bad[:5]]}

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


PACKAGE_ROOT = str(Path(dcp.__file__).resolve().parent.parent)


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem_mb(pid: int) -> dict[str, float]:
    mem = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            mem[key] = round(int(value.split()[0]) / 1024, 1)
    return mem


class WorkerProc:
    def __init__(self, index: int, process: asyncio.subprocess.Process) -> None:
        self.index = index
        self.process = process
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.progress: dict[str, Any] = {}
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def spawn(cls, index: int, tmp: Path) -> WorkerProc:
        process = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), "--worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=open(tmp / f"worker{index}.log", "w"), cwd=PACKAGE_ROOT, limit=1 << 24,
            preexec_fn=die_with_parent,
        )
        return cls(index, process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            event = json.loads(line)
            if event["ev"] == "progress":
                self.progress = event
            else:
                await self.events.put(event)
        await self.events.put({"ev": "exited"})

    def send(self, **cmd: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(cmd) + "\n").encode())

    async def expect(self, ev: str, timeout: float | None) -> dict[str, Any]:
        while True:
            event = await asyncio.wait_for(self.events.get(), timeout)
            if event["ev"] == ev:
                return event
            if event["ev"] == "exited":
                raise RuntimeError(f"worker {self.index} exited")

    async def stop(self) -> None:
        try:
            self.send(cmd="stop")
            await self.expect("stopped", 60)
            await asyncio.wait_for(self.process.wait(), 10)
        except (Exception, asyncio.TimeoutError):
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


class Pinger:
    """An admin connection pinging the orchestrator every ``interval_s``: (sent at, RTT s)."""

    def __init__(self, url: str, interval_s: float) -> None:
        self.url, self.interval_s = url, interval_s
        self.samples: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.task: asyncio.Task[None] | None = None
        self.stopping = False
        self.out_since: float | None = None

    async def start(self) -> None:
        self.conn = await dcp.connect(self.url, role="admin", name="scale-pinger", reconnect=False, request_timeout_s=3600)
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while not self.stopping:  # a flag: wait_for in ping() can swallow a cancel (Python 3.11)
            sent = self.out_since = now()
            try:
                await self.conn.ping()
            except dcp.DcpError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return
            self.out_since = None
            self.samples.append((sent, now() - sent))
            await asyncio.sleep(max(0.0, sent + self.interval_s - now()))

    def window(self, start: float, end: float | None = None, in_flight: bool = False) -> dict[str, Any]:
        """RTT p50/p99/max in ms of the pings sent in [start, end); ``in_flight``: also how long
        the ping still unanswered now has been out (an orchestrator stalled at the end)."""
        rtts = [rtt * 1000 for sent, rtt in self.samples if sent >= start and (end is None or sent < end)]
        stats = percentiles(rtts)
        if in_flight and self.out_since is not None:
            stats["in_flight_ms"] = round((now() - self.out_since) * 1000, 3)
        if self.errors:
            stats["errors"] = self.errors[:3]
        return stats

    async def stop(self) -> None:
        self.stopping = True
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.conn.close()


class Plane:
    """An orchestrator and brokers as processes, linked."""

    def __init__(self, tmp: Path, brokers: int, ports: int | None, topology: str, auth: list[str]) -> None:
        self.tmp, self.n, self.ports, self.topology, self.auth = tmp, brokers, ports, topology, auth
        self.do: Daemon | None = None
        self.brokers: list[Daemon] = []
        self.startup: dict[str, Any] = {}

    async def start(self) -> None:
        tmp = self.tmp
        self.do = Daemon("orchestrator", ["orchestrator", "--listen", "127.0.0.1:0", "--db", str(tmp / "do.db"), *self.auth],
                         DO_LISTENING, tmp)
        self.startup["orchestrator_s"] = round(await self.do.wait_listening(60), 3)
        extra = [*(["--ports", str(self.ports)] if self.ports is not None else []), *self.auth]
        self.brokers = [
            Daemon(f"b{i}", ["broker", "--listen", "127.0.0.1:0", "--name", f"b{i}", "--orchestrator", self.do.address, *extra],
                   BROKER_LISTENING, tmp)
            for i in range(self.n)
        ]
        times = await asyncio.gather(*(b.wait_listening(1800) for b in self.brokers))
        self.startup["brokers_s"] = [round(t, 3) for t in times]
        started = now()
        self.links = []
        for a, b in self.edges():
            async with dcp.connect(f"dcp://{self.brokers[a].address}", role="admin", name="scale", reconnect=False) as admin:
                link = await admin.link(self.brokers[b].address, wait=60)
            self.links.append({"a": f"b{a}", "b": f"b{b}", "a_port": link["port"], "b_port": link.get("remote_port")})
        await self.wait_registered(60)
        self.startup["links_and_registration_s"] = round(now() - started, 3)

    def edges(self) -> list[tuple[int, int]]:
        n = self.n
        if self.topology == "line":
            return [(i + 1, i) for i in range(n - 1)]
        if self.topology == "star":
            return [(i, 0) for i in range(1, n)]
        return [(j, i) for i in range(n) for j in range(i + 1, n)]  # mesh

    async def wait_registered(self, timeout: float) -> None:
        """Until the orchestrator has every broker online with every link up at both ends."""
        deadline = now() + timeout
        want = 2 * len(self.edges())
        status: dict[str, Any] = {}
        while now() < deadline:
            try:
                async with dcp.connect(self.url, role="admin", name="scale", reconnect=False) as admin:
                    status = (await admin.request({"op": "status"}))["status"]
                online = [b for b in status["brokers"] if b["online"]]
                if len(online) == self.n and sum(link["state"] == "up" for b in online for link in b["links"]) == want:
                    return
            except (dcp.DcpError, OSError):
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the brokers did not register with the orchestrator: {status.get('brokers')}")

    @property
    def url(self) -> str:
        assert self.do is not None
        return f"dcp://{self.do.address}"

    @property
    def broker_urls(self) -> list[str]:
        return [f"dcp://{b.address}" for b in self.brokers]

    def problems(self) -> dict[str, Any]:
        return {d.name: p for d in [*([self.do] if self.do else []), *self.brokers] if (p := d.problems())["count"]}

    def stop(self) -> dict[str, Any]:
        codes = {b.name: b.stop() for b in self.brokers}  # brokers first: they say goodbye to the orchestrator
        if self.do is not None:
            codes["orchestrator"] = self.do.stop()
        return codes


async def status_scalars(url: str, timeout: float) -> dict[str, Any]:
    """The orchestrator's ``status`` map without its lists (sizes instead), or why it could not be read."""
    started = now()
    try:
        async with dcp.connect(url, role="admin", name="scale-status", reconnect=False, request_timeout_s=timeout) as admin:
            try:  # counts only: a full status of thousands of agents does not fit a control frame
                status = (await admin.request({"op": "status", "summary": True}))["status"]
            except dcp.RemoteError:  # an orchestrator that has no summary: the whole map
                status = (await admin.request({"op": "status"}))["status"]
    except (dcp.DcpError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "after_s": round(now() - started, 3)}
    out: dict[str, Any] = {"read_s": round(now() - started, 3)}
    for key, value in status.items():
        out[key] = {"count": len(value)} if isinstance(value, list) else value
    return out


async def spawn_workers(count: int, tmp: Path) -> list[WorkerProc]:
    return list(await asyncio.gather(*(WorkerProc.spawn(i, tmp) for i in range(count))))


def join_targets(scheme: Scheme, block: int, joins: int) -> list[int]:
    """Agents of the first worker's block whose consumers and sources are in that block too."""
    inside = range(block)
    eligible = [t for t in inside
                if all(j in inside for j in scheme.consumers_of(t)) and all(s in inside for s in scheme.sources_of(t))]
    if not eligible:
        return []
    stride = max(1, len(eligible) // max(joins, 1))
    return [eligible[(k * stride) % len(eligible)] for k in range(joins)]


async def scale_run(args: argparse.Namespace, n: int, variant: str, tmp: Path) -> dict[str, Any]:
    wildcard = variant == "wildcard"
    scheme = Scheme(n, wildcard, args.group_size)
    result: dict[str, Any] = {"agents": n, "variant": variant, "streams": n,
                              "consumers_per_stream": args.group_size if wildcard else 1}
    if wildcard and (n % args.group_size or n // args.group_size < 2):
        return {**result, "error": "--agents must be a multiple of --group-size, with two groups at least"}
    log(f"run: {n} agents, {variant}")
    plane = Plane(tmp, args.brokers, args.ports, args.topology, args.auth_flags)
    workers: list[WorkerProc] = []
    pinger: Pinger | None = None
    try:
        await plane.start()
        result["startup"] = plane.startup
        assert plane.do is not None
        do_pid = plane.do.pid
        log(f"  orchestrator and {args.brokers} brokers up: {plane.startup}")
        workers = await spawn_workers(args.workers, tmp)
        block = -(-n // args.workers)
        for w in workers:
            w.send(cmd="init", kind="scale", n=n, wildcard=wildcard, group=args.group_size, do=plane.url,
                   brokers=plane.broker_urls, report_interval_s=args.report_interval_s,
                   agents=list(range(w.index * block, min(n, (w.index + 1) * block))))
        await asyncio.gather(*(w.expect("ready", 300) for w in workers))
        result["orchestrator_before"] = {"cpu_s": proc_cpu_s(do_pid), **proc_mem_mb(do_pid)}
        pinger = Pinger(plane.url, args.ping_interval_ms / 1000)
        await pinger.start()
        await asyncio.sleep(0.5)
        idle_ping = pinger.window(now() - 0.5)
        rss_peak = 0.0

        # -- the burst
        cpu0 = proc_cpu_s(do_pid)
        t0 = now()
        for w in workers:
            w.send(cmd="burst", concurrency=args.concurrency, timeout=args.time_limit_s)
        started_ev = [asyncio.ensure_future(w.expect("started", None)) for w in workers]
        routed_ev = [asyncio.ensure_future(w.expect("routed", None)) for w in workers]
        deadline = t0 + args.time_limit_s
        last_log = t0
        while now() < deadline and not all(f.done() for f in routed_ev):
            await asyncio.sleep(0.1)
            rss_peak = max(rss_peak, proc_mem_mb(do_pid).get("VmRSS", 0.0))
            if any(w.process.returncode is not None for w in workers):
                raise RuntimeError("a worker died")
            if now() - last_log > 15:
                last_log = now()
                log(f"  {now() - t0:6.1f} s: started {sum(w.progress.get('started', 0) for w in workers)}, "
                    f"routed {sum(w.progress.get('routed', 0) for w in workers)} of {n}")
        t_end = now()
        completed = all(f.done() for f in routed_ev)
        cpu_burst = proc_cpu_s(do_pid) - cpu0
        mem = proc_mem_mb(do_pid)
        burst: dict[str, Any] = {"completed": completed, "time_limit_s": args.time_limit_s}
        if all(f.done() for f in started_ev):
            events = [f.result() for f in started_ev]
            burst["all_started_s"] = round(max(e["t"] for e in events if e["t"] is not None) - t0, 3) if any(e["t"] for e in events) else None
            burst["start_failures"] = sum(e["failed"] for e in events)
            burst["start_errors"] = sorted({err for e in events for err in e["errors"]})[:5]
        else:
            burst["all_started_s"] = None
        if completed:
            burst["all_routed_s"] = round(max(f.result()["t"] for f in routed_ev) - t0, 3)
            burst["routed"] = n
        else:
            burst["all_routed_s"] = None
            burst["after_s"] = round(t_end - t0, 3)
            burst["started"] = sum(w.progress.get("started", 0) for w in workers)
            burst["routed"] = sum(w.progress.get("routed", 0) for w in workers)
            for f in [*started_ev, *routed_ev]:
                f.cancel()
        result["burst"] = burst
        log(f"  burst: {burst}")
        orchestrator: dict[str, Any] = {
            "cpu_s_burst": round(cpu_burst, 3),
            "rss_mb_end_of_burst": mem.get("VmRSS"),
            "rss_mb_max_sampled": rss_peak,
            "vmhwm_mb": mem.get("VmHWM"),
            "ping_ms_idle": idle_ping,
            "ping_ms_burst": pinger.window(t0, t_end, in_flight=not completed),
        }
        result["orchestrator"] = orchestrator

        # -- steady state: nothing but the agents' reports
        if completed:
            cpu1, t1 = proc_cpu_s(do_pid), now()
            await asyncio.sleep(args.steady_s)
            orchestrator["steady_cpu_cores"] = round((proc_cpu_s(do_pid) - cpu1) / (now() - t1), 3)
            orchestrator["ping_ms_steady"] = pinger.window(t1)

        # -- delivery: one frame per stream
        t_pub = now()
        for w in workers:
            w.send(cmd="publish")
        published = await asyncio.gather(*(w.expect("published", 300) for w in workers))
        publish_errors: Counter[str] = Counter()
        for p in published:
            publish_errors.update(p["errors"])
        delivery: dict[str, Any] = {"published": sum(p["ok"] for p in published), "not_sent": sum(p["not_sent"] for p in published),
                                    "publish_errors": dict(publish_errors)}
        settle_until = now() + args.settle_s
        while True:
            for w in workers:
                w.send(cmd="deliveries")
            counts = await asyncio.gather(*(w.expect("deliveries", 300) for w in workers))
            if sum(c["received"] for c in counts) >= sum(c["expected"] for c in counts) or now() > settle_until:
                break
            await asyncio.sleep(0.2)
        for key in ("expected", "received", "missing", "duplicates", "unexpected"):
            delivery[key] = sum(c[key] for c in counts)
        delivery["samples"] = [s for c in counts for s in c["samples"]][:10]
        delivery["seconds"] = round(now() - t_pub, 3)
        result["delivery"] = delivery
        pushes = sum(c["route_pushes"] for c in counts)
        orchestrator["events"] = {"registrations": n, "route_pushes": pushes}
        orchestrator["cpu_ms_per_registration"] = round(cpu_burst * 1000 / n, 3)
        orchestrator["cpu_us_per_route_push"] = round(cpu_burst * 1e6 / pushes, 1) if pushes else None
        log(f"  delivery: {delivery}")

        # -- joins, one at a time
        if completed and args.joins:
            targets = join_targets(scheme, block, args.joins)
            joins: list[dict[str, Any]] = []
            t_joins = now()
            for k, t in enumerate(targets):
                workers[0].send(cmd="join", k=k, t=t, broker=plane.broker_urls[(n + k) % args.brokers], timeout=60)
                joins.append(await workers[0].expect("joined", 120))
            ok = [j for j in joins if "error" not in j]
            result["join"] = {
                "count": len(joins),
                "errors": [j["error"] for j in joins if "error" in j][:5],
                "registered_ms": percentiles([j["registered_ms"] for j in ok]),
                "route_ms": percentiles([j["route_ms"] for j in ok]),
                "in_route_ms": percentiles([j["in_route_ms"] for j in ok]),
                "ping_ms": pinger.window(t_joins),
            }
            log(f"  join: {result['join']}")
        cpu_all = proc_cpu_s(do_pid)
        orchestrator["cpu_s_total"] = round(cpu_all, 3)
        orchestrator["vmhwm_mb"] = proc_mem_mb(do_pid).get("VmHWM")
        orchestrator["status"] = await status_scalars(plane.url, 120)
        log(f"  orchestrator: {orchestrator}")
        result["brokers"] = [{"name": b.name, "cpu_s": proc_cpu_s(b.pid), **proc_mem_mb(b.pid)} for b in plane.brokers]
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  error: {result['error']}")
    finally:
        result["logged_problems"] = plane.problems()  # before the teardown, which logs links going down
        result["worker_log"] = worker_problems(tmp, len(workers))
        if pinger is not None:
            await pinger.stop()
        await asyncio.gather(*(w.stop() for w in workers))
        result["exit_codes"] = plane.stop()
    return result


def worker_problems(tmp: Path, count: int) -> dict[str, Any]:
    out = {}
    for i in range(count):
        lines = (tmp / f"worker{i}.log").read_text(errors="replace").splitlines()
        if lines:
            out[f"worker{i}"] = {"lines": len(lines), "first": [line[:300] for line in lines[:3]],
                                 "last": [line[:300] for line in lines[-3:]]}
    return out


async def fanout_run(args: argparse.Namespace, spec: str, tmp: Path) -> dict[str, Any]:
    parts = spec.split(":")
    brokers, topology = int(parts[0]), (parts[1] if len(parts) > 1 and parts[1] else "line")
    ports = int(parts[2]) if len(parts) > 2 else args.fanout_ports
    subs, frames = args.fanout_subscribers, args.fanout_frames
    result: dict[str, Any] = {"brokers": brokers, "topology": topology if brokers > 1 else None, "ports": ports,
                              "subscribers": subs, "frames": frames}
    log(f"fan-out: 1 publisher -> {subs} subscribers over {brokers} broker(s) {result['topology'] or ''}")
    plane = Plane(tmp, brokers, ports, topology, args.auth_flags)
    workers: list[WorkerProc] = []
    publisher: dcp.DataAgent | None = None
    try:
        await plane.start()
        result["startup"] = plane.startup
        workers = await spawn_workers(args.workers, tmp)
        block = -(-subs // args.workers)
        for w in workers:
            w.send(cmd="init", kind="fanout", frames=frames, do=plane.url, brokers=plane.broker_urls,
                   report_interval_s=args.report_interval_s, agents=list(range(w.index * block, min(subs, (w.index + 1) * block))))
        await asyncio.gather(*(w.expect("ready", 300) for w in workers))
        for w in workers:
            w.send(cmd="fan_start")
        started = await asyncio.gather(*(w.expect("fan_started", 300) for w in workers))
        result["start_failures"] = sum(s["failed"] for s in started)
        publisher = dcp.DataAgent("fan-publisher", broker=plane.broker_urls[0], orchestrator=plane.url,
                                  report_interval_s=args.report_interval_s)
        await publisher.declare_produces("fan.data")
        await publisher.start(timeout=120)
        t_route = now()
        await publisher.wait_route("fan.data", consumers=subs - result["start_failures"], timeout=300)
        result["route_s"] = round(now() - t_route, 3)
        payload = bytes(24)
        t0 = now()
        sent = 0
        for seq in range(frames):
            if await publisher.publish("fan.data", seq.to_bytes(8, "big") + payload):
                sent += 1
        t_sent = now()
        expected = subs * frames
        settle_until = now() + args.settle_s + frames * subs / 20000
        while True:
            for w in workers:
                w.send(cmd="fan_result")
            res = await asyncio.gather(*(w.expect("fan_result", 300) for w in workers))
            received = sum(r["received"] for r in res)
            if received >= expected or now() > settle_until:
                break
            await asyncio.sleep(0.2)
        last = max((r["last"] for r in res if r["last"] is not None), default=None)
        result.update({
            "sent": sent, "publish_s": round(t_sent - t0, 3), "expected": expected, "received": received,
            "missing": sum(r["missing"] for r in res), "duplicates": sum(r["duplicates"] for r in res),
            "deliver_s": round(last - t0, 3) if last else None,
            "deliveries_per_s": round(received / (last - t0)) if last and last > t0 else None,
            "x_bytes": (publisher.routes["fan.data"][1].bit_length() + 7) // 8,
        })
        result["brokers_cpu_s"] = [round(proc_cpu_s(b.pid), 3) for b in plane.brokers]
        log(f"  {result}")
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  error: {result['error']}")
    finally:
        result["logged_problems"] = plane.problems()
        result["worker_log"] = worker_problems(tmp, len(workers))
        if publisher is not None:
            await publisher.stop()
        await asyncio.gather(*(w.stop() for w in workers))
        result["exit_codes"] = plane.stop()
    return result


def goals(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where each goal stands, per run (reported, not asserted)."""
    out = []
    for run in runs:
        where = f"{run['agents']} agents, {run['variant']}"
        burst, do, join = run.get("burst", {}), run.get("orchestrator", {}), run.get("join", {})
        if run["agents"] >= 10_000:
            routed = burst.get("all_routed_s")
            out.append({"run": where, "goal": "all routed within 60 s", "measured": routed if routed is not None else
                        f"not routed within {burst.get('time_limit_s')} s ({burst.get('routed')} of {run['agents']})",
                        "met": routed is not None and routed <= GOALS["all_routed_s_at_10000"]})
        if join.get("route_ms", {}).get("count"):
            p99 = max(join["route_ms"]["p99"], join["in_route_ms"]["p99"])
            out.append({"run": where, "goal": "join p99 under 50 ms (route_ms and in_route_ms)", "measured": p99,
                        "met": p99 < GOALS["join_p99_ms"]})
        stall = do.get("ping_ms_burst", {})
        if stall.get("count"):
            worst = max(stall["max"], stall.get("in_flight_ms", 0))
            out.append({"run": where, "goal": "no loop stall over 20 ms (max ping RTT in the burst)", "measured": worst,
                        "met": worst <= GOALS["max_loop_stall_ms"]})
        if do.get("vmhwm_mb") is not None:
            out.append({"run": where, "goal": "orchestrator RSS under 500 MB (VmHWM)", "measured": do["vmhwm_mb"],
                        "met": do["vmhwm_mb"] < GOALS["orchestrator_rss_mb"]})
    return out


def auth_flags(auth: str) -> list[str]:
    """The daemons' flags for ``--auth``; ``auto``: ``--insecure`` where the daemons refuse to
    start without a secret or it (they have the flag), nothing where they do not have it."""
    if auth == "none":
        return []
    if auth == "auto":
        help_text = subprocess.run([sys.executable, "-m", "dcp", "broker", "--help"], capture_output=True, text=True,
                                   cwd=PACKAGE_ROOT, timeout=60).stdout
        if "--insecure" not in help_text:
            return []
    return ["--insecure"]


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def environment() -> dict[str, Any]:
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", "-C", PACKAGE_ROOT, *argv], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "python": platform.python_version(),
        "uvloop": uvloop.__version__, "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "dcp": PACKAGE_ROOT, "commit": git("rev-parse", "--short", "HEAD").strip(),
        "uncommitted_dcp_files": [line[3:] for line in git("status", "--porcelain", "--", "dcp").splitlines()],
        "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bench": "scale", "label": args.label, "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": environment(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "definitions": {
            "all_routed_s": "burst command sent to the workers -> the last producing agent holds a route (X != 0) naming every "
                            "expected consumer",
            "all_started_s": "burst command -> the last DataAgent.start() returned (attached to its broker, registered)",
            "join.registered_ms": "joiner's start() called (it connects to its broker) -> start() returned",
            "join.route_ms": "start() called -> the joiner holds a route for its topic naming every expected consumer",
            "join.in_route_ms": "start() called -> the joiner is a consumer in the route of every producer of what it consumes",
            "ping_ms": "round trip of an admin ping to the orchestrator, one every ping_interval_ms; the max is the longest "
                       "stall seen from outside (it includes this host's scheduling)",
            "cpu_ms_per_registration": "orchestrator CPU (utime+stime) over the burst / agents",
            "cpu_us_per_route_push": "the same CPU / route pushes (sum of the producers' final epochs)",
            "steady_cpu_cores": "orchestrator CPU per second after the burst (agents' reports only)",
            "deliveries_per_s": "frames received by all subscribers / (last frame received - first publish)",
        },
        "runs": [],
        "fanout": [],
    }
    for n in args.agents:
        for variant in args.variants:
            with tempfile.TemporaryDirectory(prefix="dcp-scale-") as tmp:
                out["runs"].append(await scale_run(args, n, variant, Path(tmp)))
            await asyncio.sleep(1)
    for spec in args.fanout:
        if spec != "none":
            with tempfile.TemporaryDirectory(prefix="dcp-scale-") as tmp:
                out["fanout"].append(await fanout_run(args, spec, Path(tmp)))
    out["goals"] = goals(out["runs"])
    out["loadavg_at_end"] = os.getloadavg()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, nargs="+", default=[1000], metavar="N", help="agent counts, one run each (default: 1000)")
    parser.add_argument("--variants", nargs="+", choices=("exact", "wildcard"), default=["exact", "wildcard"],
                        help="topic variants, one run each (default: exact wildcard)")
    parser.add_argument("--group-size", type=int, default=10, help="wildcard variant: agents per group (default: 10)")
    parser.add_argument("--brokers", type=int, default=4, help="broker processes (default: 4)")
    parser.add_argument("--topology", choices=("line", "star", "mesh"), default="line", help="links between the brokers (default: line)")
    parser.add_argument("--ports", type=int, default=None, help="--ports of every broker (default: none given, the broker's default)")
    parser.add_argument("--workers", type=int, default=4, help="processes holding the agents (default: 4)")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="start() calls in flight per worker during the burst; 0: all at once (default: 0)")
    parser.add_argument("--report-interval-s", type=float, default=1.0,
                        help="the agents' report interval, DataAgent's report_interval_s (default: 1.0, its default)")
    parser.add_argument("--time-limit-s", type=float, default=600, help="longest wait for the burst to be routed (default: 600)")
    parser.add_argument("--joins", type=int, default=50, help="agents joining one at a time after the burst (default: 50)")
    parser.add_argument("--ping-interval-ms", type=float, default=5.0, help="orchestrator ping period (default: 5)")
    parser.add_argument("--steady-s", type=float, default=3.0, help="seconds measuring the orchestrator's CPU after the burst (default: 3)")
    parser.add_argument("--settle-s", type=float, default=10.0, help="longest wait for frames to arrive (default: 10)")
    parser.add_argument("--fanout", nargs="+", default=["1", "10:line"], metavar="SPEC",
                        help="fan-out runs: BROKERS[:line|star|mesh[:PORTS]] (PORTS: that run's --ports, else --fanout-ports); "
                             "'none' for none (default: 1 10:line)")
    parser.add_argument("--fanout-subscribers", type=int, default=1000, help="subscribers of the fan-out runs (default: 1000)")
    parser.add_argument("--fanout-frames", type=int, default=200, help="frames the fan-out publisher sends (default: 200)")
    parser.add_argument("--fanout-ports", type=int, default=None, help="--ports of the fan-out brokers (default: the broker's default)")
    parser.add_argument("--auth", choices=("auto", "none", "insecure"), default="auto",
                        help="access control of the daemons: none (no flag), insecure (--insecure: every role admitted without "
                             "a token, loopback only), auto: insecure if the daemons have that flag, else none (default: auto)")
    parser.add_argument("--label", default="", help="free text stored in the output (e.g. before, after)")
    parser.add_argument("--out", metavar="PATH", help="write the results as JSON here (they are printed too)")
    return parser.parse_args(argv)


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        worker_main()
        return 0
    args = parse_args()
    raise_fd_limit()  # inherited by the daemons
    args.auth_flags = auth_flags(args.auth)
    out = uvloop.run(main_async(args))
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        log(f"wrote {args.out}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
