"""The volume manager: volumes on arrays, and migrate_volume as the proposal orders it.

migrate_volume, "Async volume migration between backends":

1. the SOURCE driver's migrate_volume(); moved -> success (e.g. pool to pool);
2. else the TARGET driver's migrate_volume_target() -> (moved, migration_async,
   model_update): moved False -> generic host copy (not attachable until done);
   moved and not async -> success once completed; moved and async ->
   migrating_attachable;
3. volume.host becomes the target, model_update is saved;
4. complete_migration_target() follows the copy to its end; the source LUN is removed;
5. migration_status = success. Any failure -> error, and the volume stays usable on
   its authoritative side with its data intact.

An in-use volume may migrate. Its attachment records follow it (what Cinder does
through Nova's swap_volume, short of driving the hosts): wherever volume.host is
written, the attachments are re-pointed at that host in the same transaction
(:meth:`VolumeManager._switch_host`), so a record always names the array that serves
the volume and the URI to use there, at every step and after a crash.

Steps 1-3 run in the command that asked; steps 4-5 (and a host copy) in a
follower: the same command with --wait, else a background process. A
follower that died is restarted by the next command (``recover``), so no
volume stays stuck in a migrating state.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from emulator.array.errors import InvalidInput
from emulator.array.names import check_name, check_size
from emulator.nbd.errors import NbdError

from .api_client import FINAL, ApiError, ArrayApi
from .config import (
    ArrayRecord,
    Registry,
    RegistryError,
    child_env,
    pid_alive,
    process_start,
    python_module_command,
)
from .drivers import VolumeDriver, driver_for
from .drivers.base import Host, RemoteTakeoverMixin
from .volumes import MIGRATING, Conflict, Volume, VolumeError, VolumesDB

log = logging.getLogger("blockmig.control")
Progress = Callable[[dict[str, Any]], None]
#: tries of a read-modify-write of a volume's attachments that another command raced
RACE_TRIES = 20
#: seconds a command waits for another one to finish with the same volume (delete, the
#: checks and the claim of migrate); and for a follower of its last migration to let go
LOCK_WAIT = 60.0
RUNNER_WAIT = 10.0
#: seconds `show` waits for the volume's array to say whether it can serve it (a stopped
#: process never answers)
SHOW_TIMEOUT = 5.0


class SourceNote(NamedTuple):
    """What :meth:`VolumeManager.update_sources` (or :meth:`~VolumeManager.release_leftovers`)
    did for one volume (``ok``) or could not."""

    volume: str
    ok: bool
    message: str


def _readdressed(given: str, srec: ArrayRecord) -> str | None:
    """``given`` (an nbd:// URI of an export of the array ``srec``) at that array's address
    now; None if it is no nbd:// URI of a TCP address."""
    if not given.startswith("nbd://"):
        return None
    rest = given.removeprefix("nbd://")
    if "/" not in rest:
        return None
    export = urllib.parse.unquote(rest.split("/", 1)[1])
    if not export:
        return None
    uri: str = srec.connection(export)["uri"]
    return uri


MAX_VOLUME_NAME = 255  # Cinder's display_name column


def check_volume_name(name: str) -> None:
    """A volume name is free text, as in Cinder, but one line: a newline or another control
    character garbled `list`'s table, and a name of any length was taken."""
    if not 0 < len(name) <= MAX_VOLUME_NAME or not name.isprintable():
        raise VolumeError(
            f"invalid volume name {name!r}: use 1-{MAX_VOLUME_NAME} printable characters (no newline or tab)"
        )


def _since(mig: dict[str, Any], what: str) -> None:
    """Add to a failed migration's error what a later command cleaned up of what it left:
    its error said what stays and who removes it, which is no longer true."""
    mig["error"] = f"{mig.get('error') or ''}; since: {what}".removeprefix("; ")


def _pool_move(v: Volume) -> bool:
    """Is the volume's migration a move between two pools of its array (step 1), which
    that array runs while it serves the LUN as before (the same export, reads and writes)?"""
    mig = v.migration
    return (
        v.migration_status == "starting"
        and mig.get("phase") == "source"
        and Host.parse(mig["source"]).array == Host.parse(mig["target"]).array
    )


def _runner(pid: int) -> dict[str, Any]:
    """The migration record's fields that name the process running its steps: its pid and
    start time (:func:`_runs`)."""
    return {"pid": pid, "pid_start": process_start(pid)}


def _runs(mig: dict[str, Any]) -> bool:
    """Does another process run the migration's steps (`recover` then starts no follower)?
    Its pid alone could name a process that got it since the runner died (a reboot): the
    migration would wait for good. A record without the start time trusts the pid."""
    pid = int(mig.get("pid") or 0)
    if not pid or pid == os.getpid() or not pid_alive(pid):
        return False
    start = mig.get("pid_start")
    return start is None or process_start(pid) == start


class VolumeManager:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.registry = Registry(state_dir)
        self.db = VolumesDB(state_dir / "volumes.db")
        #: failure injection for tests: a step name ("source", "target", "host", "copy",
        #: "complete", "cleanup") from BLOCKMIG_FAIL_AT makes that step raise
        self.fail_at = os.environ.get("BLOCKMIG_FAIL_AT", "")

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ helpers
    def driver(self, array: str) -> VolumeDriver:
        try:
            rec = self.registry.get(array)
        except KeyError as e:
            raise VolumeError(str(e.args[0])) from None
        d = driver_for(rec.model, array, rec.client())
        # A follower asks an array whose API does not answer again for a while (it may be
        # restarting), but not one `blockmig down` stopped or `up` no longer starts: those
        # it leaves as they are at once (waiting_for), not after that while.
        d.expect_back = lambda: self._expect_back(array)
        return d

    def _expect_back(self, array: str) -> bool:
        try:
            return array in self.registry.load() and array not in self.registry.load_stopped()
        except RegistryError:  # damaged: no sign it was stopped on purpose
            return True

    def resolve_host(self, text: str) -> Host:
        """``ARRAY[@BACKEND][#POOL]`` as a volume's host: an array `up` started, a backend (if
        given) that is that array's model, and a pool the array has (it is asked: a volume
        or a migration recorded first would be left in error by a typo)."""
        h = Host.parse(text)
        try:
            rec = self.registry.get(h.array)
        except KeyError as e:
            raise VolumeError(str(e.args[0])) from None
        left = text.partition("#")[0]
        backend = left.partition("@")[2]
        if "@" in left and backend != rec.model:
            raise VolumeError(
                f"host {text!r}: array {h.array}'s backend is its model, {rec.model!r}, not "
                f"{backend!r} (use {h.array}#{h.pool} or {Host(h.array, rec.model, h.pool)})"
            )
        try:
            check_name("pool", h.pool)
        except InvalidInput as e:
            raise VolumeError(f"host {text!r}: {e}") from None
        try:
            pools = [p["name"] for p in rec.client().array_info()["pools"]]
        except ApiError as e:
            raise VolumeError(
                f"array {h.array} does not answer ({e}); start it (`blockmig up`) and retry"
            ) from None
        if h.pool not in pools:
            known = ", ".join(pools)
            raise VolumeError(f"host {text!r}: array {h.array} has no pool {h.pool!r} (pools: {known})")
        return Host(h.array, rec.model, h.pool)

    def _inject(self, step: str) -> None:
        if self.fail_at == step:
            raise VolumeError(f"failure injected at step {step!r} (BLOCKMIG_FAIL_AT)")

    # ------------------------------------------------------------------ locks between commands
    # Each `blockmig` command is its own process; the volumes db's compare-and-set updates
    # keep single rows consistent, but a check followed by work on the arrays needs more:
    # - the volume lock: delete, and migrate's checks, leftover cleanup and claim, run one
    #   at a time per volume (a delete never removes a LUN a migration just began to take
    #   over; a second migrate never cleans up "leftovers" of the migration that won);
    # - the runner lock: held by whoever runs a migration's steps (migrate for 1-3, then
    #   one follower for 4-5), so that two commands restarting a dead follower at once
    #   never run two (a second host copy deletes the target LUN the first writes to).
    # flock(2): the kernel drops them with the process, also on kill -9.
    def _try_lock(self, vid: str, kind: str) -> int | None:
        d = self.state_dir / "locks"
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / f"{vid}.{kind}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _lock(self, vid: str, kind: str, wait: float) -> int | None:
        deadline = time.monotonic() + wait
        while True:
            fd = self._try_lock(vid, kind)
            if fd is not None or time.monotonic() >= deadline:
                return fd
            time.sleep(0.05)

    @contextmanager
    def _volume_lock(self, v: Volume, what: str) -> Iterator[None]:
        fd = self._lock(v.id, "lock", LOCK_WAIT)
        if fd is None:
            raise VolumeError(
                f"volume {v.name} ({v.id}): another command kept it busy for {LOCK_WAIT:.0f} s "
                f"while {what}; try again"
            )
        try:
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ volumes
    def create(self, name: str, size: int, host_text: str) -> Volume:
        # what the array would refuse, refused before the volume is recorded (else it stays, in error)
        check_volume_name(name)
        try:
            check_size(size, f"size of volume {name}")
        except InvalidInput as e:
            raise VolumeError(e.message) from None
        host = self.resolve_host(host_text)
        v = self.db.create(name, size, str(host))
        try:
            loc = self.driver(host.array).create_volume(v, host.pool)
        except (ApiError, VolumeError) as e:
            self.db.update(v.id, status="error")
            raise VolumeError(f"creating volume {name} on {host} failed: {e}") from None
        return self.db.update(v.id, status="available", provider_location=loc)

    def delete(self, ref: str) -> None:
        v = self.db.get(ref)
        with self._volume_lock(v, "deleting it"):
            for _ in range(RACE_TRIES):
                v = self.db.get(v.id)  # as it is now that no other delete or migrate runs
                if v.attachments:
                    raise VolumeError(
                        f"volume {v.name} ({v.id}) is attached to {len(v.attachments)} host(s); detach first"
                    )
                self._clear_leftovers(v, f"volume {v.name} ({v.id}) is not deleted")
                if v.migration_status in MIGRATING:
                    raise VolumeError(f"volume {v.name} ({v.id}) is migrating; wait for the migration to end")
                why = self._array_down(v, Host.parse(v.host).array, lun_needed=False)
                if why:
                    raise VolumeError(f"volume {v.name} ({v.id}) is not deleted: {why}")
                try:
                    # only if no attach came meanwhile (attach does not take the lock)
                    self.db.update(
                        v.id,
                        expect={
                            "attachments": [],
                            "status": v.status,
                            "migration_status": v.migration_status,
                        },
                        status="deleting",
                    )
                except Conflict:
                    continue
                break
            else:
                raise VolumeError(f"volume {v.name} ({v.id}) kept changing while deleting it; try again")
            try:
                self.driver(Host.parse(v.host).array).delete_volume(v)
            except (ApiError, VolumeError) as e:
                self.db.update(v.id, status="error")
                raise VolumeError(f"deleting volume {v.name} failed: {e}") from None
            self.db.delete(v.id)
            for kind in ("lock", "follow"):  # a command waiting on them finds no volume
                (self.state_dir / "locks" / f"{v.id}.{kind}").unlink(missing_ok=True)

    def attach(self, ref: str, connector: dict[str, Any] | None = None) -> dict[str, Any]:
        connector = connector or {"host": socket.gethostname()}
        aid = uuid.uuid4().hex[:8]
        v = self.db.get(ref)
        for _ in range(RACE_TRIES):
            if v.migration_status in ("starting", "migrating") and not _pool_move(v):
                raise VolumeError(
                    f"volume {v.name} ({v.id}) is {v.migration_status} and not attachable until the "
                    "migration ends (its target array does not serve it while copying)"
                )
            if v.status not in ("available", "in-use"):
                raise VolumeError(
                    f"volume {v.name} ({v.id}) is {v.status}; it can be attached when available"
                )
            # as `show` says: a host given a fenced LUN could read it, never write it
            why = self._unavailable(v, self.registry.load())
            if why:
                raise VolumeError(f"volume {v.name} ({v.id}) cannot be attached now: {why}")
            info = self.driver(Host.parse(v.host).array).initialize_connection(v, connector)
            att = {
                "id": aid,
                "connector": connector,
                "attached_at": time.time(),
                "host": v.host,
                "connection": info["data"],
            }
            try:
                # only if no migration moved the volume (and its records) meanwhile
                self.db.update(
                    v.id,
                    expect={
                        "host": v.host,
                        "attachments": v.attachments,
                        "migration_status": v.migration_status,
                        "status": v.status,  # not deleting meanwhile
                    },
                    status="in-use",
                    attachments=[*v.attachments, att],
                )
            except Conflict:
                v = self.db.get(v.id)
                continue
            return {"attachment": aid, **info}
        raise VolumeError(f"volume {v.name} ({v.id}) kept changing while attaching it; try again")

    def detach(self, ref: str, attachment: str | None = None) -> Volume:
        """End one attachment (or all): terminate_connection on the array each record names
        (a migration re-pointed it at the array that serves the volume now)."""
        v = self.db.get(ref)
        for _ in range(RACE_TRIES):
            keep = [a for a in v.attachments if attachment is not None and a["id"] != attachment]
            if attachment is not None and len(keep) == len(v.attachments):
                raise VolumeError(f"volume {v.name} has no attachment {attachment}")
            for a in v.attachments:
                if a not in keep:
                    self._terminate(v, Host.parse(a["host"]).array, a)
            # Only an in-use volume becomes available: one in error (its create or delete
            # failed), being created or being deleted stays so (that status keeps attach out).
            status = "available" if v.status == "in-use" and not keep else v.status
            try:
                # only if no migration re-pointed the records kept, nor a delete began, meanwhile
                return self.db.update(
                    v.id,
                    expect={"attachments": v.attachments, "status": v.status},
                    attachments=keep,
                    status=status,
                )
            except Conflict:
                v = self.db.get(v.id)
        raise VolumeError(f"volume {v.name} ({v.id}) kept changing while detaching it; try again")

    # ------------------------------------------------------------------ attachments follow the volume
    def _switch_host(self, vid: str, host: str, lenient: bool = False, **fields: Any) -> Volume:
        """Write ``volume.host = host`` (and ``fields``) and re-point its attachment records
        at ``host`` in the same transaction, then end their connections on the array they
        left (best effort).

        One transaction keeps every record true at every step: the records move when the
        host does, at step 1 (a pool move), at step 3 (the takeover), at the end of a host
        copy, and back to the source when a failure or a cancel leaves the volume there.
        initialize_connection only reads connection info, so a crash before the commit
        leaves both where they were (and a retried step does it again); a crash after it
        leaves both moved. The array left behind drops its sessions anyway: its LUN is
        deleted (step 4, or the cancelled takeover). ``lenient`` (the failure path, which
        must not raise): an attachment whose new connection cannot be had is noted in the
        migration's error and kept as it was."""
        for _ in range(RACE_TRIES):
            v = self.db.get(vid)
            notes: list[str] = []
            atts, left = self._repoint(v, host, notes if lenient else None)
            f = dict(fields)
            if notes and "migration" in f:
                m = dict(f["migration"])
                m["error"] = "; ".join([m.get("error") or "", *notes]).lstrip("; ")
                f["migration"] = m
            try:
                v = self.db.update(
                    vid, expect={"attachments": v.attachments}, host=host, attachments=atts, **f
                )
            except Conflict:
                continue  # an attach or a detach meanwhile: again, with its records
            for array, a in left:
                self._terminate(v, array, a)
            return v
        raise VolumeError(f"volume {vid}: its attachments kept changing while it moved to {host}; try again")

    def _repoint(
        self, v: Volume, host: str, notes: list[str] | None
    ) -> tuple[list[dict[str, Any]], list[tuple[str, dict[str, Any]]]]:
        """The attachment records of ``v`` pointed at ``host`` (the same id and attached_at;
        the connection initialize_connection gives there; moved_from and moved_at say
        whence and when), and (array, record) of each connection to end on the array it
        left. A move within one array keeps its connection (the export is the same)."""
        to = Host.parse(host).array
        out: list[dict[str, Any]] = []
        left: list[tuple[str, dict[str, Any]]] = []
        now = time.time()
        for a in v.attachments:
            if a["host"] == host:
                out.append(a)
                continue
            try:
                conn = self.driver(to).initialize_connection(v, a["connector"])["data"]
            except (ApiError, VolumeError) as e:
                msg = (
                    f"attachment {a['id']} of host {a['connector'].get('host')}: no connection "
                    f"on array {to}: {e}"
                )
                if notes is None:
                    raise VolumeError(msg) from None
                prev = a.get("moved_from") or {}
                if prev.get("host") and Host.parse(prev["host"]).array == to:
                    conn = prev["connection"]  # moving back: it was this before
                else:
                    log.warning("%s; its record still names %s", msg, a["host"])
                    notes.append(f"{msg}; its record still names {a['host']}")
                    out.append(a)
                    continue
            out.append(
                {
                    **a,
                    "host": host,
                    "connection": conn,
                    "moved_from": {"host": a["host"], "connection": a["connection"]},
                    "moved_at": now,
                }
            )
            old = Host.parse(a["host"]).array
            if old != to:
                left.append((old, a))
        return out, left

    def _terminate(self, v: Volume, array: str, a: dict[str, Any]) -> None:
        """terminate_connection of one attachment on ``array``; best effort, logged."""
        try:
            self.driver(array).terminate_connection(v, a["connector"])
        except (ApiError, VolumeError) as e:
            log.warning(
                "terminate_connection of volume %s (attachment %s) on %s: %s", v.id, a["id"], array, e
            )

    # ------------------------------------------------------------------ migration, steps 1-3
    def migrate(
        self,
        ref: str,
        dest_text: str,
        force_host_copy: bool = False,
        new_type_id: str | None = None,
        progress: Progress | None = None,
    ) -> Volume:
        """Steps 1-3. Afterwards call :meth:`follow` (or spawn a follower) for 4-5."""
        v = self.db.get(ref)
        try:
            # before anything changes: a takeover fences the source before it asks the
            # target, and a target that then does not answer keeps the fence (_fail)
            dest = self.resolve_host(dest_text)
        except VolumeError as e:
            raise VolumeError(f"volume {v.name} ({v.id}) stays on {v.host}, unchanged: {e}") from None
        with self._volume_lock(v, "migrating it"):
            v = self.db.get(v.id)  # as it is now that no other delete or migrate runs
            if v.migration_status in MIGRATING:
                raise VolumeError(
                    f"volume {v.name} ({v.id}) is already {v.migration_status}; wait for that migration "
                    "to end (`blockmig show` follows it)"
                )
            self._clear_leftovers(v, f"volume {v.name} ({v.id}) stays on {v.host}, unchanged")
            v = self.db.get(v.id)  # a leftover cutover adopted: the volume lives there now
            if v.status not in ("available", "in-use"):  # the claim below would fail, less clearly
                why = "; its create or delete failed: delete it (`blockmig delete`)"
                raise VolumeError(
                    f"volume {v.name} ({v.id}) is {v.status}: only an available or in-use volume "
                    f"migrates{why if v.status == 'error' else ''}"
                )
            src = Host.parse(v.host)
            if (dest.array, dest.pool) == (src.array, src.pool):
                raise VolumeError(f"volume {v.name} is already on {v.host}")
            why = self._cannot_move_within(src, dest, force_host_copy) or self._array_down(v, src.array)
            if why:  # refused before the claim: no migration recorded in error
                raise VolumeError(f"volume {v.name} ({v.id}) stays on {v.host}, unchanged: {why}")
            mig = {
                "phase": "source",
                "source": v.host,
                "target": str(dest),
                "started": time.time(),
                "source_location": v.provider_location,
                **_runner(os.getpid()),
                "error": "",
            }
            # a follower of the last migration may still be letting go of it
            runner = self._lock(v.id, "follow", RUNNER_WAIT)
            if runner is None:
                raise VolumeError(
                    f"volume {v.name} ({v.id}): a follower of its last migration still runs; try again"
                )
            try:
                v = self.db.update(
                    v.id,
                    expect={
                        "migration_status": (None, "success", "error"),
                        "status": ("available", "in-use"),
                    },
                    migration_status="starting",
                    migration=mig,
                )
            except BaseException:
                os.close(runner)
                raise
        try:
            # Step 1: the source driver first, unless told to copy or retype.
            if not force_host_copy and not new_type_id:
                self._inject("source")
                r = self.driver(src.array).migrate_volume(v, dest, progress)
                if r.moved:
                    return self._switch_host(
                        v.id,
                        str(dest),
                        provider_location=r.model_update or {},
                        migration_status="success",
                        migration={**mig, "phase": "done"},
                    )
            # Step 2: the target driver.
            mig["phase"] = "target"
            v = self.db.update(v.id, migration=mig)
            r2 = None
            if not force_host_copy and dest.array != src.array:
                self._inject("target")
                ddrv, sdrv = self.driver(dest.array), self.driver(src.array)
                if isinstance(ddrv, RemoteTakeoverMixin):
                    # the target alone gets the fence's URI
                    v, src_uri = self._fence_source(v, mig, sdrv)
                else:
                    src_uri = sdrv.connection_uri(v)
                # what the target dials: told again if the source array moves (update_sources);
                # recorded first, so that its takeover is told from others while step 2 runs
                mig["source_uri"] = src_uri
                v = self.db.update(v.id, migration=mig)
                r2 = ddrv.migrate_volume_target(v, src_uri, dest.pool)
            if r2 is None or not r2.moved:
                if mig.get("fenced"):  # a generic host copy, the volume unusable meanwhile
                    self._unfence(v, mig)
                if dest.array == src.array:
                    raise VolumeError(
                        f"array {src.array} (model {src.backend}) cannot move volumes between its own "
                        "pools, and a host copy needs another array"
                    )
                mig["phase"] = "host-copy"
                return self.db.update(v.id, migration_status="migrating", migration=mig)
            # Step 3: the volume now lives on the target.
            self._inject("host")
            mig["phase"] = "complete"
            mig["async"] = r2.migration_async
            return self._switch_host(
                v.id,
                str(dest),
                provider_location=r2.model_update or {},
                migration=mig,
                migration_status="migrating_attachable" if r2.migration_async else "migrating",
            )
        except (ApiError, VolumeError, OSError) as e:
            self._fail(v.id, f"step {mig['phase']}: {e}")
            raise VolumeError(f"migration of {v.name} failed at step {mig['phase']}: {e}") from None
        finally:
            os.close(runner)  # steps 4-5 are the follower's

    def _array_down(self, v: Volume, array: str, lun_needed: bool = True) -> str:
        """Why the array that holds the volume cannot be asked to migrate or delete it now
        ("": it can): like a migration's target (:meth:`resolve_host`), it is asked before
        anything changes, not found down half-way (a migration's fence comes first in step
        2; a delete marks the volume deleting, then error). ``lun_needed`` False: a LUN that
        is gone is no reason (deleting a missing volume succeeds)."""
        try:
            self.driver(array).api.get_lun(v.lun)
        except ApiError as e:
            if e.status == 404:
                return f"its LUN {v.lun} is not on array {array}" if lun_needed else ""
            return f"array {array} does not answer ({e}); start it (`blockmig up`) and retry"
        return ""

    def _cannot_move_within(self, src: Host, dest: Host, force_host_copy: bool) -> str:
        """Why a move between two pools of one array cannot be made ("": it can): only the
        array itself moves a volume between its pools; a host copy needs another array."""
        if dest.array != src.array:
            return ""
        pools = self.driver(src.array).supports_pool_migration
        if force_host_copy:
            return f"a host copy (--force-host-copy) needs another array than {src.array}" + (
                f" (without it, array {src.array} moves the volume between its own pools)" if pools else ""
            )
        if not pools:
            return (
                f"array {src.array} (model {src.backend}) cannot move volumes between its own pools, "
                "and a host copy needs another array"
            )
        return ""

    # ------------------------------------------------------------------ steps 4-5
    def follow(self, ref: str, progress: Progress | None = None, wait: bool = True) -> Volume:
        """Steps 4-5 (or the host copy), in this process. Idempotent: may run again after a crash.

        One follower at a time: while another process runs the migration's steps, wait for
        it (``wait``) until the migration ends (or that process dies, and this one goes on),
        else give up after a moment and return the volume as it is."""
        v = self.db.get(ref)
        started = v.migration.get("started")
        deadline = time.monotonic() + (float("inf") if wait else 2.0)
        while (runner := self._try_lock(v.id, "follow")) is None:
            v = self.db.get(v.id)
            if (
                v.migration_status not in MIGRATING
                or v.migration.get("started") != started  # it ended and another one began
                or time.monotonic() >= deadline
            ):
                log.info("volume %s: another process follows its migration", v.id)
                return v
            time.sleep(0.2)
        try:
            return self._follow(v.id, progress)
        finally:
            os.close(runner)

    def _follow(self, vid: str, progress: Progress | None) -> Volume:
        v = self.db.get(vid)
        mig = dict(v.migration)
        if v.migration_status not in MIGRATING:
            return v
        mig.update(_runner(os.getpid()))
        v = self.db.update(v.id, migration=mig)
        try:
            if mig["phase"] == "host-copy":
                return self._host_copy(v, progress)
            if mig["phase"] == "complete":
                return self._complete(v, progress)
            if mig["phase"] == "cleanup":
                return self._cleanup(v)
            if mig["phase"] == "source":
                moved = self._finish_move(v, progress)
                if moved is not None:
                    return moved
            if mig["phase"] == "target":
                adopted = self._adopt_cutover(v, progress)
                if adopted is not None:
                    return adopted
            # The command that ran steps 1-3 died half-way: nothing was switched yet.
            raise VolumeError(f"interrupted during step {mig['phase']}; the volume stays on {mig['source']}")
        except (ApiError, VolumeError, OSError, ValueError, NbdError) as e:
            # NbdError: the host copy's NBD I/O failed (ENOSPC on the target, an array gone)
            why = self.waiting_for(mig)
            if why:
                # `blockmig down` stopped them, on purpose, or they are no longer configured:
                # no failure (a takeover's target resumes its copy when started again, and
                # which side holds the data is not known without it); the next command after
                # `up` restarts a follower (recover)
                log.warning("volume %s: its migration waits (%s): %s", v.id, e, why)
                return self.db.get(v.id)
            self._fail(v.id, str(e))
            raise VolumeError(f"migration of {v.name} failed: {e}") from None

    def _finish_move(self, v: Volume, progress: Progress | None) -> Volume | None:
        """The command that ran step 1, a move between two pools of one array, died (Ctrl-C)
        while it waited for the array's move: follow the move to its end as step 1 did, and
        end the migration as step 1 would have. None if the array runs no such move (it
        never got that far): the migration fails back to where it was."""
        mig = dict(v.migration)
        src, dest = Host.parse(mig["source"]), Host.parse(mig["target"])
        if dest.array != src.array:
            return None
        d = self.driver(src.array)
        st = d.migration_if_any(v.lun)  # through a restart of the array
        if st is None:
            return None
        if st.get("source") != f"move:{src.pool}:{dest.pool}":
            return None  # not this move's
        if st.get("state") not in FINAL:
            st = d._follow(v.lun, progress)  # raises if it fails or is cancelled
        lun = d.asked(lambda: d.api.get_lun(v.lun))
        if st.get("state") != "completed" or lun["pool"] != dest.pool:
            return None  # (an earlier move's record, the LUN moved back since)
        loc = d._location(lun)
        return self._switch_host(
            v.id,
            str(dest),
            provider_location=loc,
            migration_status="success",
            migration={**mig, "phase": "done"},
        )

    def _adopt_cutover(self, v: Volume, progress: Progress | None = None) -> Volume | None:
        """The command that ran steps 1-3 died after the target took the LUN over, and the
        target has cut over since: it is authoritative now (a host may have found the LUN
        there), so the migration goes on from step 3, not back to the source (which would
        delete the copy hosts may have written to). A synchronous target copies within step
        2, where that command waited (Ctrl-C of it leaves the migration going on): its copy
        is followed to its end here first. None if its takeover did not cut over."""
        mig = dict(v.migration)
        dest = Host.parse(mig["target"])
        d = self.driver(dest.array)
        if not isinstance(d, RemoteTakeoverMixin):
            return None
        st = d.migration_if_any(v.lun)  # through a restart of the array
        if st is None:
            return None  # it never got that far
        if mig.get("source_uri") and st.get("source") != mig["source_uri"]:
            return None  # another takeover's
        if st.get("state") not in FINAL and not d.supports_async_migration:
            st = d._follow(v.lun, progress)  # raises if it fails or is cancelled: back to the source
        if st.get("state") != "completed":
            return None  # not cut over
        loc = d.location(v.lun)
        mig.update(phase="cleanup", adopted=True)
        v = self._switch_host(v.id, str(dest), provider_location=loc, migration=mig)
        return self._cleanup(v)

    def _complete(self, v: Volume, progress: Progress | None) -> Volume:
        mig = dict(v.migration)
        dest = Host.parse(mig["target"])
        self._inject("complete")
        loc = self.driver(dest.array).complete_migration_target(v, progress)
        v = self.db.update(v.id, provider_location=loc, migration={**mig, "phase": "cleanup"})
        return self._cleanup(v)

    def _cleanup(self, v: Volume) -> Volume:
        """Step 4's end: the target holds the volume; remove the source LUN."""
        mig = dict(v.migration)
        self._remove_source(v, mig)
        return self.db.update(
            v.id, migration_status="success", migration={**mig, "phase": "done", "finished": time.time()}
        )

    def _host_copy(self, v: Volume, progress: Progress | None) -> Volume:
        # Imported here, not with the module: the NBD client and an event loop serve this
        # copy alone, and every volume command loads this module (control/cli.py).
        import asyncio

        from .hostcopy import copy_volume

        mig = dict(v.migration)
        src, dest = Host.parse(mig["source"]), Host.parse(mig["target"])
        sdrv, ddrv = self.driver(src.array), self.driver(dest.array)
        target = Volume(**v.__dict__)  # the same LUN name, on the target array
        ddrv.delete_volume(target)  # a partial copy left by an earlier try
        if mig.pop("copy_leftover", None):  # recorded when its array was down: gone now
            v = self.db.update(v.id, migration=mig)
        try:
            loc = ddrv.create_volume(target, dest.pool)
            # Fenced as a takeover is (an in-use volume's hosts stay attached to the source);
            # the copy reads through the fence's alias.
            v, src_uri = self._fence_source(v, mig, sdrv)
            self._inject("copy")

            def report(done: int, total: int) -> None:
                m = {**mig, "progress": {"copied": done, "total": total}}
                self.db.update(v.id, migration=m)
                if progress is not None:
                    progress(
                        {
                            "state": "copying",
                            "clean_bytes": done,
                            "total_bytes": total,
                            "dirty_bytes": total - done,
                        }
                    )

            asyncio.run(copy_volume(src_uri, ddrv.connection_uri(target), report))
        except BaseException:
            self._drop_copy(v.id, mig, ddrv, target)
            raise
        try:
            v = self._switch_host(
                v.id, str(dest), provider_location=loc, migration={**mig, "phase": "cleanup"}
            )
        except VolumeError:
            self._drop_copy(v.id, mig, ddrv, target)  # nothing switched (it raises before its commit only)
            raise
        return self._cleanup(v)

    def _drop_copy(self, vid: str, mig: dict[str, Any], ddrv: VolumeDriver, target: Volume) -> None:
        """Delete a failed host copy's partial LUN on the target. If its array does not
        answer (it died mid-copy), record it as ``copy_leftover`` for the next migrate or
        delete, or `blockmig up`, to delete (:meth:`_remove_leftover`): nothing else would
        ever reach it, not even the volume's delete. The copy's own error is what the
        caller raises."""
        try:
            ddrv.delete_volume(target)
        except (ApiError, VolumeError):
            mig["copy_leftover"] = True  # _fail says so
            self.db.update(vid, migration=mig)

    def _clear_leftovers(self, v: Volume, refused: str) -> None:
        """:meth:`_remove_leftover` before a delete or a migration, which an array that does
        not answer refuses with ``refused`` (what becomes of the volume) and says why: the
        API error alone named an address, not which migration's leftovers were meant."""
        try:
            self._remove_leftover(v)
        except ApiError as e:
            mig = v.migration
            raise VolumeError(
                f"{refused}: what its failed migration {mig.get('source')} -> {mig.get('target')} left "
                f"could not be removed first: {e} (`blockmig up` starts the arrays; then retry)"
            ) from None

    def _remove_leftover(self, v: Volume) -> None:
        """The last migration could not remove its source LUN, or could not reach its
        target to drop the takeover there: do it now, so that neither a delete nor a
        migration back to that array leaves or meets it."""
        mig = v.migration
        if v.migration_status != "error" or not mig:
            return
        here = Host.parse(v.host).array
        mig = dict(mig)
        if (
            mig.get("phase") == "cleanup"
            and not mig.get("source_removed")
            and Host.parse(mig["source"]).array != here
        ):
            self.driver(Host.parse(mig["source"]).array).delete_volume(v)  # its fence with it
            mig["source_removed"] = True
            _since(mig, f"its source LUN on {Host.parse(mig['source']).array} was removed")
            v = self.db.update(v.id, migration=mig)
        if mig.get("target_leftover") and Host.parse(mig["target"]).array != here:
            d = self.driver(Host.parse(mig["target"]).array)
            if isinstance(d, RemoteTakeoverMixin):
                if mig.get("fenced") and d.has_cut_over(v) and self._source_fenced(v, mig):
                    # The target cut over (before the failure, unseen, or after a restart),
                    # and the source stayed fenced all along: the target holds all the
                    # source has, and what hosts wrote to it since. It is authoritative.
                    self._adopt_leftover(v, mig, d)
                    return
                # the source stayed authoritative; a target that cut over while the
                # source was not fenced may hold host writes the source lacks (refused)
                self._refuse_if_written_since_cutover(v, d)
                d.cancel_migration_target(v, keep_completed=False)
            mig["target_leftover"] = False
            _since(mig, f"the takeover on {Host.parse(mig['target']).array} was dropped")
            v = self.db.update(v.id, migration=mig)
        if mig.get("move_leftover") and Host.parse(mig["source"]).array == here:
            v = self._stop_leftover_move(v, mig)
        target = Host.parse(mig["target"]).array
        if mig.get("copy_leftover") and target != here:
            # a host copy's partial LUN, never given to a host: its array was down then; one
            # that no config names any more (neither running nor stopped) is out of reach
            if target in self.registry.load() or target in self.registry.load_stopped():
                self.driver(target).delete_volume(v)
                _since(mig, f"the partial copy on {target} was deleted")
            else:
                _since(mig, f"the partial copy on {target} is out of reach: no config names {target}")
            mig["copy_leftover"] = False
            v = self.db.update(v.id, migration=mig)
        if mig.get("fenced") and Host.parse(mig["source"]).array == here:
            # the source stayed authoritative but its fence could not be lifted then
            _since(mig, f"the fence on {here} was lifted")
            self._unfence(v, mig)

    def _stop_leftover_move(self, v: Volume, mig: dict[str, Any]) -> Volume:
        """A failed pool move its array could not be told to stop (it was down) and goes on
        with since it is up: stop it now, or, if it ended, follow the LUN to its pool, so
        that the volume's host names the pool its LUN is in. ``mig`` is updated in place."""
        src = Host.parse(v.host)
        pool, loc = self._stop_move(v, src.array, v.provider_location)
        mig["move_leftover"] = False
        if pool == src.pool:
            _since(mig, f"the move on {src.array} was stopped")
            return self.db.update(v.id, migration=mig)
        _since(mig, f"the array had moved it meanwhile: the volume is on {src.array}#{pool}")
        host = str(Host(src.array, src.backend, pool))
        return self._switch_host(v.id, host, lenient=True, provider_location=loc, migration=mig)

    def _source_fenced(self, v: Volume, mig: dict[str, Any]) -> bool:
        """Does the source array still hold the volume's LUN fenced (ours, never lifted)?"""
        lun = self.driver(Host.parse(mig["source"]).array).api.get_lun(v.lun)
        return bool(lun.get("fenced")) and (lun.get("fence") or {}).get("holder") == f"volume {v.id}"

    def _adopt_leftover(self, v: Volume, mig: dict[str, Any], d: VolumeDriver) -> Volume:
        """The volume (in error on its source) moves to the target that cut over, and the
        migration ends as it would have: the source LUN removed, ``success``."""
        target = mig["target"]
        loc = d._location(d.api.get_lun(v.lun))
        mig.update(
            target_leftover=False,
            phase="cleanup",
            error=f"{mig.get('error', '')}; {target} had cut over: the volume lives there (adopted)",
        )
        v = self._switch_host(v.id, target, provider_location=loc, migration=mig)
        return self._cleanup(v)

    def release_leftovers(self, wait: float = 0.0) -> list[SourceNote]:
        """Finish what failed migrations could not clean up (`blockmig up`, once the arrays
        run again): a takeover its target did not answer to drop, the source LUN's fence
        kept meanwhile, a source LUN left after the cutover (:meth:`_remove_leftover`).
        Each under the volume's lock (``wait`` seconds at most; a busy volume is left to
        its next migrate or delete). Returns what it did and what failed."""
        notes: list[SourceNote] = []
        for v in self.db.list():
            mig = v.migration
            here = Host.parse(v.host).array
            if v.migration_status != "error" or not mig.get("source"):
                continue
            on_source = Host.parse(mig["source"]).array == here
            if not (
                mig.get("target_leftover")
                or mig.get("copy_leftover")
                or (mig.get("move_leftover") and on_source)
                or (mig.get("fenced") and on_source)
                or (mig.get("phase") == "cleanup" and not mig.get("source_removed") and not on_source)
            ):
                continue  # nothing _remove_leftover would do
            what = f"volume {v.name} ({v.id})"
            fd = self._lock(v.id, "lock", wait)
            if fd is None:
                notes.append(SourceNote(v.id, False, f"{what}: busy; its leftovers stay"))
                continue
            try:
                self._remove_leftover(self.db.get(v.id))
            except (ApiError, VolumeError) as e:
                notes.append(SourceNote(v.id, False, f"{what}: its failed migration's leftovers stay: {e}"))
            else:
                notes.append(SourceNote(v.id, True, f"{what}: its failed migration's leftovers are gone"))
            finally:
                os.close(fd)
        return notes

    @staticmethod
    def _refuse_if_written_since_cutover(v: Volume, d: VolumeDriver) -> None:
        """A leftover takeover that cut over by itself (its array restarted and resumed
        it) and has taken host writes since its array started may hold data the source
        never saw (a host still attached to it): keep both copies and say so, rather
        than delete the one that may be newer."""
        st = d.api.migration_if_any(v.lun)
        if st is None:
            return
        if st.get("state") != "completed":
            return  # not cut over: every write it took went to the source too (I1)
        ops = d.api.call("GET", f"/api/v1/luns/{v.lun}/stats")["ops"]
        written = sum(int(ops[op]["count"]) for op in ("write", "zero", "trim"))
        if written:
            raise VolumeError(
                f"LUN {v.lun} on array {d.array_name} completed its takeover after the migration failed and "
                f"has taken {written} write(s) since: it may hold data the source lacks. Keep one "
                f"copy by hand (`blockmig lun delete --api URL {v.lun} --force` on the other), then retry"
            )

    def _fence_source(self, v: Volume, mig: dict[str, Any], sdrv: VolumeDriver) -> tuple[Volume, str]:
        """Fence the source LUN: a host still attached to it can no longer write behind
        the copy (the write would be lost when the source goes). Returns the volume and
        the URI the copy reads through. Recorded before the call, so that every failure
        path (_fail) lifts it; a refusal (400/404/409) fenced nothing: a fence there is
        another holder's, whose takeover may still copy, not ours to lift."""
        mig["fenced"] = True
        v = self.db.update(v.id, migration=mig)
        try:
            # asked again through an outage of the source array (a restart): a fence is
            # idempotent for its holder (the array gives the one it holds)
            return v, sdrv.asked(lambda: sdrv.fence_for_takeover(v, f"volume {v.id}"))
        except ApiError as e:
            if e.status in (400, 404, 409):
                mig["fenced"] = False
                self.db.update(v.id, migration=mig)
            raise

    def _unfence(self, v: Volume, mig: dict[str, Any]) -> None:
        """Lift the source LUN's fence and record it (``mig`` is updated in place)."""
        self.driver(Host.parse(mig["source"]).array).unfence(v)
        mig["fenced"] = False
        self.db.update(v.id, migration=mig)

    def _remove_source(self, v: Volume, mig: dict[str, Any]) -> None:
        self._inject("cleanup")
        d = self.driver(Host.parse(mig["source"]).array)
        # asked again through an outage of the source array (a restart): one left after the
        # cutover ended the migration in error; a delete of a missing LUN succeeds
        d.asked(lambda: d.delete_volume(v))

    def _fail(self, vid: str, error: str) -> None:
        """Step failed: leave the volume on its authoritative side, status error."""
        v = self.db.get(vid)
        mig = dict(v.migration)
        mig["error"] = error
        src, dest = Host.parse(mig["source"]), Host.parse(mig["target"])
        if mig.get("phase") == "complete" and self._target_completed(v, dest):
            mig["phase"] = "cleanup"  # the array cut over: the target is authoritative now
        if mig.get("phase") in ("complete", "target") and dest.array != src.array:
            # The source stayed authoritative (I1): drop the takeover on the target. One that
            # cut over meanwhile holds the volume once hosts were sent there (step 3 done:
            # "complete"); before that, none was, and the fenced source holds every write.
            try:
                d = self.driver(dest.array)
                if isinstance(d, RemoteTakeoverMixin):
                    d.cancel_migration_target(v, keep_completed=None if mig["phase"] == "complete" else False)
            except ApiError as e:
                if e.code != "completed":
                    self._target_left(mig, dest.array, e)
                else:
                    mig["phase"] = "cleanup"
            except VolumeError as e:
                self._target_left(mig, dest.array, e)
        if mig.get("phase") == "cleanup":
            # Only removing the source failed: the data lives on the target, keep it there.
            mig["error"] = f"{error}; the volume lives on {mig['target']}; its source LUN may remain"
            self._switch_host(vid, mig["target"], lenient=True, migration_status="error", migration=mig)
            return
        if mig.get("fenced") and mig.get("target_leftover"):
            # The target may still serve the LUN (its API did not answer, its process may
            # live on, or restart and resume): a host writing to the source now would write
            # behind its back. The fence stays until the takeover is dropped there.
            mig["error"] += (
                f"; the source LUN on {src.array} stays fenced until the takeover on {dest.array} is "
                "dropped (by the next migrate or delete, or `blockmig up`, once it answers; if "
                f"{dest.array} is gone for good: `blockmig lun unfence --api URL {v.lun}`)"
            )
        elif mig.get("fenced"):
            # after the takeover (or the host copy) is gone: hosts may write to the source again
            try:
                self.driver(src.array).unfence(v)
                mig["fenced"] = False
            except (ApiError, VolumeError) as e:
                mig["error"] += (
                    f"; lifting the fence on {src.array}: {e} (done by the next migrate or delete, "
                    "or `blockmig up`)"
                )
        if mig.get("copy_leftover"):
            mig["error"] += (
                f"; the partial copy on {dest.array} could not be deleted (done by the next migrate "
                "or delete, or `blockmig up`)"
            )
        host, loc = mig["source"], mig.get("source_location", {})
        if mig.get("phase") == "source" and dest.array == src.array:
            # A pool move, which the array runs by itself: stop it, else it ends in the new
            # pool while the volume says the old one (and a retry finds it "already there").
            try:
                pool, loc = self._stop_move(v, src.array, loc)
            except (ApiError, VolumeError) as e:
                # the array (down, or its process killed) goes on with the move once up
                mig["error"] += (
                    f"; stopping the move on {src.array}: {e} (done by the next migrate or delete, "
                    "or `blockmig up`)"
                )
                mig["move_leftover"] = True
            else:
                if pool != src.pool:
                    host = str(Host(src.array, src.backend, pool))
                    mig["error"] += f"; the array had already moved it: the volume is on {host}"
        # attachments moved to the target (or made there) follow the volume back
        self._switch_host(
            vid,
            host,
            lenient=True,
            provider_location=loc,
            migration_status="error",
            migration=mig,
        )

    @staticmethod
    def _target_left(mig: dict[str, Any], array: str, e: Exception) -> None:
        """Record that the takeover on ``array`` could not be dropped (``e``)."""
        mig["error"] += f"; cleanup on {array}: {e} (done by the next migrate or delete, or `blockmig up`)"
        mig["target_leftover"] = True

    def _stop_move(self, v: Volume, array: str, loc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Cancel the array's move of the volume's LUN if it runs; (pool, location) of the LUN."""
        d = self.driver(array)
        try:
            st = d.api.migration(v.lun)
        except ApiError as e:
            if e.status != 404:
                raise
            st = {}
        if str(st.get("source", "")).startswith("move:") and st.get("state") not in FINAL:
            try:
                d.api.call("POST", f"/api/v1/migrations/{v.lun}/cancel")
            except ApiError as e:
                if e.status not in (404, 409):  # it ended meanwhile
                    raise
        lun = d.api.get_lun(v.lun)
        return str(lun["pool"]), {**loc, **d._location(lun)}

    def _target_completed(self, v: Volume, dest: Host) -> bool:
        """Has the target array already cut over to its own copy?"""
        try:
            st = self.driver(dest.array).api.migration(v.lun)
        except (ApiError, VolumeError):
            return False
        return bool(st.get("state") == "completed")

    # ------------------------------------------------------------------ restart
    def waiting_for(
        self,
        mig: dict[str, Any],
        stopped: dict[str, ArrayRecord] | None = None,
        known: dict[str, ArrayRecord] | None = None,
    ) -> str:
        """Why migration ``mig`` waits for `blockmig up` instead of going on ("": it need
        not): an array of it (source, target) that `blockmig down` stopped (``stopped``:
        STATE_DIR/stopped.json), or one that is neither in the registry (``known``) nor
        stopped: `up` left it out, its config no longer names it. No follower runs it
        meanwhile (it would find the array gone and fail the migration, not knowing which
        side holds the data); `show` and `up` say why it waits."""
        if not mig.get("source") or not mig.get("target"):
            return ""
        arrays = sorted({Host.parse(mig[k]).array for k in ("source", "target")})
        if stopped is None:
            stopped = self.registry.load_stopped()
        down = [a for a in arrays if a in stopped]
        if down:
            return f"array(s) {', '.join(down)} stopped by `blockmig down`; it goes on after `blockmig up`"
        if known is None:
            known = self.registry.load()
        gone = [a for a in arrays if a not in known]
        if gone:
            return (
                f"array(s) {', '.join(gone)}: not running, and not stopped by `blockmig down` (the config "
                "`blockmig up` last started names no such array); it goes on once a config names it "
                "again and `blockmig up` starts it"
            )
        return ""

    def recover(self, sources: bool = True) -> list[str]:
        """Find migrations whose follower is gone and start one again (not while an array
        they need is stopped by `blockmig down`, or not known at all: :meth:`waiting_for`);
        first tell takeovers where their source is served now (:meth:`update_sources`),
        unless ``sources`` is False."""
        migrating = self.db.migrating()
        if sources:
            for note in self.update_sources(volumes=migrating):
                if not note.ok:
                    log.warning("%s", note.message)
        started = []
        stopped = self.registry.load_stopped() if migrating else {}
        known = self.registry.load() if migrating else {}
        for v in migrating:
            if _runs(v.migration):
                continue
            if self.waiting_for(v.migration, stopped, known):
                continue  # `blockmig up` first: the follower would find them gone
            runner = self._try_lock(v.id, "follow")
            if runner is None:
                continue  # a follower runs, though not the one recorded (two were started at once)
            os.close(runner)
            self.spawn_follower(v.id)
            started.append(v.id)
        return started

    def update_sources(self, wait: float = 0.0, volumes: list[Volume] | None = None) -> list[SourceNote]:
        """Tell each takeover's target where its source is served now.

        The target array dials the source URI it was given (the fence alias's, on the
        source array's NBD address then), kept with its migration in its own database. An
        array that `blockmig up` started again at another address (its old port taken; a
        new ``nbd`` in its config) serves the alias there, while the target keeps dialing
        the old address: host I/O that needs the source would fail with EIO and the copy
        never resume. So for each volume whose takeover runs (phase ``complete``), the URI
        recorded as given (``source_uri``) is compared with the alias at the source array's
        address in the registry, and where they differ the target is told the new one
        (`PATCH /api/v1/migrations/NAME {"source": URI}`: it checks that the URI serves the
        same LUN), under the volume's lock (``wait`` seconds at most; a volume busy with
        another command is left to the next one), and it is recorded. Cheap when nothing
        moved: no array is asked (a migration recorded before ``source_uri`` asks its
        target once). Returns what it did and what failed; failures change nothing and
        the next command tries again. ``volumes``: the migrating ones, if read already."""
        notes: list[SourceNote] = []
        arrays: dict[str, ArrayRecord] | None = None
        for v in self.db.migrating() if volumes is None else volumes:
            mig = v.migration
            if mig.get("phase") != "complete" or not mig.get("source") or not mig.get("target"):
                continue
            src, dest = Host.parse(mig["source"]).array, Host.parse(mig["target"]).array
            if src == dest:
                continue
            if arrays is None:
                arrays = self.registry.load()
            if src not in arrays or dest not in arrays:
                continue  # not started (down): `up` comes first
            try:
                note = self._update_source(v, arrays[src], dest, wait)
            except (ApiError, VolumeError, OSError) as e:
                note = SourceNote(v.id, False, f"volume {v.name} ({v.id}): finding where its source is: {e}")
            if note is not None:
                notes.append(note)
        return notes

    def _update_source(self, v: Volume, srec: ArrayRecord, dest: str, wait: float) -> SourceNote | None:
        given = v.migration.get("source_uri")
        if not given:  # a migration from before source_uri: what its target dials
            d = self.driver(dest)
            if not isinstance(d, RemoteTakeoverMixin):
                return None
            try:
                given = str(d.api.migration(v.lun)["source"])
            except (ApiError, KeyError):
                return None  # the target is not up (yet), or its migration gone: the follower's
            self._record_source(v.id, v.migration, given)
        now = _readdressed(given, srec)
        if now is None or now == given:
            return None
        fd = self._lock(v.id, "lock", wait)
        if fd is None:
            return SourceNote(
                v.id,
                False,
                f"volume {v.name} ({v.id}): busy with another command; its source is told "
                f"to move to {now} by the next one",
            )
        try:
            v = self.db.get(v.id)  # as it is now, under the lock
            mig = v.migration
            if v.migration_status not in MIGRATING or mig.get("phase") != "complete":
                return None
            d = self.driver(dest)
            if not isinstance(d, RemoteTakeoverMixin):
                return None
            try:
                d.set_migration_source(v, now)
            except ApiError as e:
                return SourceNote(
                    v.id,
                    False,
                    f"volume {v.name} ({v.id}): array {dest} could not be told that its "
                    f"migration's source is at {now} now (was {given}): {e}",
                )
            self._record_source(v.id, mig, now)
            return SourceNote(
                v.id,
                True,
                f"volume {v.name} ({v.id}): array {dest} reaches its migration's source at "
                f"{now} now (was {given})",
            )
        finally:
            os.close(fd)

    def _record_source(self, vid: str, mig: dict[str, Any], uri: str) -> None:
        """Record ``source_uri`` in the volume's migration unless the migration changed
        meanwhile (its follower records its pid, a failure its error: read again)."""
        started = mig.get("started")
        for _ in range(RACE_TRIES):
            try:
                self.db.update(vid, expect={"migration": mig}, migration={**mig, "source_uri": uri})
                return
            except Conflict:
                mig = self.db.get(vid).migration
                if mig.get("started") != started:
                    return  # another migration now
        log.warning("volume %s: its migration kept changing; source_uri %s not recorded", vid, uri)

    def spawn_follower(self, vid: str) -> int:
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = child_env()
        with open(logs / f"follow-{vid}.log", "ab") as log_file:
            proc = subprocess.Popen(
                python_module_command("control.cli", "_follow", "--state-dir", str(self.state_dir), vid),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        v = self.db.get(vid)
        try:  # unless the follower already got on with it (it records its own pid)
            self.db.update(
                vid, expect={"migration": v.migration}, migration={**v.migration, **_runner(proc.pid)}
            )
        except Conflict:
            pass
        return proc.pid

    # ------------------------------------------------------------------ views
    def view(self, v: Volume, arrays: dict[str, ArrayRecord] | None = None) -> dict[str, Any]:
        """``v`` as the commands print it, every address at its array's address NOW.

        volumes.db keeps which array and which export (LUN) a location or an attachment
        names; the URIs stored with them are what the array answered then. An array that
        `blockmig up` started again on other ports (its old ones taken), or whose config
        names another ``nbd`` address, serves the same exports elsewhere: so the location's
        ``uri`` and each attachment's ``connection`` come from the registry
        (:meth:`ArrayRecord.connection`), never from the stored row, which stays as it was
        (old databases read as they are). An attachment whose stored URI is not the one
        now keeps it as ``given_uri``: what its host was given and still holds, which no
        record can fix (the array's connections ended when it stopped): the host must
        re-attach. ``moved_from`` is history too, as recorded. A volume on an array the
        registry does not name (arrays down: `blockmig down` forgets them) shows what was
        recorded. ``arrays``: the registry, read once for many volumes."""
        if arrays is None:
            arrays = self.registry.load()
        d = v.as_dict()
        loc = dict(v.provider_location)
        if loc:
            rec = arrays.get(str(loc.get("array") or Host.parse(v.host).array))
            if rec is not None:
                loc["uri"] = rec.connection(str(loc.get("lun") or v.lun))["uri"]
        d["provider_location"] = loc
        atts = []
        for a in v.attachments:
            rec = arrays.get(Host.parse(a["host"]).array)
            given = a.get("connection") or {}
            if rec is not None:
                a = {**a, "connection": {**given, **rec.connection(str(given.get("export") or v.lun))}}
                if given.get("uri") and given["uri"] != a["connection"]["uri"]:
                    a["given_uri"] = given["uri"]
            atts.append(a)
        d["attachments"] = atts
        return d

    def show(self, ref: str) -> dict[str, Any]:
        v = self.db.get(ref)
        arrays = self.registry.load()
        d = self.view(v, arrays)
        d["last_uri"] = v.provider_location.get("uri")  # as recorded: `view` gives it as now
        why = self._unavailable(v, arrays)
        d["attachable"] = not why
        if why:
            d["unavailable"] = why
        if v.migration:
            m = {k: v.migration.get(k) for k in ("phase", "source", "target", "started", "finished", "error")}
            if v.migration_status in MIGRATING:
                m["progress"] = self._progress(v)
                m["waiting"] = self.waiting_for(v.migration)
            d["migration"] = m
        return d

    def _unavailable(self, v: Volume, arrays: dict[str, ArrayRecord]) -> str:
        """Why a host could not use the volume if it attached now ("": it could): its state,
        or the array that serves it asked (one call): not running, its LUN gone, or fenced
        (read-only for hosts) with no migration whose target serves it."""
        if v.migration_status in ("starting", "migrating") and not _pool_move(v):
            return f"its migration is {v.migration_status}: no array serves it to hosts until that ends"
        if v.status not in ("available", "in-use"):
            return f"it is {v.status}"
        array = Host.parse(v.host).array
        rec = arrays.get(array)
        if rec is None:
            return f"array {array} is not running (`blockmig up` starts it)"
        try:
            lun = ArrayApi(rec.api, rec.token, timeout=SHOW_TIMEOUT).get_lun(v.lun)
        except ApiError as e:
            if e.status == 404:
                return f"its LUN {v.lun} is not on array {array}"
            return f"array {array} does not answer: {e}"
        if lun.get("fenced"):
            holder = (lun.get("fence") or {}).get("holder") or "another array"
            why = f"its LUN on array {array} is fenced for {holder}: hosts may read, not write"
            mig = v.migration
            if mig.get("target_leftover"):
                why += (
                    f" (the takeover on {Host.parse(mig['target']).array} that its failed migration "
                    "could not drop may still serve it; `blockmig up` or the next migrate lifts it)"
                )
            return why
        return ""

    def _progress(self, v: Volume) -> dict[str, Any] | None:
        mig = v.migration
        if mig.get("phase") == "host-copy":
            p = mig.get("progress") or {}
            return {
                "state": "copying",
                "clean_bytes": p.get("copied", 0),
                "total_bytes": p.get("total", v.size),
            }
        if mig.get("phase") not in ("complete", "target", "source"):
            return None
        src, dest = Host.parse(mig["source"]), Host.parse(mig["target"])
        try:
            st: dict[str, Any] = self.driver(dest.array).api.migration(v.lun)
        except (ApiError, VolumeError):
            return None
        # Steps 1 and 2 wait for a copy too (a pool move; a takeover-sync target's copy):
        # that one, not a record the array kept of an earlier migration of the LUN
        if mig["phase"] == "source" and st.get("source") != f"move:{src.pool}:{dest.pool}":
            return None
        if mig["phase"] == "target" and st.get("source") != mig.get("source_uri"):
            return None
        return st
