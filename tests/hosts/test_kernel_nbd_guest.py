"""The kernel's own NBD client on a volume that migrates: a Linux guest under qemu.

The route of /work/shared/recipes/guest-attach.sh (see tests/hosts/guest.py): a Debian
kernel and a busybox initramfs, booted under qemu's software emulation, attach a
blockmig volume as /dev/nbd0 with Debian's `nbd-client` over qemu's user network
(the host's 127.0.0.1 is 10.0.2.2 in the guest) while the volume migrates from array A
to array B through the control layer (`blockmig migrate`, as tests/control does).

The story, and what pins each part of it down:

1. A 64 MiB volume on A (2 ms media) holds a tagged block every 16 KiB: 16 MiB of data,
   which B's migration_throttle of 4 MB/s makes a copy of ~4 s (unthrottled it takes
   ~0.2 s: the copier reads a region's runs all at once, so A's media alone no longer
   makes it slow, and the pause below lost that race once). `blockmig migrate VOL B`
   answers ``migrating_attachable``; B's copy is paused at once through B's API (the
   array's own control: `blockmig migrate` takes no throttle), so however slow the boot
   is, the guest finds the volume still migrating.
   `blockmig attach VOL --json` names the export the guest attaches.
2. The guest loops over passes on a 4 MiB region: write zeroes and read them back, write
   one of three random patterns the host made for this run, read it back, all O_DIRECT,
   md5 compared in the guest. It prints each pass's start and end on the serial console.
3. After the first pass ends, the host resumes the copy: the guest's passes now run while
   B copies, converges and cuts over. Once the control layer records ``success``, the host
   waits for a pass that started after it (I/O on the cut-over LUN), then writes a stop
   flag into a block of the volume, which the guest reads (O_DIRECT) after every pass.
4. The guest detaches, prints ``BM-VERDICT: PASS ... run=NONCE`` and powers off. The host
   then reads the volume from B over NBD: the region holds the last pass's pattern byte
   for byte, every tagged block outside it is intact, and A no longer has the LUN.

A host thread samples the volume's migration_status (volumes.db) and B's migration state
every 50 ms; console lines carry the host's time when they arrived. The test asserts
orderings between the two (a pass inside the paused takeover, one overlapping the copy,
one after success), never durations.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.control.blockmig_env import (
    MIGRATING,
    ArraySpec,
    BlockmigEnv,
    MiB,
    assert_content,
    fill,
    read_all,
    write_blocks,
)
from tests.hosts import guest

pytestmark = [pytest.mark.slow, pytest.mark.interop, pytest.mark.timeout(420)]

SIZE = 64 * MiB
REGION = (24 * MiB, 4 * MiB)  # (offset, length) the guest writes; 64 KiB aligned
FLAG = 23 * MiB  # the 4 KiB block the host writes "STOP-<nonce>" into
STRIDE = 16 * 1024  # a tagged block every 16 KiB: 4096 extents to copy at 2 ms each on A
PATTERNS = 3  # random patterns per run, pass i writes pattern i % 3
ARRAYS = [ArraySpec("A", "unified", media="fixed:2"), ArraySpec("B", "unified", migration_throttle=4)]
BOOT_TIMEOUT = 240.0  # to the first pass's end: software emulation on 2 shared cores
STEP_TIMEOUT = 180.0  # for each later step the host waits for
GUEST_MAX = 600  # the guest gives up (FAIL) at this uptime without a stop flag
#: B's migration states while it copies (not paused, not final)
COPYING = ("copying", "converging", "cutover")

JOB = r"""# the job of tests/hosts/test_kernel_nbd_guest.py, sourced by the guest's init
S=$((BM_off / 65536)); C=$((BM_len / 65536)); F=$((BM_flag / 4096))
md5() { md5sum | cut -c1-32; }
want_of() { echo "$BM_md5" | cut -d, -f$(($1 + 1)); }
for k in $(seq 0 $((BM_patterns - 1))); do
  [ "$(md5 < /run/p$k.bin)" = "$(want_of $k)" ] || fail "pattern file $k is not what the host made"
done
i=0
while :; do
  k=$((i % BM_patterns)); i=$((i + 1)); want=$(want_of $k)
  say "pass $i start pattern=$k"
  dd if=/dev/zero of=/dev/nbd0 bs=64k seek=$S count=$C oflag=direct conv=notrunc,fsync 2>/tmp/dd.err \
    || fail "pass $i: writing zeroes: $(tail -n 1 /tmp/dd.err)"
  got=$(dd if=/dev/nbd0 bs=64k skip=$S count=$C iflag=direct 2>/tmp/dd.err | md5) \
    || fail "pass $i: reading the zeroes: $(tail -n 1 /tmp/dd.err)"
  [ "$got" = "$BM_zero" ] || fail "pass $i: the region reads md5 $got after zeroing, not zeroes"
  dd if=/run/p$k.bin of=/dev/nbd0 bs=64k seek=$S oflag=direct conv=notrunc,fsync 2>/tmp/dd.err \
    || fail "pass $i: writing pattern $k: $(tail -n 1 /tmp/dd.err)"
  blockdev --flushbufs /dev/nbd0; echo 3 > /proc/sys/vm/drop_caches
  got=$(dd if=/dev/nbd0 bs=64k skip=$S count=$C iflag=direct 2>/tmp/dd.err | md5) \
    || fail "pass $i: reading pattern $k back: $(tail -n 1 /tmp/dd.err)"
  [ "$got" = "$want" ] || fail "pass $i: pattern $k reads back md5 $got, wrote $want"
  say "pass $i ok pattern=$k md5=$got"
  flag=$(dd if=/dev/nbd0 bs=4096 skip=$F count=1 iflag=direct 2>/dev/null | head -c 64 | tr -dc A-Za-z0-9-)
  [ "$flag" = "STOP-$BM_run" ] && break
  [ "$(up | cut -d. -f1)" -lt "$BM_max" ] || fail "no stop flag after $i passes and $BM_max s"
