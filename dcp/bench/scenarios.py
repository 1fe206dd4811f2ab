"""The benchmark scenarios: the article's Figures 7, 8 and 9, and the routing cost.

Every measurement runs the target (a dcp broker, the raw relay; an external broker or
reference queue is already running, see ``bench/peers``) and one publisher and one
subscriber, each in its own process (``dcp.bench.worker``), on this host.  Latency
is the subscriber's clock minus the send time the publisher wrote into the payload.
Cells run one after another, never side by side, so they do not share the CPUs.

* latency (Figure 7): per size, ``rounds`` rounds; in each, every target in turn
  (the order rotates per round) gets a warm-up, then its share of ``count`` messages
  at a fixed interval; the rounds are pooled into p50/p90/p99/max and the success
  rate, so a slow spell of the host hits every target alike.
* success (Figure 8): per size and send interval, as many messages as fit in a
  bounded time (at least ``min_messages``); the fraction received.
* throughput (Figure 9): N independent brokers, each with its own publisher and
  subscriber sending as fast as flow control allows for a fixed time; delivered MB/s
  (goodput) over the whole set, the delivered fraction, and MB/s per CPU core used
  (the CPU time of every process of the cell, brokers included, over the wall time).
  Each cell runs ``runs`` times and keeps the run of median MB/s; every run's MB/s is
  kept too (``runs_mb_s``), for the spread.  A dcp target is measured in two modes
  (:func:`modes`): ``lossless`` (the subscriber asks for ``--slow-consumer pause``) and
  ``overload`` (the broker's default policy, which drops); every other target runs
  once, in its own natural mode.  dcp-stateless sweeps the broker counts lossless.
* routing: the forwarding decision per tree size (``dcp.bench.routing_cost``).
* requests: request/reply round trips, dcp on one broker and across two, beside NATS
  (``dcp.bench.requests``).

Progress goes out as numbered lines with an ETA (:class:`Steps`).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from . import requests
from .report import BEST_EFFORT, LOSSLESS, OVERLOAD, PRIMARY, fmt_size
from .targets import IN_TREE, PUBSUB, QUEUES, Server, availability, start_server

__all__ = ["Profile", "PROFILES", "FIGURES", "Steps", "modes", "plan", "run", "evaluate_targets"]

KB = 1024
MB = 1024 * 1024
FIGURES = ("latency", "success", "throughput", "routing", "requests")
DCP = tuple(t for t in IN_TREE if t.startswith("dcp-"))  # measured in both modes
_DCP_MODES = {
    LOSSLESS: "the subscriber asks for --slow-consumer pause: the broker stops reading the publisher while the "
    "subscriber's buffer is full, so nothing may be lost",
    OVERLOAD: "the broker's default policy: it drops the newest frames while the subscriber's port buffer is full; "
    "goodput with the delivered fraction",
}
#: The one mode of every other target, and how it comes about.
_NATURAL = {
    "relay": (LOSSLESS, "the subscriber registers as pausing: the relay stops reading the publishers while its "
              "buffer is full (TCP backpressure)"),
    "nats": (BEST_EFFORT, "core NATS, at most once: the server cuts off a subscriber that falls behind"),
    "redis": (BEST_EFFORT, "pub/sub, at most once: the server disconnects a subscriber past its output buffer limit"),
    "mqtt": (BEST_EFFORT, "QoS 0, at most once"),
    "rabbitmq": (BEST_EFFORT, "transient messages to a consumer without acks, no publisher confirms: at most once"),
    "zenoh": (LOSSLESS, "puts with congestion control BLOCK on a reliable link: a full queue on the way makes the "
              "publisher wait"),
    **{queue: (LOSSLESS, "a persistent queue: lossless by acks") for queue in QUEUES},
    "mqtt-gateway": (BEST_EFFORT, "MQTT QoS 0 into dcp mqtt and out to an MQTT subscriber of the same gateway: at most "
                     "once, a subscriber past its queue (client_queue) loses its oldest messages, counted"),
    "mqtt-gateway-dcp": (BEST_EFFORT, "MQTT QoS 0 into dcp mqtt, then the broker to a DataAgent: at most once (the "
                         "broker's default policy drops for a port that falls behind)"),
}
_PAUSE = ("--slow-consumer", "pause")  # dcp's and the relay's subscribers: lossless


def modes(target: str) -> dict[str, str]:
    """The modes ``target``'s throughput is measured in, each with how it comes about."""
    if target in DCP:
        return dict(_DCP_MODES)
    mode, how = _NATURAL[target]
    return {mode: how}


