"""Emulated storage network for the benchmarks: namespaces, veth pairs, netem.

Every array runs in its own network namespace; ``host`` (where fio, nbdcopy,
the control CLI and the benchmark driver itself run) is the root namespace,
so the driver reaches every array's NBD and API ports directly and a process
on the host needs no wrapper.

Topology: a full mesh of point-to-point veth pairs, one /30 per pair of
nodes. With the default nodes that is three links: host<->A and host<->B
(*host links*, shaped by ``profile.host_link``) and A<->B (the *array link*,
shaped by ``profile.array_link``, which carries a migration's read-through
and copy traffic). Each node also has one *service address* (a /32 on ``lo``
in its namespace; on the host, on its first veth) and a /32 route to every
other node's service address over their direct link, so ``addr(node)`` is
one address that every other node reaches over the right link: the target
array connects to ``addr("A")`` over the array link, the host over a host
link. Nothing is routed through a third node, so no forwarding is needed.

Addresses come from 198.18.0.0/15 (reserved for network benchmarks, RFC
2544), one /25 per fabric; a fabric that includes ``host`` picks, under a
lock file, a /25 with no address or route in the root namespace, so
parallel runs never collide. Names are unique per run (``bmfab-PID-SEQ-NODE``
namespaces, ``bmfPIDsSEQ...`` root-side interfaces), and every interface has
at least one end in a namespace of the run, so deleting the namespaces
deletes all of it.

Shaping, per direction (``LinkProfile`` gives round-trip figures):

- ``netem`` (kernel qdisc, when the kernel has ``sch_netem``): a netem qdisc
  on *both* ends of the link's veth pair, each with half the delay, half the
  jitter, the full rate and the full loss; netem shapes egress only, so
  each end shapes the direction leaving it. Like netem, jitter may reorder.
- ``wire`` (when it has not, e.g. on kernels built without netem): the
  link is two veth pairs whose inner ends meet in a ``bmfab-PID-SEQ-_wire``
  namespace, where one small process (``python -m bench.fabric _wire``)
  moves frames between them with ``AF_PACKET`` sockets (``PACKET_VNET_HDR``,
  so 64 KiB TCP super-frames cross whole) after half the delay +- half the
  jitter (uniform, order kept), serialised at the rate, with the loss drawn
  per frame. On the 2-core reference box it moves 0.6-1.2 GB/s of bulk
  TCP and about 40k frames/s (fio 4k randread QD16 over NBD: 31k IOPS
  through an ``fc`` wire against 43k over plain veths), and adds 35-50 us
  a direction of its own (an ``fc`` round trip measures ~0.12 ms, not
  0.05): compare ratios, not absolute numbers. It also takes CPU from the
  arrays and fio; its per-lane counters are in ``describe()["wire_stats"]``
  after the fabric is closed.
- links whose profile asks for nothing are plain veth pairs.

Teardown (``__exit__``, also on exceptions, SIGTERM and SIGINT) ends the
processes started with ``popen`` and any other process left in the run's
namespaces, removes the root-side interfaces and deletes the namespaces; a
SIGINT or SIGTERM that comes meanwhile (a second Ctrl-C) waits until it is done.
A fabric whose owner died (``kill -9``) is removed by the stale sweep at the
start of the next run (``sweep_stale()``, or ``python -m bench.fabric sweep``).

Without namespaces (not root, no pyroute2 or ``ip``, or any netlink error)
the fabric falls back to loopback: every ``addr()`` is 127.0.0.1, ``wrap()``
returns the command unchanged, nothing is shaped, ``namespaced`` is False
and ``fallback_reason`` says why (it is also logged). The ``loopback``
profile asks for exactly that (and leaves ``fallback_reason`` None).
Set ``BLOCKMIG_FABRIC_FALLBACK=reason`` to force the fallback.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import itertools
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from control.config import child_env
from emulator.units import count_arg

log = logging.getLogger("bench.fabric")

HOST = "host"  # the root namespace
LOOPBACK = "127.0.0.1"
NS_PREFIX = "bmfab-"
WIRE = "_wire"  # suffix of the wire namespace (node names cannot start with "_")
NETWORK = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544 benchmark space
SLOT_PREFIX = 25  # one /25 per fabric: service addresses .1-.15, /30 links from .16
MAX_NODES = 8  # 28 links of /30 fit in a /25
_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,11}")  # "to-" + name fits IFNAMSIZ
_NS_RE = re.compile(rf"^{NS_PREFIX}(\d+)-(\d+)-")
_CAP_NET_ADMIN, _CAP_SYS_ADMIN = 12, 21
_seq = itertools.count()
_netem_probe: tuple[str | None] | None = None  # the kernel's answer, once asked


@dataclass(frozen=True)
class LinkProfile:
    """What one link adds, as a network engineer quotes it.

    ``delay_ms`` is the round-trip time the link adds (half per direction);
    ``jitter_ms`` the +- spread of that round trip (half per direction,
    uniform); ``rate_mbit`` the bandwidth of each direction (None:
    unlimited); ``loss_pct`` the chance of losing a packet in each
    direction (the wire draws it per frame, and a frame can be a 64 KiB
    TCP super-frame).
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_mbit: float | None = None
    loss_pct: float = 0.0

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or not 0 <= self.loss_pct <= 100:
            raise ValueError(f"bad link profile {self}: negative delay/jitter or loss outside 0..100")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise ValueError(f"bad link profile {self}: rate_mbit must be positive or None")

    @property
    def shaped(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.rate_mbit or self.loss_pct)

    def per_direction(self) -> dict[str, Any]:
        """The settings each direction (each netem qdisc, each wire lane) gets."""
        return {
            "delay_ms": self.delay_ms / 2,
            "jitter_ms": self.jitter_ms / 2,
            "rate_mbit": self.rate_mbit,
            "loss_pct": self.loss_pct,
        }


