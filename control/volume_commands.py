"""Cinder-client-like commands: up, down, create, list, show, migrate, attach, detach, delete."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from emulator.units import format_size, size_arg

from . import config
from .api_client import ApiError
from .array_commands import name_arg, not_utf8, table
from .drivers.base import Host
from .manager import VolumeManager
from .volumes import MIGRATING, VolumeError

#: seconds `up` waits for a volume another command keeps busy before leaving its source's
#: new address to the next command
UP_LOCK_WAIT = 10.0
#: how a command names a volume (VolumesDB.get)
VOLUME_REF = "id, name, or id prefix (in that order)"


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) if args.state_dir else config.default_state_dir()


def _path_arg(text: str) -> str:
    """A path for argparse: an empty one (``--state-dir "$DIR"`` with DIR unset) would
    quietly mean the default state dir, or config, and `down` stop its arrays."""
    if not text:
        raise argparse.ArgumentTypeError("a path, not an empty one")
    return text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        type=_path_arg,
        help=f"where arrays and volumes are recorded (default: ${config.STATE_ENV} "
        "or ~/.local/state/blockmig)",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _manager(args: argparse.Namespace, recover: bool = True) -> VolumeManager:
    m = VolumeManager(_state_dir(args))
    if recover:
        m.recover()  # a migration whose follower died goes on
    return m


# ---------------------------------------------------------------- arrays
def cmd_up(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    reg = config.Registry(state_dir)
    before = {**reg.load_stopped(), **reg.load()}  # stopped by `down`, or died
    recs = config.up(state_dir, Path(args.config) if args.config else None)
    for name, r in recs.items():
        was = before.get(name)
        if was is not None and was.nbd != r.nbd:
            print(
                f"blockmig: array {name} serves NBD at {r.nbd} now, not {was.nbd} (its port was taken, or "
                "its config changed): hosts attached to its volumes must re-attach at the URI "
                "`blockmig show VOLUME` gives",
                file=sys.stderr,
            )
    if (state_dir / "volumes.db").exists():
        # Takeovers whose source array moved dial its new address from now on, and the
        # migrations `down` interrupted go on (their followers). Reported, never fatal:
        # the arrays run, and every later command tries again.
        try:
            m = VolumeManager(state_dir)
            for note in m.update_sources(wait=UP_LOCK_WAIT):
                print(f"blockmig: {note.message}", file=sys.stderr)
            m.recover(sources=False)
            # what failed migrations left on arrays that did not answer then (a fence kept
            # while the target may serve the LUN)
            for note in m.release_leftovers(wait=UP_LOCK_WAIT):
                print(f"blockmig: {note.message}", file=sys.stderr)
            for v in m.db.migrating():  # what `up` could not bring back
                why = m.waiting_for(v.migration)
                if why:
                    print(f"blockmig: the migration of {v.name} ({v.id}) waits: {why}", file=sys.stderr)
        except (VolumeError, ApiError, OSError) as e:
            print(
                f"blockmig: the arrays run; resuming their volumes' migrations failed: {e}", file=sys.stderr
            )
    rows = [(r.name, r.model, r.api, r.nbd, r.pid) for r in recs.values()]
    _out(args, {n: r.__dict__ for n, r in recs.items()}, table(rows, ("ARRAY", "MODEL", "API", "NBD", "PID")))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = config.down(_state_dir(args))
    _out(args, {"stopped": stopped}, f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0


# ---------------------------------------------------------------- volumes
def cmd_create(args: argparse.Namespace) -> int:
    m = _manager(args)
    v = m.create(args.name or f"vol-{int(time.time())}", args.size, args.host)
    _out(args, m.show(v.id), _show_text(m.show(v.id)))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    m = _manager(args)
    arrays = m.registry.load()
    vols = [m.view(v, arrays) for v in m.db.list()]
    rows = [
        (v["id"], v["name"], format_size(v["size"]), v["status"], v["host"], v["migration_status"] or "-")
        for v in vols
    ]
    _out(
        args,
        vols,
        table(rows, ("ID", "NAME", "SIZE", "STATUS", "HOST", "MIGRATION")) if rows else "no volumes",
    )
    return 0


#: `show`'s words for the step a migration is at, or failed at (its JSON keeps the short name)
_PHASES = {
    "source": "step 1: the source array is asked to move it",
    "target": "step 2: the target array takes it over",
    "host-copy": "a host copy",
    "complete": "step 4: the target copies it, then cuts over",
    "cleanup": "step 5: removing the source LUN",
    "done": "done",
}


def _show_text(d: dict[str, Any]) -> str:
    lines = [
        f"{k + ':':<19}{'-' if d[k] is None else d[k]}"  # never migrated: "-", as `list` says
        for k in ("id", "name", "size", "status", "host", "migration_status", "attachable")
    ]
    if d.get("unavailable"):
        lines.append(f"{'unavailable:':<19}{d['unavailable']}")
    loc = d.get("provider_location") or {}
    if loc.get("uri"):
        lines.append(f"{'uri:':<19}{loc['uri']}")
    for a in d.get("attachments", []):
        was = _moved_from_uri(a)
        lines.append(
            f"{'attachment:':<19}{a['id']} on {a['connector'].get('host')} via {a['connection']['uri']}"
            + (f" (moved from {was})" if was and was != a["connection"]["uri"] else "")
            + (f" (given {a['given_uri']}: {_READDRESSED})" if a.get("given_uri") else "")
        )
    mig = d.get("migration")
    if mig:
        phase = _PHASES.get(mig.get("phase") or "", mig.get("phase"))
        if d.get("migration_status") == "error":  # where it stopped, not what goes on
            phase = f"failed at {phase}"
        elif d.get("migration_status") in MIGRATING and mig.get("phase") == "host-copy":
            phase += ", the volume unusable until done"
        lines.append(f"{'migration:':<19}{mig.get('source')} -> {mig.get('target')} ({phase})")
        p = mig.get("progress")
        if p:
            total = p.get("total_bytes") or 1
            clean = p.get("clean_bytes", total - p.get("dirty_bytes", total))
            lines.append(f"{'progress:':<19}{100 * clean / total:.1f}% ({p.get('state')})")
            if p.get("source_connected") is False and p.get("state") in ("copying", "converging", "paused"):
                # attachable all the same, but writes (and reads of regions not yet copied)
                # need the source: they wait for it up to the target's retry window, then fail
                why = f": {p['last_error']}" if p.get("last_error") else ""
                lines.append(
                    f"{'source:':<19}not connected{why}; writes, and reads of regions not yet "
                    "copied, wait for it up to the target's source retry window, then fail with EIO"
                )
        if mig.get("waiting"):
            lines.append(f"{'waiting:':<19}{mig['waiting']}")
        if mig.get("error"):
            lines.append(f"{'error:':<19}{mig['error']}")
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    m = _manager(args)
    d = m.show(args.volume)
    _out(args, d, _show_text(d))
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    m = _manager(args)
    info = m.attach(args.volume, {"host": args.host_name} if args.host_name else None)
    c = info["data"]
    text = (
        f"attached ({info['attachment']}): {c['uri']}\n"
        f"  kernel: {c['nbd_client']}\n"
        f"  qemu:   -drive driver=nbd,host={c['host']},port={c['port']},export={c['export']}\n"
        f"  fuse:   nbdfuse DIR {c['uri']}"
    )
    _out(args, info, text)
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    m = _manager(args)
    v = m.detach(args.volume, args.attachment)
    _out(args, m.view(v), f"detached; volume {v.name} is {v.status}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    m = _manager(args)
    v = m.db.get(args.volume)
    m.delete(v.id)
    _out(args, {"deleted": v.id}, f"deleted volume {v.name} ({v.id})")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    m = _manager(args)
    # on stderr: stdout carries the result, which a script may parse (--json)
    bar = _ProgressBar(args.wait and not args.json and sys.stderr.isatty() or args.progress, stderr=True)
    with bar:
        v = m.migrate(args.volume, args.host, force_host_copy=args.force_host_copy, progress=bar.update)
        bar.status(v.migration_status or "")
        if v.migration_status in MIGRATING:
            if args.wait:
                v = m.follow(v.id, progress=bar.update)
                if v.migration_status in MIGRATING:
                    why = m.waiting_for(v.migration) or "its arrays stopped; it goes on after `blockmig up`"
                    print(f"blockmig: the migration of {v.name} waits: {why}", file=sys.stderr)
            else:
                m.spawn_follower(v.id)
        bar.status(v.migration_status or "")
    d = m.show(v.id)
    d["reattach"] = reattach_notices(d)
    _out(args, d, "\n".join([_show_text(d), *(n["message"] for n in d["reattach"])]))
    return 0 if v.migration_status in ("success", "migrating", "migrating_attachable") else 1


#: why an attachment given a URI before its array moved needs its host again (`show`)
_READDRESSED = "its array serves at another address since; the host must re-attach"


def _moved_from_uri(a: dict[str, Any]) -> str | None:
    """The URI an attachment record named before a migration moved it, if one did."""
    uri: str | None = (a.get("moved_from") or {}).get("connection", {}).get("uri")
    return uri


def reattach_notices(d: dict[str, Any]) -> list[dict[str, Any]]:
    """What each host attached to a migrating (or migrated) volume must do, as `show`'s
    view ``d`` has it: a record this migration moved to another URI (the volume is served
    there now) means the host must re-attach there; its writes to the old URI fail with
    EPERM from the takeover (or the host copy) on, as the source is fenced, and that URI
    goes away with the source LUN. A record whose host was given a URI of its array's
    address before the array moved (``given_uri``, see VolumeManager.view) means the
    host must re-attach too. Other records need nothing."""
    mig = d.get("migration") or {}
    started = float(mig.get("started") or 0.0)
    out = []
    for a in d.get("attachments", []):
        who = a["connector"].get("host")
        uri = a["connection"]["uri"]
        was = _moved_from_uri(a)
        array = Host.parse(a["host"]).array
        given = a.get("given_uri")
        moved = bool(was and was != uri and float(a.get("moved_at") or 0.0) >= started)
        if moved and Host.parse(a["moved_from"]["host"]).array == array:
            # a pool move keeps the export where it was: ``was`` differs as the array moved
            moved, given = False, given or was
        if moved:
            if d["host"] == mig.get("source"):  # a failure or a cancel moved it back
                why = f"the migration failed; the volume stays on {d['host']} and takes writes again"
            elif d.get("migration_status") == "success":
                why = f"writes to {was} failed with EPERM once the source was fenced; the source LUN is gone"
            else:
                why = (
                    f"writes to {was} fail with EPERM from the takeover on (the source is fenced; "
                    "reads still work until the migration completes)"
                )
            message = f"attachment {a['id']} (host {who}): the host must re-attach at {uri}: {why}"
        elif given:
            was = given
            message = (
                f"attachment {a['id']} (host {who}): the host must re-attach at {uri}: array {array} "
                f"serves at another address than the {was} it was given (its connection ended when the "
                "array stopped)"
            )
        elif d.get("migration_status") == "migrating" and mig.get("phase") == "host-copy":
            message = (
                f"attachment {a['id']} (host {who}): writes to {uri} fail with EPERM while the host copy "
                "runs (the source is fenced); re-attach at the URI `blockmig show` gives once it succeeded"
            )
        else:
            continue
        out.append({"attachment": a["id"], "host": who, "uri": uri, "was": was, "message": message})
    return out


def cmd_follow(args: argparse.Namespace) -> int:
    m = _manager(args, recover=False)
    v = m.follow(args.volume, wait=False)  # a follower started at the same time may have it
    print(f"volume {v.id}: migration {v.migration_status}")
    return 0 if v.migration_status == "success" else 1


class _ProgressBar:
    """A live rich progress bar with rate and ETA, fed with array migration status dicts."""

    def __init__(self, enabled: bool, stderr: bool = False) -> None:
        self.enabled = enabled
        self.stderr = stderr
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=self.stderr),
            )
            self._progress.start()
            self._task = self._progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def status(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def update(self, st: dict[str, Any]) -> None:
        if self._progress is None:
            return
        total = st.get("total_bytes") or None
        clean = st.get("clean_bytes")
        if clean is None and total is not None:
            clean = total - st.get("dirty_bytes", total)
        self._progress.update(
            self._task,
            total=total,
            completed=clean or 0,
            description=f"{st.get('state', '')} ({st.get('mode', 'copy')})",
        )


def _run(func: Any) -> Any:
    def runner(args: argparse.Namespace) -> int:
        try:
            rc: int = func(args)
            return rc
        except BrokenPipeError:
            raise  # the reader of stdout went away: control.cli.main ends quietly
        except (VolumeError, ApiError, ValueError, KeyError, RuntimeError, OSError) as e:
            # an OSError's args[0] is its errno alone ("blockmig: 30"): str() names the file;
            # a UnicodeEncodeError's is the codec's name ("blockmig: utf-8")
            msg = getattr(e, "message", None) or (
                not_utf8(e)
                if isinstance(e, UnicodeEncodeError)
                else e.args[0]
                if e.args and not isinstance(e, OSError)
                else str(e)
            )
            if args.json:
                print(json.dumps({"error": str(msg)}))
            print(f"blockmig: {msg}", file=sys.stderr)
            return 1

    return runner


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("up", help="start the arrays of a config in the background")
    _common(p)
    p.add_argument(
        "--config",
        type=_path_arg,
        help="TOML file naming the arrays, kept as STATE_DIR/config.toml for the next `up` "
        "(default: that copy, else arrays A and B, model unified)",
    )
    p.set_defaults(func=_run(cmd_up))
    p = sub.add_parser("down", help="stop the arrays `up` started")
    _common(p)
    p.set_defaults(func=_run(cmd_down))
    p = sub.add_parser("create", help="create a volume")
    _common(p)
    p.add_argument("--size", required=True, type=size_arg, help="e.g. 1G")
    p.add_argument("--host", required=True, help="ARRAY, ARRAY#POOL or ARRAY@BACKEND#POOL")
    p.add_argument("--name", help="volume name: 1-255 printable characters (default: vol-TIME)")
    p.set_defaults(func=_run(cmd_create))
    p = sub.add_parser("list", help="list volumes")
    _common(p)
    p.set_defaults(func=_run(cmd_list))
    p = sub.add_parser("show", help="show a volume, with the progress of a running migration")
    _common(p)
    p.add_argument("volume", help=VOLUME_REF)
    p.set_defaults(func=_run(cmd_show))
    p = sub.add_parser(
        "migrate",
        help="migrate a volume to another array or pool",
        description="Migrate a volume to another array or pool. A move to another array fences the "
        "source LUN first; "
        "an attached volume's attachment records move with it, and for each attached host this "
        "prints the URI it must re-attach at (its writes to the source fail with EPERM).",
    )
    _common(p)
    p.add_argument("volume", help=VOLUME_REF)
    p.add_argument("host", help="ARRAY, ARRAY#POOL or ARRAY@BACKEND#POOL")
    p.add_argument("--force-host-copy", action="store_true", help="skip the drivers: generic host copy")
    p.add_argument("--wait", action="store_true", help="follow the migration to its end here")
    p.add_argument(
        "--progress", action="store_true", help="show the progress bar (on stderr) even without a terminal"
    )
    p.set_defaults(func=_run(cmd_migrate))
    p = sub.add_parser("attach", help="attach a volume: NBD connection info for a host")
    _common(p)
    p.add_argument("volume", help=VOLUME_REF)
    p.add_argument(
        "--host-name", type=name_arg("host"), help="name of the host attaching (default: this machine)"
    )
    p.set_defaults(func=_run(cmd_attach))
    p = sub.add_parser("detach", help="detach a volume (all attachments, or one)")
    _common(p)
    p.add_argument("volume", help=VOLUME_REF)
    p.add_argument("--attachment", help="attachment id (default: all)")
    p.set_defaults(func=_run(cmd_detach))
    p = sub.add_parser("delete", help="delete a volume")
    _common(p)
    p.add_argument("volume", help=VOLUME_REF)
    p.set_defaults(func=_run(cmd_delete))
    p = sub.add_parser("_follow")  # the background follower of a migration (not listed)
    _common(p)
    p.add_argument("volume", help=VOLUME_REF)
    p.set_defaults(func=_run(cmd_follow))
