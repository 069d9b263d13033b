"""The `blockmig` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from emulator.array import serve_file
    from emulator.daemon import main as daemon

    from . import array_commands, demo, migration_commands, volume_commands

    parser = argparse.ArgumentParser(
        prog="blockmig",
        description="Userspace block-device emulator with live migration between storage arrays over NBD.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    serve_file.add_parser(sub)
    array = sub.add_parser("array", help="run an array, or show one")
    array_sub = array.add_subparsers(dest="array_command", metavar="ACTION", required=True)
    daemon.add_parser(array_sub)
    array_commands.add_parsers(array_sub, sub)
    migration_commands.add_parsers(sub)
    volume_commands.add_parsers(sub)
    demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
