"""One live migration: a remote source LUN copied into a local one, then cutover.

States: copying (first pass) -> converging (copying what writes dirtied) ->
cutover -> completed; paused, failed and cancelled on the side. Failure or
cancel leaves the LUN serving the source directly as a remote LUN, so the
source stays complete and authoritative (I1) and host I/O keeps flowing
(I7).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from emulator.nbd.backend import Backend
from emulator.nbd.errors import BackendError

from .copier import Copier, TargetError, Throttle, allocation_runs, gather_or_cancel
from .migrating import MigratingBackend
from .regions import DIRTY, ProgressFile, RegionMap
from .remote import RemoteBackend

log = logging.getLogger("blockmig.mirror")

RUNNING = ("copying", "converging", "cutover")
FINAL = ("completed", "failed", "cancelled")


#: seconds of rate samples before the dirty rate may switch a migration to active mode
ACTIVE_AFTER_S = 2.0


@dataclass(slots=True)
class MigrationConfig:
    #: 1 MiB (bench/migration.py, region size sweep): of 256K, 1M and 4M it completes
    #: soonest under 20 MB/s of random 64k writes (a 128 MiB LUN: 83-87 ms against
    #: 96-107 and 91-118; 4M copies 1.4-1.5x the LUN again) and copies a 512 MiB LUN
    #: fastest flat out (rotating rounds: 187 ms against 291 and ~520)
    region_size: int = 1 << 20
    mode: str = "background"  # or "active"
    throttle: float = 0.0  # bytes/s, 0 = unlimited
    workers: int = 4
    #: copies in flight in active mode under writes (Migration._pass: they mostly wait)
    active_copies: int = 32
    checkpoint_interval: float = 1.0
    #: regions written within this window stay dirty on disk (saves an fsync per write)
    hot_window: float = 1.0
    #: cut over when at most this many bytes are dirty
    cutover_dirty: int = 8 << 20
    retry_window: float = 30.0
    auto_active: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Migration:
    """Drives one migration. The owner persists state through ``on_change``."""

    def __init__(
        self,
        name: str,
        source_uri: str,
        lun: Any,  # emulator.array.lun.LunBackend: has .swap(backend)
        local: Backend,
        progress_path: Path,
        config: MigrationConfig,
        on_change: Callable[[Migration], None],
        reserve: Callable[[int, int], AbstractContextManager[None]] = lambda off, n: nullcontext(),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        source: Backend | None = None,
        on_released: Callable[[Migration], None] | None = None,
        reserve_source: Callable[[int, int], AbstractContextManager[None]] | None = None,
    ) -> None:
        self.name = name
        #: a local source (a move between pools of one array) instead of source_uri
        self.local_source = source
        self.on_released = on_released
        self.source_uri = source_uri
        self.lun = lun
        self.local = local
        self.progress_path = progress_path
        self.config = config
        self.mode = config.mode
        self.mode_reason = "requested" if config.mode == "active" else ""
        self.on_change = on_change
        self.reserve = reserve
        #: pool room for host writes to a local ``source`` (see MigratingBackend)
        self.reserve_source = reserve_source
        self.clock = clock
        self.sleep = sleep
        self.state = "copying"
        self._last_error = ""
        #: when last_error was last set: an error the migration since got over (a source
        #: back after an outage) still shows, and says how old it is
        self.last_error_at: float | None = None
        self.passes = 0
        self.started = time.time()
        self.finished: float | None = None
        self.cutover_pause_s: float | None = None
        self.cutover_steps: dict[str, float] = {}
        self.recopied_regions = 0  # on resume: regions not clean on disk
        self.source: Backend | None = None
        self.regions: RegionMap | None = None
        self.progress: ProgressFile | None = None
        self.backend: MigratingBackend | None = None
        self.copier: Copier | None = None
        self._task: asyncio.Task[None] | None = None
        self._cancelling: asyncio.Future[None] | None = None  # a cancel under way
        #: why the migration fails, once its task began to let go (_to_remote "failed")
        self._failing = ""
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._done = asyncio.Event()
        #: set once the state is final and persisted (cleanup may still run): long polls wait on it
        self.ended = asyncio.Event()
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=64)
        self._last_checkpoint = 0.0
        self._checkpointing = False
        #: (copied, zeroed, local reads, remote reads) once the maps are let go (_let_go)
        self._ended_counts: tuple[int, int, int, int] | None = None

    @property
    def last_error(self) -> str:
        return self._last_error

    @last_error.setter
    def last_error(self, why: str) -> None:
        self._last_error = why
        self.last_error_at = time.time() if why else None

    # ------------------------------------------------------------------ start
    async def start(
        self, resume: bool = False, paused: bool = False, connected: RemoteBackend | None = None
    ) -> None:
        """Take the source over and begin (or resume) copying.

        A fresh start fails at once if the source cannot be reached; a resume
        after restart waits for it in the background. ``connected`` is the
        source made by the caller: on a fresh start, already connected (the
        connection that learnt its size); on a resume, one that offers what
        the source offered before the restart and connects when first needed.
        It is used, not opened again, and closed if the start fails.
        """
        size = self.local.size
        src: Backend
        if self.local_source is not None:
            src = self.local_source
        elif connected is not None:
            src = connected
        else:
            src = RemoteBackend(self.source_uri, retry_window=self.config.retry_window, size=size)
            if not resume:
                await src.connect()
        if src.size != size:
            await _close(src)
            raise BackendError(errno.EINVAL, f"source {self.source_uri} is {src.size} bytes, the LUN {size}")
        self.source = src
        regions = self.regions = RegionMap(size, self.config.region_size)
        header: dict[str, object] = {"source": self.source_uri, "lun": self.name}
        progress = self.progress = ProgressFile(self.progress_path, regions, header)
        if resume and self.progress_path.exists():
            progress.load()
            self.recopied_regions = regions.dirty_count()
            await self._find_target_holes()
        else:
            progress.create()
            if not resume:
                regions.target_data[:] = False  # a fresh LUN file is all holes
        self.backend = MigratingBackend(
            src, self.local, regions, progress, self.reserve, self.clock, self.reserve_source
        )
        self.backend.active = self.mode == "active"
        backend = self.backend
        self.copier = Copier(
            src,
            self.local,
            regions,
            Throttle(self.config.throttle, self.clock, self.sleep),
            self.reserve,
            claim_busy=lambda: backend.active,
        )
        self.lun.swap(self.backend)
        # The first in-pass checkpoint comes one interval after the start, not at
        # the first region (a flush and a commit that would hold up a short copy).
        self._last_checkpoint = self.clock()
        if paused:
            self.state = "paused"
            self._unpaused.clear()
        self._task = asyncio.ensure_future(self._run())

    async def _find_target_holes(self) -> None:
        """On resume, learn from the local copy's own allocation map where it
        holds nothing: those regions' holes are cleaned in bulk with the source's
        map, as on a fresh start, instead of a write_zeroes each (a 4 TiB LUN with
        100 MiB of data resumed in 65 s and 46 s of CPU, where it copies in 4).
        Nothing writes the local copy meanwhile: the LUN is swapped to it after
        this, and a resumed LUN is exported only once start() returned (manager)."""
        regions = self.regions
        assert regions is not None
        if not self.local.can_extents:
            return  # all may hold data: every hole region is zeroed on the target
        data = np.zeros(regions.count, np.bool_)
        shift = regions.shift
        async for answer in allocation_runs(self.local, 0, regions.size, regions.size):
            for off, ln, zero in answer:
                if not zero:
                    data[off >> shift : ((off + ln - 1) >> shift) + 1] = True
            await asyncio.sleep(0)  # a fragmented file takes many answers: let hosts in
        regions.target_data[:] = data

    # ------------------------------------------------------------------ control
    def pause(self) -> None:
        if self.state in FINAL:
            raise ValueError(f"migration of {self.name} is {self.state}")
        if self.state != "paused":
            self._unpaused.clear()
            self.state = "paused"
            self.on_change(self)

    def resume(self) -> None:
        if self.state in FINAL:
            raise ValueError(f"migration of {self.name} is {self.state}")
        if self.state == "paused":
            self.state = "converging" if self.passes else "copying"
            self._unpaused.set()
            self.on_change(self)

    def set_throttle(self, rate: float) -> None:
        """Copy at ``rate`` bytes/s (0 = unlimited) from now on, also the copies
        waiting on the old rate; the owner persists it through ``on_change``."""
        if self.state in FINAL:
            raise ValueError(f"migration of {self.name} is {self.state}")
        self.config.throttle = rate
        if self.copier is not None:
            self.copier.throttle.set_rate(rate)
        self.on_change(self)

    def go_active(self) -> None:
        """Active mode on request, as the engine goes by itself when background mode
        would not converge (_go_active); one way only, so no request undoes that."""
        if self.state in FINAL:
            raise ValueError(f"migration of {self.name} is {self.state}")
        if self.mode != "active":
            self._activate("requested")

    async def cancel(self) -> None:
        """Serve the source directly from now on. A second cancel while one is under
        way waits for it and is refused as one after it is: it would trim the local
        copy again and report a success it did not make."""
        while self._cancelling is not None:
            await asyncio.shield(self._cancelling)
        if self.state in FINAL:
            raise ValueError(ended_message(self.name, self.state))
        self._cancelling = done = asyncio.get_running_loop().create_future()
        try:
            await self._stop_task()
            if self._failing:
                # It failed, and this stopped its task while it let go of the local copy
                # (waiting for host I/O on it): end it as the failure it is, with why (a
                # full pool, for the operator to fix), not as a cancel with no error.
                await self._to_remote("failed", self._failing)
                raise ValueError(ended_message(self.name, self.state))
            await self._to_remote("cancelled", "")
        finally:
            self._cancelling = None
            done.set_result(None)

    async def wait(self, timeout: float | None = None) -> str:
        await asyncio.wait_for(self._done.wait(), timeout)
        return self.state

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Array stopping: stop copying, keep the migration as it is on disk, close
        the source (waiting up to ``timeout`` seconds for requests in flight). A
        cancelled or failed migration's source is the LUN's now: its owner closes it."""
        await self._stop_task()
        if self.progress is not None:
            await self.progress.close()
        if self.source is not None and self.state not in ("cancelled", "failed"):
            await _close(self.source, timeout)

    async def _stop_task(self) -> None:
        t = self._task
        if t is not None and not t.done():
            t.cancel()
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        sampler = asyncio.ensure_future(self._sample())
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except TargetError as e:
            log.error("migration of %s failed: %s", self.name, e)
            self._failing = str(e)  # before the wait in _to_remote, where a cancel may stop it
            await self._to_remote("failed", self._failing)
        except Exception as e:  # a bug: fail safe, the source stays authoritative
            log.exception("migration of %s failed", self.name)
            self._failing = f"internal error: {e!r}"
            await self._to_remote("failed", self._failing)
        finally:
            sampler.cancel()

    async def _loop(self) -> None:
        regions, backend = self.regions, self.backend
        assert regions is not None and backend is not None
        prev_dirty = regions.dirty_bytes()
        backoff = 0.05
        while True:
            await self._unpaused.wait()
            try:
                copied = await self._pass()
                await self._checkpoint()
            except TargetError:
                raise  # the local copy cannot go on: fail (I7)
            except BackendError as e:  # the source is unreachable: wait, retry by itself (I6)
                self.last_error = str(e)
                log.warning("migration of %s waits for its source: %s", self.name, e)
                await self.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            self.passes += 1
            dirty = regions.dirty_bytes()
            if dirty <= self.config.cutover_dirty and self._unpaused.is_set():
                if await self._cutover():
                    return
            elif self.passes >= 2 and dirty > prev_dirty // 2:
                self._go_active(f"{dirty} bytes still dirty after pass {self.passes}")
            if self.state != "paused":
                self.state = "converging"
            prev_dirty = dirty
            if not copied:
                await self.sleep(0.02)  # everything left is being written right now

    async def _pass(self) -> int:
        """Copy every DIRTY region once, in LUN order; returns regions made clean."""
        regions, copier = self.regions, self.copier
        assert regions is not None and copier is not None
        before = copier.regions_copied
        cursor = 0
        queue: npt.NDArray[np.intp] = np.empty(0, np.intp)
        pos = 0

        def take() -> int:
            nonlocal cursor, queue, pos
            while True:
                if pos < queue.size:
                    r = int(queue[pos])
                    if regions.state[r] == DIRTY:
                        pos += 1
                        return r
                    # Made clean since the queue was filled: a hole cleaned with its
                    # window's map. Drop every such region at once, not one call each:
                    # a 4 TiB LUN has 4M regions, nearly all holes (1-2 us each, 6 s).
                    rest = queue[pos:]
                    queue, pos = rest[regions.state[rest] == DIRTY], 0
                    continue
                if cursor >= regions.count:
                    return -1
                end = min(regions.count, cursor + 4096)
                queue, pos = cursor + np.flatnonzero(regions.state[cursor:end] == DIRTY), 0
                cursor = end

        # In active mode under writes, a copy waits more than it moves bytes: for
        # the writes to its region already sent to the source, queued behind all
        # the others (64 hosts at queue depth 128: ~1 s), then for its read, behind
        # them again. Such copies run beside the workers, up to active_copies() at
        # once, rather than each holding one (4 in flight made a region clean every
        # 0.9 s, bench/active_load.py).
        backend = self.backend
        assert backend is not None
        slots = asyncio.Semaphore(self.active_copies())
        beside: set[asyncio.Task[bool]] = set()
        failed: list[BaseException] = []

        async def copy_beside(r: int) -> bool:
            try:
                return await copier.copy_region(r)
            finally:
                slots.release()

        def ended(t: asyncio.Task[bool]) -> None:
            beside.discard(t)
            if not t.cancelled() and (e := t.exception()) is not None:
                failed.append(e)

        async def worker() -> None:
            while self._unpaused.is_set():
                if failed:
                    raise failed[0]
                r = take()
                if r < 0:
                    return
                if backend.writing and copier.claim_busy():
                    await slots.acquire()
                    t = asyncio.ensure_future(copy_beside(r))
                    beside.add(t)
                    t.add_done_callback(ended)
                else:
                    await copier.copy_region(r)
                if self.clock() - self._last_checkpoint >= self.config.checkpoint_interval:
                    await self._checkpoint()

        workers = [asyncio.ensure_future(worker()) for _ in range(self.config.workers)]
        try:
            await asyncio.gather(*workers)
            await asyncio.gather(*beside, return_exceptions=True)
            if failed:
                raise failed[0]
        finally:
            # The pass failed or was cancelled: its copies end with it, not after it.
            rest = [t for t in (*workers, *beside) if not t.done()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        return copier.regions_copied - before

    def active_copies(self) -> int:
        """Copies in flight in active mode under writes: each holds new writes to its
        region (MigratingBackend._modify), so at most an eighth of the LUN's regions."""
        regions = self.regions
        assert regions is not None
        return max(1, min(self.config.active_copies, regions.count // 8))

    async def _checkpoint(self) -> None:
        """Make regions clean on disk: flush the target first, then commit the bits."""
        regions, progress = self.regions, self.progress
        if regions is None or progress is None or self._checkpointing:
            return  # None: ended (_let_go), and this is a worker its failed pass left running
        self._checkpointing = True
        try:
            now = self.clock()
            self._last_checkpoint = now
            # Over the whole LUN only the two byte maps; the wide arrays (inflight,
            # last_write: 12 bytes a region) only at the regions clean since the
            # last checkpoint. All four over 64M regions (a 64 TiB LUN) took up to
            # 0.85 s of the event loop at each checkpoint (every second), the byte
            # maps alone 65 ms: what is left is still one scan a checkpoint.
            cand = np.flatnonzero((regions.state == 2) & ~progress.disk_clean)
            cand = cand[
                (regions.inflight[cand] == 0) & (regions.last_write[cand] <= now - self.config.hot_window)
            ]
            if cand.size == 0:
                return
            gens = regions.gen[cand].copy()
            try:
                await self.local.flush()
            except BackendError as e:
                raise TargetError(e.errno, f"target flush: {e}") from None
            # No await between this check and setting the bits: a write that
            # starts after it sees the bit set and waits for it to clear.
            ok = cand[(regions.gen[cand] == gens) & (regions.state[cand] == 2)]
            progress.disk_clean[ok] = True
            try:
                await progress.commit()
            except BackendError as e:  # the target's side, not an unreachable source: fail
                raise TargetError(e.errno, str(e)) from None
        finally:
            self._checkpointing = False

    async def _settle(self) -> None:
        """Copy what is dirty until nothing is, and flush, with writes still
        flowing in active mode (a write to a clean region goes to both sides,
        so no region gets dirty again but by a trim or a failed write). The
        pause under held writes then only drains writes in flight and records
        the completion: copying and flushing were most of it (bench/migration.py)."""
        regions = self.regions
        assert regions is not None
        for _ in range(4):
            before = regions.dirty_bytes()
            if not before:
                break
            await self._pass()
            if regions.dirty_bytes() >= before:
                break
        try:
            await self.local.flush()
        except BackendError as e:
            raise TargetError(e.errno, f"target flush: {e}") from None

    async def _cutover(self) -> bool:
        """Converge in active mode, then hold writes, copy what a trim or a failed
        write left dirty, switch the LUN to its local copy."""
        regions, backend, copier = self.regions, self.backend, self.copier
        assert regions is not None and backend is not None and copier is not None
        self.state = "cutover"
        backend.active = True
        try:
            await self._settle()
        except TargetError:
            raise
        except BackendError as e:  # the source went away: try again later
            self._postponed()
            self.last_error = str(e)
            return False
        t0 = time.perf_counter()
        steps: dict[str, float] = {}

        def step(name: str) -> None:
            steps[name] = round((time.perf_counter() - t0) * 1e3 - sum(steps.values()), 3)

        await backend.hold_writes()
        step("drain_ms")
        try:
            if regions.dirty_bytes() > 2 * self.config.cutover_dirty:
                raise _Retry("too much was written while writes were being held")
            # No write can race now: copy what is left, several regions at a time.
            left = np.flatnonzero(regions.state == DIRTY).tolist()
            sem = asyncio.Semaphore(self.config.workers)

            async def copy(r: int) -> None:
                async with sem:
                    await copier.copy_region(r)

            await gather_or_cancel(*(copy(r) for r in left))
            if regions.dirty_count():
                raise _Retry(f"{regions.dirty_count()} regions would not copy")
            step("copy_ms")
            if backend.target_error is not None:
                err = backend.target_error
                raise TargetError(getattr(err, "errno", None) or errno.EIO, f"target flush: {err}")
            if left:  # copied since the flush in _settle: make it durable first
                try:
                    await self.local.flush()
                except BackendError as e:
                    raise TargetError(e.errno, f"target flush: {e}") from None
            # Writes that reached both sides since that flush are as durable on the
            # target as the host asked: FLUSH went to both sides, FUA writes too.
            step("flush_ms")
            self.state = "completed"
            self.finished = time.time()
            self.on_change(self)  # durable before any write lands on the local copy only
            step("persist_ms")
            self.lun.swap(self.local)
            backend.release_writes(forward_to=self.local)
            step("swap_ms")
            self.cutover_steps = steps
        except _Retry as e:
            self._postponed()
            backend.release_writes()
            log.info("cutover of %s postponed: %s", self.name, e)
            return False
        except BackendError as e:
            self._postponed()
            backend.release_writes()
            if isinstance(e, TargetError):
                raise
            self.last_error = str(e)
            return False
        self.cutover_pause_s = time.perf_counter() - t0
        self.ended.set()  # long polls answer from memory, not after the record below
        log.info("migration of %s completed; writes held %.2f ms", self.name, self.cutover_pause_s * 1e3)
        if self.source is not None and not self.source.remote:
            # A pool move's source is the old file, closed and unlinked below: wait out
            # the reads begun on it (a remote source's aclose waits for its own).
            await backend.side_idle(local=False)
        await self._release_source(remove_progress=True)
        self.on_change(self)  # the pause into the record (its state was durable before the swap)
        self._let_go()
        self._done.set()
        return True

    def _postponed(self) -> None:
        """A cutover put off: back to the mode asked for, and to converging, or to
        paused if a pause came meanwhile (it closed the gate the copy loop waits
        on; "converging" would hide that, and resume() would find nothing to undo)."""
        assert self.backend is not None
        self.backend.active = self.mode == "active"
        self.state = "converging" if self._unpaused.is_set() else "paused"

    async def _to_remote(self, state: str, error: str) -> None:
        """Serve the source directly from now on (cancel, failure)."""
        if self.backend is not None:
            # The local copy is trimmed below (a pool move's closed by on_change): a
            # read of a clean region still in flight on it (a media's latency, a big
            # read in a thread) would answer zeroes or EBADF, a write to it land after
            # the trim (pool room the LUN keeps). Host I/O goes to the source alone
            # from now on; wait out what was begun: local storage, soon done.
            self.backend.stop_local_io()
            await self.backend.side_idle(local=True)
        self.state = state
        if error:
            self.last_error = error
        self.finished = time.time()
        self.on_change(self)
        self.ended.set()
        if self.source is not None and self.backend is not None:
            self.lun.swap(self.source)
            self.backend.release_writes(forward_to=self.source)
        if self.progress is not None:
            await self.progress.close(remove=True)
        try:  # give the pool its space back
            await self.local.trim(0, self.local.size)
        except BackendError:
            pass
        self._let_go()
        self._done.set()

    def _counts(self) -> tuple[int, int, int, int]:
        """(copied, zeroed, local reads, remote reads) bytes and reads, for the status."""
        if self._ended_counts is not None:
            return self._ended_counts
        c, b = self.copier, self.backend
        return (
            c.copied_bytes if c else 0,
            c.zeroed_bytes if c else 0,
            b.local_reads if b else 0,
            b.remote_reads if b else 0,
        )

    def _let_go(self) -> None:
        """The migration has ended: keep the counts its status shows, let go of its
        region maps (19 bytes a region, 19 MB for a 1 TiB LUN in 1 MiB regions, 304 MB
        in 64 KiB ones), the MigratingBackend and the copier. Its manager keeps it for
        as long as its LUN lives, and these were kept with it: memory that grew with
        every migrated LUN an array kept, and that only a restart gave back (it then
        keeps the status only). Requests still in the MigratingBackend hold it until
        they finish."""
        self._ended_counts = self._counts()
        self.regions = self.progress = self.backend = self.copier = None

    async def _release_source(self, remove_progress: bool) -> None:
        if self.progress is not None:
            await self.progress.close(remove=remove_progress)
        if self.source is not None:
            await _close(self.source)
        if self.on_released is not None:
            self.on_released(self)

    def _go_active(self, why: str) -> None:
        """Background mode cannot converge: writes to clean regions go to both sides from now on."""
        if self.mode != "background" or not self.config.auto_active or self.backend is None:
            return
        copy_rate, dirty_rate = self.rates()
        self._activate(
            f"dirty rate {dirty_rate / 1e6:.1f} MB/s against copy rate {copy_rate / 1e6:.1f} MB/s: {why}"
        )

    def _activate(self, reason: str) -> None:
        self.mode = "active"
        self.mode_reason = reason
        if self.backend is not None:
            self.backend.active = True
        log.info("migration of %s goes active: %s", self.name, reason)
        self.on_change(self)

    # ------------------------------------------------------------------ status
    async def _sample(self) -> None:
        while True:
            if self.copier is not None and self.backend is not None:
                now = self.clock()
                self._samples.append(
                    (now, self.copier.copied_bytes + self.copier.zeroed_bytes, self.backend.dirtied_bytes)
                )
                # Between passes too: a throttled pass over a big LUN takes long, and
                # while writes undo the copy faster than it goes, reads stay remote.
                if self.state in RUNNING and now - self._samples[0][0] >= ACTIVE_AFTER_S:
                    copy_rate, dirty_rate = self.rates()
                    if copy_rate and dirty_rate >= copy_rate / 2:
                        self._go_active("writes make regions dirty again at half the copy rate or more")
            await self.sleep(0.25)

    def rates(self) -> tuple[float, float]:
        """(copy, dirty) in bytes/s over the last few seconds."""
        s = self._samples
        if len(s) < 2:
            return 0.0, 0.0
        recent = [x for x in s if x[0] >= s[-1][0] - 5.0]
        t0, c0, d0 = recent[0]
        t1, c1, d1 = s[-1]
        dt = t1 - t0
        if dt <= 0:
            return 0.0, 0.0
        return (c1 - c0) / dt, (d1 - d0) / dt

    def status(self) -> dict[str, Any]:
        regions = self.regions
        total = self.local.size
        dirty = regions.dirty_bytes() if regions is not None and self.state not in FINAL else 0
        if self.state == "completed":
            dirty = 0
        copy_rate, dirty_rate = self.rates()
        copied, zeroed, local_reads, remote_reads = self._counts()
        net = copy_rate - dirty_rate
        eta = dirty / net if net > 0 and self.state in RUNNING else None
        return {
            "lun": self.name,
            "source": self.source_uri,
            "state": self.state,
            "mode": self.mode,
            "mode_reason": self.mode_reason,
            "total_bytes": total,
            "dirty_bytes": dirty if self.state != "completed" else 0,
            "copied_bytes": copied,
            "zeroed_bytes": zeroed,
            "clean_bytes": total - dirty if self.state not in ("failed", "cancelled") else 0,
            "copy_rate": round(copy_rate),
            "dirty_rate": round(dirty_rate),
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "passes": self.passes,
            "region_size": self.config.region_size,
            "throttle": self.config.throttle,
            "recopied_regions_on_resume": self.recopied_regions,
            "cutover_pause_ms": round(self.cutover_pause_s * 1e3, 3) if self.cutover_pause_s else None,
            "cutover_steps": self.cutover_steps,
            "local_reads": local_reads,
            "remote_reads": remote_reads,
            "source_connected": getattr(self.source, "connected", self.source is not None),
            #: the source LUN's id, where it gives one (emulator/array/lun.py lun_id_of)
            "source_id": getattr(self.source, "identity", ""),
            "started": self.started,
            "finished": self.finished,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


def ended_message(name: str, state: str) -> str:
    """Why a change to the migration of LUN ``name``, ended in ``state``, is refused."""
    if state == "completed":
        # said outright: a client took the bare 409 of a cancel for "nothing left to drop"
        # and deleted the LUN
        return (
            f"migration of {name} is already completed: LUN {name} cut over to its own copy and "
            "holds the data now (with what hosts wrote to it since); it cannot be cancelled"
        )
    return f"migration of {name} is already {state}"


class _Retry(Exception):
    pass


async def _close(b: Backend, timeout: float = 5.0) -> None:
    if isinstance(b, RemoteBackend):
        await b.aclose(timeout)
    else:
        b.close()