@dataclass(frozen=True)
class FabricProfile:
    """A named network: the link every host<->array pair gets, and the array<->array one.

    ``namespaces`` False means loopback: no namespaces, nothing shaped.
    """

    name: str
    host_link: LinkProfile
    array_link: LinkProfile
    namespaces: bool = True


PROFILES: dict[str, FabricProfile] = {
    p.name: p
    for p in (
        # everything on 127.0.0.1, as the other benchmarks run
        FabricProfile("loopback", LinkProfile(), LinkProfile(), namespaces=False),
        # namespaces and veth pairs, nothing added: the cost of the isolation itself
        FabricProfile("local", LinkProfile(), LinkProfile()),
        # one fibre-channel SAN: 50 us round trips everywhere
        FabricProfile("fc", LinkProfile(delay_ms=0.05), LinkProfile(delay_ms=0.05)),
        # arrays in two sites of a metro area (~50 km of fibre), the host next to them
        FabricProfile(
            "metro",
            LinkProfile(delay_ms=0.05),
            LinkProfile(delay_ms=0.5, jitter_ms=0.05, rate_mbit=10_000),
        ),
        # arrays a few hundred km apart over a shared 1 Gbit/s line
        FabricProfile(
            "wan",
            LinkProfile(delay_ms=0.05),
            LinkProfile(delay_ms=10.0, jitter_ms=1.0, rate_mbit=1_000, loss_pct=0.01),
        ),
    )
}


class FabricError(RuntimeError):
    """The fabric could not be built (the caller falls back to loopback)."""


@dataclass
class _Link:
    """One point-to-point link between nodes ``a`` and ``b`` and its /30."""

    a: str
    b: str
    kind: str  # "host" | "array"
    profile: LinkProfile
    via: str  # "direct" | "netem" | "wire"
    addr_a: str
    addr_b: str
    if_a: str  # the interface of node a (in a's namespace, or the root one)
    if_b: str
    wire_ifs: tuple[str, str] | None = None  # the inner ends, in the wire namespace

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "nodes": [self.a, self.b],
            "kind": self.kind,
            "via": self.via,
            "profile": dataclasses.asdict(self.profile),
            "per_direction": self.profile.per_direction() if self.via != "direct" else None,
            "addrs": {self.a: self.addr_a, self.b: self.addr_b},
            "ifaces": {self.a: self.if_a, self.b: self.if_b},
        }
        if self.wire_ifs:
            d["wire_ifaces"] = list(self.wire_ifs)
        return d


