"""`blockmig demo`: a volume migrates between two arrays while fio runs on it, in a few minutes.

The story, as the proposal "Async volume migration between backends" tells it:

1. `blockmig up`: arrays A (source) and B (target), model ``unified``, SSD-like media;
2. a volume on A, filled with random data over NBD; the sha256 of its first half (the
   *known region*, which nothing writes afterwards) is recorded;
3. the host attaches it through a real block device: nbdfuse exposes the export as a
   file, ``losetup --direct-io=on`` makes it /dev/loopN (without FUSE or loop devices,
   fio's nbd engine talks to the export instead, and the demo says so);
4. fio runs an OLTP-like job on the second half (8k randrw 70/30, QD16, with
   ``verify=crc32c``: it reads its writes back within 64 writes): its IOPS on A are the
   baseline;
5. ``migrate VOL B``: B takes the LUN over and the volume is ``migrating_attachable``;
   the host detaches from A and attaches on B at once, and fio runs the same job there.
   B's copier is held for as long as the baseline ran, so B serves every read of data it
   has not copied by reading it through from A (the read-through IOPS); then the copy
   runs, the migration reaches ``success`` on the live progress bar, and fio goes on, on
   B's own copy, for a few seconds;
6. checks: fio reported no verify error, the source LUN is gone from A, and the known
   region read from B over NBD has the recorded sha256; IOPS are compared with the
   baseline.

The host moves its attachment instead of keeping one fio run across the migration: from
the takeover on, A's LUN is fenced and a write sent to it fails with EPERM (before fencing
it bypassed B's copy and was lost). A live path switch under one device needs
device-mapper, which these machines lack.

Everything started is stopped in reverse order (fio, loop device, nbdfuse, arrays, work
dir), on success, failure, Ctrl-C or SIGTERM; any failure exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich import get_console
from rich.markup import escape
from rich.table import Table

from emulator.nbd.client import NbdClient
from emulator.units import format_size

from . import config
from .api_client import ApiError, ArrayApi
from .manager import VolumeManager
from .volume_commands import _ProgressBar
from .volumes import Volume

MiB = 1 << 20
CHUNK = 4 * MiB  # NBD fill and read-back unit
IN_FLIGHT = 8  # NBD requests in flight while filling and reading back
SAMPLE_S = 0.1  # fio IOPS log window: a flat-out copy of the demo volume takes ~0.5 s
MIGRATION_LIMIT_S = 600.0
STEPS = 6
#: the OLTP-like job: fio reads back and checks every write within 64 writes (crc32c)
FIO_JOB = (
    "--name=oltp --rw=randrw --rwmixread=70 --bs=8k --iodepth=16 --time_based --randrepeat=0 "
    "--verify=crc32c --verify_backlog=64 --verify_fatal=1 --verify_state_save=0 "
    f"--log_avg_msec={int(SAMPLE_S * 1000)} --log_unix_epoch=1 --output-format=json"
).split()

console = get_console()  # the progress bar draws on the same console


class DemoError(Exception):
    """A step failed; the message says which and why."""


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: signals received: a KeyboardInterrupt raised by a handler can land in a weakref or
#: __del__ callback, where Python prints it and drops it, so the waits check this too
_received: list[int] = []


def check_interrupted() -> None:
    if _received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while a process starts and its teardown is registered, so
    neither is left behind; raise KeyboardInterrupt afterwards if one came. (Children get
    the default handlers back at exec, unlike with a blocked signal mask.)"""
    got: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in SIGNALS}
    # _received is left alone: the KeyboardInterrupt below is raised in plain code
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if got:
        raise KeyboardInterrupt


@dataclass
class Options:
    size: int
    fio_seconds: float
    tail_seconds: float
    media: str
    keep: bool
    work_dir: Path | None
    nbd_engine: bool = False  # fio's nbd engine even where a loop device would work


# ---------------------------------------------------------------- data over NBD
async def _fill(uri: str, known: int) -> str:
    """Random data over the whole export; the sha256 of its first ``known`` bytes."""
    digest = hashlib.sha256()
    async with await NbdClient.connect(uri) as c:
        sem = asyncio.Semaphore(IN_FLIGHT)
        tasks = []

        async def put(off: int, data: bytes) -> None:
            try:
                await c.write(off, data)
            finally:
                sem.release()

        for off in range(0, c.size, CHUNK):
            data = os.urandom(min(CHUNK, c.size - off))
            if off < known:
                digest.update(data[: known - off])
            await sem.acquire()
            tasks.append(asyncio.create_task(put(off, data)))
        await asyncio.gather(*tasks)
        await c.flush()
    return digest.hexdigest()


