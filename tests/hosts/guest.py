"""A throwaway Linux guest whose kernel attaches an NBD export: the real `nbd-client` path.

The route of /work/shared/recipes/guest-attach.sh, in Python. Debian's kernel
(linux-image-amd64) boots under qemu's software emulation (``-accel kvm`` hangs on
these machines), through PVH from the vmlinux inside the bzImage (decompressed once;
the recipe measured boot+test at 4 s this way against 10 s with the bzImage). The
initramfs holds busybox-static, nbd.ko and the virtio-net modules (each with its
dependency chain, from ``modprobe --show-depends``), Debian's ``nbd-client`` with the
shared libraries ``ldd`` names, and an init rendered from :data:`INIT_TEMPLATE`.
Everything comes from packages installed on this machine (see APT_PACKAGES in the
Makefile); nothing is downloaded.

The init brings up eth0 on qemu's user network (the host's 127.0.0.1 is 10.0.2.2
there), attaches /dev/nbd0 to the export named on the kernel command line, runs the
test's job (``/run/job.sh``, a per-run file), detaches, prints one verdict line on the
serial console and powers off::

    BM: <progress> up=<guest uptime>
    BM-VERDICT: PASS|FAIL <detail> run=<the run's nonce> up=<guest uptime>

:func:`build` caches the kernel and the initramfs under ``.cache/guest/KVER/`` (the
digest in the initramfs name covers the init template and every file copied in), so a
test run builds them once. :func:`with_files` appends a second small archive of
per-run files (the job, its patterns) to a copy of the cached one: the kernel unpacks
concatenated newc archives in order.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tests.tools import TOOL_TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = ROOT / ".cache" / "guest"
QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"  # busybox-static: it has no nbd-client applet, hence Debian's
BINARIES = ("/usr/sbin/nbd-client",)
MODULES = ("virtio_pci", "virtio_net", "nbd")  # load order: NIC first, then nbd
HOST_ADDR = "10.0.2.2"  # the host's 127.0.0.1 as qemu's user network shows it to the guest
#: bump when the layout of the image changes in a way the digest cannot see
BUILD_VERSION = "1"

INIT_TEMPLATE = r"""#!/bin/busybox sh
# init of the blockmig test guest (rendered by tests/hosts/guest.py; do not edit a copy).
# Kernel command line: bm.port= bm.export= bm.run= [bm.max=SECONDS] and whatever the job reads;
# every bm.NAME=VALUE becomes $BM_NAME here and in the job.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
set -o pipefail
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "BM: $* up=$(up)"; }
verdict() { echo "BM-VERDICT: $* run=$BM_run up=$(up)"; sync; poweroff -f; sleep 30; }
fail() { verdict "FAIL $*"; }
for a in $(cat /proc/cmdline); do
  case "$a" in bm.*=*) k=${a%%=*}; eval "export BM_${k#bm.}='${a#*=}'";; esac
done
[ -n "$BM_run" ] && [ -n "$BM_port" ] && [ -n "$BM_export" ] || fail "bm.run, bm.port, bm.export missing"
say "init start kernel=$(uname -r)"
for ko in @MODULES@; do insmod "/lib/modules/$ko" || fail "insmod $ko"; done
[ -b /dev/nbd0 ] || fail "no /dev/nbd0 after loading nbd.ko"
ip link set lo up
ip link set eth0 up || fail "no eth0"
ip addr add 10.0.2.15/24 dev eth0
ip route add default via @HOST_ADDR@
say "net up"
nbd-client -N "$BM_export" @HOST_ADDR@ "$BM_port" /dev/nbd0 -b 4096 -t 60 >/tmp/nbd-client.log 2>&1 \
  || fail "nbd-client exited $?: $(tail -n 2 /tmp/nbd-client.log | tr '\n' ' ')"
say "attached /dev/nbd0 size=$(blockdev --getsize64 /dev/nbd0)"
[ -f /run/job.sh ] || fail "no /run/job.sh"
( . /run/job.sh ) || fail "job exited $?: $(tail -n 1 /tmp/job.result 2>/dev/null)"
nbd-client -d /dev/nbd0 >/dev/null 2>&1 || fail "nbd-client -d /dev/nbd0 failed"
say "detached"
verdict "PASS $(tail -n 1 /tmp/job.result 2>/dev/null)"
"""


class GuestUnavailable(Exception):
    """What this machine lacks to boot the guest (a test skips with it as the reason)."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # the PVH vmlinux, or the bzImage where no PVH entry was found
    initramfs: Path
    kver: str
    pvh: bool
    built: bool  # False: both came from the cache
    seconds: float  # time taken by build()


# ---------------------------------------------------------------------- what the machine has
def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", v))


def find_kernel() -> tuple[str, Path]:
    """(KVER, /boot/vmlinuz-KVER): the newest kernel whose modules and image are both here."""
    mods = Path("/lib/modules")
    names = [d.name for d in mods.iterdir()] if mods.is_dir() else []
    found = [n for n in names if (Path("/boot") / f"vmlinuz-{n}").is_file()]
    if not found:
        raise GuestUnavailable(
            "no kernel package: /boot/vmlinuz-KVER with /lib/modules/KVER is missing "
            "(apt package linux-image-amd64; run `make install`)"
        )
    kver = max(found, key=_version_key)
    bz = Path("/boot") / f"vmlinuz-{kver}"
    if not os.access(bz, os.R_OK):
        raise GuestUnavailable(f"{bz} is not readable (run as root)")
    return kver, bz


