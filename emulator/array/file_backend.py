"""FileBackend: a Backend on a (sparse) file or block device.

Holes are real: TRIM punches them, WRITE_ZEROES uses fallocate, and the
allocation map comes from SEEK_DATA/SEEK_HOLE. Small I/O runs inline
(os.pread/os.pwrite on the page cache cost less than a hop to a thread);
I/O larger than ``inline_max`` goes to the default executor so a cold or
big request cannot stall the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import stat

from emulator.durable import fsync_dir
from emulator.nbd.backend import Backend
from emulator.nbd.errors import BackendError
from emulator.nbd.protocol import STATE_HOLE, STATE_ZERO, Extent

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE = 2


def _backend_error(what: str, e: OSError) -> BackendError:
    return BackendError(e.errno or errno.EIO, f"{what}: {e.strerror or e}")


class FileBackend(Backend):
    """Serve ``path`` (a regular file or a block device)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        read_only: bool = False,
        create_size: int | None = None,
        inline_max: int = 1024 * 1024,  # bench/nbd_server: threads cost more below this
    ) -> None:
        self.path = path = os.fspath(path)
        self.read_only = read_only
        self.inline_max = inline_max
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create_size is not None and not os.path.exists(path):
            if read_only:
                raise ValueError(f"{path}: does not exist, and a read-only export cannot create it")
            flags |= os.O_CREAT | os.O_EXCL
        self._fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        try:
            st = os.fstat(self._fd)
            self._is_file = stat.S_ISREG(st.st_mode)
            if self._is_file and create_size is not None and flags & os.O_CREAT:
                os.ftruncate(self._fd, create_size)
                # A new file's name is durable only once its directory is fsync'ed (a
                # flush fdatasyncs the file, never the directory): else a power cut
                # could lose a LUN whose writes a host had flushed (tests/mirror/test_power_cut.py).
                fsync_dir(os.path.dirname(os.path.abspath(path)))
            self._size = os.lseek(self._fd, 0, os.SEEK_END)
            if create_size is not None and create_size != self._size:
                raise ValueError(
                    f"{path}: exists with size {self._size}, not the requested {create_size}; "
                    "omit --size to serve it as it is"
                )
        except BaseException:
            os.close(self._fd)
            if flags & os.O_CREAT:
                os.unlink(path)  # a failed create leaves nothing behind
            raise
        self.can_trim = self.can_zero = not read_only
        self.can_fast_zero = self._is_file and not read_only

    @property
    def size(self) -> int:
        return self._size

    def refresh_size(self) -> int:
        """Re-read the size after the file was extended (a LUN grow)."""
        self._size = os.lseek(self._fd, 0, os.SEEK_END)
        return self._size

    @property
    def fd(self) -> int:
        return self._fd

    # ---- blocking primitives (inline or in a thread)
    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            # The file shrank under us: never hand out a short read.
            raise BackendError(errno.EIO, f"{self.path}: short read at {offset}")
        return data

    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        if not fua:  # os.pwrite costs 0.6 us less than pwritev with a list
            n = os.pwrite(self._fd, data, offset)
            if n == len(data):
                return
            data, offset = memoryview(data)[n:], offset + n
        view = memoryview(data)
        flags = os.RWF_DSYNC if fua else 0
        while view:
            n = os.pwritev(self._fd, [view], offset, flags)
            view = view[n:]
            offset += n

    # ---- Backend
    async def read(self, offset: int, length: int) -> bytes:
        try:
            if length <= self.inline_max:
                return self._pread(offset, length)
            return await asyncio.get_running_loop().run_in_executor(None, self._pread, offset, length)
        except OSError as e:
            raise _backend_error(f"{self.path}: read at {offset}", e) from None

    def zero_copy_fd(self, length: int) -> int | None:
        """The file itself, for a regular file and reads up to ``inline_max``
        (sendfile runs inline, like the reads it replaces)."""
        return self._fd if self._is_file and length <= self.inline_max else None

    async def read_into(self, offset: int, buf: memoryview) -> None:
        try:
            n = os.preadv(self._fd, [buf], offset)
        except OSError as e:
            raise _backend_error(f"{self.path}: read at {offset}", e) from None
        if n != len(buf):
            raise BackendError(errno.EIO, f"{self.path}: short read at {offset}")

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        try:
            if len(data) <= self.inline_max:
                self._pwrite(offset, data, fua)
            else:
                await asyncio.get_running_loop().run_in_executor(None, self._pwrite, offset, data, fua)
        except OSError as e:
            raise _backend_error(f"{self.path}: write at {offset}", e) from None

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        if self._is_file:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if may_trim else FALLOC_FL_ZERO_RANGE
            try:
                fallocate(self._fd, mode, offset, length)
                if fua:
                    os.fdatasync(self._fd)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise _backend_error(f"{self.path}: write zeroes at {offset}", e) from None
        if fast:
            raise BackendError(errno.ENOTSUP, f"{self.path}: cannot zero fast")
        await super().write_zeroes(offset, length, fua=fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if not self._is_file:
            return
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            if fua:
                os.fdatasync(self._fd)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise _backend_error(f"{self.path}: trim at {offset}", e) from None

    async def flush(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, self._fd)
        except OSError as e:
            raise _backend_error(f"{self.path}: flush", e) from None

    async def start_writeback(self, offset: int, length: int) -> None:
        """sync_file_range(WRITE): queue the range's dirty pages for writing.
        A copy that lets the page cache fill and flushes at the end waits for
        all of its writeback at once (fdatasync of 512 MiB: ~125 ms here).
        Inline up to ``inline_max`` like writes (1 MiB: p50 47 us, p99 125 us;
        it waits when the device's queue is full), else in a thread. An error
        (-1) shows again at the flush, which reports it."""
        if not self._is_file:
            return
        if length <= self.inline_max:
            _sync_file_range(self._fd, offset, length, SYNC_FILE_RANGE_WRITE)
        else:
            await asyncio.get_running_loop().run_in_executor(
                None, _sync_file_range, self._fd, offset, length, SYNC_FILE_RANGE_WRITE
            )

    async def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        if not self._is_file:
            return [Extent(length, 0)]
        fd, end = self._fd, offset + length
        out: list[Extent] = []
        pos = offset
        try:
            while pos < end and len(out) < 1024:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:
                        raise
                    data = end  # only a hole remains
                if data > pos:
                    n = min(data, end) - pos
                    out.append(Extent(n, STATE_HOLE | STATE_ZERO))
                else:
                    hole = os.lseek(fd, pos, os.SEEK_HOLE)
                    n = min(hole, end) - pos
                    out.append(Extent(n, 0))
                pos += n
        except OSError as e:
            raise _backend_error(f"{self.path}: extents at {offset}", e) from None
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