# ---------------------------------------------------------------------------
# probing and sweeping


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they probably can."""
    forced = os.environ.get("BLOCKMIG_FABRIC_FALLBACK")
    if forced:
        return f"forced by BLOCKMIG_FABRIC_FALLBACK={forced}"
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, not {sys.platform}"
    try:
        import pyroute2  # noqa: F401
    except ImportError as e:
        return f"pyroute2 is not installed ({e}); install the bench extra: pip install -e '.[bench]'"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing; processes are started with `ip netns exec`"
    caps = _effective_caps()
    if caps is not None:
        missing = [
            n
            for n, bit in (("CAP_NET_ADMIN", _CAP_NET_ADMIN), ("CAP_SYS_ADMIN", _CAP_SYS_ADMIN))
            if not caps >> bit & 1
        ]
        if missing:
            return f"no {' and '.join(missing)} (uid {os.geteuid()}); run the benchmark as root"
    return None


def _effective_caps() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return None


def _netns_dir() -> str:
    from pyroute2.netns import NETNS_RUN_DIR

    return str(NETNS_RUN_DIR)


def list_fabric_namespaces() -> list[str]:
    """The namespaces of any fabric run (ours or another process's)."""
    try:
        names = os.listdir(_netns_dir())
    except (OSError, ImportError):
        return []
    return sorted(n for n in names if n.startswith(NS_PREFIX))


def pids_in_netns(name: str) -> list[int]:
    """Pids whose network namespace is ``name`` (what `ip netns pids` does)."""
    try:
        st = os.stat(os.path.join(_netns_dir(), name))
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            s = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry))
    return pids


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_pids(name: str, grace_s: float = 2.0) -> None:
    """SIGTERM what still runs in namespace ``name``, SIGKILL it after ``grace_s``.

    A process left in a namespace keeps it, and its veths, alive after the
    namespace's name is deleted.
    """
    me = os.getpid()
    pids = [p for p in pids_in_netns(name) if p != me]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            # a zombie has left its namespace already (and is not ours to reap)
            pids = [p for p in pids if _pid_alive(p) and not _is_zombie(p)]
            if pids:
                time.sleep(0.02)
        if not pids:
            return


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _remove_netns(name: str) -> None:
    from pyroute2 import netns

    try:
        netns.remove(name)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def sweep_stale() -> list[str]:
    """Delete the namespaces of fabric runs whose process is dead; return their names.

    A namespace name carries its owner's pid (``bmfab-PID-SEQ-NODE``); only
    those of pids that no longer exist are touched. Processes still inside
    are killed first (they would keep the namespace and its veths alive).
    """
    removed = []
    for name in list_fabric_namespaces():
        m = _NS_RE.match(name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            _kill_netns_pids(name, grace_s=1.0)
            _remove_netns(name)
            removed.append(name)
        except OSError as e:
            log.warning("stale fabric namespace %s: cannot remove it: %s", name, e)
    if removed:
        log.warning("removed stale fabric namespaces of dead runs: %s", ", ".join(removed))
    return removed


# ---------------------------------------------------------------------------
# the fabric


class Fabric:
    """A storage network of namespaces and shaped veth links (see the module doc).

    ``shaper`` chooses how shaped links are made: "auto" (kernel netem if the
    kernel has it, else the userspace wire), "netem" or "wire".
    """

    def __init__(
        self,
        profile: FabricProfile,
        nodes: Sequence[str] = (HOST, "A", "B"),
        *,
        shaper: str = "auto",
    ) -> None:
        nodes = tuple(nodes)
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"duplicate node names in {nodes}")
        if len(nodes) > MAX_NODES:
            raise ValueError(f"at most {MAX_NODES} nodes per fabric, got {len(nodes)}")
        for n in nodes:
            if not _NODE_RE.fullmatch(n):
                raise ValueError(f"bad node name {n!r}: 1-12 letters, digits or '-', not starting with '-'")
        if shaper not in ("auto", "netem", "wire"):
            raise ValueError(f"shaper must be 'auto', 'netem' or 'wire', not {shaper!r}")
        self.profile = profile
        self.nodes = nodes
        self.shaper_request = shaper
        self.namespaced = False
        self.fallback_reason: str | None = None
        self.shaper: str | None = None  # "netem" | "wire" | None when nothing is shaped
        self.pid = os.getpid()
        self.seq = next(_seq)
        self.run_id = f"{self.pid}-{self.seq}"
        self._ns: dict[str, str] = {}  # node -> namespace name (not for HOST)
        self._wire_ns: str | None = None
        self._addr: dict[str, str] = {}
        self._links: list[_Link] = []
        self._root_ifs: list[str] = []
        self._to_remove: list[str] = []  # namespaces made and not yet removed
        self._sockets: dict[str, Any] = {}  # namespace ("" for root) -> pyroute2 IPRoute
        self._procs: list[subprocess.Popen[Any]] = []
        self._wire: subprocess.Popen[str] | None = None
        self.wire_stats: dict[str, Any] | None = None
        self._lock_fd: int | None = None
        self._state = "new"  # new -> up -> closed
        self._tearing_down = False
        self._pending_signal: int | None = None
        self._prev_sigterm: Any = None
        self._sigterm_installed = False

    # -- the context manager

    def __enter__(self) -> Fabric:
        if self._state != "new":
            raise RuntimeError("a Fabric can be entered once")
        self._state = "up"
        self._install_signal_handler()
        atexit.register(self._teardown)
        try:
            if not self.profile.namespaces:
                self._use_loopback(None)
            elif (reason := unavailable_reason()) is not None:
                self._use_loopback(reason)
            else:
                try:
                    self._build()
                    self.namespaced = True
                except Exception as e:  # any pyroute2/netlink/OS trouble: clean up, fall back
                    log.warning("fabric %s: building the namespaces failed", self.run_id, exc_info=True)
                    self._teardown()
                    self._tearing_down = False
                    self._deliver_pending_signal()  # a Ctrl-C during that teardown: stop here
                    self._ns.clear()
                    self._links.clear()
                    self._addr.clear()
                    self._wire_ns = None
                    self._use_loopback(f"could not build namespaces: {type(e).__name__}: {e}")
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def close(self) -> None:
        """Tear the fabric down (what ``__exit__`` does)."""
        self._close()

    def _close(self) -> None:
        if self._state == "closed":
            return
        try:
            self._teardown()
        finally:
            self._state = "closed"
            atexit.unregister(self._teardown)
            self._restore_signal_handler()
        self._deliver_pending_signal()

    def _deliver_pending_signal(self) -> None:
        """A SIGINT or SIGTERM that came during the teardown, now that it is done: to the
        handler it would have met (a KeyboardInterrupt, the caller's, SystemExit(143) for
        the default SIGTERM, or nothing if ignored)."""
        sig, self._pending_signal = self._pending_signal, None
        if sig is None:
            return
        handler = signal.getsignal(sig)
        if handler is signal.SIG_IGN:
            return
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.raise_signal(sig)  # its handler runs before this returns
            return
        if sig == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + sig)

    def _hold_signals(self) -> dict[int, Any]:
        """Until ``_release_signals``, SIGINT and SIGTERM only note that they came: a second
        Ctrl-C (or a SIGTERM after the first) must not cut the teardown short, which left
        the namespaces and what runs in them until the next run's stale sweep."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        held: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            held[sig] = signal.getsignal(sig)
            signal.signal(sig, self._note_signal)
        return held

    def _release_signals(self, held: dict[int, Any]) -> None:
        for sig, handler in held.items():
            signal.signal(sig, handler)

    def _note_signal(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.pid:
            os._exit(128 + signum)  # a forked helper: die, do not unwind our stack
        if self._pending_signal is None:
            self._pending_signal = signum

    def _install_signal_handler(self) -> None:
        # SIGINT already raises KeyboardInterrupt, which unwinds through __exit__;
        # SIGTERM kills without cleanup unless someone handles it: turn it into
        # SystemExit(143) so the with-block (and the caller's finally) unwinds.
        if threading.current_thread() is not threading.main_thread():
            return
        prev = signal.getsignal(signal.SIGTERM)
        if prev is not signal.SIG_DFL:
            return  # the caller handles SIGTERM (or ignores it) already
        self._prev_sigterm = prev
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._sigterm_installed = True

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.pid:
            os._exit(128 + signum)  # a forked helper (pyroute2's): die, do not unwind our stack
        if self._tearing_down:
            self._pending_signal = signum  # finish the teardown first; the exit follows
            return
        raise SystemExit(128 + signum)

    def _restore_signal_handler(self) -> None:
        if self._sigterm_installed and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._prev_sigterm)
        self._sigterm_installed = False

    # -- what the benchmark uses

    def addr(self, node: str) -> str:
        """The IPv4 address every other node uses to reach ``node`` (bind servers to it)."""
        self._check_node(node)
        return self._addr.get(node, LOOPBACK) if self.namespaced else LOOPBACK

    def namespace(self, node: str) -> str | None:
        """The namespace ``node`` runs in (None: the root namespace)."""
        self._check_node(node)
        return self._ns.get(node) if self.namespaced else None

    def wrap(self, node: str, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``argv`` made to run in ``node``'s namespace."""
        args = [os.fspath(a) for a in argv]
        ns = self.namespace(node)
        return ["ip", "netns", "exec", ns, *args] if ns else args

    def popen(self, node: str, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``node``'s namespace; the fabric ends it at exit if still running."""
        if self._state != "up":
            raise RuntimeError("the fabric is not up (use it inside its with-block)")
        p: subprocess.Popen[Any] = subprocess.Popen(self.wrap(node, argv), **kw)
        self._procs.append(p)
        return p

    def describe(self) -> dict[str, Any]:
        """Everything a report needs to say what network the numbers were measured on."""
        return {
            "profile": self.profile.name,
            "host_link": dataclasses.asdict(self.profile.host_link),
            "array_link": dataclasses.asdict(self.profile.array_link),
            "namespaced": self.namespaced,
            "mode": "namespaces" if self.namespaced else "loopback",
            "fallback_reason": self.fallback_reason,
            "shaper": self.shaper,
            "delay_split": "half of delay_ms and jitter_ms in each direction; rate and loss per direction",
            "run_id": self.run_id,
            "nodes": {n: {"namespace": self.namespace(n), "addr": self.addr(n)} for n in self.nodes},
            "links": [link.describe() for link in self._links] if self.namespaced else [],
            "wire_namespace": self._wire_ns if self.namespaced else None,
            "wire_stats": self.wire_stats,
        }

    def _check_node(self, node: str) -> None:
        if node not in self.nodes:
            raise KeyError(f"no node {node!r} in this fabric (nodes: {', '.join(self.nodes)})")

    # -- fallback

    def _use_loopback(self, reason: str | None) -> None:
        self.namespaced = False
        self.shaper = None
        self.fallback_reason = reason
        if reason is not None:
            asked = [
                f"{k} {lp}"
                for k, lp in (("host_link", self.profile.host_link), ("array_link", self.profile.array_link))
                if lp.shaped
            ]
            if asked:
                asked_s = "; ".join(asked)
                self.fallback_reason = f"{reason}; links are NOT shaped (profile asked for {asked_s})"
            log.warning(
                "fabric %r falls back to loopback 127.0.0.1: %s", self.profile.name, self.fallback_reason
            )

    # -- building

    def _ns_name(self, node: str) -> str:
        return f"{NS_PREFIX}{self.pid}-{self.seq}-{node}"

    def _root_ifname(self, k: int) -> str:
        return f"bmf{self.pid:x}s{self.seq:x}l{k}"[:15]

    def _build(self) -> None:
        import pyroute2.config

        # pyroute2 forks helpers and stops them with SIGTERM: let them die of it, not
        # run a Python SIGTERM handler (ours, or the caller's) in a copy of this process
        pyroute2.config.disable_mp_signal = True
        try:
            self._build_links()
        finally:
            self._close_sockets()

    def _build_links(self) -> None:
        from pyroute2 import netns

        sweep_stale()
        for node in self.nodes:
            if node == HOST:
                continue
            name = self._ns_name(node)
            netns.create(name)
            self._ns[node] = name
            self._to_remove.append(name)
            ipr = self._ipr(node)
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

        pairs = list(itertools.combinations(self.nodes, 2))
        kinds = {(a, b): ("host" if HOST in (a, b) else "array") for a, b in pairs}
        shaped = any(self._link_profile(kinds[p]).shaped for p in pairs)
        self.shaper = self._choose_shaper() if shaped else None

        if HOST in self.nodes:
            base = self._claim_slot()  # holds the lock until the root side is configured
        else:
            base = NETWORK.network_address
        try:
            for i, node in enumerate(self.nodes):
                self._addr[node] = str(base + 1 + i)
            for k, (a, b) in enumerate(pairs):
                lp = self._link_profile(kinds[(a, b)])
                net = base + 16 + 4 * k
                link = _Link(
                    a=a,
                    b=b,
                    kind=kinds[(a, b)],
                    profile=lp,
                    via=(self.shaper or "direct") if lp.shaped else "direct",
                    addr_a=str(net + 1),
                    addr_b=str(net + 2),
                    if_a=self._root_ifname(k) if a == HOST else f"to-{b}",
                    if_b=self._root_ifname(k) if b == HOST else f"to-{a}",
                )
                self._links.append(link)
                self._make_link(k, link)
            self._add_service_addrs_and_routes()
        finally:
            self._release_lock()

        wire_links = [(k, link) for k, link in enumerate(self._links) if link.via == "wire"]
        if wire_links:
            self._start_wire(wire_links)
        if self.shaper == "netem":
            for link in self._links:
                if link.via == "netem":
                    for node, ifname in ((link.a, link.if_a), (link.b, link.if_b)):
                        self._add_netem(node, ifname, link.profile)

    def _link_profile(self, kind: str) -> LinkProfile:
        return self.profile.host_link if kind == "host" else self.profile.array_link

    def _ipr(self, node: str) -> Any:
        """The netlink socket of ``node``'s namespace (HOST: the root one), kept for the build.

        pyroute2 forks a helper to open a socket in a namespace, so open each once.
        """
        from pyroute2 import IPRoute

        ns = None if node == HOST else self._wire_ns if node == WIRE else self._ns[node]
        key = ns or ""
        if key not in self._sockets:
            # flags=0: never create a namespace by accident
            self._sockets[key] = IPRoute(netns=ns, flags=0) if ns else IPRoute()
        return self._sockets[key]

    def _close_sockets(self) -> None:
        for ipr in self._sockets.values():
            with contextlib.suppress(Exception):
                ipr.close()
        self._sockets.clear()

    def _choose_shaper(self) -> str:
        if self.shaper_request == "wire":
            return "wire"
        err = self._probe_netem()
        if err is None:
            return "netem"
        if self.shaper_request == "netem":
            raise FabricError(f"shaper 'netem' asked for, but the kernel refuses a netem qdisc: {err}")
        log.info("kernel netem unavailable (%s): shaping with the userspace wire", err)
        return "wire"

    def _probe_netem(self) -> str | None:
        """None if the kernel takes a netem qdisc, else why not (asked once per process)."""
        global _netem_probe
        if _netem_probe is None:
            _netem_probe = (self._probe_netem_once(),)
        return _netem_probe[0]

    def _probe_netem_once(self) -> str | None:
        from pyroute2 import IPRoute, netns
        from pyroute2.netlink.exceptions import NetlinkError

        name = f"{NS_PREFIX}{self.pid}-{self.seq}-_probe"
        netns.create(name)
        try:
            with IPRoute(netns=name, flags=0) as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.link("set", index=lo, state="up")
                try:
                    ipr.tc("add", "netem", index=lo, handle="1:", delay=1000)
                except NetlinkError as e:
                    return f"netlink error {e.code}: {os.strerror(e.code)} (is sch_netem built or loaded?)"
                ipr.tc("del", index=lo, handle="1:")
                return None
        finally:
            _remove_netns(name)

    def _claim_slot(self) -> ipaddress.IPv4Address:
        """Lock, then find a /25 of NETWORK with no root address or route in it."""
        from pyroute2 import IPRoute

        lock_dir = "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir()
        fd = os.open(os.path.join(lock_dir, "blockmig-fabric.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock_fd = fd
        used: list[ipaddress.IPv4Network] = []
        with IPRoute() as ipr:
            for a in ipr.get_addr(family=socket.AF_INET):
                used.append(ipaddress.IPv4Network(f"{a.get_attr('IFA_ADDRESS')}/32"))
            for r in ipr.get_routes(family=socket.AF_INET, table=254):
                dst = r.get_attr("RTA_DST")
                if dst and r["dst_len"]:
                    used.append(ipaddress.IPv4Network(f"{dst}/{r['dst_len']}", strict=False))
        for slot in NETWORK.subnets(new_prefix=SLOT_PREFIX):
            if not any(slot.overlaps(u) for u in used):
                return slot.network_address
        raise FabricError(f"no free /{SLOT_PREFIX} left in {NETWORK} in the root namespace")

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _make_link(self, k: int, link: _Link) -> None:
        if link.via == "wire":
            if self._wire_ns is None:
                from pyroute2 import netns

                self._wire_ns = f"{NS_PREFIX}{self.pid}-{self.seq}-{WIRE}"
                netns.create(self._wire_ns)
                self._to_remove.append(self._wire_ns)
            link.wire_ifs = (f"l{k}a", f"l{k}b")
            self._veth(link.a, link.if_a, WIRE, link.wire_ifs[0])
            self._veth(link.b, link.if_b, WIRE, link.wire_ifs[1])
            ipr = self._ipr(WIRE)
            for ifname in link.wire_ifs:
                ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
        else:
            self._veth(link.a, link.if_a, link.b, link.if_b)
        for node, ifname, addr in ((link.a, link.if_a, link.addr_a), (link.b, link.if_b, link.addr_b)):
            ipr = self._ipr(node)
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=idx, address=addr, prefixlen=30)
            ipr.link("set", index=idx, state="up")

    def _veth(self, a: str, if_a: str, b: str, if_b: str) -> None:
        """A veth pair with end ``if_a`` in node ``a``'s namespace and ``if_b`` in ``b``'s."""

        def where(node: str) -> dict[str, Any]:
            if node == HOST:
                return {}
            return {"net_ns_fd": self._wire_ns if node == WIRE else self._ns[node]}

        self._ipr(HOST).link("add", ifname=if_a, kind="veth", **where(a), peer={"ifname": if_b, **where(b)})
        for node, ifname in ((a, if_a), (b, if_b)):
            if node == HOST:
                self._root_ifs.append(ifname)

    def _add_service_addrs_and_routes(self) -> None:
        # the host's service address sits on its first veth (the root namespace's lo
        # would keep it after a crash); a namespace's on its lo
        root_ifs = [
            i for link in self._links for n, i in ((link.a, link.if_a), (link.b, link.if_b)) if n == HOST
        ]
        for node in self.nodes:
            ifname = (root_ifs[0] if root_ifs else None) if node == HOST else "lo"
            if ifname is None:
                self._addr[node] = LOOPBACK  # a host with no links: nothing to reach it by
                continue
            ipr = self._ipr(node)
            ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=self._addr[node], prefixlen=32)
        for link in self._links:
            for me, peer, peer_addr in ((link.a, link.b, link.addr_b), (link.b, link.a, link.addr_a)):
                ipr = self._ipr(me)
                ipr.route("add", dst=f"{self._addr[peer]}/32", gateway=peer_addr, prefsrc=self._addr[me])

    def _add_netem(self, node: str, ifname: str, lp: LinkProfile) -> None:
        from pyroute2.netlink.rtnl.tcmsg import sched_netem

        if not hasattr(sched_netem, "fix_request"):
            # pyroute2 (0.9.x) also sends netem's ``rate`` as a top-level TCA_RATE (the rate
            # estimator), which the kernel refuses with ERANGE; its other rate-taking
            # plugins (htb, cake, ...) drop it the same way
            sched_netem.fix_request = _drop_tca_rate
        d = lp.per_direction()
        kw: dict[str, Any] = {"delay": int(round(d["delay_ms"] * 1000)), "limit": 10000}
        if d["jitter_ms"]:
            kw["jitter"] = int(round(d["jitter_ms"] * 1000))
        if d["loss_pct"]:
            kw["loss"] = d["loss_pct"]
        if d["rate_mbit"]:
            kw["rate"] = f"{int(d['rate_mbit'] * 1000)}kbit"
        ipr = self._ipr(node)
        ipr.tc("add", "netem", index=ipr.link_lookup(ifname=ifname)[0], handle="1:", **kw)

    def _start_wire(self, links: list[tuple[int, _Link]]) -> None:
        assert self._wire_ns is not None
        spec = {
            "parent": self.pid,
            "links": [
                {
                    "name": f"{link.a}-{link.b}",
                    "ifaces": list(link.wire_ifs or ()),
                    **link.profile.per_direction(),
                }
                for _, link in links
            ],
        }
        argv = [
            "ip",
            "netns",
            "exec",
            self._wire_ns,
            sys.executable,
            "-m",
            "bench.fabric",
            "_wire",
            json.dumps(spec),
        ]
        self._wire = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a Ctrl-C of the benchmark must not cut the links under its teardown
            env=child_env(),
        )
        line = _readline_timeout(self._wire, 20.0)
        if line.strip() != "ready":
            raise FabricError(f"the wire process did not start (said {line!r}, exit {self._wire.poll()})")

    # -- teardown

    def _teardown(self) -> None:
        """Idempotent, best effort: log what cannot be removed, go on with the rest."""
        if self._tearing_down or os.getpid() != self.pid:
            return  # (a forked child, e.g. pyroute2's helpers, runs our atexit hook too: not its job)
        self._tearing_down = True
        held = self._hold_signals()
        try:
            self._remove_all()
        finally:
            self._release_signals(held)

    def _remove_all(self) -> None:
        self._release_lock()
        for p in self._procs:
            _stop(p)
        self._procs.clear()
        if self._wire is not None:
            self.wire_stats = _stop_wire(self._wire)
            self._wire = None
        if not (self._to_remove or self._root_ifs):
            return
        try:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                for ifname in self._root_ifs:
                    for idx in ipr.link_lookup(ifname=ifname):
                        with contextlib.suppress(Exception):
                            ipr.link("del", index=idx)
        except Exception as e:
            log.warning("fabric %s: removing root-side interfaces: %s", self.run_id, e)
        self._root_ifs.clear()
        while self._to_remove:
            name = self._to_remove.pop()
            try:
                _kill_netns_pids(name)
                _remove_netns(name)
            except Exception as e:
                log.warning(
                    "fabric %s: cannot remove namespace %s: %s (sweep later: python -m bench.fabric sweep)",
                    self.run_id,
                    name,
                    e,
                )


