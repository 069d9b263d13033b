"""Array metadata in SQLite (the data dir's array.db).

Every change is one transaction; the database is in WAL mode with
synchronous=FULL, so a change that returned survives kill -9 and power loss.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import NoSpace

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pools (
    name TEXT PRIMARY KEY,
    capacity INTEGER NOT NULL CHECK (capacity > 0),
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS luns (
    name TEXT PRIMARY KEY,
    pool TEXT NOT NULL REFERENCES pools(name),
    size INTEGER NOT NULL CHECK (size > 0),
    state TEXT NOT NULL,
    created REAL NOT NULL,
    uuid TEXT  -- the LUN's identity (new_lun_id), advertised to NBD clients
);
-- a LUN fenced for a takeover (Array.fence_lun); goes with its LUN
CREATE TABLE IF NOT EXISTS fences (
    lun TEXT PRIMARY KEY REFERENCES luns(name) ON DELETE CASCADE,
    token TEXT NOT NULL,
    holder TEXT NOT NULL,
    since REAL NOT NULL
);
"""


@dataclass(slots=True)
class PoolRow:
    name: str
    capacity: int
    created: float


@dataclass(slots=True)
class FenceRow:
    lun: str
    token: str
    holder: str
    since: float


@dataclass(slots=True)
class LunRow:
    name: str
    pool: str
    size: int
    state: str  # creating, ready, deleting (and, later, migration states)
    created: float
    #: the LUN's identity: made when it is created, never reused (another LUN of the
    #: same name, made later or on another array, has another one)
    uuid: str


def new_lun_id() -> str:
    return str(uuid.uuid4())


class Metadata:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        if "uuid" not in {r[1] for r in self.db.execute("PRAGMA table_info(luns)")}:
            self.db.execute("ALTER TABLE luns ADD COLUMN uuid TEXT")  # a data dir from before ids
        # LUNs of such a data dir get theirs now, once: kept from then on
        for (name,) in self.db.execute("SELECT name FROM luns WHERE uuid IS NULL").fetchall():
            self.update_lun(name, uuid=new_lun_id())

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction; a file system too full to take it is NoSpace (507), not a 500:
        a pool larger than the file system under it (thin pools may be) fills it with
        hosts' writes, and then every LUN create, grow or delete answered "internal
        error", and a restart said the database was damaged and to restore a backup."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self._rollback()
                raise
            try:
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()  # a COMMIT that failed may leave it open: every BEGIN after would fail
                raise
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode != sqlite3.SQLITE_FULL:
                raise
            raise NoSpace(
                f"cannot record the change in {self.path}: {e} (its file system is full); "
                "free space there and retry"
            ) from None

    def _rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def close(self) -> None:
        self.db.close()

    # ---- meta
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # ---- pools
    def pools(self) -> list[PoolRow]:
        return [
            PoolRow(*r) for r in self.db.execute("SELECT name, capacity, created FROM pools ORDER BY name")
        ]

    def upsert_pool(self, name: str, capacity: int) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO pools(name, capacity, created) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET capacity=excluded.capacity",
                (name, capacity, time.time()),
            )

    # ---- luns
    def luns(self) -> list[LunRow]:
        return [
            LunRow(*r)
            for r in self.db.execute("SELECT name, pool, size, state, created, uuid FROM luns ORDER BY name")
        ]

    def insert_lun(self, name: str, pool: str, size: int, state: str) -> LunRow:
        row = LunRow(name, pool, size, state, time.time(), new_lun_id())
        with self.transaction() as db:
            db.execute(
                "INSERT INTO luns(name, pool, size, state, created, uuid) VALUES (?, ?, ?, ?, ?, ?)",
                (row.name, row.pool, row.size, row.state, row.created, row.uuid),
            )
        return row

    def update_lun(
        self, name: str, also: Callable[[sqlite3.Connection], None] | None = None, **fields: object
    ) -> None:
        """``also`` runs in the same transaction: a record that must appear with the change."""
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE luns SET {cols} WHERE name=?", (*fields.values(), name))
            if also is not None:
                also(db)

    def delete_lun(self, name: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM luns WHERE name=?", (name,))

    # ---- fences
    def fences(self) -> list[FenceRow]:
        return [FenceRow(*r) for r in self.db.execute("SELECT lun, token, holder, since FROM fences")]

    def insert_fence(self, row: FenceRow) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO fences(lun, token, holder, since) VALUES (?, ?, ?, ?)",
                (row.lun, row.token, row.holder, row.since),
            )

    def delete_fence(self, lun: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM fences WHERE lun=?", (lun,))
