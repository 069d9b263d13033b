"""Sub-millisecond sleeps for the event loop without spinning.

Event-loop timers have millisecond resolution (uvloop rounds to whole ms),
which would turn an SSD's 0.25 ms into 0 or 1 ms. Spinning on
``asyncio.sleep(0)`` until the deadline is precise but burns a core, and on
a small machine that CPU is taken from the host and from the other array,
which is exactly what a read-through benchmark measures. A Linux timerfd
armed for the earliest deadline wakes the loop's epoll on time instead
(timer slack lowered to 1 us for the loop's thread): one wake-up serves
every sleeper that is due.
"""

from __future__ import annotations

import asyncio
import ctypes
import heapq
import itertools
import logging
import os
import time
import weakref

log = logging.getLogger(__name__)

_CLOCK_MONOTONIC = 1  # time.monotonic_ns() reads the same clock on Linux
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1
_PR_SET_TIMERSLACK = 29
#: wake sleepers due this close to now with the others (0: never early)
_EARLY_NS = 0


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create  # noqa: B018 - probe: Linux only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


class TimerFd:
    """Deadlines on one event loop, served by one timerfd.

    The loop watches the fd for as long as both live: registering it anew
    whenever the first sleeper arrives cost uvloop eight syscalls per idle
    period (a poll handle made and torn down), that is per I/O at queue
    depth 1. The loop holds the timer, the timer only a weak reference to
    the loop, so both go away together."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        assert _LIBC is not None
        fd = _LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        _LIBC.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)  # best effort: 50 us by default
        self._fd = fd
        self._loop = weakref.ref(loop)
        self._heap: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._armed = 0  # the deadline the timer is set for, 0 = disarmed
        self._spec = _Itimerspec()
        weakref.finalize(self, os.close, fd)
        loop.add_reader(fd, self._fire)

    async def sleep(self, delay: float) -> None:
        loop = self._loop()
        assert loop is not None
        deadline = time.monotonic_ns() + int(delay * 1e9)
        entry = (deadline, next(self._seq), loop.create_future())
        heap = self._heap
        heapq.heappush(heap, entry)
        if self._armed == 0 or deadline < self._armed:
            self._arm(deadline)
        try:
            await entry[2]
        except asyncio.CancelledError:
            if entry in heap:  # the timer may stay armed for it: one empty wake-up
                heap.remove(entry)
                heapq.heapify(heap)
            raise

    def _arm(self, deadline: int) -> None:
        v = self._spec.it_value
        v.tv_sec, v.tv_nsec = divmod(deadline, 1_000_000_000)
        assert _LIBC is not None
        if _LIBC.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) < 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime")
        self._armed = deadline

    def _fire(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:  # re-armed after it had expired
            pass
        self._armed = 0
        heap = self._heap
        due = time.monotonic_ns() + _EARLY_NS
        while heap and heap[0][0] <= due:
            fut = heapq.heappop(heap)[2]
            if not fut.done():
                fut.set_result(None)
        if heap:
            self._arm(heap[0][0])


_timers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TimerFd] = weakref.WeakKeyDictionary()


async def _spin_sleep(delay: float) -> None:
    """The portable fallback: yield to the loop until the deadline."""
    deadline = time.perf_counter() + delay
    while time.perf_counter() < deadline:
        await asyncio.sleep(0)


async def precise_sleep(delay: float) -> None:
    """Sleep ``delay`` seconds with microsecond precision, never less."""
    loop = asyncio.get_running_loop()
    timer = _timers.get(loop)
    if timer is None:
        if _LIBC is None:
            await _spin_sleep(delay)
            return
        try:
            timer = _timers[loop] = TimerFd(loop)
        except OSError as e:
            log.warning("no timerfd (%s): sub-millisecond media delays spin", e)
            await _spin_sleep(delay)
            return
    await timer.sleep(delay)