@dataclass(frozen=True)
class Profile:
    name: str
    latency_sizes: tuple[int, ...]
    latency_count: int
    latency_warmup: int
    latency_interval_ms: float
    latency_rounds: int
    success_intervals_ms: tuple[float, ...]
    success_sizes: tuple[int, ...]
    success_cell_s: float
    success_min_messages: int
    throughput_brokers: tuple[int, ...]
    throughput_sizes: tuple[int, ...]
    throughput_duration_s: float
    throughput_runs: int
    throughput_idle_s: float  # a subscriber is done this long after its last message
    routing_sizes: tuple[int, ...]
    routing_repeat: int
    requests_sizes: tuple[int, ...]
    requests_count: int
    requests_warmup: int


PROFILES = {
    "full": Profile(
        "full",
        latency_sizes=(10, 100, KB, 10 * KB, 100 * KB, MB),
        latency_count=500,
        latency_warmup=50,
        latency_interval_ms=5.0,
        latency_rounds=3,
        success_intervals_ms=(2, 3, 4, 5, 10, 50, 100, 300, 500, 1000),
        success_sizes=(KB, 10 * KB, 100 * KB, MB),
        success_cell_s=1.5,
        success_min_messages=4,
        throughput_brokers=(1, 2, 5, 10),
        throughput_sizes=(KB, 10 * KB, 64 * KB, 128 * KB),
        throughput_duration_s=3.0,
        throughput_runs=3,
        throughput_idle_s=1.0,
        routing_sizes=(1, 2, 5, 10, 30, 100),
        routing_repeat=11,
        requests_sizes=(100, 100 * KB),
        requests_count=2000,
        requests_warmup=200,
    ),
    "quick": Profile(
        "quick",
        latency_sizes=(10, KB, 100 * KB),
        latency_count=40,
        latency_warmup=5,
        latency_interval_ms=2.0,
        latency_rounds=1,
        success_intervals_ms=(5, 50),
        success_sizes=(KB, 100 * KB),
        success_cell_s=0.2,
        success_min_messages=3,
        throughput_brokers=(1, 2),
        throughput_sizes=(KB, 128 * KB),
        throughput_duration_s=0.5,
        throughput_runs=1,
        throughput_idle_s=0.3,
        routing_sizes=(1, 2, 5),
        routing_repeat=3,
        requests_sizes=(100, 100 * KB),
        requests_count=50,
        requests_warmup=5,
    ),
}

STARTUP_S = 0.6  # about what starting a cell's worker processes takes on a small machine


def _throughput_plan(profile: Profile, target: str) -> list[tuple[int, str]]:
    """(brokers, mode) of each row of ``target``'s throughput cells."""
    one = profile.throughput_brokers[0]
    if target not in DCP:
        return [(one, mode) for mode in modes(target)]
    sweep = profile.throughput_brokers if target == PRIMARY else (one,)
    return [*((brokers, LOSSLESS) for brokers in sweep), (one, OVERLOAD)]