def check_tools() -> None:
    """Raise GuestUnavailable naming what is missing to build and boot the guest."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (apt package qemu-system-x86)")
    if not os.access(BUSYBOX, os.X_OK):
        missing.append(f"{BUSYBOX} (apt package busybox-static)")
    missing += [f"{b} (apt package nbd-client)" for b in BINARIES if not os.access(b, os.X_OK)]
    if shutil.which("modprobe") is None:
        missing.append("modprobe (apt package kmod)")
    if missing:
        raise GuestUnavailable("not installed: " + ", ".join(missing) + " (run `make install`)")


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=TOOL_TIMEOUT)


def shared_libs(binary: str) -> list[str]:
    """The shared libraries (and the loader) ``binary`` needs, as absolute paths; none when static."""
    r = _run(["ldd", binary])
    if r.returncode != 0:
        if "not a dynamic executable" in r.stdout + r.stderr:
            return []
        raise GuestUnavailable(f"ldd {binary} failed: {r.stderr.strip()}")
    return re.findall(r"(/\S+) \(0x", r.stdout)


def module_chain(kver: str, names: Sequence[str]) -> list[Path]:
    """Every .ko ``names`` need, dependencies first, each once (``modprobe --show-depends``)."""
    out: list[Path] = []
    for name in names:
        r = _run(["modprobe", "-S", kver, "--show-depends", name])
        if r.returncode != 0:
            raise GuestUnavailable(f"kernel {kver} has no module {name}: {r.stderr.strip()}")
        for line in r.stdout.splitlines():
            parts = line.split()
            if parts[:1] == ["insmod"] and Path(parts[1]) not in out:
                out.append(Path(parts[1]))
    return out


# ---------------------------------------------------------------------- the kernel
XZ_MAGIC = b"\xfd7zXZ\x00"
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point qemu's -kernel looks for in an ELF


def has_pvh_entry(elf: bytes) -> bool:
    """Whether an ELF64 image carries the Xen PVH entry note (qemu boots it directly)."""
    if elf[:5] != b"\x7fELF\x02":
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(bzimage: Path) -> bytes | None:
    """The uncompressed kernel inside a bzImage whose payload is xz, if it has a PVH entry."""
    data = bzimage.read_bytes()
    pos = data.find(XZ_MAGIC)
    if pos < 0:
        return None
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[pos:])
    except lzma.LZMAError:
        return None
    return elf if has_pvh_entry(elf) else None


# ---------------------------------------------------------------------- cpio (newc)
class Cpio:
    """A newc archive, the format the kernel unpacks into its initramfs (mode, no owners)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.dirs: set[str] = set()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (self.ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data), 0, 0, *rdev,
                  len(name) + 1, 0)  # fmt: skip
        self.ino += 1
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self.parts += [head, b"\0" * (-len(head) % 4), data, b"\0" * (-len(data) % 4)]

    def dir(self, path: str) -> None:
        path = path.strip("/")
        if not path or path in self.dirs:
            return
        self.dir(os.path.dirname(path))
        self.dirs.add(path)
        self._entry(path, 0o040755)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self._entry(path, 0o100000 | mode, data)

    def chardev(self, path: str, major: int, minor: int) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self._entry(path, 0o020600, rdev=(major, minor))

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        out = b"".join(self.parts)
        return out + b"\0" * (-len(out) % 512)


