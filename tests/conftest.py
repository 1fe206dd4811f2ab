"""Fixtures: brokers in this process and in their own processes, on OS-chosen ports."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import uvloop

from dcp.broker import Broker
from dcp.config import BrokerConfig

from .fuzzing import SCALE as FUZZ_SCALE, executed as fuzz_executed

T = TypeVar("T")
LISTENING = re.compile(r"listening on (\S+):(\d+) mode=(\w+) key=(\d+)")


def pytest_asyncio_loop_factories(config, item):  # type: ignore[no-untyped-def]
    """Every async test runs on uvloop, the loop dcp runs on."""
    return {"uvloop": uvloop.new_event_loop}


def pytest_configure(config):  # type: ignore[no-untyped-def]
    config.addinivalue_line("markers", "fuzz: a fuzz test; DCP_FUZZ_EXAMPLES=N gives it N inputs (tests/fuzzing.py)")


def pytest_terminal_summary(terminalreporter):  # type: ignore[no-untyped-def]
    """One line with the inputs the fuzz tests really ran, to quote."""
    if fuzz_executed:
        counts = ", ".join(f"{family} {count}" for family, count in sorted(fuzz_executed.items()))
        terminalreporter.write_line(
            f"fuzz inputs executed (DCP_FUZZ_EXAMPLES={FUZZ_SCALE or 'unset'}): {counts}; "
            f"session CPU {time.process_time():.0f} s"
        )


def insecure_unless_secured(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` of a test daemon, with ``insecure=True`` unless they say otherwise or
    ``require_token``: the tests of other things run as every daemon did before the
    secure default (tests/test_secure_default.py tests that)."""
    return {"insecure": not settings.get("require_token"), **settings}


def insecure_flag(args: tuple[str, ...] | list[str]) -> list[str]:
    """``--insecure`` for a test daemon's command line, unless it has ``--require-token`` or
    ``--insecure`` already, or ``--secure`` (taken out: the secure default is wanted)."""
    return [] if {"--require-token", "--insecure", "--secure"} & set(args) else ["--insecure"]


@pytest.fixture
async def make_broker() -> AsyncIterator[Callable[..., "asyncio.Future[Broker]"]]:
    """``await make_broker(**config)``: a started in-process broker on a free port
    (``insecure`` unless the settings say otherwise, or ask for ``require_token``)."""
    brokers: list[Broker] = []

    async def make(**settings: object) -> Broker:
        broker = Broker(BrokerConfig(**{"listen": "127.0.0.1:0", **insecure_unless_secured(settings)}))
        await broker.start()
        brokers.append(broker)
        return broker

    yield make  # type: ignore[misc]
    for broker in brokers:
        await broker.close()


@pytest.fixture
async def broker(make_broker) -> Broker:  # type: ignore[no-untyped-def]
    return await make_broker()


def url_of(broker: Broker) -> str:
    host, port = broker.address
    return f"dcp://{host}:{port}"


async def admin_stats(url: str, token: str | None = None) -> dict[str, Any]:
    """A broker's stats, as ``dcp stats`` gets them: over an admin connection (an agent's is refused)."""
    import dcp

    async with dcp.connect(url, role="admin", name="test-admin", token=token, reconnect=False) as admin:
        return await admin.stats()


@dataclass(kw_only=True)
class DaemonProcess:
    """A dcp daemon process (broker, orchestrator) whose stderr is drained into ``log``."""

    process: subprocess.Popen[str]
    host: str
    port: int
    log: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def __post_init__(self) -> None:
        # Drain stderr all the time, so a chatty daemon never blocks on a full pipe.
        assert self.process.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stderr,), daemon=True)
        self._reader.start()

    def _read(self, stream) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            self.log.append(line)

    @property
    def url(self) -> str:
        return f"dcp://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, str]:
        """Signal the daemon; return its exit code and what it logged after the start."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=timeout)
        assert self._reader is not None
        self._reader.join(timeout)
        return self.process.returncode, "".join(self.log)


def start_daemon(argv: list[str], listening: re.Pattern[str]) -> tuple[subprocess.Popen[str], re.Match[str], list[str]]:
    """Run ``python -m dcp ARGV``; return once its stderr shows ``listening`` (the match, the lines so far)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dcp", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    seen = []
    for line in process.stderr:  # ends when the process exits
        seen.append(line)
        match = listening.search(line)
        if match:
            return process, match, seen
    process.wait()
    raise AssertionError(f"dcp {argv[0]} exited with {process.returncode} before listening:\n{''.join(seen)}")


@dataclass(kw_only=True)
class BrokerProcess(DaemonProcess):
    mode: str
    key: int


def start_broker_process(*args: str) -> BrokerProcess:
    """Run ``python -m dcp broker --listen 127.0.0.1:0 ARGS`` and wait for its listening line
    (with ``--insecure``, as :func:`insecure_flag` says)."""
    flags = [*insecure_flag(args), *(arg for arg in args if arg != "--secure")]
    process, match, seen = start_daemon(["broker", "--listen", "127.0.0.1:0", *flags], LISTENING)
    host, port, mode, key = match.groups()
    return BrokerProcess(process=process, host=host, port=int(port), mode=mode, key=int(key), log=seen)


def _kill(proc: Any) -> None:
    proc.process.kill()
    proc.process.wait()


def tracked(start: Callable[..., T], finish: Callable[[T], None] = _kill) -> Iterator[Callable[..., T]]:
    """A fixture body: ``start`` processes; at teardown ``finish`` those still running."""
    started: list[T] = []

    def start_tracked(*args: Any, **kwargs: Any) -> T:
        proc = start(*args, **kwargs)
        started.append(proc)
        return proc

    yield start_tracked
    for proc in started:
        if proc.process.poll() is None:  # type: ignore[attr-defined]
            finish(proc)


@pytest.fixture
def broker_process() -> Iterator[Callable[..., BrokerProcess]]:
    yield from tracked(start_broker_process)


@dataclass
class ClusterProcess:
    """A ``dcp cluster`` process and the overlay it printed (see ``dcp.cluster``)."""

    process: subprocess.Popen[str]
    overlay: dict
    log: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def url(self, broker: str) -> str:
        return "dcp://" + self.overlay["brokers"][broker]["address"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        return self.process.returncode, "".join(self.log)


def insecure_flag_for_cluster(args: tuple[str, ...]) -> list[str]:
    """``--insecure`` for ``dcp cluster`` unless ARGS give ``--secret-file`` (before ``--``)."""
    own = args[: args.index("--")] if "--" in args else args
    return [] if {"--secret-file", "--insecure"} & set(own) else ["--insecure"]


def start_cluster_process(*args: str) -> ClusterProcess:
    """Run ``python -m dcp cluster --json ARGS`` and read the overlay line it prints."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dcp", "cluster", "--json", "--log-level", "info", *insecure_flag_for_cluster(args), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log: list[str] = []

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    assert process.stdout is not None
    line = process.stdout.readline()  # the overlay, or "" if the launcher failed
    if not line:
        process.wait()
        reader.join(5)
        raise AssertionError(f"dcp cluster exited with {process.returncode}:\n{''.join(log)}")
    return ClusterProcess(process, json.loads(line), log, reader)


@pytest.fixture
def cluster_process() -> Iterator[Callable[..., ClusterProcess]]:
    yield from tracked(start_cluster_process, ClusterProcess.stop)  # the launcher stops its brokers
