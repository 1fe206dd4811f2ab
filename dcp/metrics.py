"""Metrics in the Prometheus text format (version 0.0.4), with no I/O and no dependency.

A daemon describes what it counts as :class:`Family` values each time it is scraped
(its counters live where they are counted, not in a registry), and :func:`render`
writes them out.  :class:`Histogram` is the one kind that keeps state: buckets of
observations, for the orchestrator's planning time.  :func:`process_families` reads
the standard ``process_*`` metrics of this process from ``/proc`` where there is one.
"""

from __future__ import annotations

import math
import os
import re
import resource
import sys
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["CONTENT_TYPE", "Family", "Histogram", "render", "ProcessMetrics", "build_info"]

#: What a /metrics answer is.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KINDS = ("counter", "gauge", "histogram")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    """One metric: its name (a counter's ends in ``_total``), kind, help, and samples
    as (name suffix, labels, value); add them with :meth:`add`."""

    name: str
    kind: str
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"invalid metric name {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"a counter's name ends in _total: {self.name!r}")

    def add(self, value: float, labels: Labels = (), suffix: str = "") -> Family:
        for label, _ in labels:
            if not _LABEL.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r}")
        self.samples.append((suffix, labels, value))
        return self


class Histogram:
    """Observations counted into cumulative buckets (upper bounds, seconds or any unit)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be increasing and distinct")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: over every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # a bound is inclusive: le
        self.sum += value
        self.count += 1

    def family(self, name: str, help: str) -> Family:
        family = Family(name, "histogram", help)
        cumulative = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            cumulative += count
            family.add(cumulative, (("le", _number(bound)),), "_bucket")
        family.add(self.sum, suffix="_sum")
        family.add(self.count, suffix="_count")
        return family


def render(families: Iterable[Family]) -> bytes:
    """The text exposition of ``families``: HELP, TYPE, then each sample on a line."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        base = family.name
        for suffix, labels, value in family.samples:
            name = base + suffix
            if labels:
                inner = ",".join(f'{label}="{_escape_value(text)}"' for label, text in labels)
                lines.append(f"{name}{{{inner}}} {_number(value)}")
            else:
                lines.append(f"{name} {_number(value)}")
    lines.append("")
    return "\n".join(lines).encode()


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def build_info(daemon: str, version: str) -> Family:
    """``dcp_build_info``: 1, labelled with what runs."""
    return Family("dcp_build_info", "gauge", "what runs: the dcp version, the daemon and the Python version").add(
        1, (("version", version), ("daemon", daemon), ("python", ".".join(map(str, sys.version_info[:3]))))
    )


class ProcessMetrics:
    """CPU seconds, resident memory, open and allowed file descriptors, and the start
    time of this process, under the names every Prometheus client library uses; where
    ``/proc`` is missing, only what the standard library tells (CPU and the fd limit).

    Counting open descriptors lists ``/proc/self/fd``: about a millisecond per thousand
    connections, so it is done at most every :attr:`fd_sample_s` seconds.
    """

    def __init__(self, proc: str = "/proc/self", fd_sample_s: float = 10.0) -> None:
        self.proc = proc
        self.fd_sample_s = fd_sample_s
        self._fds = 0
        self._fds_at = float("-inf")
        self._start: float | None = None

    def families(self) -> list[Family]:
        times = os.times()
        families = [
            Family("process_cpu_seconds_total", "counter", "user and system CPU time spent, seconds").add(times.user + times.system),
            Family("process_max_fds", "gauge", "the open-file limit (soft)").add(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
        ]
        try:
            with open(f"{self.proc}/statm", "rb") as fh:
                resident_pages = int(fh.read().split()[1])
            now = time.monotonic()
            if now - self._fds_at >= self.fd_sample_s:
                self._fds, self._fds_at = len(os.listdir(f"{self.proc}/fd")) - 1, now  # less the one listdir opened
            if self._start is None:
                self._start = self._start_time()
        except (OSError, ValueError, IndexError, StopIteration):
            return families
        return families + [
            Family("process_resident_memory_bytes", "gauge", "resident memory, bytes").add(resident_pages * resource.getpagesize()),
            Family("process_open_fds", "gauge", f"open file descriptors (counted at most every {self.fd_sample_s:g} s)").add(self._fds),
            Family("process_start_time_seconds", "gauge", "start time of the process, seconds since the epoch").add(self._start),
        ]

    def _start_time(self) -> float:
        with open(f"{self.proc}/stat", "rb") as fh:  # the command may hold spaces and parentheses: split after the last ')'
            start_ticks = int(fh.read().rpartition(b")")[2].split()[19])
        with open("/proc/stat", "rb") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith(b"btime "))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
