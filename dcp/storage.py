"""``dcp.storage``: the storage function (DSF), a data agent that keeps frames in sqlite.

A :class:`StorageAgent` is a :class:`dcp.DataAgent` that stores every frame it gets:

* the frames of the topic patterns given as ``topics`` (declared at registration, so
  the orchestrator routes those topics to it whatever pipelines are deployed), and
* the frames a pipeline sink with ``capability = "store"`` assigned to it consumes.

A frame that both reach is stored once.  Each frame is one row of
``frames(seq, topic, msg_id, published_ns, stored_ns, payload)``: ``published_ns`` is
the publisher's clock from the frame header, ``stored_ns`` this agent's clock when it
got the frame.  Rows are buffered and written in one transaction every
``batch_frames`` frames or ``flush_interval_s`` seconds, whichever comes first, so
storing keeps up with the data plane; ``stop()`` writes what is buffered before it
closes the file, so a clean stop loses no frame that reached the handler.

:meth:`StorageAgent.replay` publishes a stored time range again, in publish-time
order, on a topic of its own.  Payloads go out byte for byte as they were stored:
the DSF does not know (and must not need to know) the payload's codec, and a
consumer of a replay runs the same code on it as on the live stream, with results
comparable to the live ones.  What a replay cannot keep is the header: a replayed
frame carries a new message id and the replaying agent's clock; the original times
stay in the store (:meth:`query`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .agent import DataAgent
from .client import Message
from .errors import ConfigError, DcpError, DcpTimeout
from .patterns import topic_matches, validate_pattern, validate_topic

__all__ = ["StorageAgent", "STORE_CAPABILITY"]

#: The capability a pipeline sink names to be stored by a StorageAgent.
STORE_CAPABILITY = "store"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    msg_id INTEGER NOT NULL,
    published_ns INTEGER NOT NULL,
    stored_ns INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS frames_published_ns ON frames (published_ns);
"""

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


def _to_i64(value: int) -> int:
    """A 64-bit header field (unsigned on the wire) as sqlite's signed INTEGER."""
    return value - _U64 if value > _I64_MAX else value


def _to_u64(value: int) -> int:
    return value + _U64 if value < 0 else value


def _open(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    if path != ":memory:":
        db.execute("PRAGMA journal_mode=WAL")  # commits append to the log: cheap, and readers don't block
        db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_SCHEMA)
    db.create_function("dcp_matches", 2, lambda pattern, topic: topic_matches(pattern, topic), deterministic=True)
    db.commit()
    return db