async def _sha256(uri: str, length: int) -> str:
    """The sha256 of the export's first ``length`` bytes, read in order."""
    digest = hashlib.sha256()
    async with await NbdClient.connect(uri) as c:
        for base in range(0, length, CHUNK * IN_FLIGHT):
            offs = range(base, min(length, base + CHUNK * IN_FLIGHT), CHUNK)
            parts = await asyncio.gather(*(c.read(o, min(CHUNK, length - o)) for o in offs))
            for p in parts:
                digest.update(p)
    return digest.hexdigest()


# ---------------------------------------------------------------- the host's block device
def loop_unavailable() -> str | None:
    """Why nbdfuse + a loop device cannot be used here (None: they can)."""
    if os.geteuid() != 0:
        return "not root (losetup needs it)"
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            return f"{dev} is missing"
    for tool in ("nbdfuse", "losetup", "fusermount3"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run `make install`)"
    return None


def _run(cmd: list[str], timeout: float = 30.0) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise DemoError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout.strip()


def _retry(cmd: list[str], attempts: int = 25) -> None:
    """A teardown step, until the device is no longer busy."""
    for i in range(attempts):
        try:
            _run(cmd)
            return
        except DemoError:
            if i == attempts - 1:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def loop_device(uri: str, work: Path) -> Iterator[str]:
    """nbdfuse + ``losetup --direct-io=on``; yields /dev/loopN. Teardown in the only order
    that works: ``losetup -d``, ``fusermount3 -u``, then nbdfuse exits by itself."""
    fusedir = work / "fuse"
    fusedir.mkdir(parents=True)
    pidfile, logpath = work / "nbdfuse.pid", work / "nbdfuse.log"
    proc: subprocess.Popen[bytes] | None = None
    loop = ""
    try:
        with deferred_interrupts(), open(logpath, "wb") as log:
            proc = subprocess.Popen(
                ["nbdfuse", "-P", str(pidfile), str(fusedir), uri],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C is for the demo: it tears nbdfuse down in order
            )
        deadline = time.monotonic() + 15
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"nbdfuse did not start (exit {proc.returncode}): {logpath.read_text()}")
            time.sleep(0.02)
        with deferred_interrupts():  # an attached device is always detached
            # --direct-io=on: otherwise reads come from the page cache of the FUSE file
            loop = _run(["losetup", "--show", "-f", "--direct-io=on", str(fusedir / "nbd")])
        yield loop
    finally:
        if loop:
            _retry(["losetup", "-d", loop])
        if proc is not None:
            _stop_nbdfuse(proc, fusedir)


def is_mounted(path: Path) -> bool:
    """From the mount table: os.path.ismount says False for a FUSE mount whose server died."""
    target = str(path).replace(" ", "\\040")
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def _stop_nbdfuse(proc: subprocess.Popen[bytes], fusedir: Path) -> None:
    """Unmount: nbdfuse exits by itself (not mounted yet: SIGTERM it)."""
    if is_mounted(fusedir) and proc.poll() is None:
        _retry(["fusermount3", "-u", str(fusedir)])
    elif proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    if is_mounted(fusedir):  # nbdfuse died or was killed: a mount without its server
        _run(["fusermount3", "-u", "-z", str(fusedir)])


@dataclass
class Attachment:
    """The volume as the host sees it, and how fio reaches it."""

    uri: str
    device: str  # /dev/loopN, or "" with fio's nbd engine
    label: str  # what to print

    def fio_args(self) -> list[str]:
        if self.device:
            return [f"--filename={self.device}", "--ioengine=libaio", "--direct=1"]
        return ["--ioengine=nbd", f"--uri={self.uri}"]


