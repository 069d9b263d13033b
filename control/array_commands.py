"""`blockmig array info` and `blockmig lun create|list|show|grow|delete|fence|unfence`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from emulator.units import format_size, size_arg

from .api_client import TOKEN_ENV, ApiError, ArrayApi


def _api_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", required=True, metavar="URL", help="array API, e.g. http://127.0.0.1:8701")
    p.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def name_arg(kind: str) -> Callable[[str], str]:
    """A name (LUN, pool, host) for argparse: an empty one would name no LUN (``lun show ''``
    asked for ``/api/v1/luns/``, "Not Found") or quietly a default (``--pool ''``: the default
    pool; ``attach --host-name ''``: this machine)."""

    def parse(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"a {kind} name, not an empty one")
        return text

    return parse


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _lun_rows(luns: list[dict[str, Any]]) -> str:
    return table(
        [
            (
                lun["name"],
                format_size(lun["size"]),
                format_size(lun["allocated"]),
                lun["pool"],
                lun["state"],
                len(lun["connected_hosts"]),
                lun.get("uri", ""),
            )
            for lun in luns
        ],
        ("NAME", "SIZE", "ALLOCATED", "POOL", "STATE", "HOSTS", "URI"),
    )


def _show(lun: dict[str, Any]) -> str:
    keys = ("name", "id", "size", "allocated", "pool", "export", "uri", "state", "connected_hosts", "fence")
    out = []
    for k in keys:
        v = lun.get(k)
        if k in ("size", "allocated") and isinstance(v, int):
            v = f"{v} ({format_size(v)})"
        if isinstance(v, list):
            v = ", ".join(v) or "-"
        if k == "fence":
            v = f"for {v.get('holder') or 'a takeover'} (hosts read only)" if isinstance(v, dict) else "-"
        out.append(f"{k + ':':<17}{v}")
    return "\n".join(out)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def cmd_array_info(args: argparse.Namespace, api: ArrayApi) -> None:
    info = api.array_info()
    caps = ", ".join(k for k, v in info["capabilities"].items() if v) or "generic host copy only"
    pools = table(
        [
            (p["name"], format_size(p["capacity"]), format_size(p["used"]), format_size(p["free"]), p["luns"])
            for p in info["pools"]
        ],
        ("POOL", "CAPACITY", "USED", "FREE", "LUNS"),
    )
    text = (
        f"array:        {info['name']}\nmodel:        {info['model']} ({info.get('description', '')})\n"
        f"capabilities: {caps}\nmedia:        {info.get('media', 'none')}\n"
        f"nbd:          {info['nbd']['host']}:{info['nbd']['port']}\n\n{pools}"
    )
    _emit(args, info, text)


def cmd_lun_create(args: argparse.Namespace, api: ArrayApi) -> None:
    lun = api.create_lun(args.name, args.size, args.pool)
    _emit(args, lun, _show(lun))


def cmd_lun_list(args: argparse.Namespace, api: ArrayApi) -> None:
    luns = api.list_luns()
    _emit(args, luns, _lun_rows(luns) if luns else "no LUNs")


def cmd_lun_show(args: argparse.Namespace, api: ArrayApi) -> None:
    lun = api.get_lun(args.name)
    _emit(args, lun, _show(lun))


def cmd_lun_grow(args: argparse.Namespace, api: ArrayApi) -> None:
    lun = api.grow_lun(args.name, args.size)
    _emit(args, lun, _show(lun))


def cmd_lun_delete(args: argparse.Namespace, api: ArrayApi) -> None:
    api.delete_lun(args.name, force=args.force)
    _emit(args, {"deleted": args.name}, f"deleted LUN {args.name}")


def cmd_lun_fence(args: argparse.Namespace, api: ArrayApi) -> None:
    f = api.fence_lun(args.name, args.holder)
    _emit(args, f, f"LUN {args.name} fenced: hosts read only; the holder's URI: {f['uri']}")


def cmd_lun_unfence(args: argparse.Namespace, api: ArrayApi) -> None:
    api.unfence_lun(args.name)
    _emit(args, {"unfenced": args.name}, f"LUN {args.name} not fenced: hosts may write")


def not_utf8(e: UnicodeEncodeError) -> str:
    """What to say of a name or URI holding bytes of the command line that are not UTF-8
    (Python keeps them as surrogates; URLs, JSON, SQLite and NBD names take UTF-8 only)."""
    return f"{e.object!r} is not valid UTF-8 (names and URIs must be)"


def run_api_command(func: Any) -> Any:
    """Wrap ``func(args, api)``: an ApiError becomes a clear message and exit 1."""

    def runner(args: argparse.Namespace) -> int:
        api = ArrayApi(args.api, args.token)
        try:
            try:
                rc: int | None = func(args, api)
            except UnicodeEncodeError as ue:  # a name put in the URL: no traceback
                raise ApiError(0, "not_utf8", not_utf8(ue)) from None
        except ApiError as e:
            if args.json:
                print(json.dumps({"error": {"status": e.status, "code": e.code, "message": e.message}}))
            print(f"blockmig: {e.message}", file=sys.stderr)
            return 1
        return rc or 0

    return runner


def add_parsers(
    array_sub: argparse._SubParsersAction[argparse.ArgumentParser],
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    p = array_sub.add_parser("info", help="show an array: model, capabilities, pools")
    _api_args(p)
    p.set_defaults(func=run_api_command(cmd_array_info))

    lun = sub.add_parser("lun", help="manage the LUNs of an array")
    lsub = lun.add_subparsers(dest="lun_command", metavar="ACTION", required=True)
    p = lsub.add_parser("create", help="create a thin LUN")
    _api_args(p)
    p.add_argument("name", type=name_arg("LUN"))
    p.add_argument("--size", required=True, type=size_arg, help="size, e.g. 1G or 1073741824")
    p.add_argument("--pool", type=name_arg("pool"), help="pool (default: 'default')")
    p.set_defaults(func=run_api_command(cmd_lun_create))
    p = lsub.add_parser("list", help="list LUNs")
    _api_args(p)
    p.set_defaults(func=run_api_command(cmd_lun_list))
    p = lsub.add_parser("show", help="show one LUN")
    _api_args(p)
    p.add_argument("name", type=name_arg("LUN"))
    p.set_defaults(func=run_api_command(cmd_lun_show))
    p = lsub.add_parser("grow", help="grow a LUN")
    _api_args(p)
    p.add_argument("name", type=name_arg("LUN"))
    p.add_argument("--size", required=True, type=size_arg, help="new size, e.g. 2G")
    p.set_defaults(func=run_api_command(cmd_lun_grow))
    p = lsub.add_parser("delete", help="delete a LUN")
    _api_args(p)
    p.add_argument("name", type=name_arg("LUN"))
    p.add_argument("--force", action="store_true", help="delete even while hosts are connected")
    p.set_defaults(func=run_api_command(cmd_lun_delete))
    p = lsub.add_parser("fence", help="fence a LUN for a takeover: read only to hosts, but to its holder")
    _api_args(p)
    p.add_argument("name", type=name_arg("LUN"))
    p.add_argument("--holder", default="", help="who holds the fence (a label)")
    p.set_defaults(func=run_api_command(cmd_lun_fence))
    p = lsub.add_parser("unfence", help="lift a LUN's fence: hosts may write again")
    _api_args(p)
    p.add_argument("name", type=name_arg("LUN"))
    p.set_defaults(func=run_api_command(cmd_lun_unfence))
