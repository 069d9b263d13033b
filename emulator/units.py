"""Sizes as people write them: 4096, 64K, 512M, 1G, 2T (binary units), 1.5G;
copy rates in MB/s."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from fractions import Fraction

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# ASCII digits only (\d also takes other scripts' digits, "١٠٢٤"); B, KB, KiB but no "iB" alone
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGTP])(?:I?B)?|B)?\s*$", re.IGNORECASE | re.ASCII)


def parse_size(text: str) -> int:
    """Parse a size; raise ValueError with a readable message if it is not one."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 4096, 64K, 512M, 1G)")
    if len(m.group(1)) > 20:
        raise ValueError(f"size {text!r} is too large")
    value = Fraction(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    if value.denominator != 1:
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def size_arg(text: str) -> int:
    """:func:`parse_size` for argparse, which shows this message only from ArgumentTypeError."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def format_size(n: int) -> str:
    for unit in ("P", "T", "G", "M", "K"):
        u = _UNITS[unit]
        if n >= u and n % (u // 1024 or 1) == 0:
            v = n / u
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"


def format_age(seconds: float) -> str:
    """How long ago, to the unit that matters: '0 s', '42 s', '7 min', '3.5 h', '2 d'."""
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} d"


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'127.0.0.1:10809', ':10809', '[::1]:10809' or '10809' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = default_host, text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # an IPv6 address
    host = host or default_host
    # a bracket left over is one not closed ('[::1:5' is no '::1' port 5)
    if "[" in host or "]" in host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not a host:port: {text!r} (try 127.0.0.1:10809, or port 0 for any)")
    return host, int(port)


def parse_rate(value: object) -> float:
    """A copy rate in MB/s, a finite number >= 0 (0 = unlimited), given as a
    number (JSON, TOML) or as text (a command line); ValueError otherwise."""
    v = math.nan
    if isinstance(value, str):
        try:
            v = float(value)
        except ValueError:
            pass
    elif isinstance(value, int | float) and not isinstance(value, bool):
        v = float(value)
    if not 0 <= v < math.inf:  # NaN fails too
        raise ValueError(f"a rate in MB/s >= 0 (0 = unlimited), not {value!r}")
    if v * 1e6 == math.inf:  # in bytes/s: an "inf" throttle the API would answer as Infinity, no JSON
        raise ValueError(f"a rate in MB/s >= 0 (0 = unlimited), not {value!r}: too large")
    return v


def rate_arg(text: str) -> float:
    """:func:`parse_rate` for argparse, which shows this message only from ArgumentTypeError."""
    try:
        return parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def seconds_arg(positive: bool) -> Callable[[str], float]:
    """A finite number of seconds, > 0 (``positive``) or >= 0, for argparse."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not (0 < v < math.inf if positive else 0 <= v < math.inf):  # NaN fails too
            raise argparse.ArgumentTypeError(f"seconds {'> 0' if positive else '>= 0'}, not {text!r}")
        return v

    return parse


def count_arg(text: str) -> int:
    """A whole number > 0 (rounds, runs), for argparse."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"a whole number > 0, not {text!r}")
    return v
