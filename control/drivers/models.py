"""One driver per array model (emulator/array/models.py names them)."""

from __future__ import annotations

from control.api_client import ArrayApi

from .base import PoolMigrationMixin, RemoteTakeoverMixin, VolumeDriver


class UnifiedDriver(RemoteTakeoverMixin, PoolMigrationMixin, VolumeDriver):
    """Model 'unified': remote takeover, async migration, pool-to-pool moves."""

    supports_async_migration = True


class TakeoverSyncDriver(RemoteTakeoverMixin, VolumeDriver):
    """Model 'takeover-sync': remote takeover, but not attachable until copied."""

    supports_async_migration = False


class PooledDriver(PoolMigrationMixin, VolumeDriver):
    """Model 'pooled': moves LUNs between its own pools only."""


class PlainDriver(VolumeDriver):
    """Model 'plain': generic host copy only."""


DRIVERS: dict[str, type[VolumeDriver]] = {
    "unified": UnifiedDriver,
    "takeover-sync": TakeoverSyncDriver,
    "pooled": PooledDriver,
    "plain": PlainDriver,
}


def driver_for(model: str, array_name: str, api: ArrayApi) -> VolumeDriver:
    try:
        cls = DRIVERS[model]
    except KeyError:
        raise ValueError(f"no driver for array model {model!r} (known: {', '.join(DRIVERS)})") from None
    return cls(array_name, api)
