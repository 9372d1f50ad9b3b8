"""The agent's state on disk: one SQLite file in DATADIR. Each change is one
transaction, committed with a full sync before the agent answers or acts on
it, so a crash at any point leaves every record as it was or as it became,
never half of each. Records are kept as the API's JSON; reads are served
from the copy in memory."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from crucible.agent.model import Region, RunningSnapshot

DB_NAME = "agent.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS regions (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS running_snapshots (
    region_id TEXT NOT NULL, name TEXT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (region_id, name));
CREATE TABLE IF NOT EXISTS processes (
    key TEXT PRIMARY KEY, pid INTEGER NOT NULL, start_time INTEGER NOT NULL);
"""


class StoreError(Exception):
    """The state file cannot be read or written."""


@dataclass(frozen=True)
class ProcessRecord:
    """A downstairs the agent started: found again after the agent restarts
    by pid, and told from a later process with the same pid by its start
    time (clock ticks after boot, /proc/PID/stat)."""

    pid: int
    start_time: int


class Store:
    def __init__(self, datadir: Path) -> None:
        self.path = datadir / DB_NAME
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.executescript(_SCHEMA)
            self.regions = {
                rid: Region.from_json(json.loads(rec))
                for rid, rec in self.db.execute("SELECT id, record FROM regions")
            }
            self.snapshots = {
                (rid, name): RunningSnapshot.from_json(json.loads(rec))
                for rid, name, rec in self.db.execute(
                    "SELECT region_id, name, record FROM running_snapshots"
                )
            }
            self.processes = {
                key: ProcessRecord(pid, start)
                for key, pid, start in self.db.execute("SELECT key, pid, start_time FROM processes")
            }
        except (sqlite3.Error, ValueError, KeyError) as e:
            raise StoreError(f"{self.path}: {e}") from None

    def _write(self, sql: str, *args: object) -> None:
        try:
            with self.db:  # one transaction, committed (and synced) on leaving
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute(sql, args)
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: {e}") from None

    def put_region(self, r: Region) -> None:
        self._write(
            "INSERT OR REPLACE INTO regions (id, record) VALUES (?, ?)",
            r.id, json.dumps(r.to_json()),
        )  # fmt: skip
        self.regions[r.id] = r

    def put_snapshot(self, s: RunningSnapshot) -> None:
        self._write(
            "INSERT OR REPLACE INTO running_snapshots (region_id, name, record) VALUES (?, ?, ?)",
            s.id, s.name, json.dumps(s.to_json()),
        )  # fmt: skip
        self.snapshots[(s.id, s.name)] = s

    def put_process(self, key: str, rec: ProcessRecord) -> None:
        self._write(
            "INSERT OR REPLACE INTO processes (key, pid, start_time) VALUES (?, ?, ?)",
            key, rec.pid, rec.start_time,
        )  # fmt: skip
        self.processes[key] = rec

    def drop_process(self, key: str) -> None:
        self._write("DELETE FROM processes WHERE key = ?", key)
        self.processes.pop(key, None)

    def close(self) -> None:
        self.db.close()
