"""Migrations of one array: start, follow, persist, resume after a restart.

Migration records live in the array's SQLite database (table
``migrations``: the config, with the throttle as last set, and the
capabilities the source offered when last connected, so that a restarted
array advertises them before the source answers, and the id of the source's
LUN, so that no connection, also after a restart, takes another LUN found at
the source's address for it); region progress lives
beside each LUN file (``POOL/LUN.progress``).
LUN states on the array: ``migrating`` while the LUN is served through a
MigratingBackend, ``remote`` when it serves the source directly (after a
cancel or a failure), ``ready`` once cut over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emulator import durable
from emulator.array.array import Array, check_name
from emulator.array.errors import (
    NO_ROOM,
    ArrayError,
    Conflict,
    InvalidInput,
    NoSpace,
    NotFound,
    Unsupported,
    storage_error,
)
from emulator.array.file_backend import FileBackend
from emulator.array.lun import Lun
from emulator.array.names import check_size
from emulator.array.open_files import check_room
from emulator.nbd.client import Address, without_user
from emulator.nbd.errors import BackendError
from emulator.units import format_size, parse_rate

from .migration import FINAL, Migration, MigrationConfig, ended_message
from .regions import MAX_REGIONS, region_size_for, regions_of
from .remote import OtherLun, RemoteBackend

log = logging.getLogger("blockmig.mirror.manager")

SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    lun TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    mode TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL DEFAULT '{}',
    caps TEXT,  -- JSON: what the source offered (RemoteBackend.capabilities); NULL: not known
    source_id TEXT  -- the source LUN's id (RemoteBackend.identity); NULL: none known yet
);
"""


def _source_uri(value: object) -> str:
    """``value`` if it is an NBD URI a migration can take its source from, else InvalidInput."""
    if not isinstance(value, str) or not value.startswith(("nbd://", "nbd+unix://")):
        raise InvalidInput(f"source must be an nbd:// or nbd+unix:// URI, not {value!r}")
    try:
        Address.parse(value)
    except ValueError as e:
        raise InvalidInput(f"source is not a valid NBD URI: {e}") from None
    return value


