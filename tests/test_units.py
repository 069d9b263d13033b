"""Sizes as people write them, and what is no size."""

from __future__ import annotations

import pytest

from emulator.units import parse_size


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("4096", 4096),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("512M", 512 << 20),
        ("1G", 1 << 30),
        ("1GB", 1 << 30),
        ("1GiB", 1 << 30),
        ("1.5G", 3 << 29),
        (" 2T ", 2 << 40),
        ("512B", 512),
        ("512b", 512),
    ],
)
def test_sizes(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "",
        "G",
        "1X",
        "-1",
        "1.5",  # half a byte
        "1IB",  # was 1: an "iB" with no unit before it
        "1iB",
        "١٠٢٤",  # was 1024: Arabic-Indic digits, which \\d matches
        "1０２４",  # fullwidth digits
    ],
)
def test_what_is_no_size(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)