@contextlib.contextmanager
def attach(m: VolumeManager, vol: Volume, work: Path, use_loop: bool) -> Iterator[Attachment]:
    """Attach through the control layer (``blockmig attach``), then on this host; detach after."""
    info = m.attach(vol.id)
    uri: str = info["data"]["uri"]
    try:
        if use_loop:
            with loop_device(uri, work) as dev:
                yield Attachment(uri, dev, f"{dev} (nbdfuse + losetup --direct-io=on)")
        else:
            yield Attachment(uri, "", "fio's nbd engine (no kernel block device)")
    finally:
        m.detach(vol.id)


# ---------------------------------------------------------------- fio
@dataclass
class FioRun:
    """One fio process of the OLTP job on the fio region, logging IOPS every 250 ms."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    iops_log: Path
    started: float = field(default_factory=time.time)

    @classmethod
    def start(cls, att: Attachment, region: tuple[int, int], seconds: float, work: Path, tag: str) -> FioRun:
        out, err, log = work / f"fio-{tag}.json", work / f"fio-{tag}.err", work / f"fio-{tag}"
        cmd = [
            "fio",
            *FIO_JOB,
            *att.fio_args(),
            f"--offset={region[0]}",
            f"--size={region[1]}",
            f"--runtime={int(seconds * 1000)}ms",
            f"--output={out}",
            f"--write_iops_log={log}",
        ]
        with open(err, "wb") as ef:
            proc = subprocess.Popen(
                cmd,
                cwd=work,
                stdin=subprocess.DEVNULL,
                stdout=ef,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(proc, out, err, Path(f"{log}_iops.1.log"))

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise DemoError(
                f"fio stopped early (exit {self.proc.returncode}): {self.errors() or self._tail()}"
            )

    def stop(self) -> None:
        """SIGINT: fio ends its job and writes its report (the writes of the last few ms
        stay unchecked: fio reads each one back within 64 writes, not at once)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise DemoError(f"fio did not finish within {timeout:.0f} s") from None

    def _tail(self) -> str:
        try:
            return self.err.read_text(errors="replace").strip()[-800:]
        except OSError:
            return ""

    def errors(self) -> str:
        """What fio reported wrong: verify mismatches, I/O errors (empty: nothing)."""
        bad = [ln for ln in self._tail().splitlines() if "verify" in ln or "error" in ln.lower()]
        try:
            text = self.out.read_text()
            report = json.loads(text[text.index("{") :])  # a "terminating on signal" line may precede
        except (OSError, ValueError) as e:
            return f"no fio report ({e}): {self._tail()}"
        for job in report.get("jobs", []):
            if job.get("error"):
                bad.append(f"job {job['jobname']} error {job['error']} ({os.strerror(job['error'])})")
        return "; ".join(bad[:5])

    def samples(self) -> list[tuple[float, float]]:
        """(end of window as epoch seconds, read+write IOPS in that window)."""
        by_t: dict[int, float] = {}
        with open(self.iops_log) as f:
            for line in f:
                t, value, ddir = (int(x) for x in line.split(",")[:3])
                if ddir in (0, 1):
                    by_t[t] = by_t.get(t, 0.0) + value
        return [(t / 1000, v) for t, v in sorted(by_t.items())]

    def iops(self, t0: float = 0.0, t1: float = float("inf")) -> float | None:
        """Mean IOPS over the windows that lie wholly in [t0, t1] (None: none do)."""
        vals = [v for t, v in self.samples() if t - SAMPLE_S >= t0 - 0.01 and t <= t1 + 0.01]
        return sum(vals) / len(vals) if len(vals) >= 2 else None


# ---------------------------------------------------------------- the story
class Story:
    def __init__(self) -> None:
        self.n = 0
        self.t0 = time.monotonic()

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.n += 1
        t = time.monotonic()
        console.print(f"\n[bold cyan][{self.n}/{STEPS}][/] [bold]{title}[/]")
        try:
            yield
            check_interrupted()
        except BaseException:
            console.print("      [bold red]✗[/]")
            raise
        console.print(f"      [green]✓[/] [dim]{time.monotonic() - t:.1f} s[/]")

    @staticmethod
    def say(text: str) -> None:
        console.print(f"      {text}", highlight=False)


