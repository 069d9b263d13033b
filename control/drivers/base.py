"""The volume driver interface (after Cinder's volume driver).

Drivers own the control path only: they talk to their array's management
API and never touch another array's files. Optional features are mixins;
capability flags are class attributes. The defaults say "not handled" so
the manager falls back to the generic host copy.

Return values are NamedTuples, so the order of ``migrate_volume``'s tuple
can never be got wrong (Cinder's own docs did once).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from control.api_client import UNREACHABLE_WINDOW_S, ApiError, ArrayApi, through_outage
from control.volumes import Volume

Progress = Callable[[dict[str, Any]], None]
T = TypeVar("T")


class MigrateResult(NamedTuple):
    """What the SOURCE driver's migrate_volume says."""

    moved: bool
    model_update: dict[str, Any] | None


class TargetMigrateResult(NamedTuple):
    """What the TARGET driver's migrate_volume_target says."""

    moved: bool
    migration_async: bool
    model_update: dict[str, Any] | None


class Host(NamedTuple):
    """``ARRAY@BACKEND#POOL``: where a volume lives."""

    array: str
    backend: str
    pool: str

    @classmethod
    def parse(cls, text: str) -> Host:
        left, _, pool = text.partition("#")
        array, _, backend = left.partition("@")
        if not array:
            raise ValueError(f"not a host: {text!r} (use ARRAY, ARRAY#POOL or ARRAY@BACKEND#POOL)")
        return cls(array, backend or array, pool or "default")

    def __str__(self) -> str:
        return f"{self.array}@{self.backend}#{self.pool}"