def _drop_tca_rate(request: dict[str, Any]) -> None:
    request.pop("rate", None)


def _readline_timeout(p: subprocess.Popen[str], timeout: float) -> str:
    assert p.stdout is not None
    r, _, _ = select.select([p.stdout], [], [], timeout)
    return p.stdout.readline() if r else ""


def _stop(p: subprocess.Popen[Any], grace_s: float = 3.0) -> None:
    if p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(grace_s)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _stop_wire(p: subprocess.Popen[str]) -> dict[str, Any] | None:
    if p.poll() is None:
        p.terminate()
    try:
        out, _ = p.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
    for line in reversed((out or "").splitlines()):
        with contextlib.suppress(ValueError):
            stats: dict[str, Any] = json.loads(line)
            return stats
    return None


# ---------------------------------------------------------------------------
# the userspace wire: runs in the wire namespace, one process per fabric

_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_VNET_HDR = 15
_PACKET_IGNORE_OUTGOING = 23
_PR_SET_TIMERSLACK = 29
_MAX_FRAME = 1 << 18  # a 64 KiB GSO super-frame, its headers and the virtio-net header fit
_QUEUE_FRAMES = 10_000
_QUEUE_BYTES = 64 << 20


class _Lane:
    """One direction of one link: frames in from one socket, out of the other."""

    __slots__ = (
        "name",
        "out",
        "delay",
        "jitter",
        "rate",
        "loss",
        "q",
        "qbytes",
        "t_free",
        "last",
        "frames",
        "bytes",
        "lost",
        "dropped",
        "tx_errors",
    )

    def __init__(self, name: str, out: socket.socket, d: dict[str, Any]) -> None:
        self.name = name
        self.out = out
        self.delay = d["delay_ms"] / 1000
        self.jitter = d["jitter_ms"] / 1000
        self.rate = d["rate_mbit"] * 1e6 / 8 if d["rate_mbit"] else 0.0  # bytes/s
        self.loss = d["loss_pct"] / 100
        self.q: deque[tuple[float, bytes]] = deque()
        self.qbytes = 0
        self.t_free = 0.0  # when the line finishes serialising what it has
        self.last = 0.0  # release time of the newest frame: order is kept
        self.frames = self.bytes = self.lost = self.dropped = self.tx_errors = 0

    def push(self, frame: bytes, now: float, rnd: random.Random) -> None:
        if self.loss and rnd.random() < self.loss:
            self.lost += 1
            return
        n = len(frame)
        if len(self.q) >= _QUEUE_FRAMES or self.qbytes + n > _QUEUE_BYTES:
            self.dropped += 1  # tail drop, like a full netem queue
            return
        t = now
        if self.rate:
            t = self.t_free = max(now, self.t_free) + n / self.rate
        t += self.delay
        if self.jitter:
            t += rnd.uniform(-self.jitter, self.jitter)
        t = max(t, now, self.last)
        self.last = t
        self.q.append((t, frame))
        self.qbytes += n

    def flush(self, now: float) -> float | None:
        """Send what is due; return when the next frame is due (None: queue empty)."""
        q = self.q
        while q and q[0][0] <= now:
            _, frame = q.popleft()
            self.qbytes -= len(frame)
            try:
                self.out.send(frame)
                self.frames += 1
                self.bytes += len(frame)
            except OSError:  # ENOBUFS / EAGAIN: the peer's backlog is full, the frame is lost
                self.tx_errors += 1
        return q[0][0] if q else None

    def stats(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "bytes": self.bytes,
            "lost": self.lost,
            "queue_drops": self.dropped,
            "tx_errors": self.tx_errors,
        }


