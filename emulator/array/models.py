"""Array models: what an emulated array supports and how its media behaves.

A model is a named profile. Capabilities decide which branch of the
migration routine an array can take (remote LUN takeover, async migration,
pool-to-pool moves inside the array); the media model gives every I/O a
service time drawn from a latency distribution and an optional IOPS and
bandwidth ceiling.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Per-I/O service time.

    ``kind``: "none"; "fixed" (always ``mean_s``); "lognormal" (mean
    ``mean_s``, shape ``sigma``: SSD-like and HDD-like media).
    """

    kind: str = "none"
    mean_s: float = 0.0
    sigma: float = 0.0

    def sample(self, rng: random.Random) -> float:
        if self.kind == "none" or self.mean_s <= 0:
            return 0.0
        if self.kind == "fixed":
            return self.mean_s
        # lognormal with the requested mean: mu = ln(mean) - sigma^2 / 2
        mu = math.log(self.mean_s) - self.sigma**2 / 2
        return rng.lognormvariate(mu, self.sigma)

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.mean_s > 0

    def describe(self) -> str:
        if not self.active:
            return "none"
        return f"{self.kind} {self.mean_s * 1000:g} ms"


NO_LATENCY = LatencyModel()
SSD = LatencyModel("lognormal", 0.0002, 0.35)
HDD = LatencyModel("lognormal", 0.005, 0.6)


@dataclass(frozen=True, slots=True)
class Media:
    """How the array's media behaves: latency plus optional ceilings."""

    name: str = "none"
    read: LatencyModel = NO_LATENCY
    write: LatencyModel = NO_LATENCY
    iops_limit: int = 0  # 0 = unlimited
    bandwidth_limit: int = 0  # bytes/s, 0 = unlimited
    rotational: bool = False  # spinning disks: LUNs advertise NBD_FLAG_ROTATIONAL

    @property
    def active(self) -> bool:
        return self.read.active or self.write.active or bool(self.iops_limit or self.bandwidth_limit)


MEDIA = {
    "none": Media(),
    "ssd": Media("ssd", SSD, LatencyModel("lognormal", 0.00025, 0.35)),
    "hdd": Media("hdd", HDD, HDD, iops_limit=200, bandwidth_limit=200 << 20, rotational=True),
}


def parse_media(text: str) -> Media:
    """``none``, ``ssd``, ``hdd`` or ``fixed:MS`` (e.g. ``fixed:0.5``)."""
    if text in MEDIA:
        return MEDIA[text]
    m = re.fullmatch(r"fixed:(\d+(?:\.\d+)?)(?:ms)?", text)
    if m:
        lat = LatencyModel("fixed", float(m.group(1)) / 1000)
        return Media(text, lat, lat)
    raise ValueError(f"unknown media {text!r}: use none, ssd, hdd or fixed:MS (e.g. fixed:0.5)")


@dataclass(frozen=True, slots=True)
class ArrayModel:
    """A named array profile."""

    name: str
    description: str
    remote_takeover: bool  # can take a LUN of another array over as a remote LUN
    async_migration: bool  # the volume is attachable while it migrates
    pool_migration: bool  # can move a LUN between its own pools by itself
    media: Media = field(default_factory=Media)

    def capabilities(self) -> dict[str, bool]:
        return {
            "remote_takeover": self.remote_takeover,
            "async_migration": self.async_migration,
            "pool_migration": self.pool_migration,
        }

    def as_dict(self) -> dict[str, Any]:
        media = asdict(self.media)
        return {
            "name": self.name,
            "description": self.description,
            "capabilities": self.capabilities(),
            "media": media,
        }

    def with_media(self, media: Media) -> ArrayModel:
        return replace(self, media=media)


MODELS: dict[str, ArrayModel] = {
    m.name: m
    for m in (
        ArrayModel(
            "unified",
            "supports everything: remote LUN takeover, async migration, pool-to-pool moves",
            remote_takeover=True,
            async_migration=True,
            pool_migration=True,
        ),
        ArrayModel(
            "takeover-sync",
            "takes remote LUNs over, but the volume is not attachable until the copy is done",
            remote_takeover=True,
            async_migration=False,
            pool_migration=False,
        ),
        ArrayModel(
            "pooled",
            "moves LUNs between its own pools only; no remote takeover",
            remote_takeover=False,
            async_migration=False,
            pool_migration=True,
        ),
        ArrayModel(
            "plain",
            "a plain array: migration only by generic host copy",
            remote_takeover=False,
            async_migration=False,
            pool_migration=False,
        ),
    )
}
DEFAULT_MODEL = "unified"


def get_model(name: str) -> ArrayModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown array model {name!r}: choose one of {', '.join(MODELS)}") from None