def _config(work: Path, size: int, media: str) -> Path:
    cap = format_size(max(2 * size, 1 << 30))
    path = work / "arrays.toml"
    path.write_text(
        "".join(
            f'[[array]]\nname = "{name}"\nmodel = "unified"\nmedia = "{media}"\n'
            f'nbd = "127.0.0.1:0"\napi = "127.0.0.1:0"\npools = {{ default = "{cap}" }}\n\n'
            for name in ("A", "B")
        )
    )
    return path


def _fmt(iops: float | None) -> str:
    return "n/a" if iops is None else f"{iops:,.0f}"


def story(opts: Options, work: Path, stack: contextlib.ExitStack) -> Result:
    """Steps 1-6; returns what the summary shows. Raises DemoError on any failure."""
    s = Story()
    size, known = opts.size, opts.size // 2
    region = (known, size - known)  # fio's half
    state = work / "state"
    if shutil.which("fio") is None:
        raise DemoError("fio is not installed: run `make install`")

    with s.step(f"Two arrays: A (source) and B (target), model unified, media {opts.media}"):
        with deferred_interrupts():  # arrays that started are always stopped
            if not opts.keep:
                stack.callback(config.down, state)
            recs = config.up(state, _config(work, size, opts.media))
        for rec in recs.values():
            s.say(f"{rec.name}  api {rec.api}  nbd {rec.nbd}  pid {rec.pid}")
        m = VolumeManager(state)
        stack.callback(m.close)

    with s.step(f"A volume of {format_size(size)} on A, random data written over NBD"):
        vol = m.create("demo-vol", size, "A")
        uri_a = m.view(vol)["provider_location"]["uri"]
        sha = asyncio.run(_fill(uri_a, known))
        s.say(f"{vol.name} ({vol.id}) at {uri_a}")
        s.say(f"known region 0-{format_size(known)}: sha256 {sha[:16]}… (nothing writes it from here on)")

    why_not = "--nbd-engine given" if opts.nbd_engine else loop_unavailable()
    with s.step("The host attaches it through a real block device"):
        if why_not:
            s.say(f"[yellow]no FUSE/loop device here: {escape(why_not)}[/]")
            s.say("[yellow]fio talks NBD itself (ioengine=nbd): no kernel block device in the path[/]")
        host_a = stack.enter_context(contextlib.ExitStack())  # closed when the host moves to B
        att_a = host_a.enter_context(attach(m, vol, work / "host-a", use_loop=why_not is None))
        s.say(f"volume on A -> {escape(att_a.label)}")

    job = f"fio {format_size(region[0])}-{format_size(size)}: 8k randrw 70/30 QD16, verify=crc32c"
    with s.step(f"Before: {job}, {opts.fio_seconds:g} s on A"):
        with deferred_interrupts():
            before = FioRun.start(att_a, region, opts.fio_seconds, work, "before")
            host_a.callback(before.stop)
        before.wait(opts.fio_seconds + 60)
        if before.errors():
            raise DemoError(f"fio on A failed: {before.errors()}")
        iops_before = before.iops()
        s.say(f"{_fmt(iops_before)} IOPS on A (the source, directly)")

    with s.step("Migrate the volume to B while fio runs"):
        # The host lets go of A first: from the takeover on, A's LUN is fenced and fio's
        # writes there would fail (EPERM). Then steps 1-3 of migrate_volume; B serves the
        # volume at once.
        host_a.close()
        t_mig = time.time()
        vol = m.migrate(vol.id, "B")
        if vol.migration_status != "migrating_attachable":
            raise DemoError(f"expected migrating_attachable, got {vol.migration_status}")
        # Unthrottled, the copy takes a second or two and crowds fio out of the CPUs; held for
        # fio_seconds, B serves everything not yet copied by reading it through from A.
        api_b = m.registry.get("B").client()
        mig_path = f"/api/v1/migrations/{vol.lun}"
        paused = _pause(api_b, mig_path)
        s.say(f"migration_status [bold]{vol.migration_status}[/]: B serves the volume, its data is on A")
        att_b = stack.enter_context(attach(m, vol, work / "host-b", use_loop=why_not is None))
        with deferred_interrupts():
            during = FioRun.start(att_b, region, MIGRATION_LIMIT_S + 120, work, "during")
            stack.callback(during.stop)
        s.say(f"host re-attached on B -> {escape(att_b.label)}; fio runs the same job")
        if paused:
            s.say(f"B's copier held for {opts.fio_seconds:g} s: fio's reads of A's data go through B to A")
        last: dict[str, Any] = {}

        def progress(st: dict[str, Any]) -> None:
            check_interrupted()
            during.check_alive()
            if time.time() - t_mig > MIGRATION_LIMIT_S:
                raise DemoError(f"migration still {st.get('state')} after {MIGRATION_LIMIT_S:.0f} s")
            for k in ("remote_reads", "local_reads"):  # reset when B cuts over to its own copy
                st[k] = max(st.get(k) or 0, last.get(k) or 0)
            last.update(st)
            bar.update(st)
            bar.status(f"migrating_attachable: {st.get('state')}")

        with _ProgressBar(enabled=True) as bar:
            until = time.monotonic() + (opts.fio_seconds if paused else 0.0)
            while time.monotonic() < until:
                progress(api_b.migration(vol.lun))
                time.sleep(0.2)
            t_resume = time.time()
            if paused:
                api_b.call("POST", f"{mig_path}/resume")
            vol = m.follow(vol.id, progress=progress)  # steps 4-5: copy, cutover, source removed
            bar.status(vol.migration_status or "")
        if vol.migration_status != "success":
            raise DemoError(f"migration ended {vol.migration_status}: {vol.migration.get('error')}")
        t_done = last.get("finished") or time.time()
        s.say(
            f"migration_status [bold green]success[/]: volume on {vol.host}, cutover pause "
            f"{last.get('cutover_pause_ms')} ms, the source LUN on A removed"
        )
        time.sleep(opts.tail_seconds)  # fio goes on, on B's own copy now
        check_interrupted()
        during.check_alive()
        during.stop()

    with s.step("Check: fio's verification, the known region on B, the IOPS"):
        if during.errors():
            raise DemoError(f"fio on B failed: {during.errors()}")
        s.say("fio: no verify error; it read its writes back as it went (crc32c, within 64 writes)")
        if vol.lun in {lun["name"] for lun in m.registry.get("A").client().list_luns()}:
            raise DemoError(f"the source LUN {vol.lun} is still on A")
        uri_b = m.view(vol)["provider_location"]["uri"]
        sha_b = asyncio.run(_sha256(uri_b, known))
        if sha_b != sha:
            raise DemoError(f"known region on B: sha256 {sha_b}, expected {sha}")
        s.say(f"known region read from B over NBD ({uri_b}): sha256 matches")
        r = Result(
            vol=vol,
            path=att_b.label,
            status=last,
            paused_s=t_resume - t_mig if paused else 0.0,
            copy_s=t_done - t_resume,
            iops_before=iops_before,
            iops_readthrough=during.iops(during.started, t_resume) if paused else None,
            iops_copying=during.iops(t_resume, t_done),
            iops_after=during.iops(t_done),
            total_s=time.monotonic() - s.t0,
        )
        if r.iops_copying is None:
            s.say("[yellow]the copy took under a second: too short to measure IOPS while it ran[/]")
    return r