def _packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    # frames carry a virtio-net header: GSO super-frames and partial checksums cross intact
    s.setsockopt(_SOL_PACKET, _PACKET_VNET_HDR, 1)
    try:
        s.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)  # not our own transmissions back
    except OSError as e:
        raise SystemExit(f"wire: PACKET_IGNORE_OUTGOING unsupported (Linux >= 4.20 needed): {e}") from e
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
    s.bind((ifname, _ETH_P_ALL))
    s.setblocking(False)
    return s


def _set_timerslack_ns(ns: int) -> None:
    # select() timeouts otherwise wake up to 50 us late; the fc profile adds 25 us a direction
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, ns, 0, 0, 0)


def wire_main(spec: dict[str, Any]) -> int:
    """Move frames between each link's two interfaces with its delay, jitter, rate and loss."""
    parent = int(spec["parent"])
    rnd = random.Random(spec.get("seed"))
    lanes: dict[socket.socket, _Lane] = {}
    all_lanes: list[_Lane] = []
    for link in spec["links"]:
        sa, sb = (_packet_socket(i) for i in link["ifaces"])
        for src, dst, label in ((sa, sb, "ab"), (sb, sa, "ba")):
            lane = _Lane(f"{link['name']}:{label}", dst, link)
            lanes[src] = lane
            all_lanes.append(lane)
    running = True

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_timerslack_ns(1000)
    socks = list(lanes)
    buf = bytearray(_MAX_FRAME)
    mv = memoryview(buf)
    print("ready", flush=True)
    next_parent_check = 0.0
    monotonic = time.monotonic
    while running:
        now = monotonic()
        due: float | None = None
        for lane in all_lanes:
            t = lane.flush(now)
            if t is not None and (due is None or t < due):
                due = t
        if now >= next_parent_check:
            if os.getppid() != parent:
                break  # the fabric's owner died: stop moving frames
            next_parent_check = now + 0.5
        timeout = 0.5 if due is None else min(0.5, max(0.0, due - now))
        try:
            ready, _, _ = select.select(socks, [], [], timeout)
        except InterruptedError:
            continue
        now = monotonic()
        for s in ready:
            lane = lanes[s]
            for _ in range(64):  # a bounded batch, so departures are not held up
                try:
                    n = s.recv_into(buf)
                except BlockingIOError:
                    break
                except OSError:
                    running = False  # the interface went away: the fabric is being removed
                    break
                lane.push(bytes(mv[:n]), now, rnd)
    with contextlib.suppress(OSError):  # the owner may be gone, and its pipe with it
        print(json.dumps({lane.name: lane.stats() for lane in all_lanes}), flush=True)
    return 0


