"""`blockmig migration start|status|list|set|pause|resume|cancel|wait` against an array's API."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from typing import Any

from emulator.units import format_age, format_size, rate_arg, seconds_arg, size_arg

from .api_client import FINAL, ArrayApi
from .array_commands import _api_args, name_arg, run_api_command, table


def _path(name: str, action: str = "") -> str:
    p = f"/api/v1/migrations/{urllib.parse.quote(name, safe='')}"
    return f"{p}/{action}" if action else p


def format_status(st: dict[str, Any]) -> str:
    total = st["total_bytes"] or 1
    pct = 100.0 * (total - st["dirty_bytes"]) / total
    progress = f"{pct:.1f}% clean, {format_size(st['dirty_bytes'])} dirty of {format_size(st['total_bytes'])}"
    if st["state"] in ("cancelled", "failed"):
        # its copy was dropped (dirty_bytes 0, clean_bytes 0): not "100% clean"
        progress = f"none kept of {format_size(st['total_bytes'])}: the LUN serves its source directly"
    eta = st.get("eta_seconds")
    lines = [
        f"lun:          {st['lun']}",
        f"source:       {st['source']}",
        f"state:        {st['state']}",
        f"mode:         {st['mode']}" + (f" ({st['mode_reason']})" if st.get("mode_reason") else ""),
        f"progress:     {progress}",
        f"copied:       {format_size(st['copied_bytes'])} data, "
        f"{format_size(st.get('zeroed_bytes', 0))} zeroed",
        f"rates:        copy {st['copy_rate'] / 1e6:.1f} MB/s, dirty {st['dirty_rate'] / 1e6:.1f} MB/s",
        f"eta:          {'-' if eta is None else f'{eta:.0f} s'}",
        f"passes:       {st['passes']}",
    ]
    if "throttle" in st:
        rate = st["throttle"]
        lines.insert(5, f"throttle:     {f'{rate / 1e6:g} MB/s' if rate else 'unlimited'}")
    if st.get("cutover_pause_ms") is not None:
        lines.append(f"cutover:      writes held {st['cutover_pause_ms']:.2f} ms")
    if st.get("last_error"):
        at = st.get("last_error_at")
        when = "" if at is None else f" ({format_age(time.time() - at)} ago)"
        lines.append(f"last error:   {st['last_error']}{when}")
    return "\n".join(lines)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def cmd_start(args: argparse.Namespace, api: ArrayApi) -> int:
    body: dict[str, Any] = {"lun": args.lun, "source": args.source, "mode": args.mode}
    if args.pool:
        body["pool"] = args.pool
    if args.throttle is not None:
        body["throttle"] = args.throttle
    if args.region_size is not None:
        body["region_size"] = args.region_size
    st = api.call("POST", "/api/v1/migrations", body)
    _emit(args, st, f"migration of {st['lun']} started; the LUN is attachable now\n" + format_status(st))
    return 0


def cmd_set(args: argparse.Namespace, api: ArrayApi) -> int:
    if args.throttle is None and args.mode is None and args.source is None:
        print("blockmig: migration set: give --throttle, --mode and/or --source", file=sys.stderr)
        return 2
    st = api.update_migration(args.lun, args.throttle, args.mode, args.source)
    _emit(args, st, format_status(st))
    return 0


def cmd_status(args: argparse.Namespace, api: ArrayApi) -> int:
    st = api.call("GET", _path(args.lun))
    _emit(args, st, format_status(st))
    return 0


def cmd_list(args: argparse.Namespace, api: ArrayApi) -> int:
    sts = api.call("GET", "/api/v1/migrations")
    rows = [
        (
            s["lun"],
            s["state"],
            s["mode"],
            format_size(s["dirty_bytes"]),
            format_size(s["total_bytes"]),
            s["source"],
        )
        for s in sts
    ]
    _emit(
        args,
        sts,
        table(rows, ("LUN", "STATE", "MODE", "DIRTY", "TOTAL", "SOURCE")) if rows else "no migrations",
    )
    return 0


def _action(action: str) -> Any:
    def cmd(args: argparse.Namespace, api: ArrayApi) -> int:
        st = api.call("POST", _path(args.lun, action))
        _emit(args, st, format_status(st))
        return 0

    return cmd


def cmd_wait(args: argparse.Namespace, api: ArrayApi) -> int:
    st = api.wait_migration(args.lun, args.timeout)
    if st["state"] not in FINAL:
        # --json promises one object on stdout whatever the outcome: a script that parses
        # it (or `jq`) found nothing on a timeout. The last status is what it waited on.
        if args.json:
            _emit(args, st, "")
        msg = f"blockmig: migration of {args.lun} still {st['state']} after {args.timeout:g} s"
        print(msg, file=sys.stderr)
        return 2
    _emit(args, st, format_status(st))
    if st["state"] != "completed":
        why = st.get("last_error") or ("no error given" if st["state"] == "failed" else "")
        msg = f"blockmig: migration of {args.lun} {st['state']}" + (f": {why}" if why else "")
        print(msg, file=sys.stderr)
        return 1
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mig = sub.add_parser("migration", help="live-migrate a LUN onto an array (run against the TARGET array)")
    msub = mig.add_subparsers(dest="migration_command", metavar="ACTION", required=True)
    p = msub.add_parser("start", help="take a source LUN over and migrate it into a local LUN")
    _api_args(p)
    p.add_argument("--source", required=True, metavar="URI", help="source LUN, nbd://HOST:PORT/EXPORT")
    p.add_argument(
        "--lun", required=True, metavar="NAME", type=name_arg("LUN"), help="name of the LUN on this array"
    )
    p.add_argument("--pool", type=name_arg("pool"), help="pool of the local copy (default: 'default')")
    p.add_argument(
        "--mode",
        choices=("background", "active"),
        default="background",
        help="background: re-copy what writes dirty; active: writes go to both sides "
        "(the migration goes active by itself when it would not converge)",
    )
    p.add_argument(
        "--throttle", type=rate_arg, metavar="MBPS", help="copy rate limit in MB/s (0 = unlimited)"
    )
    p.add_argument(
        "--region-size",
        type=size_arg,
        metavar="SIZE",
        help="region size, a power of two; at most 64M regions (default 1M, doubled until a "
        "LUN over 16 TiB has at most 16M)",
    )
    p.set_defaults(func=run_api_command(cmd_start))
    p = msub.add_parser(
        "set",
        help="change a running migration: its throttle (at once, kept across restarts), mode, or "
        "the URI of its source (that also once it ended with its LUN serving the source directly)",
    )
    _api_args(p)
    p.add_argument("lun", metavar="NAME", type=name_arg("LUN"))
    p.add_argument(
        "--throttle", type=rate_arg, metavar="MBPS", help="new copy rate limit in MB/s (0 = unlimited)"
    )
    p.add_argument(
        "--mode",
        choices=("active",),
        help="go active now: writes go to both sides (there is no way back to background)",
    )
    p.add_argument(
        "--source",
        metavar="URI",
        help="where the source LUN is served now, nbd://HOST:PORT/EXPORT (its array came back at "
        "another address): it must serve the same LUN (refused otherwise, and when unreachable); "
        "kept across restarts, and I/O waiting for the source goes on through it at once; also "
        "for a LUN left serving the source directly after a cancel or a failure",
    )
    p.set_defaults(func=run_api_command(cmd_set))
    for name, helptext, func in (
        ("status", "show a migration", cmd_status),
        ("pause", "pause copying (host I/O keeps flowing)", _action("pause")),
        ("resume", "resume copying", _action("resume")),
        (
            "cancel",
            "stop; the LUN then serves the source directly, which stays authoritative",
            _action("cancel"),
        ),
    ):
        p = msub.add_parser(name, help=helptext)
        _api_args(p)
        p.add_argument("lun", metavar="NAME", type=name_arg("LUN"))
        p.set_defaults(func=run_api_command(func))
    p = msub.add_parser("list", help="list migrations")
    _api_args(p)
    p.set_defaults(func=run_api_command(cmd_list))
    p = msub.add_parser("wait", help="wait until a migration ends; exit 0 only if it completed")
    _api_args(p)
    p.add_argument("lun", metavar="NAME", type=name_arg("LUN"))
    p.add_argument(
        "--timeout",
        type=seconds_arg(positive=False),
        metavar="S",
        help="give up after this many seconds (exit 2, with --json the last status still "
        "printed; default: wait until it ends)",
    )
    p.set_defaults(func=run_api_command(cmd_wait))