def plan(figures: Sequence[str], profile: Profile, measured: Sequence[str]) -> dict[str, tuple[int, float]]:
    """Per figure: its steps (one progress line each) over the ``measured`` targets, and a
    guess of the seconds one takes, for the ETA until the figure's own steps say better."""
    p = profile
    intervals = p.success_intervals_ms
    counts = {
        "latency": (
            len(p.latency_sizes) * p.latency_rounds * len(measured),
            STARTUP_S + (p.latency_warmup + p.latency_count / p.latency_rounds) * p.latency_interval_ms / 1000,
        ),
        "success": (
            len(measured) * len(p.success_sizes) * len(intervals),
            STARTUP_S + sum(max(p.success_cell_s, p.success_min_messages * i / 1000) for i in intervals) / len(intervals),
        ),
        "throughput": (
            sum(len(_throughput_plan(p, t)) for t in measured) * len(p.throughput_sizes),
            p.throughput_runs * (STARTUP_S + p.throughput_duration_s + p.throughput_idle_s),
        ),
        "routing": (len(p.routing_sizes), 0.1 * p.routing_repeat),
        "requests": (
            2 * ("dcp-stateless" in measured) + ("nats" in measured),
            STARTUP_S * 2 + (p.requests_warmup + p.requests_count) * len(p.requests_sizes) * 0.0005,
        ),
    }
    return {figure: counts[figure] for figure in figures}


