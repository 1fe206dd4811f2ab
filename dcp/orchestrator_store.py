"""The orchestrator's durable state in sqlite, so a restart recovers what it knew.

Registries (brokers, data agents), deployed pipelines, stage assignments and the
epoch and number of every stream.  Big integers (keys, X) are stored as decimal text
or bytes, lists as JSON.  Writes are small and rare (control-plane events), so they
run synchronously on the orchestrator's loop, each in its own transaction.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

__all__ = ["Store"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS brokers (
    name TEXT PRIMARY KEY, key TEXT NOT NULL, address TEXT NOT NULL, ports INTEGER NOT NULL, links TEXT NOT NULL
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
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, *args: Any) -> None:
        with self._db:
            self._db.execute(sql, args)

    # -- writes ---------------------------------------------------------------

    def save_broker(self, name: str, key: int, address: str, ports: int, links: list[dict[str, Any]]) -> None:
        self._write("INSERT OR REPLACE INTO brokers VALUES (?, ?, ?, ?, ?)", name, str(key), address, ports, json.dumps(links))

    def delete_broker(self, name: str) -> None:
        self._write("DELETE FROM brokers WHERE name = ?", name)

    def save_agent(
        self, name: str, capabilities: list[str], consumes: list[str], produces: list[str], broker_key: int, port: int
    ) -> None:
        self._write(
            "INSERT OR REPLACE INTO agents VALUES (?, ?, ?, ?, ?, ?)",
            name, json.dumps(capabilities), json.dumps(consumes), json.dumps(produces), str(broker_key), port,
        )

    def save_pipeline(self, name: str, spec: dict[str, Any], deployed_at: float) -> None:
        self._write("INSERT OR REPLACE INTO pipelines VALUES (?, ?, ?)", name, json.dumps(spec), deployed_at)

    def delete_pipeline(self, name: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM pipelines WHERE name = ?", (name,))
            self._db.execute("DELETE FROM assignments WHERE pipeline = ?", (name,))

    def save_assignment(self, pipeline: str, element: str, agent: str) -> None:
        self._write("INSERT OR IGNORE INTO assignments VALUES (?, ?, ?)", pipeline, element, agent)

    def delete_assignment(self, pipeline: str, element: str, agent: str) -> None:
        self._write("DELETE FROM assignments WHERE pipeline = ? AND element = ? AND agent = ?", pipeline, element, agent)

    def save_stream(self, producer: str, topic: str, epoch: int, x: int, consumers: list[str]) -> None:
        self._write(
            "INSERT OR REPLACE INTO streams VALUES (?, ?, ?, ?, ?)",
            producer, topic, epoch, x.to_bytes((x.bit_length() + 7) // 8, "big"), json.dumps(consumers),
        )

    # -- reads ----------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        """Everything, as plain dicts and lists."""
        db = self._db
        return {
            "brokers": [
                {"name": n, "key": int(k), "address": a, "ports": p, "links": json.loads(links)}
                for n, k, a, p, links in db.execute("SELECT * FROM brokers ORDER BY name")
            ],
            "agents": [
                {
                    "name": n, "capabilities": json.loads(c), "consumes": json.loads(cs), "produces": json.loads(pr),
                    "broker_key": int(bk), "port": port,
                }
                for n, c, cs, pr, bk, port in db.execute("SELECT * FROM agents ORDER BY name")
            ],
            "pipelines": [
                {"name": n, "spec": json.loads(spec), "deployed_at": at}
                for n, spec, at in db.execute("SELECT * FROM pipelines ORDER BY deployed_at, name")
            ],
            "assignments": [tuple(row) for row in db.execute("SELECT * FROM assignments ORDER BY pipeline, element, agent")],
            "streams": [
                {"producer": p, "topic": t, "epoch": e, "x": int.from_bytes(x, "big"), "consumers": json.loads(c)}
                for p, t, e, x, c in db.execute("SELECT * FROM streams ORDER BY producer, topic")
            ],
        }