def _pause(api: ArrayApi, path: str) -> bool:
    """Hold the array's copier (False: the copy already ended)."""
    try:
        api.call("POST", f"{path}/pause")
        return True
    except ApiError as e:
        if e.status == 409:
            return False
        raise


@dataclass
class Result:
    vol: Volume
    path: str  # the host's path to the volume
    status: dict[str, Any]  # the array's last migration status
    paused_s: float
    copy_s: float
    iops_before: float | None
    iops_readthrough: float | None
    iops_copying: float | None
    iops_after: float | None
    total_s: float

    def vs_before(self, iops: float | None) -> str:
        if iops is None or not self.iops_before:
            return ""
        return f" ({100 * (iops / self.iops_before - 1):+.0f}% vs before)"


def summary(r: Result) -> None:
    vol, st = r.vol, r.status
    t = Table(title="blockmig demo: summary", show_header=False, title_style="bold")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("volume", f"{vol.name} ({vol.id}), {format_size(vol.size)}: A -> B, now on {vol.host}")
    t.add_row("migration", "migrating_attachable -> [green]success[/]")
    held = f" after {r.paused_s:.1f} s held for the read-through run" if r.paused_s else ""
    rate = vol.size / r.copy_s / MiB if r.copy_s > 0 else 0.0
    t.add_row(
        "copy", f"{r.copy_s:.1f} s at {rate:.0f} MiB/s{held}; cutover pause {st.get('cutover_pause_ms')} ms"
    )
    t.add_row(
        "reads on B while migrating",
        f"{st.get('remote_reads', 0):,} through to A, {st.get('local_reads', 0):,} from B's copy",
    )
    t.add_row("host path", escape(r.path))
    t.add_row("fio verify", "[green]passed[/]: writes read back and checked as fio went (crc32c)")
    t.add_row("known region", f"[green]sha256 matches[/] on B, read over NBD ({format_size(vol.size // 2)})")
    t.add_row("IOPS before, on A", _fmt(r.iops_before))
    t.add_row("IOPS on B, read-through", _fmt(r.iops_readthrough) + r.vs_before(r.iops_readthrough))
    t.add_row("IOPS on B, while copying", _fmt(r.iops_copying) + r.vs_before(r.iops_copying))
    t.add_row("IOPS on B, after cutover", _fmt(r.iops_after) + r.vs_before(r.iops_after))
    t.add_row("result", "[bold green]PASS[/]")
    console.print()
    console.print(t)
    console.print(
        "[dim]Read-through: B serves the volume while its data is still on A (copier held). While copying: "
        "the copier runs unthrottled (B has no migration_throttle) and competes for the CPUs. "
        f"All on loopback: fio, {'nbdfuse (FUSE), a loop device ' if '/dev/' in r.path else ''}"
        f"and both arrays share {os.cpu_count()} "
        "CPUs, so the losses are CPU contention more than a fabric's; the proposal's 15% is for real "
        "arrays. Compare ratios, not IOPS.[/]"
    )
    console.print(f"[dim]Took {r.total_s:.0f} s.[/]")


