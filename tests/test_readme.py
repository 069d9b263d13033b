"""The README tells the truth about the CLI: every `blockmig` command line it shows names
commands and options that exist, its TOML config loads, and its pytest plugin example runs
as it is printed."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from control.cli import build_parser
from control.config import child_env, load_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", README, re.M | re.S)


def _command_lines() -> list[str]:
    """Each `blockmig ...` line of the README: from sh blocks (continuations joined,
    comments dropped) and from inline code spans."""
    lines = []
    for block in _blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line)
            if re.search(r"(^|/)blockmig [a-z]", line):
                lines.append(line[line.index("blockmig ") :])
    lines += re.findall(r"`(blockmig [a-z][^`]*)`", README)
    return lines


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser | None = action.choices.get(name)
            return found
    return None


def _resolve(words: list[str]) -> list[tuple[str, argparse.ArgumentParser]]:
    """The parsers a command line names (``status|pause`` names several)."""
    parsers = [("blockmig", build_parser())]
    for word in words:
        if not re.fullmatch(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*", word):
            break
        subs = [(f"{n} {w}", _subparser(p, w)) for n, p in parsers for w in word.split("|")]
        if not all(p is not None for _, p in subs):
            break  # a positional argument (a volume, an array), not a command
        parsers = [(n, p) for n, p in subs if p is not None]
    return parsers


def test_every_command_line_in_the_readme_names_commands_and_options_that_exist() -> None:
    lines = _command_lines()
    assert len(lines) > 15, lines
    for line in lines:
        parsers = _resolve(line.split()[1:])
        assert all(_subparser(p, "x") is None and not _has_command(p) for _, p in parsers), (
            f"README: {line!r} names no command"
        )
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line):
            for name, p in parsers:
                assert flag in p._option_string_actions, f"README: {line!r}: `{name}` has no {flag}"


def _has_command(p: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in p._actions)


def test_the_readme_config_loads(tmp_path: Path) -> None:
    (toml,) = _blocks("toml")
    cfg = tmp_path / "arrays.toml"
    cfg.write_text(toml)
    assert [a.name for a in load_config(cfg)] == ["A", "B"]


def test_the_readme_pytest_plugin_example_runs_as_printed(tmp_path: Path) -> None:
    section = README.split("## Testing with blockmig in your CI", 1)[1]
    example = _blocks("python")
    code = next(b for b in example if b in section)
    (tmp_path / "test_example.py").write_text(code)
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "1 passed" in p.stdout


@pytest.mark.parametrize("line", ["blockmig lun frobnicate --api URL", "blockmig lun list --api URL --nope"])
def test_the_check_itself_finds_what_does_not_exist(line: str) -> None:
    parsers = _resolve(line.split()[1:])
    flags = re.findall(r"(?<![\w-])--[a-z][a-z-]*", line)
    assert any(_has_command(p) for _, p in parsers) or any(
        f not in p._option_string_actions for f in flags for _, p in parsers
    )
