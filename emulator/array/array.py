"""An emulated storage array: pools of thin LUNs exported over NBD.

Layout of the data dir::

    array.db                 metadata (SQLite): pools, LUNs, settings
    pools/POOL/LUN.img       one sparse file per LUN

State changes are ordered so that a crash at any point leaves something a
restart can finish: a LUN is recorded as ``creating`` before its file exists
and ``ready`` after; a deleted LUN is marked ``deleting`` before its file is
removed; a grow records the new size before the file is extended.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from emulator import durable
from emulator.nbd.backend import Backend
from emulator.nbd.server import NbdServer

from .errors import NO_ROOM, Busy, Conflict, InvalidInput, NotFound, storage_error
from .file_backend import FileBackend
from .lun import Lun, LunBackend, describe
from .media import MediaBackend
from .metadata import FenceRow, Metadata
from .models import ArrayModel
from .names import MAX_LUN_SIZE as MAX_LUN_SIZE  # re-exported: callers import it from here
from .names import SECTOR, check_size
from .names import check_name as check_name  # re-exported too
from .open_files import OutOfFiles, check_room
from .pool import FsRoom, Pool

log = logging.getLogger("blockmig.array")

#: how long a fence waits for the writes in flight on the LUN's export to land
FENCE_DRAIN_S = 5.0


def fence_export(lun: str, token: str) -> str:
    """The export name through which the holder of a fence reaches LUN ``lun``:
    '~' is in no LUN name (names.NAME_RE), so it never collides with one, and it needs
    no escaping in an nbd:// URI."""
    return f"{lun}~fence-{token}"


def _close_lun(lun: Lun) -> None:
    """Close what LUN ``lun`` serves and its own file. A remote LUN (a cancelled or
    failed migration's) serves its source, not its file: closing only its Backend
    left the file open, a descriptor and the deleted file's blocks held for as long
    as the array runs, one more at every such LUN deleted."""
    lun.backend.close()
    lun.file.close()  # idempotent: closed already if the Backend was the file