class MigrationManager:
    def __init__(self, array: Array, defaults: MigrationConfig | None = None) -> None:
        self.array = array
        self.defaults = defaults or MigrationConfig()
        self.migrations: dict[str, Migration] = {}
        self.remotes: dict[str, RemoteBackend] = {}  # remote LUNs served without a migration
        self._final: dict[str, dict[str, Any]] = {}  # status of migrations that ended before a restart
        self._stopping = asyncio.Event()  # the array is stopping: long polls answer now
        self._switching: dict[str, asyncio.Lock] = {}  # one change of a migration's source at a time

    @property
    def _db(self) -> Any:
        assert self.array.meta is not None
        return self.array.meta

    # ------------------------------------------------------------------ start-up
    async def open(self) -> None:
        """Resume migrations and remote LUNs found in the array's database."""
        meta = self._db
        meta.db.executescript(SCHEMA)
        columns = {r[1] for r in meta.db.execute("PRAGMA table_info(migrations)")}
        for column in ("caps", "source_id"):  # a data dir from before them
            if column not in columns:
                meta.db.execute(f"ALTER TABLE migrations ADD COLUMN {column} TEXT")
        rows = meta.db.execute(
            "SELECT lun, source, config, state, mode, status, caps, source_id FROM migrations"
        ).fetchall()
        for name, source, config, state, mode, status, caps, source_id in rows:
            lun = self.array.luns.get(name)
            if lun is None:
                self._forget_deleted(name, source)
                continue
            source = self._drop_user(name, source)
            # Hosts may connect before the source answers (it may be down): they
            # negotiate what it offered when last connected, not a Backend's defaults.
            known = json.loads(caps) if caps else None
            # A row from before LUN ids has none: the first connection records it.
            ident = source_id or ""
            if lun.state == "migrating" and state not in FINAL:
                cfg = MigrationConfig(**json.loads(config))
                cfg.mode = mode
                remote = None
                if source.startswith("move:"):
                    m = self._new_move(lun, source.split(":")[2], cfg, resume=True)
                else:
                    m = self._new(lun, source, cfg)
                    remote = self._remote(name, source, cfg.retry_window, lun.size, known, ident)
                await m.start(resume=True, paused=state == "paused", connected=remote)
                log.info(
                    "array %s: resumed migration of %s (%d regions to copy again)",
                    self.array.name,
                    name,
                    m.recopied_regions,
                )
                self.array.export_lun(name)
            else:
                self._final[name] = json.loads(status)
                if state == "completed":
                    self._finish_completed(lun, source)
                if lun.state == "remote":
                    await self._serve_remote(lun, source, known, ident)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop every migration and remote LUN, all at once: each waits up to
        ``timeout`` seconds for requests a stopped source does not answer, and one
        after another these waits added up (20 s for three, past what `blockmig
        down` waits). The array's last flush of their LUNs comes first, while
        their sources are connected (emulator/daemon/main.py)."""
        closing = [m.shutdown(timeout) for m in self.migrations.values()]
        closing += [r.aclose(timeout) for r in self.remotes.values()]
        for e in await asyncio.gather(*closing, return_exceptions=True):
            if isinstance(e, Exception):
                log.error("array %s: closing a migration or remote LUN failed: %s", self.array.name, e)

    # ------------------------------------------------------------------ commands
    async def start(
        self,
        lun_name: object,
        source: object,
        pool: object = None,
        mode: object = None,
        throttle: object = None,
        region_size: object = None,
    ) -> Migration:
        """Take ``source`` over as LUN ``lun_name`` and migrate it into a local LUN."""
        caps = self.array.model.capabilities()
        if not caps["remote_takeover"]:
            raise Unsupported(
                f"array {self.array.name!r} (model {self.array.model.name}) cannot take remote LUNs over; "
                "use a generic host copy"
            )
        name = check_name("LUN", lun_name)
        source = _source_uri(source)
        cfg = MigrationConfig(**self.defaults.as_dict())
        if mode is not None:
            if mode not in ("background", "active"):
                raise InvalidInput(f"mode must be 'background' or 'active', not {mode!r}")
            cfg.mode = str(mode)
        if throttle is not None:
            try:
                cfg.throttle = parse_rate(throttle) * 1e6
            except ValueError:
                raise InvalidInput(f"throttle must be MB/s >= 0 (0 = unlimited), not {throttle!r}") from None
        if region_size is not None:
            if (
                isinstance(region_size, bool)
                or not isinstance(region_size, int)
                or region_size < 65536
                or region_size > 1 << 30
                or region_size & (region_size - 1)
            ):
                raise InvalidInput(
                    f"region_size must be a power of two between 64K and 1G, not {region_size!r}"
                )
            cfg.region_size = region_size
        if name in self.array.luns:
            raise Conflict(f"LUN {name!r} already exists on array {self.array.name!r}")
        # This connection learns the size, then serves the migration as its source.
        remote = RemoteBackend(source, retry_window=cfg.retry_window)
        try:
            await remote.connect()
        except BackendError as e:
            raise InvalidInput(f"cannot reach the source: {e}") from None
        remote.on_capabilities = self._capabilities_changed(name)
        try:
            # the LUN takes the source's size: refused, it is the source's (none was given)
            check_size(remote.size, f"size of source {source}")
            cfg.region_size = self._region_size(remote.size, cfg.region_size, region_size is not None)
            if remote.size % remote.min_block:
                # its last bytes could never be read (nor copied) in aligned requests
                raise InvalidInput(
                    f"size of source {source} {remote.size} is not a multiple of its minimum "
                    f"block size {remote.min_block} bytes"
                )
            taken = self._served_by(source, remote.identity)
            if taken is not None:
                raise Conflict(
                    f"source {source} is served by LUN {taken!r} of array {self.array.name!r} already: "
                    "a second LUN taking it over would miss the writes that go through the first "
                    f"(its regions believed copied, I2); delete LUN {taken!r} or let its migration "
                    "complete first"
                )
            lun = self.array.create_lun(
                name,
                remote.size,
                pool,
                state="migrating",
                also=self._record(name, source, cfg, remote.capabilities(), remote.identity),
            )
        except BaseException:
            await remote.aclose()
            raise
        try:
            m = self._new(lun, source, cfg)
            await m.start(connected=remote)
        except BaseException as e:
            await remote.aclose()  # idempotent: the start may have closed it
            self.migrations.pop(name, None)
            # The LUN goes before its row: a crash between leaves a row without a LUN
            # (skipped at start-up), never a migrating LUN without its migration.
            await self.array.delete_lun(name, force=True)
            self._db.db.execute("DELETE FROM migrations WHERE lun=?", (name,))
            if isinstance(e, BackendError):
                raise InvalidInput(f"cannot take {source} over: {e}") from None
            raise
        self.array.export_lun(name)
        return m

    async def move(self, lun_name: object, pool: object) -> Migration:
        """Move a LUN to another pool of this array, live (the pool-to-pool migration)."""
        if not self.array.model.pool_migration:
            raise Unsupported(
                f"array {self.array.name!r} (model {self.array.model.name}) cannot move LUNs between pools"
            )
        name = check_name("LUN", lun_name)
        lun = self.array.get_lun(name)
        new = self.array.get_pool(check_name("pool", pool)).name
        if lun.state != "ready":
            raise Conflict(f"LUN {name!r} is {lun.state}; only a ready LUN can move")
        if new == lun.pool:
            raise InvalidInput(f"LUN {name!r} is already in pool {new!r}")
        cfg = MigrationConfig(**self.defaults.as_dict())
        cfg.region_size = self._region_size(lun.size, cfg.region_size, False)
        source = f"move:{lun.pool}:{new}"
        self.array.set_lun_state(name, "migrating", also=self._record(name, source, cfg))
        try:
            m = self._new_move(lun, new, cfg, resume=False)
            await m.start()
        except BaseException as e:
            self.migrations.pop(name, None)
            fb = self.array.pools[new].incoming.pop(name, None)
            if fb is not None:
                fb.close()
            self.array.lun_path(new, name).unlink(missing_ok=True)
            # ready again and the record gone in one transaction, as they came
            self.array.set_lun_state(name, "ready", also=self._unrecord(name))
            # the array's own storage failed: say how (no room: 507), as a LUN create does
            what = f"cannot move LUN {name!r} to pool {new!r}"
            if isinstance(e, OSError):
                log.warning("%s: %s", what, e)  # the path, which the answer leaves out
                raise storage_error(what, e) from None
            if isinstance(e, BackendError):
                raise (NoSpace if e.errno in NO_ROOM else ArrayError)(f"{what}: {e}") from None
            raise
        return m

    def _new_move(self, lun: Lun, new_pool: str, cfg: MigrationConfig, resume: bool) -> Migration:
        path = self.array.lun_path(new_pool, lun.name)
        if not resume:
            check_room(f"the new file of LUN {lun.name!r}", self.array.name)
            path.unlink(missing_ok=True)
        fb = FileBackend(str(path), create_size=None if resume and path.exists() else lun.size)
        pool = self.array.pools[new_pool]
        # counted in the new pool from the first byte copied: else its capacity checked
        # the copy against the pool's LUNs alone, and a LUN holding 32 MiB moved into a
        # 16 MiB pool whole
        pool.incoming[lun.name] = fb
        assert lun.local is not None
        old_path, old_pool, old_file = lun.file.path, lun.pool, lun.file
        old = self.array.pools[old_pool]

        def released(m: Migration) -> None:
            if m.state == "completed":
                # for good (emulator/durable.py): a power cut must not bring back a file
                # no LUN owns, its space used for good (the row names the new pool already)
                durable.unlink(Path(old_path))

        m = Migration(
            lun.name,
            f"move:{old_pool}:{new_pool}",
            lun.backend,
            self.array.media_backend(fb),
            path.with_suffix(".progress"),
            cfg,
            self._changed,
            reserve=lambda off, n: pool.reserve(fb, lun.name, off, n),
            source=lun.local,
            on_released=released,
            # host writes land in the old file until the move completes: its pool's room
            reserve_source=lambda off, n: old.reserve(old_file, lun.name, off, n),
        )
        m.move_to = (new_pool, fb)  # type: ignore[attr-defined]
        self.migrations[lun.name] = m
        return m

    def get(self, name: str) -> Migration:
        """The migration of LUN ``name``, to pause, resume or cancel. One that ended before
        the array restarted is a 409, as it was before the restart (it is listed and
        shown, so it is no 404)."""
        m = self.migrations.get(name)
        if m is None and name in self._final:
            raise Conflict(ended_message(name, self._final[name].get("state", "over")))
        if m is None:
            raise NotFound(f"no migration of LUN {name!r} on array {self.array.name!r}")
        return m

    async def update(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change a running migration: ``throttle`` (MB/s, 0 = unlimited), ``mode``
        ("active" only) and/or ``source`` (a URI where its source LUN is served now, see
        :meth:`_set_source`); its status after. Of a migration that ended with its LUN
        serving the source directly (``remote``, after a cancel or a failure) only the
        source can change. All is checked before anything changes."""
        m = self.migrations.get(name)
        running = m is not None and m.state not in FINAL
        if not running and not (name in self.remotes and changes.keys() <= {"source"}):
            also = "; only its source can change, the LUN serves it directly" if name in self.remotes else ""
            raise self._ended(name, also)
        if not changes:
            raise InvalidInput(
                "nothing to change: give throttle (MB/s), mode ('active') and/or source (an nbd:// URI)"
            )
        rate = None
        if "throttle" in changes:
            try:
                rate = parse_rate(changes["throttle"]) * 1e6
            except ValueError:
                raise InvalidInput(
                    f"throttle must be MB/s >= 0 (0 = unlimited), not {changes['throttle']!r}"
                ) from None
        if "mode" in changes and changes["mode"] != "active":
            raise InvalidInput(
                f"mode can only be set to 'active' (background -> active), not {changes['mode']!r}"
            )
        if "source" in changes:  # the last check: it connects
            await self._set_source(name, changes["source"], running=changes.keys() != {"source"})
        if m is not None and rate is not None:
            m.set_throttle(rate)  # persisted with the config by _changed
        if m is not None and "mode" in changes:
            m.go_active()
        return self.status(name)

    def _source_of(self, name: str) -> RemoteBackend:
        """What reaches the source of LUN ``name``: its running migration's source, or, once
        the migration ended, the remote LUN's (the same object when it ended in this run)."""
        m = self.migrations.get(name)
        if m is not None and m.state not in FINAL:
            if not isinstance(m.source, RemoteBackend):
                raise Conflict(f"migration of {name} has no source URI (it moves the LUN between pools)")
            return m.source
        remote = self.remotes.get(name)
        if remote is None:
            raise self._ended(name)
        return remote

    def _ended(self, name: str, also: str = "") -> Conflict:
        """The 409 for a change to the migration of ``name``, which has ended (a 404 raised
        here if there is none)."""
        return Conflict(f"migration of {name} is {self.status(name).get('state', 'over')}{also}")

    async def _set_source(self, name: str, uri: object, running: bool) -> None:
        """Reach the source of LUN ``name`` (migrating, or ``remote``) at ``uri`` from now
        on: its array came back at another address (restarted on other ports), and the
        recorded URI leads nowhere (or to another program). ``uri`` must serve the same
        LUN (its id, where the source gives one, and its size: :meth:`RemoteBackend.probe`),
        else 409; one that cannot be reached is a 400; either way nothing changes. Recorded
        before it is used, so a restart of this array dials it too; requests waiting for
        the source, and the copier, go on through it at once. ``running``: other changes
        wait on it, so the migration must still be running after the probe."""
        uri = _source_uri(uri)
        remote = self._source_of(name)
        if uri == remote.uri:
            return
        async with self._switching.setdefault(name, asyncio.Lock()):
            try:
                c = await remote.probe(uri)
            except OtherLun as e:
                raise Conflict(f"cannot take the source of LUN {name!r} from {uri}: {e}") from None
            except BackendError as e:
                raise InvalidInput(f"cannot take the source of LUN {name!r} from {uri}: {e}") from None
            m = self.migrations.get(name)
            try:
                # the migration may have ended, or the LUN gone, while the probe connected
                if self._source_of(name) is not remote or (running and (m is None or m.state in FINAL)):
                    raise self._ended(name)
                # the status kept for a migration that ended (shown, and read back at start-up)
                st = None if m is not None and m.state not in FINAL else dict(self.status(name), source=uri)
                with self._db.transaction() as db:
                    db.execute("UPDATE migrations SET source=? WHERE lun=?", (uri, name))
                    if st is not None:
                        db.execute("UPDATE migrations SET status=? WHERE lun=?", (json.dumps(st), name))
            except BaseException:
                await c.close()
                raise
            log.warning(
                "array %s: the source of LUN %s is reached at %s from now on, not %s",
                self.array.name,
                name,
                uri,
                remote.uri,
            )
            if m is not None:
                m.source_uri = uri
            if name in self._final:
                self._final[name]["source"] = uri
            remote.switch(uri, c)

    def status(self, name: str) -> dict[str, Any]:
        if name in self.migrations:
            st = self.migrations[name].status()
        elif name in self._final:
            st = dict(self._final[name])
        else:
            raise NotFound(f"no migration of LUN {name!r} on array {self.array.name!r}")
        if st.get("state") in FINAL:
            # the link as it is now, not as it was when the migration ended (or before a
            # restart): a LUN left serving its source has it; a completed one has none
            remote = self.remotes.get(name)
            st["source_connected"] = remote is not None and remote.link_up
        return st

    async def wait_status(self, name: str, timeout: float) -> dict[str, Any]:
        """The status once the migration has ended (completed, failed or cancelled)
        or after ``timeout`` seconds, whichever comes first: a long poll, so a
        client learns of the end when it happens, not at its next poll."""
        m = self.migrations.get(name)
        if m is not None and m.state not in FINAL and not self._stopping.is_set():
            waits = {asyncio.ensure_future(m.ended.wait()), asyncio.ensure_future(self._stopping.wait())}
            try:
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        return self.status(name)

    def end_long_polls(self) -> None:
        """The array is stopping: every long poll answers at once, and later ones do not wait
        (the API server's graceful shutdown would otherwise wait them out)."""
        self._stopping.set()

    def list(self) -> list[dict[str, Any]]:
        return [self.status(n) for n in sorted(self.migrations.keys() | self._final.keys())]

    async def forget_lun(self, name: str) -> None:
        """The LUN is being deleted: stop its migration or remote connection."""
        m = self.migrations.pop(name, None)
        if m is not None:
            if m.state not in FINAL:
                with contextlib.suppress(ValueError):  # a cancel under way ended it meanwhile
                    await m.cancel()
            await m.shutdown()
        r = self.remotes.pop(name, None)
        if r is not None:
            await r.aclose()
        self._final.pop(name, None)
        self._db.db.execute("DELETE FROM migrations WHERE lun=?", (name,))

    # ------------------------------------------------------------------ internals
    def _finish_completed(self, lun: Lun, source: str) -> None:
        """Remove what a completed migration still had when a crash stopped it: its end is
        recorded first, then it waits out the reads in flight on its source, and only then
        are its progress file and a pool move's old file removed. The old file, which no
        LUN owns, kept its space in the old pool's file system for good."""
        stale = [Path(lun.file.path.removesuffix(".img") + ".progress")]
        if source.startswith("move:") and source.split(":")[1] != lun.pool:
            stale.append(self.array.lun_path(source.split(":")[1], lun.name))
        for path in stale:
            if path.exists():
                log.warning(
                    "array %s: removed %s, left by a crash after its migration completed",
                    self.array.name,
                    path,
                )
                durable.unlink(path)

    def _forget_deleted(self, name: str, source: str) -> None:
        """A migration whose LUN is gone: a crash cut its delete short after the LUN was
        marked deleting, before :meth:`forget_lun`, and the array finished the delete. Its
        row would be taken for a new LUN of that name's after the next start."""
        log.warning("array %s: dropped the migration of LUN %s, deleted in a crash", self.array.name, name)
        for progress in self.array.data_dir.glob(f"pools/*/{name}.progress"):
            durable.unlink(progress)
        if source.startswith("move:"):  # the new pool's copy, which no LUN owns now
            durable.unlink(self.array.lun_path(source.split(":")[2], name))
        self._db.db.execute("DELETE FROM migrations WHERE lun=?", (name,))

    def _served_by(self, source: str, identity: str) -> str | None:
        """The LUN of this array that serves ``source`` (migrating, or remote after a
        cancel or a failure), if any: the same LUN id where both are known, else the same
        address."""
        addr = Address.parse(source)
        for lun, uri, ident in self._db.db.execute("SELECT lun, source, source_id FROM migrations"):
            known = self.array.luns.get(lun)
            if known is None or known.state not in ("migrating", "remote") or uri.startswith("move:"):
                continue
            if ident == identity if ident and identity else Address.parse(uri) == addr:
                return str(lun)
        return None

    @staticmethod
    def _region_size(size: int, region_size: int, asked: bool) -> int:
        """The region size of a migration of a LUN of ``size`` bytes: one ``asked`` for
        as it is, within MAX_REGIONS regions; the default one doubled for a big LUN."""
        if not asked:
            return region_size_for(size, region_size)
        least = region_size_for(size, region_size, MAX_REGIONS)
        if least != region_size:
            raise InvalidInput(
                f"region_size {format_size(region_size)} cuts the source's {format_size(size)} into "
                f"{regions_of(size, region_size)} regions, more than {MAX_REGIONS}: use "
                f"{format_size(least)} or more, or leave it out (the default grows with the LUN)"
            )
        return region_size

    def _drop_user(self, name: str, source: str) -> str:
        """``source`` without a ``user@`` part, which arrays took (and ignored) before such
        URIs were refused: the migration resumes, and no password stays in its row."""
        bare = without_user(source)
        if bare != source:
            self._db.db.execute("UPDATE migrations SET source=? WHERE lun=?", (bare, name))
            log.warning("array %s: dropped the user@ part of the source URI of %s", self.array.name, name)
        return bare

    def _new(self, lun: Lun, source: str, cfg: MigrationConfig) -> Migration:
        pool = self.array.pools[lun.pool]
        assert lun.local is not None
        progress = lun.file.path.removesuffix(".img") + ".progress"
        m = Migration(
            lun.name,
            source,
            lun.backend,
            lun.local,
            Path(progress),
            cfg,
            self._changed,
            reserve=lambda off, n: pool.reserve(lun.file, lun.name, off, n),
        )
        self.migrations[lun.name] = m
        return m

    @staticmethod
    def _record(
        name: str,
        source: str,
        cfg: MigrationConfig,
        caps: dict[str, Any] | None = None,
        source_id: str = "",
    ) -> Callable[[sqlite3.Connection], None]:
        """The migration's row, to insert in the transaction that makes its LUN
        ``migrating`` (one commit fewer, and no migrating LUN without it after a crash);
        ``caps``: what a remote source offers, ``source_id``: the id of its LUN, if it
        gives one."""

        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO migrations(lun, source, config, state, mode, started, caps, "
                "source_id) VALUES (?, ?, ?, 'copying', ?, ?, ?, ?)",
                (
                    name,
                    source,
                    json.dumps(cfg.as_dict()),
                    cfg.mode,
                    time.time(),
                    None if caps is None else json.dumps(caps),
                    source_id or None,
                ),
            )

        return insert

    @staticmethod
    def _unrecord(name: str) -> Callable[[sqlite3.Connection], None]:
        """Undo of ``_record``, for the transaction that makes its LUN ready again."""

        def delete(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM migrations WHERE lun=?", (name,))

        return delete

    def _changed(self, m: Migration) -> None:
        """Persist a state change; the LUN's state follows in the same transaction."""
        move = getattr(m, "move_to", None)
        lun_state = {"completed": "ready", "failed": "remote", "cancelled": "remote"}.get(m.state)
        if move is not None and lun_state == "remote":
            lun_state = "ready"  # a failed move keeps serving the old pool's file
        st = m.status()
        with self._db.transaction() as db:
            db.execute(
                "UPDATE migrations SET state=?, mode=?, config=?, error=?, finished=?, status=? WHERE lun=?",
                (
                    m.state,
                    m.mode,
                    json.dumps(m.config.as_dict()),  # its throttle may have changed (update)
                    m.last_error,
                    m.finished,
                    json.dumps(st),
                    m.name,
                ),
            )
            if lun_state:
                # not over a delete's mark: the cancel of a LUN being deleted (forget_lun)
                # made it remote (ready) again, and a kill -9 before the delete ended
                # brought the LUN back (a remote one serving its source) at the restart
                db.execute(
                    "UPDATE luns SET state=? WHERE name=? AND state != 'deleting'", (lun_state, m.name)
                )
            if move is not None and m.state == "completed":
                db.execute("UPDATE luns SET pool=? WHERE name=?", (move[0], m.name))
        if lun_state == "remote" and isinstance(m.source, RemoteBackend):
            # its LUN serves the source from now on: closed with the other remote LUNs
            self.remotes[m.name] = m.source
        lun = self.array.luns.get(m.name)
        if lun_state and lun is not None:
            if lun.state != "deleting":
                lun.state = lun_state
            if move is not None:
                self.array.pools[move[0]].incoming.pop(lun.name, None)
            if move is not None and m.state == "completed":
                new_pool, fb = move
                self.array.pools[lun.pool].files.pop(lun.name, None)
                self.array.pools[new_pool].files[lun.name] = fb
                lun.pool, lun.file, lun.local = new_pool, fb, m.local
                lun.backend.set_file(fb, self.array.pools[new_pool], m.local)
            elif move is not None:  # failed or cancelled: drop the new copy
                move[1].close()
                durable.unlink(self.array.lun_path(move[0], lun.name))

    def _remote(
        self,
        name: str,
        source: str,
        retry_window: float,
        size: int,
        caps: dict[str, Any] | None,
        identity: str,
    ) -> RemoteBackend:
        """The source of LUN ``name`` after a restart, not connected yet: it offers the
        recorded ``caps`` until it connects (None, from a data dir of before: defaults
        until then), and takes only the LUN of id ``identity`` for it ("": any, the
        first connection records the id it finds)."""
        remote = RemoteBackend(
            source, retry_window=retry_window, size=size, capabilities=caps, identity=identity
        )
        remote.on_capabilities = self._capabilities_changed(name)
        return remote

    def _capabilities_changed(self, name: str) -> Callable[[RemoteBackend, dict[str, Any]], None]:
        """A (re)connection found the source of LUN ``name`` offering other capabilities
        than known (``before``; empty: none were recorded), or learnt its LUN's id. They
        are recorded, and the LUN advertises them to hosts that connect from now on.
        Hosts already connected keep what they negotiated: a FUA the source lost is a
        write and a flush, TRIM and CACHE are advice, and what the source now refuses (a
        write to a read-only source, an unaligned request) fails with the source's error
        (EPERM, EINVAL)."""

        def changed(remote: RemoteBackend, before: dict[str, Any]) -> None:
            now = remote.capabilities()
            with self._db.transaction() as db:
                db.execute(
                    "UPDATE migrations SET caps=?, source_id=? WHERE lun=?",
                    (json.dumps(now), remote.identity or None, name),
                )
            diff = ", ".join(f"{k} {v} -> {now.get(k)}" for k, v in before.items() if now.get(k) != v)
            if diff:  # none: nothing was known, or only the id was learnt (a row from before ids)
                log.warning("array %s: the source of LUN %s changed: %s", self.array.name, name, diff)
            m = self.migrations.get(name)
            if m is not None and m.backend is not None and m.source is remote:
                m.backend.refresh_capabilities()
            lun = self.array.luns.get(name)
            if lun is not None:
                lun.backend.refresh_capabilities()

        return changed

    async def _serve_remote(
        self, lun: Lun, source: str, capabilities: dict[str, Any] | None, identity: str
    ) -> None:
        remote = self._remote(lun.name, source, self.defaults.retry_window, lun.size, capabilities, identity)
        self.remotes[lun.name] = remote
        lun.backend.swap(remote)
        self.array.export_lun(lun.name)