# ---------------------------------------------------------------------- the image
def render_init(modules: Sequence[str]) -> str:
    return INIT_TEMPLATE.replace("@MODULES@", " ".join(modules)).replace("@HOST_ADDR@", HOST_ADDR)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _stamp(paths: Sequence[str | Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def _prune(directory: Path, prefix: str, keep: Path) -> None:
    for old in directory.glob(f"{prefix}*"):
        if old != keep:
            with suppress(OSError):
                old.unlink()


def build(cache_dir: Path = CACHE_DIR) -> GuestImage:
    """The guest's kernel and initramfs, from the cache when nothing that goes in changed."""
    t0 = time.monotonic()
    check_tools()
    kver, bzimage = find_kernel()
    kos = module_chain(kver, MODULES)
    bins = [BUSYBOX, *BINARIES]
    libs = sorted({lib for b in bins for lib in shared_libs(b)})
    init = render_init([ko.name for ko in kos])
    directory = cache_dir / kver
    directory.mkdir(parents=True, exist_ok=True)
    built = False

    kernel_key = _stamp([bzimage])
    vmlinux = directory / f"vmlinux-{kernel_key}"
    no_pvh = directory / f"vmlinux-{kernel_key}.none"  # this bzImage has no PVH vmlinux inside
    if not vmlinux.exists() and not no_pvh.exists():
        elf = extract_vmlinux(bzimage)
        if elf is None:
            no_pvh.touch()
        else:
            _write_atomic(vmlinux, elf)
        built = True
        _prune(directory, "vmlinux-", vmlinux if elf is not None else no_pvh)
    pvh = vmlinux.exists()

    h = hashlib.sha256(f"{BUILD_VERSION}\0{init}\0".encode())
    h.update(_stamp([*bins, *libs, *kos]).encode())
    initramfs = directory / f"initramfs-{h.hexdigest()[:16]}.cpio"
    if not initramfs.exists():
        a = Cpio()
        for d in ("bin", "dev", "proc", "sys", "tmp", "run", "etc", "mnt", "lib/modules"):
            a.dir(d)
        a.chardev("dev/console", 5, 1)  # stdio of init before devtmpfs is mounted
        a.file("init", init.encode(), 0o755)
        for b in bins:
            a.file(b, Path(b).read_bytes(), 0o755)
        for lib in libs:
            a.file(lib, Path(lib).read_bytes(), 0o755)  # the loader must be executable
        for ko in kos:
            a.file(f"lib/modules/{ko.name}", ko.read_bytes())
        _write_atomic(initramfs, a.bytes())
        built = True
        _prune(directory, "initramfs-", initramfs)
    return GuestImage(vmlinux if pvh else bzimage, initramfs, kver, pvh, built, time.monotonic() - t0)


def with_files(base: Path, files: Mapping[str, bytes], out: Path) -> Path:
    """``out``: the archive ``base`` followed by one holding ``files`` (path -> content, mode
    0755 for paths ending in .sh), so per-run files need no rebuild of the cached image."""
    a = Cpio()
    for path, data in files.items():
        a.file(path, data, 0o755 if path.endswith(".sh") else 0o644)
    with open(out, "wb") as f:
        with open(base, "rb") as b:
            shutil.copyfileobj(b, f)
        f.write(a.bytes())
    return out


# ---------------------------------------------------------------------- running it
def qemu_command(kernel: Path, initramfs: Path, params: Mapping[str, str], mem_mb: int = 256) -> list[str]:
    """qemu, software emulation, serial console on stdout, one virtio NIC on the user network.
    ``params`` become ``bm.NAME=VALUE`` on the kernel command line (no spaces in values)."""
    for k, v in params.items():
        if not v or any(c.isspace() or c in "'\"" for c in v):
            raise ValueError(f"guest parameter {k}={v!r} must be non-empty, no spaces or quotes")
    append = "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init mitigations=off " + " ".join(
        f"bm.{k}={v}" for k, v in params.items()
    )
    return [
        QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "1", "-m", str(mem_mb),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", "stdio", "-monitor", "none",
        "-kernel", str(kernel), "-initrd", str(initramfs), "-append", append,
        "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
    ]  # fmt: skip


@dataclass
class Console:
    """The guest's serial console as it arrives: each line with the host's monotonic time."""

    log: Path
    lines: list[tuple[float, str]] = field(default_factory=list)
    closed: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)

    def feed(self, stream: Iterator[str]) -> None:
        with open(self.log, "w") as f:
            for raw in stream:
                line = raw.rstrip("\r\n")
                f.write(line + "\n")
                f.flush()
                with self.cond:
                    self.lines.append((time.monotonic(), line))
                    self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def find(self, pattern: str, after: float = 0.0) -> tuple[float, re.Match[str]] | None:
        rx = re.compile(pattern)
        with self.cond:
            for t, line in self.lines:
                m = rx.search(line)
                if m and t >= after:
                    return t, m
        return None

    def wait_for(self, pattern: str, timeout: float, after: float = 0.0) -> tuple[float, re.Match[str]]:
        """The first line at or after host time ``after`` matching ``pattern``; AssertionError
        with the console's tail when the guest ends or ``timeout`` passes without one."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                hit = self.find(pattern, after)
                if hit is not None:
                    return hit
                verdict = self.find(r"^BM-VERDICT: ")
                if verdict is not None or self.closed or time.monotonic() > deadline:
                    why = "the guest ended" if verdict or self.closed else f"{timeout:.0f} s passed"
                    raise AssertionError(
                        f"{why} before a console line matched {pattern!r}; console ({self.log}):\n"
                        + self.tail()
                    )
                self.cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))

    def tail(self, n: int = 40) -> str:
        with self.cond:
            return "\n".join(line for _, line in self.lines[-n:])


@contextmanager
def boot(
    image: GuestImage, work: Path, files: Mapping[str, bytes], params: Mapping[str, str]
) -> Iterator[tuple[subprocess.Popen[str], Console]]:
    """Boot the guest with ``files`` added to its initramfs; yield (qemu, its console).
    qemu is always gone when this returns (killed if the guest has not powered off)."""
    initrd = with_files(image.initramfs, files, work / "initramfs-run.cpio")
    console = Console(work / "console.log")
    proc = subprocess.Popen(
        qemu_command(image.kernel, initrd, params),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace",
    )  # fmt: skip
    assert proc.stdout is not None
    reader = threading.Thread(target=console.feed, args=(proc.stdout,), name="guest-console", daemon=True)
    reader.start()
    try:
        yield proc, console
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        reader.join(timeout=10)
