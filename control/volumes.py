"""The volumes database (SQLite): one row per volume, every change one transaction."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("creating", "available", "in-use", "maintenance", "deleting", "error")
#: migration_status values while a migration runs (a second one is refused)
MIGRATING = ("starting", "migrating", "migrating_attachable")

SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    status TEXT NOT NULL,
    host TEXT NOT NULL,
    migration_status TEXT,
    provider_location TEXT NOT NULL DEFAULT '{}',
    attachments TEXT NOT NULL DEFAULT '[]',
    migration TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS volumes_name ON volumes(name);
CREATE INDEX IF NOT EXISTS volumes_migration_status ON volumes(migration_status);
"""


class VolumeError(Exception):
    """A volume operation was refused; the message says why and what to do."""


class Conflict(VolumeError):
    """An update's ``expect`` did not hold: another command changed the volume meanwhile."""


class DatabaseError(VolumeError):
    """The volumes database cannot be read or written (damaged, read-only, disk full, locked)."""


def database_error(path: Path, e: sqlite3.Error) -> DatabaseError:
    """What to tell the user about SQLite's error ``e`` on the volumes database ``path``."""
    text = str(e)
    if not isinstance(e, sqlite3.OperationalError) and isinstance(e, sqlite3.DatabaseError):
        # "file is not a database", "database disk image is malformed"
        return DatabaseError(
            f"the volumes database {path} is damaged ({text}); blockmig leaves it as it is: restore "
            "it from a backup (the arrays still hold every volume's LUN, named volume-ID)"
        )
    low = text.lower()
    if "full" in low or "i/o error" in low:
        hint = "its file system may be full or failing: free space there, then retry"
    elif "readonly" in low or "read-only" in low or "unable to open" in low:
        hint = f"the state dir {path.parent} and the files in it must be writable"
    elif "locked" in low or "busy" in low:
        hint = "another blockmig command kept it locked; retry"
    else:
        hint = "nothing else was changed by this step"
    return DatabaseError(f"the volumes database {path}: {text} ({hint})")


@dataclass
class Volume:
    id: str
    name: str
    size: int
    status: str
    host: str  # ARRAY@MODEL#POOL
    migration_status: str | None = None
    provider_location: dict[str, Any] = field(default_factory=dict)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    #: bookkeeping of a running migration: phase, source/target hosts, follower pid, progress
    migration: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def lun(self) -> str:
        """The LUN name on the arrays (the same on source and target)."""
        return f"volume-{self.id}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "size": self.size,
            "status": self.status,
            "host": self.host,
            "migration_status": self.migration_status,
            "provider_location": self.provider_location,
            "attachments": self.attachments,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


class VolumesDB:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(SCHEMA)
            except BaseException:
                self.db.close()
                raise
        except sqlite3.Error as e:
            raise database_error(path, e) from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors as a :class:`DatabaseError` that names the file and what to do."""
        try:
            yield
        except sqlite3.Error as e:
            raise database_error(self.path, e) from None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._errors():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back by itself (a full disk): a ROLLBACK then would
                # raise "no transaction is active" instead of the error that matters
                if self.db.in_transaction:
                    try:
                        self.db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise

    @staticmethod
    def _row(r: tuple[Any, ...]) -> Volume:
        return Volume(
            id=r[0],
            name=r[1],
            size=r[2],
            status=r[3],
            host=r[4],
            migration_status=r[5],
            provider_location=json.loads(r[6]),
            attachments=json.loads(r[7]),
            migration=json.loads(r[8]),
            created_at=r[9],
            updated_at=r[10],
        )

    _COLS = (
        "id, name, size, status, host, migration_status, provider_location, attachments, "
        "migration, created_at, updated_at"
    )

    def create(self, name: str, size: int, host: str) -> Volume:
        now = time.time()
        v = Volume(uuid.uuid4().hex[:12], name, size, "creating", host, None, created_at=now, updated_at=now)
        with self.transaction() as db:
            db.execute(
                f"INSERT INTO volumes({self._COLS}) VALUES (?, ?, ?, ?, ?, ?, '{{}}', '[]', '{{}}', ?, ?)",
                (v.id, v.name, v.size, v.status, v.host, None, now, now),
            )
        return v

    def get(self, ref: str) -> Volume:
        """By id, then name, then id prefix; a clear error when none or several match.
        A name wins over an id prefix: a volume named ``c1`` stays reachable by its name
        when another's id begins with c1 (both matched: "use the id")."""
        q = f"SELECT {self._COLS} FROM volumes WHERE "
        with self._errors():
            rows = self.db.execute(q + "id=?", (ref,)).fetchall()
            if not rows:
                rows = self.db.execute(q + "name=?", (ref,)).fetchall()
            if not rows and ref:  # a prefix as typed (LIKE would take % and _ as wildcards)
                rows = self.db.execute(q + "substr(id, 1, ?)=?", (len(ref), ref)).fetchall()
        if not rows:
            raise VolumeError(f"no volume {ref!r} (see `blockmig list`)")
        if len(rows) > 1:
            raise VolumeError(f"{len(rows)} volumes match {ref!r}: use the id")
        return self._row(rows[0])

    def migrating(self) -> list[Volume]:
        """The volumes whose migration runs (what every command's recover() looks at: not
        every volume, which made each command O(volumes))."""
        marks = ", ".join("?" * len(MIGRATING))
        with self._errors():
            rows = self.db.execute(
                f"SELECT {self._COLS} FROM volumes WHERE migration_status IN ({marks}) ORDER BY created_at",
                MIGRATING,
            ).fetchall()
        return [self._row(r) for r in rows]

    def list(self) -> list[Volume]:
        with self._errors():
            rows = self.db.execute(f"SELECT {self._COLS} FROM volumes ORDER BY created_at").fetchall()
        return [self._row(r) for r in rows]

    def update(self, vid: str, expect: dict[str, Any] | None = None, **fields: Any) -> Volume:
        """Change fields in one transaction; with ``expect``, only if those columns still
        hold those values (None matches NULL, a tuple any of its values)."""
        for k in ("provider_location", "attachments", "migration"):
            if k in fields:
                fields[k] = json.dumps(fields[k])
        fields["updated_at"] = time.time()
        with self.transaction() as db:
            if expect:
                row = db.execute(f"SELECT {self._COLS} FROM volumes WHERE id=?", (vid,)).fetchone()
                if row is None:
                    raise VolumeError(f"volume {vid} is gone")
                cur = self._row(row).__dict__
                for k, want in expect.items():
                    ok = cur[k] in want if isinstance(want, tuple) else cur[k] == want
                    if not ok:
                        raise Conflict(f"volume {vid}: {k} is {cur[k]!r}, expected {want!r}")
            cols = ", ".join(f"{k}=?" for k in fields)
            cur_n = db.execute(f"UPDATE volumes SET {cols} WHERE id=?", (*fields.values(), vid)).rowcount
            if not cur_n:
                raise VolumeError(f"volume {vid} is gone")
        return self.get(vid)

    def delete(self, vid: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM volumes WHERE id=?", (vid,))