def _clock(seconds: float) -> str:
    """``42s``, ``6m12s``, ``1h05m``."""
    s = max(int(seconds + 0.5), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


class Steps:
    """Numbered progress lines over a whole run: ``[37/412] what (elapsed 6m12s, ETA 21m04s)``.

    The figures' steps differ in length, so the ETA takes each figure's steps left at the
    mean of its own steps so far, or at the guess of :func:`plan` before it has begun.
    """

    def __init__(self, planned: dict[str, tuple[int, float]], emit: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.left = {figure: steps for figure, (steps, _) in planned.items()}
        self.guess = {figure: seconds for figure, (_, seconds) in planned.items()}
        self.total = sum(self.left.values())
        self.done = 0
        self.emit = emit
        self.clock = clock
        self.started = clock()
        self.figure = ""
        self.figure_started = self.started
        self.figure_done = 0

    def begin(self, figure: str) -> None:
        self.figure, self.figure_started, self.figure_done = figure, self.clock(), 0

    def __call__(self, what: str) -> None:
        """The next step of the current figure begins."""
        now = self.clock()
        figure = self.figure
        mean = (now - self.figure_started) / self.figure_done if self.figure_done else self.guess[figure]
        eta = sum(left * (mean if f == figure else self.guess[f]) for f, left in self.left.items())
        self.done += 1
        self.figure_done += 1
        self.left[figure] -= 1
        self.emit(f"[{self.done}/{self.total}] {what} (elapsed {_clock(now - self.started)}, ETA {_clock(eta)})")

    def drop(self, steps: int) -> None:
        """``steps`` of the current figure will not run (their target failed)."""
        self.left[self.figure] -= steps
        self.total -= steps


# -- one publisher/subscriber pair --------------------------------------------------------


def _worker(role: str, target: str, address: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dcp.bench.worker", role, "--target", target, "--address", address, "--topic", "bench", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _json_line(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    """The first line a worker prints (it exits if it cannot get ready, which ends the read)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"{what} exited with {proc.returncode} before reporting: {proc.stderr.read() if proc.stderr else ''}")
    return json.loads(line)


def _finish(proc: subprocess.Popen[str], what: str, timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"{what} did not finish within {timeout:.0f} s: {err.strip()[-500:]}") from None
    lines = [line for line in out.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} exited with {proc.returncode}: {err.strip()[-500:]}")
    return json.loads(lines[-1])


def run_pair(
    target: str, server: Server, *, size: int, count: int, interval_ms: float | None = None,
    duration_s: float | None = None, keep_latencies: bool = False, idle_timeout_s: float = 1.0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One subscriber, then one publisher; both results once both are done."""
    address = server.address
    sub_args = [*server.client_args, "--expect", str(count), "--idle-timeout", str(idle_timeout_s), "--max-time", str(60 + (duration_s or 0))]
    if keep_latencies:
        sub_args.append("--keep-latencies")
    sub = _worker("sub", target, address, *sub_args)
    try:
        ready = _json_line(sub, f"{target} subscriber")
        pub_args = [*server.client_args, "--size", str(size), "--count", str(count)]
        if interval_ms is not None:
            pub_args += ["--interval-ms", str(interval_ms)]
        if duration_s is not None:
            pub_args += ["--duration", str(duration_s)]
        if ready.get("route"):
            pub_args += ["--route", str(ready["route"])]
        pub = _worker("pub", target, address, *pub_args)
        sent = _finish(pub, f"{target} publisher", 120 + (duration_s or 0) + count * (interval_ms or 0) / 1000)
        got = _finish(sub, f"{target} subscriber", 60 + idle_timeout_s)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    return sent, got


# -- the figures ---------------------------------------------------------------------------------


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"p50_us": 0.0, "p90_us": 0.0, "p99_us": 0.0, "max_us": 0.0}

    def pick(q: float) -> float:
        return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 1)

    return {"p50_us": pick(0.50), "p90_us": pick(0.90), "p99_us": pick(0.99), "max_us": round(ordered[-1], 1)}


class _Servers:
    """One server per target, started on first use and stopped at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: dict[str, Server] = {}

    def get(self, target: str) -> Server:
        if target not in self.running:
            self.running[target] = start_server(target, self.workdir)
        return self.running[target]

    def stop(self) -> None:
        for server in self.running.values():
            server.stop()
        self.running.clear()


def latency(profile: Profile, targets: Sequence[str], skipped: dict[str, str], workdir: Path, steps: Steps) -> dict[str, Any]:
    rounds = profile.latency_rounds
    per_round = -(-profile.latency_count // rounds)
    measured = [t for t in targets if t not in skipped]
    cells: list[dict[str, Any]] = []
    servers = _Servers(workdir)
    try:
        for size in profile.latency_sizes:
            pooled: dict[str, list[float]] = {t: [] for t in measured}
            received = dict.fromkeys(measured, 0)
            duplicates = dict.fromkeys(measured, 0)
            failed: dict[str, str] = {}
            for round_ in range(rounds):
                shift = round_ % max(len(measured), 1)
                for target in measured[shift:] + measured[:shift]:
                    if target in failed:
                        continue
                    steps(f"latency {target} {fmt_size(size)}, round {round_ + 1} of {rounds}")
                    try:
                        _, got = run_pair(
                            target, servers.get(target), size=size, count=profile.latency_warmup + per_round,
                            interval_ms=profile.latency_interval_ms, keep_latencies=True,
                        )
                    except RuntimeError as exc:
                        failed[target] = f"failed: {exc}"
                        steps.drop(rounds - round_ - 1)
                        continue
                    pooled[target] += got.get("latencies_us", [])[profile.latency_warmup:]  # arrival order
                    received[target] += max(got["received"] - profile.latency_warmup, 0)
                    duplicates[target] += got.get("duplicates", 0)
            for target in targets:
                cell: dict[str, Any] = {"target": target, "size": size}
                why = skipped.get(target) or failed.get(target)
                if why:
                    cells.append({**cell, "skipped": why})
                    continue
                sent = per_round * rounds
                cells.append({
                    **cell, "sent": sent, "received": received[target], "success": round(received[target] / sent, 4),
                    **_percentiles(pooled[target]), "duplicates": duplicates[target],
                })
    finally:
        servers.stop()
    return {
        "sizes": list(profile.latency_sizes), "count": per_round * rounds, "rounds": rounds,
        "warmup": profile.latency_warmup, "interval_ms": profile.latency_interval_ms, "cells": cells,
    }


def success(profile: Profile, targets: Sequence[str], skipped: dict[str, str], workdir: Path, steps: Steps) -> dict[str, Any]:
    cells: list[dict[str, Any]] = []
    servers = _Servers(workdir)
    try:
        for target in targets:
            for size in profile.success_sizes:
                for interval in profile.success_intervals_ms:
                    cell: dict[str, Any] = {"target": target, "size": size, "interval_ms": interval}
                    if target in skipped:
                        cells.append({**cell, "skipped": skipped[target]})
                        continue
                    count = max(profile.success_min_messages, int(profile.success_cell_s * 1000 / interval))
                    steps(f"success {target} {fmt_size(size)} every {interval} ms x {count}")
                    try:
                        sent, got = run_pair(  # idle for two intervals and a second before it counts as the end
                            target, servers.get(target), size=size, count=count, interval_ms=interval,
                            idle_timeout_s=1.0 + 2 * interval / 1000,
                        )
                    except RuntimeError as exc:
                        cells.append({**cell, "skipped": f"failed: {exc}"})
                        continue
                    received = min(got["received"], sent["sent"])
                    cells.append({**cell, "sent": sent["sent"], "received": received,
                                  "success": round(received / max(sent["sent"], 1), 4)})
    finally:
        servers.stop()
    return {
        "intervals_ms": list(profile.success_intervals_ms), "sizes": list(profile.success_sizes),
        "cell_s": profile.success_cell_s, "min_messages": profile.success_min_messages, "cells": cells,
    }


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _throughput_cell(target: str, brokers: int, mode: str, size: int, profile: Profile, workdir: Path) -> dict[str, Any]:
    """``brokers`` servers, each with its own publisher and subscriber, all at once."""
    duration_s = profile.throughput_duration_s
    sub_args = ["--idle-timeout", str(profile.throughput_idle_s), "--max-time", str(duration_s + 60)]
    if mode == LOSSLESS and target in (*DCP, "relay"):
        sub_args += _PAUSE
    cpu_before = _children_cpu_s()
    servers = [start_server(target, workdir) for _ in range(brokers)]
    count = 10**9  # the publishers stop at the duration
    subs, pubs = [], []
    try:
        for server in servers:
            sub = _worker("sub", target, server.address, *server.client_args, *sub_args)
            subs.append((sub, _json_line(sub, f"{target} subscriber")))
        started = time.monotonic()
        for (sub, ready), server in zip(subs, servers):
            args = [*server.client_args, "--size", str(size), "--count", str(count), "--duration", str(duration_s)]
            if ready.get("route"):
                args += ["--route", str(ready["route"])]
            pubs.append(_worker("pub", target, server.address, *args))
        sent = [_finish(pub, f"{target} publisher", duration_s + 120) for pub in pubs]
        got = [_finish(sub, f"{target} subscriber", 120) for sub, _ in subs]
        wall = time.monotonic() - started
    finally:
        for proc in [*pubs, *(sub for sub, _ in subs)]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for server in servers:
            server.stop()
    cpu = _children_cpu_s() - cpu_before
    first = min(g["first_recv_ns"] for g in got if g["received"])
    last = max(g["last_recv_ns"] for g in got if g["received"])
    span = max((last - first) / 1e9, 1e-9)
    received_bytes = sum(g["bytes"] for g in got)
    n_sent = sum(s["sent"] for s in sent)
    n_received = sum(min(g["received"], s["sent"]) for g, s in zip(got, sent))
    mb_s = received_bytes / MB / span
    cores = cpu / wall if wall else 0.0
    return {
        "sent": n_sent, "received": n_received, "delivered": round(n_received / max(n_sent, 1), 4), "mb_s": round(mb_s, 1),
        "msg_s": round(n_received / span, 0), "cpu_s": round(cpu, 2), "cores_used": round(cores, 2),
        "mb_s_per_core": round(mb_s / cores, 1) if cores else 0.0,
    }


def throughput(profile: Profile, targets: Sequence[str], skipped: dict[str, str], workdir: Path, steps: Steps) -> dict[str, Any]:
    """Every target with one broker in each of its modes; dcp-stateless lossless over every broker count too."""
    cells: list[dict[str, Any]] = []
    runs = profile.throughput_runs
    for target in targets:
        for brokers, mode in _throughput_plan(profile, target):
            for size in profile.throughput_sizes:
                cell: dict[str, Any] = {"target": target, "mode": mode, "brokers": brokers, "size": size}
                if target in skipped:
                    cells.append({**cell, "skipped": skipped[target]})
                    continue
                steps(f"throughput {target} x{brokers} {fmt_size(size)} {mode} for {profile.throughput_duration_s} s x {runs}")
                try:
                    measured = [_throughput_cell(target, brokers, mode, size, profile, workdir) for _ in range(runs)]
                except (RuntimeError, ValueError) as exc:
                    cells.append({**cell, "skipped": f"failed: {exc}"})
                    continue
                measured.sort(key=lambda run: run["mb_s"])
                cells.append({**cell, **measured[len(measured) // 2], "runs_mb_s": [run["mb_s"] for run in measured]})
    return {
        "brokers": list(profile.throughput_brokers), "sizes": list(profile.throughput_sizes),
        "duration_s": profile.throughput_duration_s, "runs": runs, "modes": {target: modes(target) for target in targets},
        "cells": cells,
    }


def routing(profile: Profile, steps: Steps) -> dict[str, Any]:
    from .routing_cost import measure

    rows = []
    for n in profile.routing_sizes:
        steps(f"routing cost, tree of {n} broker(s)")
        row = measure(n, profile.routing_repeat)
        rows.append({**row, "ratio": round(row["stateless_ns"] / row["stateful_ns"], 2)})
    return {"rows": rows}


# -- the run and its verdicts ------------------------------------------------------------------------


def environment(targets: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    import uvloop

    found: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for target in targets:
        ok, detail = availability(target)
        found[target] = {"available": True, "version": detail} if ok else {"available": False, "why": detail}
        if not ok:
            skipped[target] = detail
    env = {
        "cpu_count": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "platform": platform.platform(), "dcp": __version__,
        "uvloop": uvloop.__version__, "targets": found,
    }
    return env, skipped


def run(
    figures: Sequence[str], profile: Profile, targets: Sequence[str], progress: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    """Run the ``figures`` (latency, success, throughput, routing) and return the results document;
    ``progress`` gets the lines of :class:`Steps`."""
    started = time.time()
    env, skipped = environment(targets)
    steps = Steps(plan(figures, profile, [t for t in targets if t not in skipped]), progress)
    results: dict[str, Any] = {
        "profile": profile.name, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "environment": env,
    }
    with tempfile.TemporaryDirectory(prefix="dcp-bench-") as tmp:
        workdir = Path(tmp)
        for figure in figures:
            steps.begin(figure)
            if figure == "routing":
                results["routing"] = routing(profile, steps)
            elif figure == "requests":
                results["requests"] = requests.measure(
                    profile.requests_sizes, profile.requests_count, profile.requests_warmup, targets, skipped, workdir, steps,
                )
            else:
                scenario = {"latency": latency, "success": success, "throughput": throughput}[figure]
                results[figure] = scenario(profile, targets, skipped, workdir, steps)
    results["duration_s"] = round(time.time() - started, 1)
    env["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = evaluate_targets(results)
    return results


def _cells(results: dict[str, Any], figure: str) -> list[dict[str, Any]]:
    return [c for c in results.get(figure, {}).get("cells", []) if "skipped" not in c]


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Where each benchmark goal (listed below) stands, from what was measured in this run; a
    goal gets a verdict only where both of its sides were measured.  Ratios are dcp-stateless's
    figure over the other target's; throughput is judged on dcp's lossless figure."""
    verdicts: list[dict[str, Any]] = []

    def verdict(goal: str, other: str, ratios: list[tuple[int, float]], limit: float, at_least: bool = False) -> None:
        if not ratios:
            return
        size, worst = (min if at_least else max)(ratios, key=lambda item: item[1])
        measured = f"dcp / {other}: {'worst ' if len(ratios) > 1 else ''}{worst:.2f} ({fmt_size(size)})"
        verdicts.append({"goal": goal, "measured": measured, "met": worst >= limit if at_least else worst <= limit})

    lat = {(c["target"], c["size"]): c["p50_us"] for c in _cells(results, "latency")}
    dcp = {size: p50 for (target, size), p50 in sorted(lat.items()) if target == PRIMARY}

    def p50_vs(other: str, largest: float = float("inf")) -> list[tuple[int, float]]:
        return [(s, dcp[s] / lat[(other, s)]) for s in dcp if s <= largest and lat.get((other, s), 0) > 0]

    for queue in QUEUES:
        verdict(f"p50 latency of dcp-stateless <= 0.35 x {queue}'s (a reference queue: the article's \"at least 65 % below\"), "
                "every size", queue, p50_vs(queue), 0.35)
    verdict("p50 latency of dcp-stateless <= 0.35 x dcp-commitlog's (dcp with a commit log, not a reference queue), every size",
            "dcp-commitlog", p50_vs("dcp-commitlog"), 0.35)
    verdict("p50 latency of dcp-stateless <= 1.3 x the raw relay's, every size from 10 B to 100 KB", "relay", p50_vs("relay", 100 * KB), 1.3)
    for other in (*PUBSUB, "dcp-stateful"):
        verdict(f"p50 latency of dcp-stateless no worse than {other}'s, every size", other, p50_vs(other), 1.0)
    relay = {size: p50 for (target, size), p50 in lat.items() if target == "relay"}
    if all(size in side for side in (dcp, relay) for size in (10, 100 * KB)):
        grew, relay_grew = dcp[100 * KB] - dcp[10], relay[100 * KB] - relay[10]
        verdicts.append({  # copying the payload costs both alike; a relay that did not grow leaves dcp no room either
            "goal": "flat latency: dcp-stateless's p50 growth from 10 B to 100 KB <= 1.3 x the raw relay's growth",
            "measured": f"dcp {grew:+.0f} µs, relay {relay_grew:+.0f} µs"
            + (f": {grew / relay_grew:.2f} x" if relay_grew > 0 else ": the relay did not grow"),
            "met": grew <= 1.3 * max(relay_grew, 0.0),
        })
    succ = [c for c in _cells(results, "success") if c["target"] == PRIMARY and c["size"] <= MB and c["interval_ms"] >= 2]
    if succ:
        worst = min(succ, key=lambda c: c["success"])
        verdicts.append({
            "goal": "success rate 100 % for every size up to 1 MB at every interval >= 2 ms (dcp-stateless)",
            "measured": f"lowest {worst['success'] * 100:.1f} % ({fmt_size(worst['size'])} every {worst['interval_ms']} ms)",
            "met": worst["success"] >= 1.0,
        })
    one = {  # one broker; dcp's lossless cells, every other target's only mode
        (c["target"], c["size"]): c for c in _cells(results, "throughput") if c["brokers"] == 1 and c.get("mode") != OVERLOAD
    }
    for size, floor in ((KB, 228.0), (128 * KB, 714.6)):
        cell = one.get((PRIMARY, size))
        if cell:
            verdicts.append({
                "goal": f"one broker, lossless: >= {floor} MB/s at {fmt_size(size)} (the article, 80 cores)",
                "measured": f"{cell['mb_s']} MB/s, delivered {cell['delivered'] * 100:.1f} %", "met": cell["mb_s"] >= floor,
            })
    mb_s = {size: c["mb_s"] for (target, size), c in sorted(one.items()) if target == PRIMARY and c["mb_s"] > 0}

    def mb_s_vs(other: str, *sizes: int) -> list[tuple[int, float]]:
        return [(s, mb_s[s] / one[(other, s)]["mb_s"]) for s in mb_s if (other, s) in one and one[(other, s)]["mb_s"] > 0 and (not sizes or s in sizes)]

    verdict("one broker, lossless, 1 KB: dcp-stateless >= 0.8 x the raw relay's MB/s", "relay", mb_s_vs("relay", KB), 0.8, at_least=True)
    verdict("one broker, lossless, 128 KB: dcp-stateless >= 0.95 x the raw relay's MB/s", "relay", mb_s_vs("relay", 128 * KB), 0.95, at_least=True)
    verdict("one broker, 128 KB: dcp-stateless (lossless) ahead of zenoh", "zenoh", mb_s_vs("zenoh", 128 * KB), 1.0, at_least=True)
    verdict("one broker, lossless: dcp-stateless no slower than dcp-stateful, every size", "dcp-stateful", mb_s_vs("dcp-stateful"), 1.0, at_least=True)
    for other in PUBSUB:
        verdict(f"one broker: dcp-stateless (lossless) ahead of {other} ({_NATURAL[other][0]}), every size", other, mb_s_vs(other), 1.0, at_least=True)
    return verdicts
