"""Media latency, ceilings and per-LUN statistics.

MediaBackend runs over a MemoryBackend with injected time (STYLE habit 6): a
fake clock and a fake sleep that records every requested delay, so latency
and ceilings are checked exactly and fast. Only precise_sleep, whose job is
real time, is measured against the real clock, with generous bounds. The
Prometheus text is checked after real NBD writes to a LUN of a real Array.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from emulator.array.array import Array
from emulator.array.lun import LunBackend
from emulator.array.media import MediaBackend
from emulator.array.models import (
    HDD,
    MEDIA,
    MODELS,
    SSD,
    LatencyModel,
    Media,
    get_model,
    parse_media,
)
from emulator.array.stats import BOUNDS, OPS, LunStats, OpStats, exposition
from emulator.array.timer import precise_sleep
from emulator.nbd.backend import Backend, MemoryBackend
from emulator.nbd.client import NbdClient
from emulator.nbd.errors import BackendError, RequestError
from emulator.nbd.server import NbdServer, serve_forever_loop
from tests.loop_turns import loop_turns_during

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
KIB = 1024
MIB = 1 << 20


def run(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class FakeTime:
    """A clock and a sleep for MediaBackend: sleeping records the delay and,
    with ``advance``, moves the clock by it (a caller that waits its turn)."""

    def __init__(self, advance: bool = True) -> None:
        self.now = 1000.0
        self.advance = advance
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        if self.advance:
            self.now += delay


def media_backend(media: Media, t: FakeTime, size: int = 4 * MIB, seed: int = 1) -> MediaBackend:
    return MediaBackend(MemoryBackend(size), media, rng=random.Random(seed), clock=t.clock, sleep=t.sleep)


# =========================================================================== latency
def test_fixed_latency_per_io() -> None:
    media = parse_media("fixed:0.5")
    t = FakeTime()
    mb = media_backend(media, t)

    async def io() -> None:
        await mb.write(0, b"a" * 4096)
        await mb.read(0, 4096)
        await mb.read_into(0, memoryview(bytearray(512)))
        await mb.write_zeroes(8192, 4096)
        await mb.flush()

    run(io())
    assert t.sleeps == [media.read.mean_s] * 5
    assert t.sleeps[0] == pytest.approx(0.0005, abs=1e-12)
    # advice and metadata operations cost no media time
    before = len(t.sleeps)
    run(mb.trim(0, 4096))
    run(mb.cache(0, 4096))
    run(mb.extents(0, 8192))
    assert len(t.sleeps) == before


def test_no_media_never_sleeps() -> None:
    t = FakeTime()
    mb = media_backend(MEDIA["none"], t)

    async def io() -> None:
        for i in range(50):
            await mb.write(i * 512, b"x" * 512)
            await mb.read(i * 512, 512)
        await mb.flush()

    run(io())
    assert t.sleeps == []
    assert not MEDIA["none"].active


@pytest.mark.parametrize(
    "name, model",
    [("ssd read", SSD), ("ssd write", MEDIA["ssd"].write), ("hdd", HDD)],
)
def test_lognormal_mean(name: str, model: LatencyModel) -> None:
    """The samples have the configured mean (and the lognormal's shape)."""
    assert model.kind == "lognormal" and model.mean_s > 0 and model.sigma > 0
    n = 20000
    t = FakeTime()
    mb = media_backend(Media(name, model, model), t, seed=12345)

    async def io() -> None:
        for i in range(n):
            if i % 2:
                await mb.read(0, 4096)
            else:
                await mb.write(0, b"z" * 4096)

    run(io())
    assert len(t.sleeps) == n
    mean = statistics.fmean(t.sleeps)
    assert mean == pytest.approx(model.mean_s, rel=0.03)
    # lognormal: the median is mean * exp(-sigma^2 / 2), the CV sqrt(exp(sigma^2) - 1)
    assert statistics.median(t.sleeps) == pytest.approx(
        model.mean_s * math.exp(-(model.sigma**2) / 2), rel=0.05
    )
    cv = statistics.pstdev(t.sleeps) / mean
    assert cv == pytest.approx(math.sqrt(math.exp(model.sigma**2) - 1), rel=0.15)
    assert min(t.sleeps) > 0
    # seeded: the same seed gives the same delays, another seed others
    t2, t3 = FakeTime(), FakeTime()
    for tt, seed in ((t2, 12345), (t3, 54321)):
        mb2 = media_backend(Media(name, model, model), tt, seed=seed)
        run(mb2.write(0, b"z" * 4096))
        run(mb2.read(0, 4096))
    assert t2.sleeps == t.sleeps[:2]
    assert t3.sleeps != t.sleeps[:2]


def test_latency_model_describe_and_active() -> None:
    assert parse_media("fixed:0.5").read.describe() == "fixed 0.5 ms"
    assert SSD.describe() == "lognormal 0.2 ms"
    assert LatencyModel().describe() == "none"
    assert not LatencyModel("fixed", 0.0).active
    assert LatencyModel("fixed", 0.0).sample(random.Random(0)) == 0.0


# =========================================================================== ceilings
def test_iops_ceiling_spaces_a_burst() -> None:
    """Ten I/Os submitted at the same instant finish 1/iops apart."""
    iops = 1000
    t = FakeTime(advance=False)
    mb = media_backend(Media("iops", iops_limit=iops), t)

    async def burst() -> None:
        await asyncio.gather(*(mb.read(i * 4096, 4096) for i in range(10)))

    run(burst())
    assert t.sleeps == pytest.approx([(k + 1) / iops for k in range(10)])
    gaps = [b - a for a, b in zip(t.sleeps, t.sleeps[1:], strict=False)]
    assert gaps == pytest.approx([1 / iops] * 9)


def test_iops_ceiling_sequential_and_idle() -> None:
    iops = 200
    t = FakeTime(advance=True)
    mb = media_backend(Media("iops", iops_limit=iops), t)

    async def io() -> list[float]:
        done = []
        for _ in range(5):
            await mb.write(0, b"q" * 512)
            done.append(t.now)
        return done

    done = run(io())
    assert t.sleeps == pytest.approx([1 / iops] * 5)
    assert [b - a for a, b in zip(done, done[1:], strict=False)] == pytest.approx([1 / iops] * 4)
    # after an idle second the channel is free: no backlog is carried over
    t.now += 1.0
    t.sleeps.clear()
    run(mb.read(0, 512))
    assert t.sleeps == pytest.approx([1 / iops])


@pytest.mark.parametrize("nbytes", [4 * KIB, 64 * KIB, MIB])
def test_bandwidth_ceiling_spaces_by_size(nbytes: int) -> None:
    bw = 10 * MIB
    t = FakeTime(advance=False)
    mb = media_backend(Media("bw", bandwidth_limit=bw), t, size=16 * MIB)

    async def burst() -> None:
        payload = b"b" * nbytes
        await asyncio.gather(*(mb.write(i * nbytes, payload) for i in range(6)))

    run(burst())
    assert t.sleeps == pytest.approx([(k + 1) * nbytes / bw for k in range(6)])


def test_bandwidth_ceiling_mixed_sizes_and_both_ceilings() -> None:
    iops, bw = 100, 4 * MIB
    t = FakeTime(advance=False)
    mb = media_backend(Media("both", iops_limit=iops, bandwidth_limit=bw), t, size=16 * MIB)
    sizes = [4 * KIB, MIB, 512, 256 * KIB]

    async def burst() -> None:
        for i, n in enumerate(sizes):
            await mb.read_into(i * MIB, memoryview(bytearray(n)))

    run(burst())
    want, busy = [], 0.0
    for n in sizes:
        busy += 1 / iops + n / bw
        want.append(busy)
    assert t.sleeps == pytest.approx(want)


def test_latency_overlaps_channel_time() -> None:
    """Current semantics: an I/O takes max(latency, its turn + 1/iops + n/bw).

    So the hdd preset's idle 4 KiB I/O averages about 6.2 ms, not its
    configured 5 ms mean (the 200 IOPS ceiling is a 5 ms floor); see the
    report that came with these tests.
    """
    lat = LatencyModel("fixed", 0.010)
    t = FakeTime(advance=False)
    mb = media_backend(Media("x", lat, lat, iops_limit=1000), t)

    async def burst() -> None:
        await asyncio.gather(*(mb.read(0, 512) for _ in range(15)))

    run(burst())
    assert t.sleeps == pytest.approx([max(0.010, (k + 1) / 1000) for k in range(15)])


# =========================================================================== data path
class Recording(MemoryBackend):
    can_cache = False
    can_fua = False

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.fua: list[bool] = []

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self.fua.append(fua)
        await super().write(offset, data, fua)


def test_data_passes_through_unchanged() -> None:
    inner = Recording(4 * MIB)
    t = FakeTime()
    mb = MediaBackend(inner, parse_media("ssd"), rng=random.Random(3), clock=t.clock, sleep=t.sleep)
    assert mb.size == inner.size
    for cap in ("read_only", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_flush", "can_fua"):
        assert getattr(mb, cap) == getattr(inner, cap), cap
    rng = random.Random(7)
    writes = [(rng.randrange(0, 4 * MIB - 70000), os.urandom(rng.randrange(1, 70000))) for _ in range(40)]

    async def io() -> None:
        model = bytearray(4 * MIB)
        for i, (off, data) in enumerate(writes):
            kind = (bytes, bytearray, memoryview)[i % 3]
            await mb.write(off, kind(data), fua=bool(i % 2))
            model[off : off + len(data)] = data
        await mb.write_zeroes(100, 5000)
        model[100:5100] = bytes(5000)
        await mb.trim(MIB, 8192)
        model[MIB : MIB + 8192] = bytes(8192)
        assert bytes(await mb.read(0, 4 * MIB)) == bytes(model)
        buf = bytearray(300000)
        await mb.read_into(12345, memoryview(buf))
        assert buf == model[12345 : 12345 + 300000]
        assert bytes(await inner.read(0, 4 * MIB)) == bytes(model)
        assert await mb.extents(0, 4 * MIB) == await inner.extents(0, 4 * MIB)

    run(io())
    assert inner.fua == [bool(i % 2) for i in range(len(writes))]


def test_write_buffer_may_be_reused_while_waiting() -> None:
    """The caller's buffer is copied before the media wait (the server reuses it)."""
    inner = MemoryBackend(MIB)
    gate = asyncio.Event()

    async def slow_sleep(delay: float) -> None:
        await gate.wait()

    mb = MediaBackend(inner, parse_media("fixed:1"), clock=time.monotonic, sleep=slow_sleep)

    async def io() -> bytes:
        buf = bytearray(b"original" * 512)
        task = asyncio.create_task(mb.write(0, memoryview(buf)))
        await asyncio.sleep(0)  # the write is now waiting for the media
        buf[:] = b"CLOBBER!" * 512
        gate.set()
        await task
        return bytes(await inner.read(0, len(buf)))

    assert run(io()) == b"original" * 512


# =========================================================================== precise_sleep
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_precise_sleep_sub_millisecond(loop_kind: str) -> None:
    delay, n = 0.0002, 200

    async def measure() -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await precise_sleep(delay)
            out.append(time.perf_counter() - t0)
        return out

    if loop_kind == "uvloop":
        loop = serve_forever_loop()
        try:
            took = loop.run_until_complete(measure())
        finally:
            loop.close()
    else:
        took = asyncio.run(measure())
    assert min(took) >= delay  # never early
    assert 0.00015 <= statistics.fmean(took) <= 0.001, statistics.fmean(took)


def test_precise_sleep_longer_and_zero() -> None:
    async def measure(delay: float) -> float:
        t0 = time.perf_counter()
        await precise_sleep(delay)
        return time.perf_counter() - t0

    took = asyncio.run(measure(0.003))
    assert 0.003 <= took < 0.1
    assert asyncio.run(measure(0)) < 0.05
    assert asyncio.run(measure(-1)) < 0.05


def test_precise_sleep_lets_others_run() -> None:
    async def both() -> int:
        _, turns = await loop_turns_during(precise_sleep(0.0008))
        return turns

    assert run(both()) > 0


# =========================================================================== parse_media, get_model
@pytest.mark.parametrize(
    "text, kind, mean",
    [
        ("none", "none", 0.0),
        ("ssd", "lognormal", 0.0002),
        ("hdd", "lognormal", 0.005),
        ("fixed:0.5", "fixed", 0.0005),
        ("fixed:2", "fixed", 0.002),
        ("fixed:1.25ms", "fixed", 0.00125),
    ],
)
def test_parse_media_accepts(text: str, kind: str, mean: float) -> None:
    m = parse_media(text)
    assert m.read.kind == kind and m.read.mean_s == pytest.approx(mean)
    assert m.active == (kind != "none")
    if kind == "fixed":
        assert m.write == m.read and m.name == text
        assert (m.iops_limit, m.bandwidth_limit) == (0, 0)


def test_parse_media_presets() -> None:
    assert parse_media("hdd").iops_limit == 200 and parse_media("hdd").bandwidth_limit == 200 * MIB
    assert parse_media("ssd") is MEDIA["ssd"]


@pytest.mark.parametrize(
    "text",
    ["", " ", "SSD", "ssd ", "nvme", "fixed", "fixed:", "fixed:-1", "fixed:abc", "fixed:1e3", "fixed:.5",
     "fixed:0.5s", "fixed:0.5 ms", "lognormal:1", "none,ssd", "fixed:1:2"],
)  # fmt: skip
def test_parse_media_rejects(text: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_media(text)
    msg = str(e.value)
    assert repr(text) in msg
    for word in ("none", "ssd", "hdd", "fixed:"):
        assert word in msg


def test_get_model() -> None:
    for name, model in MODELS.items():
        assert get_model(name) is model
    for bad in ("", "Unified", "nope", "unified "):
        with pytest.raises(ValueError) as e:
            get_model(bad)
        assert repr(bad) in str(e.value)
        for name in MODELS:
            assert name in str(e.value)
    m = get_model("plain").with_media(parse_media("fixed:1"))
    assert m.media.read.mean_s == pytest.approx(0.001) and get_model("plain").media.name == "none"


# =========================================================================== OpStats, LunStats
def test_opstats_counts_and_cumulative_histogram() -> None:
    s = OpStats()
    samples = [
        (4096, BOUNDS[0], True),
        (512, 0.0002, True),
        (MIB, 0.003, True),
        (0, 2.0, True),
        (0, 0.0007, False),
    ]
    for nbytes, secs, ok in samples:
        s.record(nbytes, secs, ok)
    assert s.count == len(samples)
    assert s.bytes == sum(n for n, _, _ in samples)
    assert s.errors == 1
    assert s.seconds == pytest.approx(sum(x for _, x, _ in samples))
    d = s.as_dict()
    assert (d["count"], d["bytes"], d["errors"]) == (s.count, s.bytes, s.errors)
    assert d["latency_seconds_sum"] == pytest.approx(s.seconds, abs=1e-6)
    hist = d["latency_histogram"]
    assert list(hist) == [f"{b:g}" for b in BOUNDS] + ["+Inf"]
    values = list(hist.values())
    assert values == sorted(values), "cumulative"
    assert hist["+Inf"] == s.count
    # le semantics: a sample equal to a bound is in that bound's bucket
    for bound, cum in zip(BOUNDS, values, strict=False):
        assert cum == sum(1 for _, x, _ in samples if x <= bound), bound
    assert hist["5e-05"] == 1 and hist["0.00025"] == 2 and hist["0.001"] == 3 and hist["1"] == 4


class Failing(MemoryBackend):
    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        if offset >= MIB:
            raise BackendError(errno.EIO, "bad sector")
        await super().write(offset, data, fua)

    async def flush(self) -> None:
        raise BackendError(errno.EIO, "flush failed")


def test_lunstats_through_lun_backend() -> None:
    lb = LunBackend("l1", Failing(2 * MIB), None, None)
    assert set(lb.stats.ops) == set(OPS)

    async def io() -> None:
        for i in range(3):
            await lb.write(i * 4096, b"w" * 4096)
        await lb.read(0, 8192)
        await lb.read_into(0, memoryview(bytearray(512)))
        await lb.write_zeroes(0, 4096)
        await lb.trim(4096, 4096)
        await lb.cache(0, 100)
        await lb.extents(0, MIB)
        with pytest.raises(BackendError):
            await lb.write(MIB, b"x" * 512)
        with pytest.raises(BackendError):
            await lb.flush()

    run(io())
    ops = lb.stats.as_dict()
    assert (ops["write"]["count"], ops["write"]["bytes"], ops["write"]["errors"]) == (4, 3 * 4096, 1)
    assert (ops["read"]["count"], ops["read"]["bytes"], ops["read"]["errors"]) == (2, 8192 + 512, 0)
    assert (ops["zero"]["count"], ops["zero"]["bytes"]) == (1, 4096)
    assert (ops["trim"]["count"], ops["trim"]["bytes"]) == (1, 4096)
    assert (ops["cache"]["count"], ops["extents"]["count"]) == (1, 1)
    assert (ops["flush"]["count"], ops["flush"]["errors"]) == (1, 1)
    for op in OPS:
        assert ops[op]["latency_histogram"]["+Inf"] == ops[op]["count"], op


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_collector_prometheus_text() -> None:
    a, b = LunStats(), LunStats()
    for _ in range(3):
        a.ops["write"].record(4096, 0.0003)
    a.ops["read"].record(512, 0.02, ok=False)
    text = asyncio.run(exposition("arr9", [("lun-a", a), ("lun-b", b)])).decode()
    assert 'blockmig_lun_ops_total{array="arr9",lun="lun-a",op="write"} 3.0' in text.splitlines()
    s = _samples(text)

    def key(name: str, lun: str, op: str, **extra: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return (name, tuple(sorted({"array": "arr9", "lun": lun, "op": op, **extra}.items())))

    assert s[key("blockmig_lun_bytes_total", "lun-a", "write")] == 3 * 4096
    assert s[key("blockmig_lun_errors_total", "lun-a", "read")] == 1
    assert s[key("blockmig_lun_ops_total", "lun-b", "write")] == 0
    assert s[key("blockmig_lun_latency_seconds_bucket", "lun-a", "write", le="0.00025")] == 0
    assert s[key("blockmig_lun_latency_seconds_bucket", "lun-a", "write", le="0.0005")] == 3
    assert s[key("blockmig_lun_latency_seconds_bucket", "lun-a", "write", le="+Inf")] == 3
    assert s[key("blockmig_lun_latency_seconds_count", "lun-a", "write")] == 3
    assert s[key("blockmig_lun_latency_seconds_sum", "lun-a", "write")] == pytest.approx(0.0009)
    # every LUN has every op's counters; a histogram only once the op was used
    luns_ops = {(dict(lbl)["lun"], dict(lbl)["op"]) for (n, lbl) in s if n == "blockmig_lun_ops_total"}
    assert luns_ops == {(lun, op) for lun in ("lun-a", "lun-b") for op in OPS}
    hists = {(dict(lbl)["lun"], dict(lbl)["op"]) for (n, lbl) in s if n.startswith("blockmig_lun_latency")}
    assert hists == {("lun-a", "write"), ("lun-a", "read")}


# =========================================================================== end to end: NBD -> stats
async def _array_io(
    data_dir: Path, media: str, work: Callable[[NbdClient], Coroutine[Any, Any, None]]
) -> tuple[str, dict[str, Any]]:
    server = NbdServer()
    array = Array(data_dir, "arr-e2e", get_model("unified").with_media(parse_media(media)), server)
    array.open()
    try:
        _, port = await server.listen_tcp("127.0.0.1", 0)
        array.create_lun("vol1", 4 * MIB)
        array.create_lun("vol2", MIB)
        async with await NbdClient.connect(f"nbd://127.0.0.1:{port}/vol1", timeout=5) as c:
            await work(c)
        text = await exposition(array.name, [(n, lun.backend.stats) for n, lun in array.luns.items()])
        return text.decode(), array.get_lun("vol1").backend.stats.as_dict()
    finally:
        await server.close()
        await array.close()


def test_metrics_after_nbd_writes(tmp_path: Path) -> None:
    writes = 7

    async def work(c: NbdClient) -> None:
        for i in range(writes):
            await c.write(i * 65536, os.urandom(65536))
        assert len(await c.read(0, 4096)) == 4096
        with pytest.raises(RequestError):
            await c.write(4 * MIB - 512, b"x" * 4096)  # past the end: refused by the server

    text, stats = run(_array_io(tmp_path / "a", "none", work))
    lines = text.splitlines()
    assert f'blockmig_lun_ops_total{{array="arr-e2e",lun="vol1",op="write"}} {writes}.0' in lines
    assert f'blockmig_lun_bytes_total{{array="arr-e2e",lun="vol1",op="write"}} {writes * 65536}.0' in lines
    assert 'blockmig_lun_ops_total{array="arr-e2e",lun="vol1",op="read"} 1.0' in lines
    assert 'blockmig_lun_ops_total{array="arr-e2e",lun="vol2",op="write"} 0.0' in lines
    assert stats["write"]["count"] == writes and stats["write"]["errors"] == 0


def test_media_latency_shows_in_histogram(tmp_path: Path) -> None:
    """With 2 ms fixed media, no NBD write completes in under 1 ms."""
    writes = 10

    async def work(c: NbdClient) -> None:
        for i in range(writes):
            await c.write(i * 4096, b"m" * 4096)

    t0 = time.perf_counter()
    _, stats = run(_array_io(tmp_path / "a", "fixed:2", work))
    assert time.perf_counter() - t0 >= writes * 0.002
    hist = stats["write"]["latency_histogram"]
    assert hist["0.001"] == 0 and hist["+Inf"] == writes
    assert stats["write"]["latency_seconds_sum"] >= writes * 0.002


def test_backend_interface_is_complete() -> None:
    """MediaBackend and LunBackend forward every Backend operation (habit 5)."""
    for cls in (MediaBackend, LunBackend):
        for name in (
            "read",
            "read_into",
            "write",
            "write_zeroes",
            "trim",
            "flush",
            "cache",
            "extents",
            "close",
        ):
            assert getattr(cls, name) is not getattr(Backend, name), (cls.__name__, name)


def test_precise_sleep_many_sleepers_in_order_and_cancelled() -> None:
    """Concurrent sleepers share one timerfd: each wakes at or after its own
    deadline; a cancelled one leaves the heap, and once everyone woke the
    timer is disarmed."""
    from emulator.array import timer

    async def main() -> None:
        rng = random.Random(5)
        delays = [rng.uniform(0.0001, 0.003) for _ in range(100)]

        async def one(d: float) -> float:
            t0 = time.perf_counter()
            await precise_sleep(d)
            return time.perf_counter() - t0

        victim = asyncio.create_task(precise_sleep(0.5))
        await asyncio.sleep(0)
        victim.cancel()
        took = await asyncio.gather(*(one(d) for d in delays))
        assert all(t >= d for t, d in zip(took, delays, strict=True))
        tfd = timer._timers.get(asyncio.get_running_loop())
        if tfd is not None:  # Linux: the timerfd path was taken
            assert not tfd._heap and tfd._armed == 0

    run(main())


def test_precise_sleep_does_not_spin() -> None:
    """Waiting for an SSD's 0.25 ms must not burn a core: that CPU is what the
    host and the other array need (bench/migration's read-through)."""

    async def main() -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(400):
            await asyncio.gather(*(precise_sleep(0.00025) for _ in range(8)))
        return time.perf_counter() - w0, time.process_time() - c0

    wall, cpu = run(main())
    assert cpu < 0.6 * wall, (cpu, wall)
