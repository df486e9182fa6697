"""The README's options table is the full list: every option ``pyvirtiofsd --help`` shows has
a row, and every row names the tests that show it, each of which exists."""

from __future__ import annotations

import re
from pathlib import Path

from pyvirtiofs import options

ROOT = Path(__file__).resolve().parents[2]
TABLE_HEAD = "| option | what it does | shown by |"


def table_rows() -> list[tuple[str, str]]:
    """(option cell, shown-by cell) of each row of the options table."""
    text = (ROOT / "README.md").read_text()
    start = text.index(TABLE_HEAD)
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 3, line
        rows.append((cells[0], cells[2]))
    return rows


def options_named(cell: str) -> set[str]:
    names = set()
    for code in re.findall(r"`([^`]*)`", cell):
        for m in re.finditer(r"--\[no-\]([a-z][a-z0-9-]*)", code):
            names |= {f"--{m.group(1)}", f"--no-{m.group(1)}"}
        names |= set(re.findall(r"(?<![\w\]-])(--[a-z][a-z0-9-]*)", code))
        names |= set(re.findall(r"(?<![\w-])(-[a-zA-Z])\b", code))
    return names


def help_options() -> set[str]:
    text = options.build_parser().format_help()
    return (set(re.findall(r"(?m)^\s+(?:-\w(?: \S+)?, )?(--[a-z][a-z0-9-]*)", text))
            | set(re.findall(r"(?m)^\s+(-\w)\b", text)))


def test_every_option_of_the_help_has_a_row():
    listed = set().union(*(options_named(opt) for opt, _ in table_rows()))
    shown = help_options()
    assert len(shown) >= 45, shown  # the help was read
    assert shown - listed == set(), "options without a row in the README's options table"


def test_every_row_names_tests_that_exist():
    rows = table_rows()
    assert len(rows) >= 35
    for opt, shown_by in rows:
        files = re.findall(r"`((?:unit|e2e)/[\w/]+\.py)`", shown_by)
        assert files, f"row {opt} names no test"
        for f in files:
            assert (ROOT / "tests" / f).is_file(), f"row {opt}: tests/{f} does not exist"
