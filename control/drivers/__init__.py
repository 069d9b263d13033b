"""Volume drivers, one per array model (see base.py for the interface)."""

from .base import MigrateResult, TargetMigrateResult, VolumeDriver
from .models import DRIVERS, driver_for

__all__ = ["DRIVERS", "MigrateResult", "TargetMigrateResult", "VolumeDriver", "driver_for"]
