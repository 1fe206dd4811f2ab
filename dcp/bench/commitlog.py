"""dcp with a commit log: dcp's stateful broker, persistence on (target ``dcp-commitlog``).

The article compares dcp with RocketMQ running with persistence: every message is
appended to an on-disk commit log before it is delivered.  The reference queues of
``dcp bench`` are established persistent queues (NATS JetStream, RabbitMQ quorum
queues, Redis Streams: :mod:`dcp.bench.targets`); this target is the same idea built
from dcp's own parts, so the difference it shows is the design (a table lookup and a
disk write per read) and not the language or the event loop: a
:class:`dcp.broker.Broker` in stateful mode whose connections append every run of
data frames they forward to an append-only log (``os.write``/``os.writev`` on an
``O_APPEND`` descriptor: one system call per read that carries data, into the page
cache) *before* writing them to the subscribers.  The log is flushed to the disk
(``fdatasync``) every ``fsync_interval_ms`` by a timer on the event loop (500 ms by
default: RocketMQ's default is asynchronous flush), or after every write with
``fsync_interval_ms=0`` (synchronous flush).

What goes in the log is exactly what goes out: the frames as forwarded (hop limit
already decremented), once per run of frames whatever the number of subscribers;
frames that no subscriber takes are not forwarded and not logged.  The log is a
sequence of segment files named by their starting offset (``%020d.log``, as
RocketMQ names its commit log files); a segment is closed at ``segment_bytes`` and
at most ``keep_segments`` (2) are kept, so a long benchmark cannot fill the disk.

How it hooks in: ``Broker`` builds every connection with ``new_connection()``; the
subclass returns a :class:`LoggingConnection`, whose one overridden method,
``_emit``, is the one place every forwarded chunk goes through.

``python -m dcp.bench.commitlog --listen 127.0.0.1:0 --log-dir DIR`` logs the same
``dcp broker listening on HOST:PORT mode=stateful key=K ports=P`` line as ``dcp
broker`` and stops on SIGTERM/SIGINT with exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .. import logs
from ..broker import Broker, BrokerConnection
from ..config import BrokerConfig

__all__ = ["CommitLog", "CommitLogBroker", "LoggingConnection", "main"]

log = logging.getLogger("dcp.bench.commitlog")

DEFAULT_SEGMENT_BYTES = 256 * 1024 * 1024
DEFAULT_FSYNC_INTERVAL_MS = 500.0
_IOV_MAX = 1024
_sync = getattr(os, "fdatasync", os.fsync)


class CommitLog:
    """An append-only log of segment files in ``directory``."""

    def __init__(
        self,
        directory: str | Path,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync_interval_ms: float = DEFAULT_FSYNC_INTERVAL_MS,
        keep_segments: int = 2,
    ) -> None:
        if segment_bytes < 1:
            raise ValueError("segment_bytes must be positive")
        if fsync_interval_ms < 0:
            raise ValueError("fsync_interval_ms must not be negative")
        if keep_segments < 1:
            raise ValueError("keep_segments must be at least 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.fsync_interval_s = fsync_interval_ms / 1000
        self.keep_segments = keep_segments
        self.offset = 0  # bytes appended since the start (all segments)
        self.writes = 0
        self.syncs = 0
        self.segments: list[Path] = []
        self._fd = -1
        self._segment_size = 0
        self._dirty = False
        self._timer: asyncio.TimerHandle | None = None
        self._open_segment()

    def _open_segment(self) -> None:
        path = self.directory / f"{self.offset:020d}.log"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
        self._segment_size = 0
        self.segments.append(path)
        while len(self.segments) > self.keep_segments:
            old = self.segments.pop(0)
            try:
                old.unlink()
            except FileNotFoundError:
                pass

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the periodic flush (nothing to start with ``fsync_interval_ms=0``)."""
        if self.fsync_interval_s > 0 and self._timer is None:
            loop = loop or asyncio.get_running_loop()
            self._timer = loop.call_later(self.fsync_interval_s, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sync()
        self._timer = loop.call_later(self.fsync_interval_s, self._tick, loop)

    def append(self, chunks: tuple[Any, ...] | list[Any], size: int) -> None:
        """Append ``chunks`` (``size`` bytes) with one system call (writev for several)."""
        fd = self._fd
        if len(chunks) == 1:
            written = os.write(fd, chunks[0])
        else:
            written = os.writev(fd, chunks[:_IOV_MAX])
        if written != size:  # a short write (disk full, signal, > IOV_MAX pieces): finish it
            self._finish(chunks, written)
        self.writes += 1
        self.offset += size
        self._segment_size += size
        if self.fsync_interval_s == 0:
            _sync(fd)
            self.syncs += 1
        else:
            self._dirty = True
        if self._segment_size >= self.segment_bytes:
            self._roll()

    def _finish(self, chunks: tuple[Any, ...] | list[Any], done: int) -> None:
        data = memoryview(b"".join(chunks))[done:]
        while data:
            n = os.write(self._fd, data)
            data = data[n:]

    def _roll(self) -> None:
        if self._dirty:
            _sync(self._fd)
            self.syncs += 1
            self._dirty = False
        os.close(self._fd)
        self._open_segment()

    def sync(self) -> None:
        if self._dirty and self._fd >= 0:
            _sync(self._fd)
            self.syncs += 1
            self._dirty = False

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1

    def size_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.segments if path.exists())