done
echo "passes=$i last=$k md5=$want" > /tmp/job.result
"""


@pytest.fixture(scope="module")
def image() -> guest.GuestImage:
    try:
        im = guest.build()
    except guest.GuestUnavailable as e:
        print(f"kernel nbd-client guest test skipped: {e}")
        pytest.skip(str(e))
    print(f"guest image: {'built' if im.built else 'cached'} in {im.seconds:.1f} s, kernel {im.kver} "
          f"({'PVH vmlinux' if im.pvh else 'bzImage'}), {im.initramfs}")  # fmt: skip
    return im


@pytest.fixture
def bm(tmp_path: Path) -> Iterator[BlockmigEnv]:
    with BlockmigEnv(tmp_path / "state") as env:  # stops the arrays whatever happens
        env.up(ARRAYS)
        yield env


@dataclass
class Timeline:
    """The volume's migration_status and B's migration state, sampled with the host's time."""

    bm: BlockmigEnv
    vid: str
    lun: str
    samples: list[tuple[float, str, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self) -> None:
        api = self.bm.api("B")
        try:
            while not self.stop.is_set():
                status, _ = self.bm.db_row(self.vid)
                st: dict[str, Any] = api.call("GET", f"/api/v1/migrations/{self.lun}")
                self.samples.append((time.monotonic(), str(status), str(st["state"])))
                self.stop.wait(0.05)
        except BaseException as e:  # reported by the test, not lost in a thread
            self.error = e

    def states(self) -> list[str]:
        out: list[str] = []
        for _, _, a in self.samples:
            if not out or out[-1] != a:
                out.append(a)
        return out

    def changes(self, t0: float) -> str:
        """status/state@seconds at each change, seconds counted from ``t0``."""
        out, prev = [], ("", "")
        for t, s, a in self.samples:
            if (s, a) != prev:
                out.append(f"{s}/{a}@{t - t0:.2f}")
                prev = (s, a)
        return " ".join(out)


def wait_until(pred: Any, timeout: float, what: str, console: guest.Console) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s; console:\n{console.tail()}")
        time.sleep(0.05)


def passes(console: guest.Console) -> dict[int, tuple[float, float]]:
    """Pass number -> (host time its start line arrived, host time its ok line arrived)."""
    start: dict[int, float] = {}
    done: dict[int, tuple[float, float]] = {}
    for t, line in list(console.lines):
        m = re.match(r"BM: pass (\d+) (start|ok)\b", line)
        if m and m[2] == "start":
            start[int(m[1])] = t
        elif m:
            done[int(m[1])] = (start[int(m[1])], t)
    return done


def test_kernel_nbd_client_writes_and_verifies_through_a_live_migration(
    image: guest.GuestImage, bm: BlockmigEnv, tmp_path: Path
) -> None:
    run = secrets.token_hex(8)
    patterns = [os.urandom(REGION[1]) for _ in range(PATTERNS)]
    v = bm.create(f"kguest-{run}", SIZE, "A")
    vid, lun = v["id"], f"volume-{v['id']}"
    img = fill(v["provider_location"]["uri"], SIZE, seed=int(run, 16), stride=STRIDE)
    img.blocks[FLAG] = bytes(4096)  # no stop flag yet (a stale one could not match the nonce anyway)
    write_blocks(v["provider_location"]["uri"], {FLAG: img.blocks[FLAG]})

    d = bm.ok("migrate", vid, "B")
    assert d["migration_status"] == "migrating_attachable", d
    api_b = bm.api("B")
    api_b.call("POST", f"/api/v1/migrations/{lun}/pause")
    att = bm.ok("attach", vid, "--host-name", "kernel-guest")["data"]
    assert att["uri"] == d["provider_location"]["uri"], (att, d)
    assert att["host"] == "127.0.0.1", f"the guest reaches only the host's loopback: {att}"

    timeline = Timeline(bm, vid, lun)
    sampler = threading.Thread(target=timeline.run, name="migration-timeline", daemon=True)
    sampler.start()
    params = {
        "port": str(att["port"]), "export": att["export"], "run": run, "max": str(GUEST_MAX),
        "off": str(REGION[0]), "len": str(REGION[1]), "flag": str(FLAG), "patterns": str(PATTERNS),
        "md5": ",".join(hashlib.md5(p).hexdigest() for p in patterns),
        "zero": hashlib.md5(bytes(REGION[1])).hexdigest(),
    }  # fmt: skip
    files = {"run/job.sh": JOB.encode(), **{f"run/p{k}.bin": p for k, p in enumerate(patterns)}}
    t_boot = time.monotonic()
    try:
        with guest.boot(image, tmp_path, files, params) as (qemu, console):
            t_attached, _ = console.wait_for(r"^BM: attached /dev/nbd0", BOOT_TIMEOUT)
            t_first, _ = console.wait_for(r"^BM: pass 1 ok", BOOT_TIMEOUT)
            t_resume = time.monotonic()
            api_b.call("POST", f"/api/v1/migrations/{lun}/resume")
            wait_until(lambda: any(s not in MIGRATING for _, s, _ in timeline.samples) or timeline.error,
                       STEP_TIMEOUT, "the end of the migration", console)  # fmt: skip
            assert timeline.error is None, f"sampling the migration failed: {timeline.error!r}"
            t_end, status_end = next((t, s) for t, s, _ in timeline.samples if s not in MIGRATING)
            assert status_end == "success", f"the migration ended {status_end}: {bm.show(vid)}"
            _, m = console.wait_for(r"^BM: pass (\d+) start", STEP_TIMEOUT, after=t_end)
            write_blocks(att["uri"], {FLAG: f"STOP-{run}".encode().ljust(4096, b"\0")})
            t_verdict, verdict = console.wait_for(r"^BM-VERDICT: (\w+) (.*) run=(\w+)", STEP_TIMEOUT)
            qemu.wait(timeout=60)
    finally:
        timeline.stop.set()
        sampler.join(timeout=10)
    print(f"guest: attached {t_attached - t_boot:.1f} s after qemu started, verdict after "
          f"{t_verdict - t_boot:.1f} s; B's migration went {' -> '.join(timeline.states())}")  # fmt: skip

    # the guest's verdict, from this run
    assert verdict[1] == "PASS", f"the guest said {verdict[0]}; console:\n{console.tail()}"
    assert verdict[3] == run, f"verdict of another run: {verdict[0]}"
    done = re.search(r"passes=(\d+) last=(\d+) md5=(\w+)", verdict[2])
    assert done, verdict[0]
    last = int(done[2])
    assert done[3] == hashlib.md5(patterns[last]).hexdigest()

    # the guest did I/O in each phase of the migration
    seen = passes(console)
    story = (
        f"timeline (s after qemu started): {timeline.changes(t_boot)}; resumed@{t_resume - t_boot:.2f}; "
        "passes " + " ".join(f"{n}:{a - t_boot:.2f}-{b - t_boot:.2f}" for n, (a, b) in sorted(seen.items()))
    )
    print(story)
    assert int(done[1]) == max(seen), (done[0], sorted(seen))
    p_start, p_ok = seen[1]
    assert p_ok == t_first and p_ok <= t_resume
    assert any(
        t <= p_start and s == "migrating_attachable" and a == "paused" for t, s, a in timeline.samples
    ), f"pass 1 did not run in the paused takeover: {story}"
    during_copy = [
        n for n, (ts, to) in seen.items()
        if any(ts <= t <= to and s == "migrating_attachable" and a in COPYING for t, s, a in timeline.samples)
    ]  # fmt: skip
    assert during_copy, f"no pass ran while B copied: {story}"
    after = [n for n, (ts, _) in seen.items() if ts >= t_end]
    assert after and int(m[1]) in after, f"no pass after success: {story}"
    print(f"guest passes: {len(seen)} (1 in the paused takeover, {during_copy} while B copied, "
          f"{after} after success)")  # fmt: skip

    # the data on the array: B serves the last pattern and every tagged block around it
    end = bm.show(vid)
    assert end["migration_status"] == "success" and end["host"] == "B@unified#default", end
    assert end["provider_location"]["uri"] == att["uri"]
    assert (bm.array_migration("B", lun) or {}).get("state") == "completed"
    assert lun not in bm.luns("A"), "the source LUN must be gone after the migration"
    size, data = read_all(att["uri"])
    assert size == SIZE
    got = bytes(data[REGION[0] : REGION[0] + REGION[1]])
    if got != patterns[last]:
        bad = next(o for o in range(0, REGION[1], 4096) if got[o : o + 4096] != patterns[last][o : o + 4096])
        raise AssertionError(
            f"B holds something else than pattern {last} at {REGION[0] + bad} (md5 "
            f"{hashlib.md5(got).hexdigest()}, the guest read back {done[3]})"
        )
    img.blocks[FLAG] = f"STOP-{run}".encode().ljust(4096, b"\0")
    assert_content(att["uri"], img, ignore=(REGION[0], REGION[0] + REGION[1]))
    assert bm.ok("detach", vid)["status"] == "available"