class Array:
    """Pools and LUNs of one array, wired to an NBD server."""

    def __init__(
        self,
        data_dir: Path,
        name: str,
        model: ArrayModel,
        server: NbdServer,
        pools: dict[str, int] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.name = check_name("array", name)
        self.model = model
        self.server = server
        self._pool_config = pools or {}
        self.pools: dict[str, Pool] = {}
        self.luns: dict[str, Lun] = {}
        self.meta: Metadata | None = None
        self._lock_fd = -1
        #: called with a LUN's name before it is deleted (the migration layer hooks in here)
        self.delete_hooks: list[Callable[[str], Awaitable[None]]] = []
        self._deleting: set[str] = set()  # LUNs whose deletion awaits its hooks or hosts
        #: fenced LUNs (:meth:`fence_lun`), by name
        self.fences: dict[str, FenceRow] = {}

    # ---- start and stop
    def open(self) -> None:
        # Durable names (emulator/durable.py), here and below: else a power cut could
        # lose a new data dir or pool directory with the LUN files a host flushed in it.
        durable.make_dir(self.data_dir)
        self._lock_fd = os.open(self.data_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise Conflict(
                f"data dir {self.data_dir} is in use by another running array; stop it first"
            ) from None
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self.meta:
            self.meta.close()
            self.meta = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _open(self) -> None:
        self.meta = meta = Metadata(self.data_dir / "array.db")
        stored = meta.get_meta("name")
        if stored is not None and stored != self.name:
            raise InvalidInput(f"data dir {self.data_dir} belongs to array {stored!r}, not {self.name!r}")
        meta.set_meta("name", self.name)
        for pname, cap in self._pool_config.items():
            check_name("pool", pname)
            meta.upsert_pool(pname, check_size(cap, f"capacity of pool {pname!r}"))
        if not meta.pools():
            free = shutil.disk_usage(self.data_dir).free
            meta.upsert_pool("default", max(SECTOR, free - free % SECTOR))
        self.fences = {f.lun: f for f in meta.fences()}  # before the LUNs are exported
        durable.make_dir(self.data_dir / "pools")
        rooms: dict[int, FsRoom] = {}  # by device: the pools of one file system share its room
        for row in meta.pools():
            d = self.data_dir / "pools" / row.name
            durable.make_dir(d)
            room = rooms.setdefault(os.stat(d).st_dev, FsRoom(d))
            self.pools[row.name] = Pool(row.name, row.capacity, d, room)
        for lrow in meta.luns():
            path = self._path(lrow.pool, lrow.name)
            if lrow.state in ("creating", "deleting"):
                # Finish what a crash interrupted (the row goes once the file is gone for good).
                durable.unlink(path)
                meta.delete_lun(lrow.name)  # and its fence
                self.fences.pop(lrow.name, None)
                log.warning("array %s: removed LUN %s left %s by a crash", self.name, lrow.name, lrow.state)
                continue
            if not path.exists():
                log.error("array %s: LUN %s has no file %s; recreating it empty", self.name, lrow.name, path)
            try:
                fb = FileBackend(str(path), create_size=lrow.size if not path.exists() else None)
            except OSError as e:
                if e.errno != errno.EMFILE:
                    raise
                raise OutOfFiles(
                    f"cannot open the file of LUN {lrow.name!r} ({len(self.luns)} of "
                    f"{len(meta.luns())} open): too many open files; raise the open files "
                    f"limit (ulimit -Hn, LimitNOFILE=) and start the array again"
                ) from None
            if fb.size < lrow.size:  # a grow recorded but not yet applied
                os.ftruncate(fb.fd, lrow.size)
                fb.refresh_size()
            self._attach(lrow.name, lrow.pool, lrow.state, lrow.created, fb, lrow.uuid)
        for pool in self.pools.values():
            pool.used()  # start the pool's accounting from what the files really hold

    async def flush_luns(self, timeout: float = 5.0, remote_timeout: float | None = None) -> None:
        """The last flush of every LUN, all at once. One still running after
        ``timeout`` seconds is given up, a migrating or remote LUN's (it flushes
        through to its source) after ``remote_timeout`` if that is sooner (the
        stop's grace for peers, see emulator/daemon/main.py): a remote LUN whose
        source is gone (a cancelled migration's) would retry for its whole retry
        window, 30 s by default, and a stopped source never answers. Nothing
        acknowledged is lost with it: a remote or migrating LUN's writes were
        acknowledged only once its source had them (I1)."""
        remote_limit = timeout if remote_timeout is None else min(timeout, remote_timeout)

        async def flush(lun: Lun, limit: float) -> None:
            try:
                await asyncio.wait_for(lun.backend.flush(), limit)
            except TimeoutError:
                remote = lun.backend.remote  # nothing lost: a warning
                log.log(
                    logging.WARNING if remote else logging.ERROR,
                    "array %s: flush of LUN %s did not finish in %.3g s; closing it anyway%s",
                    self.name,
                    lun.name,
                    limit,
                    " (its writes were acknowledged once its source had them)" if remote else "",
                )
            except Exception as e:  # keep closing the others
                log.error("array %s: flush of LUN %s failed: %s", self.name, lun.name, e)

        await asyncio.gather(
            *(flush(lun, remote_limit if lun.backend.remote else timeout) for lun in self.luns.values())
        )

    async def close(self, flush: bool = True) -> None:
        """Flush every LUN (:meth:`flush_luns`; ``flush=False`` if the caller did),
        then close them (the NBD server is closed by its owner)."""
        if flush:
            await self.flush_luns()
        luns = list(self.luns.values())
        for lun in luns:
            _close_lun(lun)
        self.luns.clear()
        self._release()

    # ---- helpers
    def _path(self, pool: str, lun: str) -> Path:
        return self.data_dir / "pools" / pool / f"{lun}.img"

    def _db(self) -> Metadata:
        assert self.meta is not None, "array is not open"
        return self.meta

    def media_backend(self, fb: FileBackend) -> Backend:
        """The file as hosts see it: with the model's media latency, if any."""
        return MediaBackend(fb, self.model.media) if self.model.media.active else fb

    def lun_path(self, pool: str, lun: str) -> Path:
        return self._path(pool, lun)

    def _storage_failed(self, e: OSError) -> None:
        """Log a failure of the array's own storage, with its path (the API's answer
        has none); a full file system is the operator's to see in the pool's numbers."""
        if e.errno not in NO_ROOM:
            log.error("array %s: %s", self.name, e)

    def _attach(self, name: str, pool: str, state: str, created: float, fb: FileBackend, uuid: str) -> Lun:
        inner = self.media_backend(fb)
        p = self.pools[pool]
        lb = LunBackend(name, inner, p, fb)
        lun = Lun(name, pool, fb.size, state, created, fb, lb, local=inner, uuid=uuid)
        self.luns[name] = lun
        p.files[name] = fb
        if state == "ready":  # others are exported by whoever wires their Backend
            self.export_lun(name)
        return lun

    def export_lun(self, name: str) -> None:
        lun = self.get_lun(name)
        fence = self.fences.get(name)
        desc = describe(self.name, lun.pool, lun.uuid)
        self.server.add_export(name, lun.backend, description=desc, read_only=fence is not None)
        if fence is not None:
            self._export_alias(lun, fence)

    def _export_alias(self, lun: Lun, fence: FenceRow) -> None:
        self.server.add_export(
            fence_export(lun.name, fence.token),
            lun.backend,
            description=describe(
                self.name, lun.pool, lun.uuid, f", fenced for {fence.holder or 'a takeover'}"
            ),
            hidden=True,
        )

    # ---- fences (a LUN taken over by another array)
    async def fence_lun(self, name: object, holder: str = "") -> tuple[FenceRow, bool]:
        """Fence LUN ``name`` for a takeover: its export becomes read-only for every
        host (those connected get EPERM on writes from now on), and a secret alias
        export (:func:`fence_export`) gives the holder full access. Returns the fence
        and whether it is new. Idempotent: fencing a fenced LUN returns its fence,
        unless ``holder`` names another holder than the fence's (Conflict).

        Returns once the writes in flight on the LUN's export have landed: a write
        acknowledged later than the holder's copy of its region would be lost."""
        lun = self.get_lun(check_name("LUN", name))
        if lun.name in self._deleting:
            raise Conflict(f"LUN {lun.name!r} is being deleted")
        old = self.fences.get(lun.name)
        if old is not None:
            if holder and old.holder and holder != old.holder:
                raise Conflict(f"LUN {lun.name!r} is already fenced for {old.holder!r}")
            # A second call (a retry, or one made while the first still waits): it too
            # answers only once the hosts' writes accepted before the fence landed.
            await self._drain(lun.name)
            return old, False
        if lun.state != "ready":
            # A migrating or remote LUN takes hosts' writes on to its source without a
            # Task (start_write): the drain would not wait for them, and a write the
            # holder's copy missed would be acknowledged after the fence answered.
            raise Conflict(f"LUN {lun.name!r} is {lun.state}: fence it once its migration has completed")
        fence = FenceRow(lun.name, secrets.token_hex(16), holder, time.time())
        self._db().insert_fence(fence)  # first: a crash from here on restarts fenced
        self.fences[lun.name] = fence
        if lun.name in self.server.exports:  # else export_lun fences it when it exports it
            self._export_alias(lun, fence)
            self.server.set_read_only(lun.name, True)
        log.info("array %s: LUN %s fenced for %s", self.name, lun.name, holder or "a takeover")
        await self._drain(lun.name)
        return fence, True

    async def _drain(self, name: str) -> None:
        """Wait for the requests in flight on LUN ``name``'s export: those accepted
        before its fence may be writes (those after are not). Still in flight after
        FENCE_DRAIN_S: Busy, and the fence stays (the caller retries, or lifts it):
        answering then let a write land after the holder may have copied its region."""
        tasks = self.server.inflight(name) if name in self.server.exports else []
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=FENCE_DRAIN_S)
        if pending:
            raise Busy(
                f"LUN {name!r} is fenced, but {len(pending)} request(s) of its hosts are still in "
                f"flight after {FENCE_DRAIN_S:g} s: fence it again to wait for them, or lift the fence"
            )

    async def unfence_lun(self, name: object) -> None:
        """Lift the fence of LUN ``name`` (idempotent): the holder's alias export goes,
        its connections are closed, and hosts may write again."""
        lun = self.get_lun(check_name("LUN", name))
        fence = self.fences.get(lun.name)
        if fence is None:
            return
        self._db().delete_fence(lun.name)
        del self.fences[lun.name]
        alias = fence_export(lun.name, fence.token)
        # the holder goes first: it and the hosts never write side by side
        self.server.exports.pop(alias, None)
        await self.server.disconnect_export(alias)
        # fenced again while its holder's connections closed (up to 5 s): the new fence
        # keeps the export read-only (else hosts wrote behind the new holder's back)
        if lun.name in self.server.exports and lun.name not in self.fences:
            self.server.set_read_only(lun.name, False)
        log.info("array %s: fence of LUN %s lifted", self.name, lun.name)

    def set_lun_state(
        self, name: str, state: str, also: Callable[[sqlite3.Connection], None] | None = None
    ) -> None:
        lun = self.get_lun(name)
        self._db().update_lun(name, also, state=state)
        lun.state = state

    def get_lun(self, name: str) -> Lun:
        lun = self.luns.get(name)
        if lun is None:
            raise NotFound(f"LUN {name!r} does not exist on array {self.name!r}")
        return lun

    def get_pool(self, name: str | None) -> Pool:
        if name is None:
            name = "default" if "default" in self.pools else sorted(self.pools)[0]
        pool = self.pools.get(name)
        if pool is None:
            raise NotFound(
                f"pool {name!r} does not exist on array {self.name!r} "
                f"(pools: {', '.join(sorted(self.pools))})"
            )
        return pool

    # ---- LUN lifecycle
    def create_lun(
        self,
        name: object,
        size: object,
        pool: object = None,
        state: str = "ready",
        also: Callable[[sqlite3.Connection], None] | None = None,
    ) -> Lun:
        """Create a thin LUN. Only a ``ready`` LUN is exported at once. ``also``
        runs in the transaction that gives the LUN its ``state`` (a migration
        records itself there: never a migrating LUN without its migration)."""
        name = check_name("LUN", name)
        size = check_size(size)
        if pool is not None:
            check_name("pool", pool)
        p = self.get_pool(pool)  # type: ignore[arg-type]
        if name in self.luns:
            raise Conflict(f"LUN {name!r} already exists on array {self.name!r}")
        check_room(f"the file of LUN {name!r}", self.name)
        meta = self._db()
        row = meta.insert_lun(name, p.name, size, "creating")
        path = self._path(p.name, name)
        try:
            path.unlink(missing_ok=True)  # a stale file of a LUN deleted during a crash
            fb = FileBackend(str(path), create_size=size)
        except OSError as e:
            meta.delete_lun(name)
            self._storage_failed(e)
            raise storage_error(f"cannot create the file of LUN {name!r}", e) from None
        try:
            meta.update_lun(name, also, state=state)
        except BaseException:
            fb.close()
            durable.unlink(path)
            meta.delete_lun(name)
            raise
        return self._attach(name, p.name, state, row.created, fb, row.uuid)

    def grow_lun(self, name: object, size: object) -> Lun:
        lun = self.get_lun(check_name("LUN", name))
        size = check_size(size)
        if size < lun.size:
            raise InvalidInput(f"LUN {lun.name!r} is {lun.size} bytes; shrinking to {size} is not supported")
        if size == lun.size:
            return lun
        if lun.name in self._deleting:
            raise Conflict(f"LUN {lun.name!r} is being deleted")
        if lun.state != "ready":
            # A migrating LUN's size is its source's: its region map, its hosts' export
            # and the copy all end there (growing only the local file made the API and
            # NBD disagree, and a source grown meanwhile was copied only up to the old size).
            raise Conflict(
                f"LUN {lun.name!r} is {lun.state}: it has its source's size until its migration "
                "completes; grow it once it is ready"
            )
        if lun.name in self.fences:
            # its holder took it over at this size: what grew here would never be copied
            raise Conflict(
                f"LUN {lun.name!r} is fenced for a takeover; grow it on the array that took it over"
            )
        self._db().update_lun(lun.name, size=size)
        try:
            os.ftruncate(lun.file.fd, size)
        except OSError as e:
            self._db().update_lun(lun.name, size=lun.size)
            self._storage_failed(e)
            raise storage_error(f"cannot grow LUN {lun.name!r}", e) from None
        lun.file.refresh_size()
        lun.size = size
        return lun

    async def delete_lun(self, name: object, force: bool = False) -> None:
        lun = self.get_lun(check_name("LUN", name))
        if lun.name in self._deleting:
            # a second DELETE while the first waits on its hooks (a migration's cancel) or
            # its hosts' disconnection: it found the LUN, and would remove it twice
            raise Conflict(f"LUN {lun.name!r} is already being deleted")
        hosts = self.connected_hosts(lun.name)
        if hosts and not force:
            raise Conflict(
                f"LUN {lun.name!r} has {len(hosts)} connected host(s) ({', '.join(hosts)}); "
                "detach them first or delete with force"
            )
        meta = self._db()
        # in memory too: the API shows what array.db says, and a pool move or a grow
        # (which take a ready LUN) is refused while the delete waits on hooks or hosts
        self.set_lun_state(lun.name, "deleting")
        self.server.exports.pop(lun.name, None)
        fence = self.fences.get(lun.name)
        alias = fence_export(lun.name, fence.token) if fence else None
        if alias:
            self.server.exports.pop(alias, None)
        self._deleting.add(lun.name)
        try:
            for hook in self.delete_hooks:
                await hook(lun.name)
            await self.server.disconnect_export(lun.name)
            if alias:
                await self.server.disconnect_export(alias)
        finally:
            self._deleting.discard(lun.name)
        self.fences.pop(lun.name, None)  # its row goes with the LUN's (ON DELETE CASCADE)
        del self.luns[lun.name]
        self.pools[lun.pool].files.pop(lun.name, None)
        _close_lun(lun)
        # The file goes for good before the row: else a power cut after the DELETE
        # answered could bring the file back, owned by no LUN (its space used for good).
        durable.unlink(self._path(lun.pool, lun.name))
        meta.delete_lun(lun.name)

    # ---- views
    def connected_hosts(self, name: str) -> list[str]:
        """Peers connected to the LUN: through its export, or as its fence's holder."""
        fence = self.fences.get(name)
        names = (name, fence_export(name, fence.token)) if fence else (name,)
        return sorted(
            c.peer for c in self.server.connections if c.export is not None and c.export.name in names
        )

    def lun_info(self, lun: Lun) -> dict[str, Any]:
        info = {
            "name": lun.name,
            "size": lun.size,
            "allocated": lun.allocated,
            "pool": lun.pool,
            "export": lun.name,
            "state": lun.state,
            "created": lun.created,
            "id": lun.uuid,
            "connected_hosts": self.connected_hosts(lun.name),
            "fenced": lun.name in self.fences,
        }
        f = self.fences.get(lun.name)
        if f is not None:  # never the alias: that is the holder's secret
            info["fence"] = {"holder": f.holder, "since": f.since}
        return info

    def pool_info(self, pool: Pool) -> dict[str, Any]:
        used = pool.used()
        return {
            "name": pool.name,
            "capacity": pool.capacity,
            "used": used,
            "free": pool.free_given(used),  # less than the room left where the file system has less
            "luns": len(pool.files),
        }

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model.name,
            "description": self.model.description,
            "capabilities": self.model.capabilities(),
            "media": self.model.media.name,
            "pools": [self.pool_info(p) for p in self.pools.values()],
            "luns": len(self.luns),
        }
