"""Soak: one dcp broker at a fraction of its measured capacity for a long while.

Not part of CI.  One ``dcp broker`` process (stateless, started as ``dcp bench``
starts it, :func:`dcp.bench.targets.start_server`) and bench worker processes
(``python -m dcp.bench.worker``, the publishers and subscribers of ``dcp bench``):

1. capacity: one publisher and one subscriber at ``--size``, the publisher as fast
   as flow control allows for ``--capacity-s``; the capacity is the rate of the
   distinct messages the subscriber received, between its first and its last.
2. soak: ``--fraction`` of that rate for ``--duration`` seconds.  Each publisher
   sends at a fixed interval; when one publisher would have to send more than
   one every ``--min-interval-ms``, several publishers share the rate, each with its
   own stream.  Every stream goes to ``--subscribers`` subscribers: the topology
   number the publisher uses names all of their ports (fan-out in the broker).
3. drain: once the publishers are done and the broker's buffers are empty, the
   subscribers are stopped and report what they received and its latency.

All along, every second: the broker process's RSS (``/proc/PID/status``) and CPU
time (``/proc/PID/stat``) and an admin ``stats()`` (frames and bytes in/out, every
drop counter, each port's output buffer ``buffered`` and drop-oldest queue
``queued``), one JSON line each in ``OUT/samples.jsonl``; a progress line every
10 s.  At the end the summary goes to ``OUT/soak.md`` and ``OUT/soak.json`` and is
printed.

The subscribers (``dcp.bench.worker``) keep every latency until they report: about
36 bytes a message received, some 2 GiB over all of them after 10 minutes at 50,000
messages/s with two subscribers per stream.

The script judges nothing.  Exit status: 0 when the run completed; 1 when a process
died, the broker stopped answering or the set-up failed (the reason is printed,
and the summary of what ran is still written); 130 after Ctrl-C (or SIGTERM),
which stops everything and writes the summary of what ran; 2 on bad usage.  The
worker processes are started with SIGINT blocked, so a Ctrl-C at the terminal
reaches this script only and it stops them in order.

    .venv/bin/python bench/soak.py                  # 10 min at half capacity, 1 KiB messages
    .venv/bin/python bench/soak.py --duration 20 --capacity-s 3 --out /tmp/soak-check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO, TypeVar

from dcp._loop import run
from dcp.bench.scenarios import _finish, _json_line, _worker, run_pair
from dcp.bench.targets import Server, start_server
from dcp.client import Connection, connect
from dcp.control import SLOW_CONSUMER_POLICIES
from dcp.errors import DcpError
from dcp.routing import encode

T = TypeVar("T")

TARGET = "dcp-stateless"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "soak"
SAMPLE_S = 1.0
PROGRESS_EVERY = 10  # samples
# A subscriber keeps the latency of at most about this many messages (one in N).
LATENCY_SAMPLES = 1_000_000
# A soak subscriber that hears nothing for this long ends by itself, which fails the run:
# at a steady rate, that long a silence is a stall, not the end of the stream.
SUB_IDLE_S = 30.0
DRAIN_TIMEOUT_S = 30.0
DRAIN_GRACE_S = 0.5  # after the broker's buffers are empty: what the sockets hold reaches the subscribers
CLK_TCK = os.sysconf("SC_CLK_TCK")


class SoakFailed(Exception):
    """A process died, the broker stopped answering, or the set-up failed."""


class Interrupted(Exception):
    """SIGINT or SIGTERM."""


def _block_sigint() -> None:
    """In the threads that start workers: the children inherit the mask, so a Ctrl-C at
    the terminal (sent to the whole process group) does not stop them under us."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError(f"no VmRSS for process {pid}")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()  # fields from the 3rd on; the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(seconds, value)`` points, per minute; None under 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.t0 = time.monotonic()
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.loadavg_start = [round(x, 2) for x in os.getloadavg()]
        self.phase = "start"
        self.samples: list[dict[str, Any]] = []
        self.marks: dict[str, dict[str, Any]] = {}  # the sample taken as each phase began
        self.broker: Server | None = None
        self.admin: Connection | None = None
        self.sampler: asyncio.Task[None] | None = None
        self.pubs: list[tuple[subprocess.Popen[str], str]] = []
        self.subs: list[tuple[subprocess.Popen[str], str, int]] = []  # and the stream it listens to
        self.watched: list[tuple[subprocess.Popen[str], str]] = []  # must not end by themselves
        self.stopping: set[subprocess.Popen[str]] = set()  # told to stop
        self.capacity: dict[str, Any] = {}
        self.plan: dict[str, Any] = {}
        self.pub_results: list[dict[str, Any] | None] = []
        self.sub_results: list[dict[str, Any] | None] = []
        self.drained: bool | None = None
        self.ports = 64  # the broker's, once attached
        # A subscriber keeps every latency until it reports, then sorts them: tens of
        # millions after a 10-minute soak, which takes a while on a small machine.
        self.sub_timeout = 120 + args.duration / 2
        self.error: str | None = None
        self.interrupted: str | None = None
        self.hurry = False
        self._stop: asyncio.Event | None = None
        self._samples_file: TextIO | None = None
        self._last_progress: dict[str, Any] | None = None

    # -- running ---------------------------------------------------------------------

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=64, initializer=_block_sigint))
        self._stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        self.out.mkdir(parents=True, exist_ok=True)
        self._samples_file = open(self.out / "samples.jsonl", "w")
        try:
            with tempfile.TemporaryDirectory(prefix="dcp-soak-") as workdir:
                try:
                    await self._phases(Path(workdir))
                except Interrupted:
                    self.interrupted = f"interrupted in the {self.phase} phase, {time.monotonic() - self.t0:.0f} s in"
                except SoakFailed as exc:
                    self.error = str(exc)
                finally:
                    await self._cleanup()
        finally:
            self._samples_file.close()
        summary = self.summary()
        (self.out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
        markdown = render(summary)
        (self.out / "soak.md").write_text(markdown)
        print()
        print(markdown, end="")
        if self.error:
            print(f"\nsoak FAILED: {self.error}", file=sys.stderr)
            return 1
        return 130 if self.interrupted else 0

    def _on_signal(self, signum: int) -> None:
        assert self._stop is not None
        if self._stop.is_set():
            self.hurry = True  # a second one: no drain, kill what is left
            print(f"soak: {signal.Signals(signum).name} again, stopping at once", file=sys.stderr, flush=True)
        else:
            print(f"\nsoak: {signal.Signals(signum).name}, stopping and writing the summary", file=sys.stderr, flush=True)
        self._stop.set()

    async def _guard(self, aw: Awaitable[T]) -> T:
        """``await aw``, unless the sampler fails first (SoakFailed) or a signal comes (Interrupted).

        A worker that fails (RuntimeError from the bench helpers) fails the run.
        """
        assert self._stop is not None
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._stop.wait())
        waiting: set[asyncio.Future[Any]] = {task, stop}
        if self.sampler is not None:
            waiting.add(self.sampler)
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if task in done:
            try:
                return task.result()
            except RuntimeError as exc:
                self._check_processes()  # a worker fails when the broker has died: say that first
                raise SoakFailed(str(exc)) from exc
        task.cancel()  # a thread under it runs on until _cleanup stops its process
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # nobody awaits it any more
        if self.sampler in done:
            self.sampler.result()  # raises SoakFailed
            raise SoakFailed("the sampler stopped")
        raise Interrupted

    async def _phases(self, workdir: Path) -> None:
        a = self.args
        extra = ["--slow-consumer", a.slow_consumer] if a.slow_consumer else []
        self._log(f"starting the broker ({TARGET}{' ' + ' '.join(extra) if extra else ''})")
        try:
            self.broker = await asyncio.to_thread(start_server, TARGET, workdir, extra)
        except RuntimeError as exc:
            raise SoakFailed(str(exc)) from exc
        address = self.broker.address
        try:
            self.admin = await connect(
                f"dcp://{address}", name="soak", role="admin", reconnect=False, request_timeout_s=a.stats_timeout
            )
            self.ports = int((await self.admin.stats())["ports"])
        except (DcpError, OSError) as exc:
            raise SoakFailed(f"could not attach to the broker at {address}: {type(exc).__name__}: {exc}") from exc
        key = self.admin.broker_key
        assert key is not None
        await self.mark("capacity")
        self.sampler = asyncio.create_task(self._sampling())

        self._log(f"capacity: one publisher, one subscriber, {a.size} B, as fast as flow control allows, {a.capacity_s:g} s")
        sent, got = await self._guard(asyncio.to_thread(
            run_pair, TARGET, self.broker, size=a.size, count=10**9, duration_s=a.capacity_s, idle_timeout_s=1.0
        ))
        await self.mark("setup")
        span = (got["last_recv_ns"] - got["first_recv_ns"]) / 1e9 if got["received"] > 1 else 0.0
        if span <= 0:
            raise SoakFailed(f"the capacity run delivered {got['received']} message(s): no rate to take a fraction of")
        capacity = got["received"] / span
        self.capacity = {
            "msg_s": round(capacity, 1), "mb_s": round(got["bytes"] / span / 2**20, 1), "sent": sent["sent"],
            "received": got["received"], "delivered": round(got["received"] / max(sent["sent"], 1), 4),
            "span_s": round(span, 3), "latency_us": got["latency_us"],
            "drops": self._delta("capacity", "setup")["drops"],
        }
        self._log(f"capacity: {capacity:.0f} msg/s delivered ({self.capacity['delivered'] * 100:.1f} % of {sent['sent']} sent)")

        rate = a.fraction * capacity
        publishers = max(1, math.ceil(rate * a.min_interval_ms / 1000))
        interval_ms = 1000 * publishers / rate
        count = max(1, round(a.duration * 1000 / interval_ms))
        ports = publishers * (a.subscribers + 1)  # an admin connection takes none
        if ports > self.ports:
            raise SoakFailed(f"{publishers} publisher(s) x (1 + {a.subscribers} subscribers) need {ports} ports; "
                             f"the broker has {self.ports} (lower --min-interval-ms or --subscribers)")
        self.plan = {
            "rate_msg_s": round(rate, 1), "publishers": publishers, "subscribers_per_stream": a.subscribers,
            "interval_ms": round(interval_ms, 6), "count_per_publisher": count,
        }
        self._log(
            f"soak: {rate:.0f} msg/s for {a.duration:g} s: {publishers} publisher(s), one every {interval_ms:.4g} ms each, "
            f"{a.subscribers} subscriber(s) per stream"
        )
        for stream in range(publishers):
            for n in range(a.subscribers):
                proc = await asyncio.to_thread(
                    _worker, "sub", TARGET, address, *self.broker.client_args,
                    "--idle-timeout", str(SUB_IDLE_S), "--max-time", str(a.duration + 3600),
                    "--latency-every", str(max(1, math.ceil(count / LATENCY_SAMPLES))),
                )
                self.subs.append((proc, f"subscriber {stream}.{n}", stream))
        readies = await self._guard(asyncio.gather(*(asyncio.to_thread(_json_line, p, what) for p, what, _ in self.subs)))
        self.watched += [(p, what) for p, what, _ in self.subs]
        bitmaps = [0] * publishers
        for (_, _, stream), ready in zip(self.subs, readies):
            bitmaps[stream] |= int(ready["route"]) % key  # this subscriber's port bit
        await self.mark("soak")
        for stream, bitmap in enumerate(bitmaps):
            proc = await asyncio.to_thread(
                _worker, "pub", TARGET, address, *self.broker.client_args, "--size", str(a.size), "--count", str(count),
                "--interval-ms", repr(interval_ms), "--duration", str(a.duration), "--route", str(encode({key: bitmap})),
            )
            self.pubs.append((proc, f"publisher {stream}"))
        self.pub_results = list(await self._guard(asyncio.gather(
            *(asyncio.to_thread(_finish, p, what, a.duration + 120) for p, what in self.pubs)
        )))

        await self.mark("drain")
        self._log("drain: the publishers are done; waiting for the broker's buffers to empty")
        self.drained = await self._guard(self._drain(DRAIN_TIMEOUT_S))
        self.sub_results = await self._stop_subscribers()  # not cut short: they hold the results
        await self.mark("end")

    async def _sampling(self) -> None:
        next_at = time.monotonic()
        ticks = 0
        while True:
            next_at = max(next_at + SAMPLE_S, time.monotonic())
            await asyncio.sleep(next_at - time.monotonic())
            sample = await self.take()
            ticks += 1
            if ticks % PROGRESS_EVERY == 0:
                self._progress(sample)

    async def mark(self, phase: str) -> None:
        """Begin ``phase``, with a sample at its very start."""
        self.phase = phase
        self.marks[phase] = await self.take()

    async def take(self) -> dict[str, Any]:
        """One sample of the broker: written to samples.jsonl and kept.

        Raises:
            SoakFailed: the broker, or a worker that must not end yet, has ended, or the
                broker did not answer within --stats-timeout.
        """
        self._check_processes()
        assert self.broker is not None and self.broker.process is not None and self.admin is not None
        pid = self.broker.process.pid
        phase = self.phase
        try:
            stats = await self.admin.stats()
            rss, cpu = _rss_kib(pid), _cpu_s(pid)
        except (DcpError, OSError) as exc:
            self._check_processes()  # a broker that exited says more than one that is silent
            raise SoakFailed(
                f"the broker stopped answering stats ({type(exc).__name__}: {exc}); its last lines:\n{self.broker.output[-2000:]}"
            ) from exc
        sample = {
            "t": round(time.monotonic() - self.t0, 3), "phase": phase, "rss_kib": rss, "cpu_s": round(cpu, 2),
            "frames_in": stats["frames_in"], "frames_out": stats["frames_out"],
            "bytes_in": stats["bytes_in"], "bytes_out": stats["bytes_out"], "drops": stats["drops"],
            "ports": [
                {key: conn[key] for key in ("port", "name", "role", "policy", "buffered", "queued", "dropped")}
                for conn in stats["connections"]
            ],
        }
        self.samples.append(sample)
        if self._samples_file is not None and not self._samples_file.closed:
            self._samples_file.write(json.dumps(sample, separators=(",", ":")) + "\n")
            self._samples_file.flush()
        return sample

    def _check_processes(self) -> None:
        assert self.broker is not None and self.broker.process is not None
        code = self.broker.process.poll()
        if code is not None:
            raise SoakFailed(f"the broker exited with {code}; its last lines:\n{self.broker.output[-2000:]}")
        for proc, what in self.watched:
            if proc in self.stopping or proc.poll() is None:
                continue
            out, err = proc.communicate()
            said = (err.strip() or out.strip())[-1000:]
            raise SoakFailed(f"{what} ended during the soak (exit {proc.returncode}): {said or 'it said nothing'}")

    async def _drain(self, timeout: float) -> bool:
        """Wait until every port's output buffer and queue are empty and nothing more goes out."""
        deadline = time.monotonic() + timeout
        previous = None
        while time.monotonic() < deadline and not self.hurry:
            sample = await self.take()
            empty = all(p["buffered"] == 0 and p["queued"] == 0 for p in sample["ports"])
            if empty and previous is not None and sample["frames_out"] == previous:
                await asyncio.sleep(DRAIN_GRACE_S)
                return True
            previous = sample["frames_out"]
            await asyncio.sleep(0.2)
        return False

    async def _stop_subscribers(self) -> list[dict[str, Any] | None]:
        """SIGTERM every subscriber still running; each prints its result as it goes."""
        for proc, _, _ in self.subs:
            self.stopping.add(proc)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

        def result(proc: subprocess.Popen[str], what: str) -> dict[str, Any] | None:
            try:
                return _finish(proc, what, self.sub_timeout)
            except Exception as exc:  # RuntimeError from _finish; anything else must not lose the other results
                print(f"soak: {what}: {exc}", file=sys.stderr, flush=True)
                return None

        return list(await asyncio.gather(*(asyncio.to_thread(result, p, what) for p, what, _ in self.subs)))

    async def _cleanup(self) -> None:
        """Stop what still runs (publishers, subscribers, then the broker); keep what they report."""
        if self.sampler is not None:
            self.sampler.cancel()
            try:
                await self.sampler
            except (asyncio.CancelledError, SoakFailed):
                pass
        broker_alive = self.broker is not None and self.broker.process is not None and self.broker.process.poll() is None
        running_pubs = [proc for proc, _ in self.pubs if proc.poll() is None]
        for proc in running_pubs:
            self.stopping.add(proc)
            proc.terminate()  # it prints nothing then: what it sent is the broker's frames_in
        if self.subs and not self.sub_results:
            if broker_alive and self.admin is not None and not self.hurry:
                if "drain" not in self.marks:
                    self.phase = "drain"
                    await self._try_mark("drain")
                try:
                    self.drained = await self._drain(5.0)
                except SoakFailed:
                    pass
            self.sub_results = await self._stop_subscribers()
        if broker_alive and "end" not in self.marks:
            self.phase = "end"
            await self._try_mark("end")
        for proc in running_pubs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.admin is not None:
            await self.admin.close()
        if self.broker is not None:
            code = await asyncio.to_thread(self.broker.stop)
            if code not in (0, None) and not self.error:
                self.error = f"the broker exited with {code} when stopped; its last lines:\n{self.broker.output[-2000:]}"

    async def _try_mark(self, phase: str) -> None:
        try:
            await self.mark(phase)
        except SoakFailed as exc:
            print(f"soak: no {phase} sample: {exc}", file=sys.stderr, flush=True)

    # -- reporting -------------------------------------------------------------------

    def _log(self, line: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.0f} s] {line}", flush=True)

    def _progress(self, sample: dict[str, Any]) -> None:
        last = self._last_progress or self.samples[0]
        dt = max(sample["t"] - last["t"], 1e-9)
        buffered = max((p["buffered"] for p in sample["ports"]), default=0)
        queued = max((p["queued"] for p in sample["ports"]), default=0)
        self._log(
            f"{sample['phase']:<8} rss {sample['rss_kib'] / 1024:.1f} MiB, cpu {(sample['cpu_s'] - last['cpu_s']) / dt:.2f} cores, "
            f"in {(sample['frames_in'] - last['frames_in']) / dt:.0f}/s, out {(sample['frames_out'] - last['frames_out']) / dt:.0f}/s, "
            f"drops so far {sum(sample['drops'].values())}, buffered {buffered} B, queued {queued} B (largest port)"
        )
        self._last_progress = sample

    def _delta(self, first: str, last: str) -> dict[str, Any]:
        a, b = self.marks[first], self.marks[last]
        return {
            "frames_in": b["frames_in"] - a["frames_in"], "frames_out": b["frames_out"] - a["frames_out"],
            "drops": {k: v - a["drops"].get(k, 0) for k, v in b["drops"].items()},
        }

    def summary(self) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {
            "status": "failed" if self.error else "interrupted" if self.interrupted else "completed",
            "error": self.error, "interrupted": self.interrupted, "started_at": self.started_at,
            "wall_s": round(time.monotonic() - self.t0, 1),
            "settings": {
                "target": TARGET, "size": a.size, "fraction": a.fraction, "duration_s": a.duration,
                "capacity_s": a.capacity_s, "subscribers": a.subscribers, "min_interval_ms": a.min_interval_ms,
                "slow_consumer": a.slow_consumer or "broker default", "warmup_s": a.warmup_s,
            },
            "host": {
                "cpus": os.cpu_count(), "loadavg_start": self.loadavg_start,
                "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            },
            "capacity": self.capacity, "plan": self.plan, "samples": len(self.samples),
            "files": {name: str(self.out / name) for name in ("samples.jsonl", "soak.md", "soak.json")},
        }
        if "soak" in self.marks:
            out["soak"] = self._soak_summary()
            out["broker"] = self._broker_summary()
        return out

    def _soak_summary(self) -> dict[str, Any]:
        start = self.marks["soak"]
        end = self.marks.get("drain") or self.samples[-1]
        last = self.marks.get("end") or self.samples[-1]
        read = last["frames_in"] - start["frames_in"]  # the publishers are the only ones publishing
        finished = [r for r in self.pub_results if r]
        if self.pubs and len(finished) == len(self.pubs):
            sent, sent_by = sum(r["sent"] for r in finished), "publishers"
            rate = sum(r["sent"] / r["elapsed_s"] for r in finished if r["elapsed_s"] > 0)
        else:  # stopped early: they printed nothing; what reached the broker is what was sent
            sent, sent_by = read, "broker frames_in"
            rate = read / max(end["t"] - start["t"], 1e-9)
        subscribers = self.args.subscribers
        expected = sent * subscribers
        # Counted by the broker but with no sample after the publishers stopped (it died):
        # the count is older than what the subscribers got, so it tells nothing of loss.
        comparable = sent_by == "publishers" or "end" in self.marks
        got = [r for r in self.sub_results if r]
        received = sum(r["received"] for r in got)
        latency = [r["latency_us"] for r in got if r["received"]]

        def worst(key: str) -> int | None:
            values = [lat[key] for lat in latency if lat[key] is not None]
            return max(values) if values else None

        return {
            "duration_s": round(end["t"] - start["t"], 1), "sent": sent, "sent_counted_by": sent_by,
            "sent_rate_msg_s": round(rate, 1), "read_by_broker": read, "expected_deliveries": expected,
            "received": received, "lost": max(expected - received, 0) if comparable else None,
            "delivered_pct": round(100 * received / expected, 4) if expected and comparable else None,
            "duplicates": sum(r["duplicates"] for r in got), "out_of_order": sum(r["out_of_order"] for r in got),
            "subscribers_reporting": f"{len(got)} of {len(self.subs)}", "drained": self.drained,
            "latency_us": {"p50": worst("p50"), "p99": worst("p99"), "max": worst("max"), "of": "the worst subscriber"},
            "per_subscriber": [
                {"subscriber": what, "received": r["received"], "latency_us": r["latency_us"], "error": r.get("error")}
                if r else {"subscriber": what, "result": None}
                for (_, what, _), r in zip(self.subs, self.sub_results or [None] * len(self.subs))
            ],
        }

    def _broker_summary(self) -> dict[str, Any]:
        start = self.marks["soak"]
        end = self.marks.get("drain") or self.samples[-1]
        last = self.marks.get("end") or self.samples[-1]
        soaking = [s for s in self.samples if s["phase"] == "soak"] + ([end] if end["phase"] == "drain" else [])
        rss = [s["rss_kib"] for s in soaking]
        fit = [(s["t"], s["rss_kib"]) for s in soaking if s["t"] - start["t"] >= self.args.warmup_s]
        slope = _slope_per_min(fit)
        during = [s for s in self.samples if s["t"] >= start["t"]]

        def largest(key: str) -> dict[str, Any]:
            best = {"bytes": 0, "port": None, "name": None, "t_s": None}
            for s in during:
                for port in s["ports"]:
                    if port[key] > best["bytes"]:
                        best = {"bytes": port[key], "port": port["port"], "name": port["name"], "t_s": round(s["t"] - start["t"], 1)}
            return best

        wall = end["t"] - start["t"]
        return {
            "rss_kib": {
                "before_capacity": self.marks["capacity"]["rss_kib"], "start": start["rss_kib"], "end": end["rss_kib"],
                "min": min(rss), "max": max(rss), "growth": end["rss_kib"] - start["rss_kib"], "after_drain": last["rss_kib"],
            },
            "rss_slope_kib_per_min": round(slope, 2) if slope is not None else None,
            "rss_fit": {"from_s": self.args.warmup_s, "points": len(fit)},
            "max_buffered": largest("buffered"), "max_queued": largest("queued"),
            "frames_in": last["frames_in"] - start["frames_in"], "frames_out": last["frames_out"] - start["frames_out"],
            "drops": {k: v - start["drops"].get(k, 0) for k, v in last["drops"].items()},
            "cpu_s": round(end["cpu_s"] - start["cpu_s"], 2),
            "cpu_cores": round((end["cpu_s"] - start["cpu_s"]) / wall, 3) if wall > 0 else None,
        }


def _n(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}"
    return f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"


def render(s: dict[str, Any]) -> str:
    """The summary as markdown."""
    st, cap, plan = s["settings"], s["capacity"], s["plan"]
    lines = [
        "# Soak", "",
        f"Status: **{s['status']}**" + (f": {s['interrupted']}" if s["interrupted"] else "")
        + f". Started {s['started_at']}, {s['wall_s']} s in all; {s['host']['cpus']} CPUs, load average "
        f"{s['host']['loadavg_start'][0]} at the start, {s['host']['loadavg_end'][0]} at the end.", "",
    ]
    if s["error"]:
        lines += ["```", s["error"].strip(), "```", ""]
    lines += [
        f"{st['target']}, {st['size']} B messages, broker slow-consumer policy: {st['slow_consumer']}.", "",
        "| | |", "|---|---:|",
    ]
    rows: list[tuple[str, str]] = []
    if cap:
        rows += [
            (f"capacity (1 publisher, 1 subscriber, max rate, {st['capacity_s']:g} s)", f"{cap['msg_s']:,.0f} msg/s ({cap['mb_s']} MB/s)"),
            ("capacity run: delivered", f"{cap['delivered'] * 100:.2f} % of {cap['sent']:,}"),
            ("capacity run: drops", ", ".join(f"{k} {v:,}" for k, v in cap["drops"].items() if v) or "none"),
        ]
    if plan:
        rows += [
            (f"rate planned ({st['fraction']:g} x capacity)", f"{plan['rate_msg_s']:,.0f} msg/s"),
            ("publishers x subscribers per stream", f"{plan['publishers']} x {plan['subscribers_per_stream']}, "
             f"one message every {plan['interval_ms']:.4g} ms per publisher"),
        ]
    soak, broker = s.get("soak"), s.get("broker")
    if soak and broker:
        lat = soak["latency_us"]
        rss = broker["rss_kib"]
        rows += [
            ("rate sent", f"{soak['sent_rate_msg_s']:,.0f} msg/s"),
            ("duration", f"{soak['duration_s']} s (asked {st['duration_s']:g} s)"),
            (f"sent (counted by the {soak['sent_counted_by']})", _n(soak["sent"])),
            (f"deliveries expected (x {st['subscribers']})", _n(soak["expected_deliveries"])),
            ("received", f"{_n(soak['received'])} ({soak['subscribers_reporting']} subscribers reporting)"),
            ("lost", _n(soak["lost"])),
            ("delivered", f"{soak['delivered_pct']:.4f} %" if soak["delivered_pct"] is not None else "n/a"),
            ("duplicates, out of order", f"{soak['duplicates']}, {soak['out_of_order']}"),
            ("latency p50 / p99 / max (worst subscriber; of the sampled messages)", f"{_n(lat['p50'])} / {_n(lat['p99'])} / {_n(lat['max'])} µs"),
            ("broker RSS start / end / min / max", " / ".join(f"{rss[k] / 1024:.1f}" for k in ("start", "end", "min", "max")) + " MiB"),
            ("broker RSS growth (end - start)", f"{rss['growth']:+,} KiB"),
            (f"broker RSS slope (least squares after {st['warmup_s']:g} s, {broker['rss_fit']['points']} samples)",
             _n(broker["rss_slope_kib_per_min"], " KiB/min")),
            ("broker RSS before the capacity run, after the drain", f"{rss['before_capacity'] / 1024:.1f}, {rss['after_drain'] / 1024:.1f} MiB"),
            ("max buffered on a port", _largest(broker["max_buffered"])),
            ("max queued on a port", _largest(broker["max_queued"])),
            ("drops (soak and drain)", ", ".join(f"{k} {v:,}" for k, v in broker["drops"].items() if v) or "none"),
            ("broker frames in / out", f"{broker['frames_in']:,} / {broker['frames_out']:,}"),
            ("broker CPU", f"{_n(broker['cpu_cores'])} cores ({broker['cpu_s']} s)"),
            ("drained at the end", {True: "yes", False: "no (timed out)", None: "n/a"}[soak["drained"]]),
        ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", f"Samples: {s['samples']}, one JSON line each in `{s['files']['samples.jsonl']}`.", ""]
    return "\n".join(lines)


def _largest(best: dict[str, Any]) -> str:
    if not best["bytes"]:
        return "0 B"
    return f"{best['bytes']:,} B (port {best['port']} {best['name']}, at {best['t_s']} s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/soak.py",
        description="Soak one dcp broker: measure its capacity, then run at a fraction of it for a long while, "
        "sampling the broker's memory, queues and drop counters every second; a summary at the end. "
        "Not part of CI; it judges nothing (exit 0 when it ran, 1 when a process died or the broker stopped "
        "answering, 130 after Ctrl-C).",
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of the soak phase (default 600)")
    parser.add_argument("--fraction", type=float, default=0.5, help="rate of the soak as a fraction of the measured capacity (default 0.5)")
    parser.add_argument("--size", type=int, default=1024, help="message size in bytes, at least 10 (default 1024)")
    parser.add_argument("--capacity-s", type=float, default=5.0, help="seconds of the max-rate capacity run (default 5)")
    parser.add_argument("--subscribers", type=int, default=2, help="subscribers per stream, one topology number naming them all (default 2)")
    parser.add_argument(
        "--min-interval-ms", type=float, default=0.02,
        help="the shortest send interval one publisher is given (ms); a rate that needs less is split over "
        "several publishers, each with its own stream and subscribers (default 0.02: 50000 msg/s each)",
    )
    parser.add_argument(
        "--slow-consumer", choices=SLOW_CONSUMER_POLICIES, default=None,
        help="the broker's slow-consumer policy (default: the broker's own, drop-newest)",
    )
    parser.add_argument("--warmup-s", type=float, default=30.0, help="the RSS slope is fitted from this many seconds into the soak (default 30)")
    parser.add_argument(
        "--stats-timeout", type=float, default=5.0, help="seconds the broker has to answer a stats request before the run fails (default 5)"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"folder for samples.jsonl, soak.md and soak.json (default {DEFAULT_OUT})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.size < 10:
        parser.error("--size must be at least 10 (the send-time stamp)")
    if args.duration <= 0 or args.capacity_s <= 0 or args.min_interval_ms <= 0 or args.stats_timeout <= 0:
        parser.error("--duration, --capacity-s, --min-interval-ms and --stats-timeout must be positive")
    if not 0 < args.fraction <= 1:
        parser.error("--fraction must be in (0, 1]")
    if args.subscribers < 1 or args.subscribers > 60:
        parser.error("--subscribers must be 1 to 60 (one broker has 64 ports)")
    return run(Soak(args).main())


if __name__ == "__main__":
    sys.exit(main())