# ---------------------------------------------------------------------------
# measuring: a TCP echo server and a round-trip prober, run in any node


def echo_main(listen: str) -> int:
    """Echo every byte back; print the port it listens on."""
    host, port = listen.rsplit(":", 1)
    srv = socket.create_server((host, int(port)))
    print(srv.getsockname()[1], flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def serve(c: socket.socket) -> None:
        with c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := c.recv(65536):
                c.sendall(data)

    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def ping_main(connect: str, count: int, size: int = 1) -> int:
    """Round trips of ``size``-byte messages over one TCP connection; print a JSON summary."""
    host, port = connect.rsplit(":", 1)
    t0 = time.monotonic()
    s = socket.create_connection((host, int(port)), timeout=10)
    connect_ms = (time.monotonic() - t0) * 1000
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * size
    rtts = []
    for _ in range(count):
        t = time.monotonic()
        s.sendall(msg)
        got = 0
        while got < size:
            chunk = s.recv(size - got)
            if not chunk:
                raise SystemExit("echo server closed the connection")
            got += len(chunk)
        rtts.append((time.monotonic() - t) * 1000)
    s.close()
    print(json.dumps({"count": count, "connect_ms": round(connect_ms, 4), **rtt_summary(rtts)}))
    return 0


def rtt_summary(rtts: Sequence[float]) -> dict[str, float]:
    """min, median and max of round trips in ms (``p50_ms`` was the upper of the two middle
    ones for an even count: the 11th of 20, not their mean)."""
    return {
        "min_ms": round(min(rtts), 4),
        "p50_ms": round(statistics.median(rtts), 4),
        "max_ms": round(max(rtts), 4),
    }


def measure_rtt(fabric: Fabric, src: str, dst: str, count: int = 20, timeout: float = 60.0) -> dict[str, Any]:
    """TCP round-trip times from node ``src`` to node ``dst`` (1-byte echo, TCP_NODELAY)."""
    py = [sys.executable, "-m", "bench.fabric"]
    server = fabric.popen(
        dst,
        [*py, "echo", "--listen", f"{fabric.addr(dst)}:0"],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        port = _readline_timeout(server, timeout).strip()
        if not port.isdigit():
            raise RuntimeError(f"echo server in {dst} did not start (said {port!r})")
        out = subprocess.run(
            fabric.wrap(src, [*py, "ping", "--connect", f"{fabric.addr(dst)}:{port}", "--count", str(count)]),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(),
            check=True,
        ).stdout
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result
    finally:
        _stop(server)


# ---------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fabric", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("show", help="build a fabric, print its description and round trips, remove it")
    sp.add_argument("--profile", default="metro", choices=sorted(PROFILES))
    sp.add_argument("--shaper", default="auto", choices=["auto", "netem", "wire"])
    sp.add_argument("--count", type=count_arg, default=50, help="round trips per pair of nodes (default 50)")
    sub.add_parser("sweep", help="remove the namespaces of fabric runs whose process is dead")
    sp = sub.add_parser("echo", help="(internal) TCP echo server")
    sp.add_argument("--listen", required=True)
    sp = sub.add_parser("ping", help="(internal) TCP round-trip prober")
    sp.add_argument("--connect", required=True)
    sp.add_argument("--count", type=count_arg, default=20)
    sp = sub.add_parser("_wire", help="(internal) the userspace link emulator")
    sp.add_argument("spec")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.cmd == "_wire":
        return wire_main(json.loads(args.spec))
    if args.cmd == "echo":
        return echo_main(args.listen)
    if args.cmd == "ping":
        return ping_main(args.connect, args.count)
    if args.cmd == "sweep":
        print(json.dumps({"removed": sweep_stale()}))
        return 0
    with Fabric(PROFILES[args.profile], shaper=args.shaper) as fab:
        rtts = {
            f"{a}->{b}": measure_rtt(fab, a, b, args.count) for a, b in itertools.combinations(fab.nodes, 2)
        }
    print(json.dumps({"fabric": fab.describe(), "rtt": rtts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
