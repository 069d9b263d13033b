"""Per-LUN I/O counters and a latency histogram, cheap enough for the hot path.

Recording is a few integer additions and a bisect; Prometheus text is made
only when /metrics is scraped (see :func:`collector`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

#: upper bounds of the latency buckets, in seconds (the last bucket is +Inf)
BOUNDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
OPS = ("read", "write", "zero", "trim", "flush", "cache", "extents")


@dataclass(slots=True)
class OpStats:
    count: int = 0
    bytes: int = 0
    errors: int = 0
    seconds: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))

    def record(self, nbytes: int, seconds: float, ok: bool = True) -> None:
        self.count += 1
        self.bytes += nbytes
        self.seconds += seconds
        self.buckets[bisect_left(BOUNDS, seconds)] += 1
        if not ok:
            self.errors += 1

    def as_dict(self) -> dict[str, Any]:
        cum, hist = 0, {}
        for bound, n in zip((*BOUNDS, float("inf")), self.buckets, strict=True):
            cum += n
            hist["+Inf" if bound == float("inf") else f"{bound:g}"] = cum
        return {
            "count": self.count,
            "bytes": self.bytes,
            "errors": self.errors,
            "latency_seconds_sum": round(self.seconds, 6),
            "latency_histogram": hist,
        }


class LunStats:
    """Counters of one LUN, one :class:`OpStats` per operation."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops = {op: OpStats() for op in OPS}

    def as_dict(self) -> dict[str, Any]:
        return {op: s.as_dict() for op, s in self.ops.items()}


def collector(source: Callable[[], Iterable[tuple[str, LunStats]]], array: str) -> Any:
    """A prometheus_client collector over the LUNs that ``source`` yields."""
    from prometheus_client.core import (
        CounterMetricFamily,
        HistogramMetricFamily,
    )

    class _Collector:
        def collect(self) -> Iterator[Any]:
            ops = CounterMetricFamily(
                "blockmig_lun_ops", "I/O requests per LUN and op", labels=["array", "lun", "op"]
            )
            nbytes = CounterMetricFamily(
                "blockmig_lun_bytes", "bytes moved per LUN and op", labels=["array", "lun", "op"]
            )
            errs = CounterMetricFamily(
                "blockmig_lun_errors", "failed requests per LUN and op", labels=["array", "lun", "op"]
            )
            lat = HistogramMetricFamily(
                "blockmig_lun_latency_seconds",
                "request latency per LUN and op",
                labels=["array", "lun", "op"],
            )
            for lun, st in source():
                for op, s in st.ops.items():
                    labels = [array, lun, op]
                    ops.add_metric(labels, s.count)
                    nbytes.add_metric(labels, s.bytes)
                    errs.add_metric(labels, s.errors)
                    cum, buckets = 0, []
                    for bound, n in zip((*BOUNDS, float("inf")), s.buckets, strict=True):
                        cum += n
                        buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cum))
                    lat.add_metric(labels, buckets, s.seconds)
            yield from (ops, nbytes, errs, lat)

        def describe(self) -> list[Any]:
            return []

    return _Collector()
