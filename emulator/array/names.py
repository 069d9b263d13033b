"""What an array accepts as a name (array, pool, LUN) and as a size (LUN, pool capacity).

Its own module, light to import: the control layer checks a `blockmig up` config and a
volume's size and pool with these before it starts an array or records a volume, without
loading the array itself (tests/control/test_cli_imports.py).
"""

from __future__ import annotations

import re

from .errors import InvalidInput

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: "$" would take "lun\n"
SECTOR = 512
MAX_LUN_SIZE = 1 << 50  # 1 PiB


def check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid {kind} name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_size(size: object, what: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidInput(f"{what} must be a whole number of bytes, not {size!r}")
    if size <= 0 or size % SECTOR or size > MAX_LUN_SIZE:
        raise InvalidInput(
            f"{what} {size} is invalid: it must be a positive multiple of {SECTOR} bytes "
            f"and at most {MAX_LUN_SIZE} bytes"
        )
    return size