class StorageAgent(DataAgent):
    """A data agent storing frames in the sqlite file ``path``; see the module docstring.

    ``topics``: topic patterns always stored.  ``batch_frames``/``flush_interval_s``:
    when buffered rows are written.  Other keyword arguments go to :class:`DataAgent`.
    """

    def __init__(
        self,
        name: str,
        path: str | Path,
        *,
        topics: str | Sequence[str] = (),
        batch_frames: int = 512,
        flush_interval_s: float = 0.05,
        **agent_options: Any,
    ) -> None:
        super().__init__(name, **agent_options)
        if batch_frames < 1:
            raise ConfigError("batch_frames must be at least 1")
        if flush_interval_s <= 0:
            raise ConfigError("flush_interval_s must be positive")
        self.path = str(path)
        self.topics = (topics,) if isinstance(topics, str) else tuple(topics)
        for pattern in self.topics:
            validate_pattern(pattern)
        self.batch_frames = batch_frames
        self.flush_interval_s = flush_interval_s
        #: Frames stored by this agent object (written or still buffered).
        self.stored = 0
        #: Frames published by :meth:`replay`.
        self.replayed = 0
        self._rows: list[tuple[str, int, int, int, bytes]] = []
        self._last: Message | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._db: sqlite3.Connection | None = _open(self.path)
        if self.topics:
            self.process(self.topics)(self._store)
        self.capability(STORE_CAPABILITY)(self._store_element)

    # -- storing --------------------------------------------------------------------------

    async def _store(self, msg: Message) -> None:
        # A frame matching both the declared topics and an assigned "store" sink is
        # dispatched to both with the same object: keep it once.
        if msg is self._last:
            return
        self._last = msg
        self._rows.append((msg.topic, _to_i64(msg.msg_id), _to_i64(msg.timestamp_ns), time.time_ns(), bytes(msg.payload)))
        self.stored += 1
        if len(self._rows) >= self.batch_frames:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval_s, self.flush)

    async def _store_element(self, msg: Message, params: dict[str, Any]) -> None:
        await self._store(msg)

    def flush(self) -> None:
        """Write the buffered frames in one transaction."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._rows or self._db is None:
            return
        rows, self._rows = self._rows, []
        with self._db:  # one transaction; rolled back (and re-raised) on error
            self._db.executemany(
                "INSERT INTO frames (topic, msg_id, published_ns, stored_ns, payload) VALUES (?, ?, ?, ?, ?)", rows
            )

    # -- life cycle -------------------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        if self._db is None:
            self._db = _open(self.path)
        await super().start(timeout)

    async def stop(self) -> None:
        """Stop the agent, write what is buffered and close the file."""
        await super().stop()
        self.close()

    def close(self) -> None:
        """Write what is buffered and close the file (:meth:`count` and :meth:`query` still work)."""
        self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The open file, with everything buffered written; or a short-lived connection once closed."""
        if self._db is not None:
            self.flush()
            yield self._db
            return
        db = _open(self.path)
        try:
            yield db
        finally:
            db.close()

    # -- reading ------------------------------------------------------------------------------

    def count(self, topic_pattern: str | None = None) -> int:
        """Frames stored, all or those whose topic matches ``topic_pattern``."""
        where, args = self._where(None, None, topic_pattern)
        with self._reading() as db:
            return int(db.execute(f"SELECT COUNT(*) FROM frames{where}", args).fetchone()[0])

    def query(
        self, start_ns: int | None = None, end_ns: int | None = None, topic_pattern: str | None = None
    ) -> list[tuple[str, int, int, bytes]]:
        """Stored frames published in ``[start_ns, end_ns)`` (None: unbounded) whose topic
        matches ``topic_pattern``, as ``(topic, msg_id, published_ns, payload)`` in
        publish-time order (store order among equal times)."""
        where, args = self._where(start_ns, end_ns, topic_pattern)
        with self._reading() as db:
            rows = db.execute(
                f"SELECT topic, msg_id, published_ns, payload FROM frames{where} ORDER BY published_ns, seq", args
            ).fetchall()
        return [(topic, _to_u64(msg_id), _to_u64(ns), bytes(payload)) for topic, msg_id, ns, payload in rows]

    @staticmethod
    def _where(start_ns: int | None, end_ns: int | None, topic_pattern: str | None) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if start_ns is not None:
            clauses.append("published_ns >= ?")
            args.append(_to_i64(start_ns))
        if end_ns is not None:
            clauses.append("published_ns < ?")
            args.append(_to_i64(end_ns))
        if topic_pattern is not None:
            validate_pattern(topic_pattern)
            clauses.append("dcp_matches(?, topic)")
            args.append(topic_pattern)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args

    # -- replaying ----------------------------------------------------------------------------

    async def replay(
        self,
        start_ns: int | None,
        end_ns: int | None,
        into: str,
        topic_pattern: str | None = None,
        rate_hz: float | None = None,
        *,
        consumers: int = 1,
        route_timeout_s: float = 5.0,
    ) -> int:
        """Publish the frames :meth:`query` returns for this range on topic ``into``,
        payloads unchanged, at most ``rate_hz`` a second (None: as fast as the connection
        takes them); return how many were published.

        A new ``into`` is declared to the orchestrator (re-registering), and the replay
        starts once ``into`` routes to ``consumers`` agents.

        Raises:
            DcpTimeout: no such route within ``route_timeout_s``.
        """
        validate_topic(into)
        if rate_hz is not None and rate_hz <= 0:
            raise ConfigError("rate_hz must be positive")
        if not self._running or self.orchestrator is None:
            raise DcpError("start the storage agent before replaying")
        rows = self.query(start_ns, end_ns, topic_pattern)
        await self.declare_produces(into)
        try:
            await self.wait_route(into, consumers, timeout=route_timeout_s)
        except asyncio.TimeoutError:
            raise DcpTimeout(
                f"{into!r} does not route to {consumers} consumer(s) after {route_timeout_s} s "
                f"(no such route from the orchestrator at {self.orchestrator_url})"
            ) from None
        began = time.monotonic()  # not loop.time(): uvloop's is cached, to the millisecond
        published = 0
        for i, (_, _, _, payload) in enumerate(rows):
            if rate_hz is not None:
                while (delay := began + i / rate_hz - time.monotonic()) > 0:
                    await asyncio.sleep(delay)  # may wake a little early: check again
            if await self.publish(into, payload):
                published += 1
        self.replayed += published
        return published