# ---------------------------------------------------------------- entry point
def _on_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def run(opts: Options) -> int:
    if opts.work_dir is not None and opts.work_dir.exists() and any(opts.work_dir.iterdir()):
        raise SystemExit(f"blockmig demo: --work-dir {opts.work_dir} is not empty (the demo removes it)")
    work = opts.work_dir or Path(tempfile.mkdtemp(prefix="blockmig-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]blockmig demo[/]: a live volume migration under fio")
    console.print(f"work dir {work} ({'kept' if opts.keep else 'removed at the end'})", highlight=False)
    _received.clear()
    old = {sig: signal.signal(sig, _on_signal) for sig in SIGNALS}
    rc, result = 1, None
    try:
        with contextlib.ExitStack() as outer:
            if not opts.keep:
                outer.callback(shutil.rmtree, work, True)
            with contextlib.ExitStack() as stack:
                try:
                    result = story(opts, work, stack)
                    check_interrupted()
                finally:  # the clean-up runs to its end, whatever is pressed or sent meanwhile
                    for sig in old:
                        signal.signal(sig, signal.SIG_IGN)
        rc = 0
    except KeyboardInterrupt:
        console.print("\n[bold red]interrupted[/]: stopped everything the demo started")
        rc = 130
    except Exception as e:  # every failure: say what, clean up, exit 1
        console.print(f"\n[bold red]FAIL[/]: {escape(str(e))}")
        if not opts.keep:
            console.print("[dim]everything the demo started is stopped; --keep keeps its logs[/]")
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if rc == 0 and result is not None:
        summary(result)
    if opts.keep:
        console.print(
            f"kept: {work}; the arrays still run: `blockmig list --state-dir {work / 'state'}`, "
            f"`blockmig down --state-dir {work / 'state'}` stops them",
            highlight=False,
        )
    return rc


def cmd_demo(args: argparse.Namespace) -> int:
    """`blockmig demo`; its arguments are in control/cli.py, which loads this module only
    when the command runs."""
    size: int = args.size
    if size < 16 * MiB or size % MiB:
        raise SystemExit("blockmig demo: --size must be a whole number of MiB, at least 16M")
    return run(
        Options(
            size=size,
            fio_seconds=args.fio_seconds,
            tail_seconds=args.tail_seconds,
            media=args.media,
            keep=args.keep,
            work_dir=Path(args.work_dir) if args.work_dir else None,
            nbd_engine=args.nbd_engine,
        )
    )
