"""The orchestrator's durable state in sqlite, so a restart recovers what it knew.

Registries (brokers, data agents), deployed pipelines, stage assignments and the
epoch and number of every stream.  Big integers (keys, X) are stored as decimal text
or bytes, lists as JSON.  Writes run synchronously on the orchestrator's loop (the
write-ahead log is copied into the file by :meth:`Store.checkpoint`, off the loop): on
their own, each is its own transaction; within :meth:`Store.begin` ... :meth:`Store.commit`
(a planning round, which spans several loop iterations) or :meth:`Store.transaction`,
they share one, so that thousands of routes cost one commit.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._guard import safe

__all__ = ["Store"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS brokers (
    name TEXT PRIMARY KEY, key TEXT NOT NULL, address TEXT NOT NULL, ports INTEGER NOT NULL, links TEXT NOT NULL, keys TEXT
);
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY, capabilities TEXT NOT NULL, consumes TEXT NOT NULL, produces TEXT NOT NULL,
    broker_key TEXT NOT NULL, port INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pipelines (name TEXT PRIMARY KEY, spec TEXT NOT NULL, deployed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    pipeline TEXT NOT NULL, element TEXT NOT NULL, agent TEXT NOT NULL, PRIMARY KEY (pipeline, element, agent)
);
CREATE TABLE IF NOT EXISTS streams (
    producer TEXT NOT NULL, topic TEXT NOT NULL, epoch INTEGER NOT NULL, x BLOB NOT NULL, consumers TEXT NOT NULL,
    PRIMARY KEY (producer, topic)
);
"""


class Store:
    """One sqlite database file (``":memory:"`` keeps nothing across restarts)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA wal_autocheckpoint=0")  # see checkpoint()
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(brokers)")}
        if "keys" not in columns:  # a file from before key layouts
            self._db.execute("ALTER TABLE brokers ADD COLUMN keys TEXT")

    def close(self) -> None:
        """Commit what a round left open, and close."""
        self.commit()
        self._db.close()

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file, on a connection of its own.

        For a worker thread: a checkpoint writes and syncs the file (30 ms and more for
        a few MB), which a commit on the loop would otherwise do every 1000 pages.
        """
        if self.path == ":memory:":
            return
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    # -- transactions -----------------------------------------------------------

    def begin(self) -> None:
        """Open a transaction that the writes from now on share, until :meth:`commit`
        (nothing if one is open)."""
        if not self._db.in_transaction:
            self._db.execute("BEGIN")

    def commit(self) -> None:
        if self._db.in_transaction:
            self._db.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """The writes of the block in one transaction, or in the one already open."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- writes ---------------------------------------------------------------

    def save_broker(
        self, name: str, key: int, address: str, ports: int, links: list[dict[str, Any]], keys: list[int] | None = None
    ) -> None:
        """``keys``: the broker's whole key layout, when it has more than ``key``."""
        self._db.execute(
            "INSERT OR REPLACE INTO brokers (name, key, address, ports, links, keys) VALUES (?, ?, ?, ?, ?, ?)",
            (name, str(key), address, ports, json.dumps(links), None if keys is None else json.dumps([str(k) for k in keys])),
        )

    def delete_broker(self, name: str) -> None:
        self._db.execute("DELETE FROM brokers WHERE name = ?", (name,))

    def save_agent(
        self, name: str, capabilities: list[str], consumes: list[str], produces: list[str], broker_key: int, port: int
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO agents VALUES (?, ?, ?, ?, ?, ?)",
            (name, json.dumps(capabilities), json.dumps(consumes), json.dumps(produces), str(broker_key), port),
        )

    def delete_agent(self, name: str) -> None:
        """Forget an agent's record (gone for longer than the grace period); its streams stay."""
        self._db.execute("DELETE FROM agents WHERE name = ?", (name,))

    def save_pipeline(self, name: str, spec: dict[str, Any], deployed_at: float) -> None:
        self._db.execute("INSERT OR REPLACE INTO pipelines VALUES (?, ?, ?)", (name, json.dumps(spec), deployed_at))

    def delete_pipeline(self, name: str) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM pipelines WHERE name = ?", (name,))
            self._db.execute("DELETE FROM assignments WHERE pipeline = ?", (name,))

    def save_assignment(self, pipeline: str, element: str, agent: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO assignments VALUES (?, ?, ?)", (pipeline, element, agent))

    def delete_assignment(self, pipeline: str, element: str, agent: str) -> None:
        self._db.execute("DELETE FROM assignments WHERE pipeline = ? AND element = ? AND agent = ?", (pipeline, element, agent))

    def save_streams(self, streams: Iterable[tuple[str, str, int, int, list[str]]]) -> None:
        """(producer, topic, epoch, x, consumers) of each stream, in one statement."""
        self._db.executemany(
            "INSERT OR REPLACE INTO streams VALUES (?, ?, ?, ?, ?)",
            (
                (producer, topic, epoch, x.to_bytes((x.bit_length() + 7) // 8, "big"), json.dumps(consumers))
                for producer, topic, epoch, x, consumers in streams
            ),
        )

    # -- reads ----------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        """Everything, as plain dicts and lists.  A row that does not decode (text that is
        not JSON, a key that is not a number) is logged and left out; the orchestrator
        checks the types and values of the rest."""
        db = self._db
        return {
            "brokers": _decoded("broker", db.execute("SELECT name, key, address, ports, links, keys FROM brokers ORDER BY name"),
                                lambda n, k, a, p, links, keys: {
                                    "name": n, "key": int(k), "address": a, "ports": p, "links": json.loads(links),
                                    "keys": None if keys is None else [int(key) for key in json.loads(keys)],
                                }),
            "agents": _decoded("agent", db.execute("SELECT * FROM agents ORDER BY name"),
                               lambda n, c, cs, pr, bk, port: {
                                   "name": n, "capabilities": json.loads(c), "consumes": json.loads(cs), "produces": json.loads(pr),
                                   "broker_key": int(bk), "port": port,
                               }),
            "pipelines": _decoded("pipeline", db.execute("SELECT * FROM pipelines ORDER BY deployed_at, name"),
                                  lambda n, spec, at: {"name": n, "spec": json.loads(spec), "deployed_at": at}),
            "assignments": [tuple(row) for row in db.execute("SELECT * FROM assignments ORDER BY pipeline, element, agent")],
            "streams": _decoded("stream", db.execute("SELECT * FROM streams ORDER BY producer, topic"),
                                lambda p, t, e, x, c: {
                                    "producer": p, "topic": t, "epoch": e, "x": int.from_bytes(x, "big"), "consumers": json.loads(c),
                                }),
        }


def _decoded(kind: str, rows: Iterable[tuple[Any, ...]], decode: Callable[..., dict[str, Any]]) -> list[dict[str, Any]]:
    """``decode(*row)`` of every row that decodes; the others logged and left out."""
    records = []
    for row in rows:
        try:
            records.append(decode(*row))
        except (ValueError, TypeError) as exc:
            log.error("ignoring a stored %s row that does not decode (%s): %s", kind, safe(exc), safe(row, 512))
    return records