class LoggingConnection(BrokerConnection):
    """A broker connection that appends what it forwards to the commit log first."""

    broker: CommitLogBroker  # a CommitLogBroker makes these (new_connection)

    def _emit(self, mask: int, chunks: tuple[Any, ...], size: int, frames: int) -> None:
        self.broker.commit_log.append(chunks, size)
        BrokerConnection._emit(self, mask, chunks, size, frames)


class CommitLogBroker(Broker):
    """A stateful dcp broker with a commit log (see the module's docstring)."""

    def __init__(
        self,
        config: BrokerConfig | None = None,
        *,
        log_dir: str | Path,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync_interval_ms: float = DEFAULT_FSYNC_INTERVAL_MS,
    ) -> None:
        config = config or BrokerConfig()
        if config.mode != "stateful":
            config = dataclasses.replace(config, mode="stateful")
        super().__init__(config)
        self.commit_log = CommitLog(log_dir, segment_bytes=segment_bytes, fsync_interval_ms=fsync_interval_ms)

    async def start(self) -> None:
        self.commit_log.start(asyncio.get_running_loop())
        await super().start()

    def new_connection(self, link: Any = None) -> BrokerConnection:
        return LoggingConnection(self, link)

    async def close(self) -> None:
        await super().close()
        self.commit_log.close()

    def summary(self) -> str:
        cl = self.commit_log
        return f"{super().summary()}; commit log: {cl.offset} bytes in {cl.writes} writes, {cl.syncs} syncs"


_OWN_FLAGS = ("mode", "peers", "orchestrator")  # fixed here: stateful, no links, no orchestrator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dcp.bench.commitlog",
        description="dcp with a commit log, a target of dcp bench: a stateful dcp broker that appends every forwarded frame to a commit log.",
    )
    parser.add_argument("--log-dir", required=True, help="folder of the commit log segments")
    parser.add_argument("--fsync-interval-ms", type=float, default=DEFAULT_FSYNC_INTERVAL_MS,
                        help="flush the log to disk this often; 0: after every write (default: 500)")
    parser.add_argument("--segment-bytes", type=int, default=DEFAULT_SEGMENT_BYTES,
                        help="roll to a new segment past this size; two segments are kept (default: 256 MiB)")
    for field in dataclasses.fields(BrokerConfig):  # the broker's own settings, as `dcp broker` spells them
        if field.name in _OWN_FLAGS:
            continue
        meta = dict(field.metadata)
        help_text = meta.pop("help")
        meta.pop("flag", None)
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=argparse.SUPPRESS, help=help_text, **meta)
    return parser


async def _serve(queue: CommitLogBroker) -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    await queue.start()
    await queue.serve_forever(stop.wait)


def main(argv: list[str] | None = None) -> int:
    from .._loop import run
    from ..errors import ConfigError

    args = build_parser().parse_args(argv)
    names = {f.name for f in dataclasses.fields(BrokerConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    overrides["mode"] = "stateful"
    try:
        config = BrokerConfig.from_sources(None, overrides)
        queue = CommitLogBroker(config, log_dir=args.log_dir, segment_bytes=args.segment_bytes, fsync_interval_ms=args.fsync_interval_ms)
        logs.configure(config.log_level, config.log_format, config.log_config, daemon=config.name or "dcp-commitlog")
    except (ConfigError, ValueError, OSError) as exc:
        print(f"dcp-commitlog: {exc}", file=sys.stderr)
        return 2
    run(_serve(queue))
    return 0


if __name__ == "__main__":
    sys.exit(main())