class VolumeDriver:
    """Base driver: create, delete, attach; migration not handled."""

    #: capability flags (the array model's features)
    supports_pool_migration = False
    supports_remote_takeover = False
    supports_async_migration = False

    #: seconds a migration's follower asks again an array whose API does not answer, before
    #: it fails the migration (:meth:`_follow`): a restart (`blockmig up`) takes ~1 s
    unreachable_window = UNREACHABLE_WINDOW_S

    def __init__(self, array_name: str, api: ArrayApi, poll_interval: float = 0.2) -> None:
        self.array_name = array_name
        self.api = api
        self.poll_interval = poll_interval
        #: is the array expected back when its API does not answer (not stopped on purpose)?
        #: False: :meth:`_follow` gives up at once (the volume manager sets it)
        self.expect_back: Callable[[], bool] = lambda: True

    # ---- volume lifecycle
    def create_volume(self, volume: Volume, pool: str) -> dict[str, Any]:
        """Make the volume's LUN in ``pool``; return its provider_location."""
        lun = self.api.create_lun(volume.lun, volume.size, pool)
        return self._location(lun)

    def delete_volume(self, volume: Volume) -> None:
        """Delete the volume's LUN. Contract: deleting a missing volume succeeds; a
        deleted volume's data never leaks into a new one (LUNs are new sparse files)."""
        try:
            self.api.delete_lun(volume.lun, force=True)
        except ApiError as e:
            if e.status != 404:
                raise

    def initialize_connection(self, volume: Volume, connector: dict[str, Any]) -> dict[str, Any]:
        """Connection info for a host: NBD host, port, export, URI and an nbd-client line."""
        c = self.api.connection(volume.lun)
        return {"driver_volume_type": "nbd", "data": c}

    def terminate_connection(self, volume: Volume, connector: dict[str, Any]) -> None:
        """Nothing to undo on the array: NBD sessions end when the host disconnects."""

    # ---- migration (defaults: not handled)
    def migrate_volume(self, volume: Volume, host: Host, progress: Progress | None = None) -> MigrateResult:
        """SOURCE side: move the volume to ``host`` by the array itself.

        (True, update) when done (e.g. pool to pool in one array); (False, None) when
        the manager must ask the target driver or copy generically."""
        return MigrateResult(False, None)

    def migrate_volume_target(self, volume: Volume, source_uri: str, pool: str) -> TargetMigrateResult:
        """TARGET side: take the source LUN over. (moved, migration_async, model_update);
        moved False: the manager does a generic host copy."""
        return TargetMigrateResult(False, False, None)

    def complete_migration_target(self, volume: Volume, progress: Progress | None = None) -> dict[str, Any]:
        """TARGET side: follow the migration to its end. Returns the final provider_location."""
        raise NotImplementedError(f"array {self.array_name} does not take migrations over")

    # ---- fencing (SOURCE side of a remote takeover)
    def fence_for_takeover(self, volume: Volume, holder: str) -> str:
        """Make the volume's LUN read-only to every host and return the URI through
        which the taking-over array alone reads and writes it: a host writing here
        directly after the copy passed its region would be lost at the cutover.
        Idempotent (a retried migration gets the same URI)."""
        uri: str = self.api.fence_lun(volume.lun, holder)["uri"]
        return uri

    def unfence(self, volume: Volume) -> None:
        """Lift the fence: this array stays authoritative. Idempotent; a missing LUN has none."""
        try:
            self.api.unfence_lun(volume.lun)
        except ApiError as e:
            if e.status != 404:
                raise

    # ---- helpers
    def _location(self, lun: dict[str, Any]) -> dict[str, Any]:
        return {"array": self.array_name, "lun": lun["name"], "pool": lun["pool"], "uri": lun["uri"]}

    def connection_uri(self, volume: Volume) -> str:
        """The volume's nbd:// URI, asked through an outage of the array (:meth:`asked`)."""
        uri: str = self.asked(lambda: self.api.connection(volume.lun))["uri"]
        return uri

    def asked(self, call: Callable[[], T], until: float | None = None) -> T:
        """``call()``, a read of this array's API, asked again while the array does not answer
        for up to :attr:`unreachable_window` seconds (not past the monotonic time ``until``),
        unless :attr:`expect_back` says it was stopped on purpose (:func:`through_outage`);
        then its error names the array (the API's named an address alone)."""
        try:
            return through_outage(call, self.unreachable_window, self.expect_back, until, self.poll_interval)
        except ApiError as e:
            if e.code != "unreachable":
                raise
            why = f"array {self.array_name} does not answer ({e.message})"
            raise ApiError(e.status, e.code, why) from None

    def location(self, lun: str) -> dict[str, Any]:
        """The provider_location of ``lun``, read through an outage of the array."""
        return self._location(self.asked(lambda: self.api.get_lun(lun)))

    def migration_if_any(self, lun: str) -> dict[str, Any] | None:
        """The array's migration of ``lun``, if any, read through an outage of the array."""
        return self.asked(lambda: self.api.migration_if_any(lun))

    def _start(
        self, path: str, body: dict[str, Any], lun: str, begun: Callable[[dict[str, Any]], bool]
    ) -> None:
        """POST ``body`` to ``path``, which starts a migration of ``lun`` (a takeover, a move).

        A start whose answer is lost (the array died, and restarts) is not sent again
        blindly: the array may have begun it, and would refuse a second (the LUN exists, or
        migrates) and fail the migration. Once the array answers again, its migration of
        ``lun`` says: ``begun(status)``, it goes on; else the start is sent again (what got
        the first died before it took it; one still at it refuses the second)."""
        try:
            self.api.call("POST", path, body)
            return
        except ApiError as e:
            if e.code != "unreachable":
                raise
        st = self.migration_if_any(lun)
        if st is None or not begun(st):
            self.api.call("POST", path, body)

    def _follow(self, lun: str, progress: Progress | None, timeout: float | None = None) -> dict[str, Any]:
        """Poll the array's migration of ``lun`` until it ends; raise unless completed.

        An API that does not answer (connection refused: the array restarts, `blockmig up`
        after a kill -9, and resumes the migration by itself) is asked again for up to
        :attr:`unreachable_window` seconds before that error is raised: one failed poll
        failed the whole migration, the volume sent back to its source while the array,
        up again a moment later, resumed a copy nobody followed any more."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.asked(lambda: self.api.migration(lun), deadline)
            if progress is not None:
                progress(st)
            if st["state"] == "completed":
                return st
            if st["state"] in ("failed", "cancelled"):
                raise ApiError(
                    409,
                    st["state"],
                    f"migration of {lun} on {self.array_name} {st['state']}: "
                    f"{st.get('last_error') or 'no error given'}",
                )
            if deadline is not None and time.monotonic() > deadline:
                raise ApiError(504, "timeout", f"migration of {lun} on {self.array_name} still {st['state']}")
            time.sleep(self.poll_interval)


class PoolMigrationMixin(VolumeDriver):
    """The array moves LUNs between its own pools (migrate_volume handles it)."""

    supports_pool_migration = True

    def migrate_volume(self, volume: Volume, host: Host, progress: Progress | None = None) -> MigrateResult:
        if host.array != self.array_name:
            return MigrateResult(False, None)
        move = f"move:{Host.parse(volume.host).pool}:{host.pool}"  # the array's name of it

        def begun(st: dict[str, Any]) -> bool:  # (not an earlier one, failed or cancelled)
            return st.get("source") == move and st.get("state") not in ("failed", "cancelled")

        self._start(f"/api/v1/luns/{volume.lun}/move", {"pool": host.pool}, volume.lun, begun)
        self._follow(volume.lun, progress)
        return MigrateResult(True, self.location(volume.lun))


class RemoteTakeoverMixin(VolumeDriver):
    """The array takes a LUN of another array over (migrate_volume_target handles it)."""

    supports_remote_takeover = True

    def migrate_volume_target(self, volume: Volume, source_uri: str, pool: str) -> TargetMigrateResult:
        body = {"lun": volume.lun, "source": source_uri, "pool": pool}
        self._start("/api/v1/migrations", body, volume.lun, lambda st: st.get("source") == source_uri)
        if not self.supports_async_migration:
            # Not attachable while copying: finish the copy before saying it moved.
            self._follow(volume.lun, None)
        # the reads of the migration asked again through an outage of the array (a restart):
        # one failed the whole migration, while the array, up a second later, went on with it
        return TargetMigrateResult(True, self.supports_async_migration, self.location(volume.lun))

    def complete_migration_target(self, volume: Volume, progress: Progress | None = None) -> dict[str, Any]:
        self._follow(volume.lun, progress)
        return self.location(volume.lun)

    def set_migration_source(self, volume: Volume, source_uri: str) -> None:
        """Tell the array where the source of its takeover of ``volume`` is served now (its
        array came back at another address). The array refuses a URI that serves another
        LUN (409) or that it cannot reach (400), and keeps its migration as it was."""
        self.api.update_migration(volume.lun, source=source_uri)

    def cancel_migration_target(self, volume: Volume, keep_completed: bool | None = None) -> None:
        """Give up a takeover: cancel the array's migration and drop the remote LUN.

        A takeover that has already cut over (completed) is no remote LUN any more: its
        array holds the volume, and what hosts wrote to it since lives there alone. So it
        is not deleted unless the caller says what to do with it: ``keep_completed`` True
        keeps it (nothing to cancel), False deletes it all the same (the caller knows the
        source holds every byte, e.g. no host was ever given the target); None (the
        default) refuses with ApiError 409 (code ``completed``) and deletes nothing."""
        try:
            self.api.call("POST", f"/api/v1/migrations/{volume.lun}/cancel")
        except ApiError as e:
            if e.status not in (404, 409):
                raise
            if e.status == 409 and self.has_cut_over(volume):
                if keep_completed is None:
                    raise ApiError(
                        409,
                        "completed",
                        f"LUN {volume.lun} on array {self.array_name} has already cut over to its "
                        "own copy: it holds the volume now (with whatever hosts wrote to it since), "
                        "so it is not deleted; keep it, or delete it by hand "
                        f"(`blockmig lun delete --api URL {volume.lun} --force`) if the source holds "
                        "every write",
                    ) from None
                if keep_completed:
                    return
        self.delete_volume(volume)

    def has_cut_over(self, volume: Volume) -> bool:
        """Has the array's takeover of ``volume`` completed (cut over)?"""
        st = self.api.migration_if_any(volume.lun)
        return st is not None and st.get("state") == "completed"
