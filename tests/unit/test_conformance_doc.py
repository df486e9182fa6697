"""docs/conformance.md stays in step with the suite: its table has one row per case of
pyvirtiofs.testing.conformance, for both daemons, and the command that writes it
(``conformance_runner --markdown``) replaces the table only, keeping the prose around it.
(The verdicts themselves need two guest runs of the whole suite; regenerating the document
with the command it names is how they are renewed.)"""

from __future__ import annotations

from pathlib import Path

from pyvirtiofs.testing import conformance, conformance_runner

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"
VERDICTS = {"same as tmpfs", "same as host ext4", "known difference", "**differs**"}


def test_the_table_has_a_row_for_every_case():
    text = DOC.read_text()
    i, j = text.index(conformance_runner.TABLE_START), text.index(conformance_runner.TABLE_END)
    rows = [line for line in text[i:j].splitlines() if line.startswith("| ")]
    assert rows[0] == "| case | pyvirtiofsd (cache=auto) | virtiofsd (cache=auto) |"
    cases = {}
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 3 and set(cells[1:]) <= VERDICTS, row
        cases[cells[0]] = cells[1:]
    assert sorted(cases) == sorted(conformance.CASES), \
        "regenerate docs/conformance.md with the command at its top"
    assert "--markdown docs/conformance.md" in text[:i]


def test_markdown_replaces_only_the_table(tmp_path):
    doc = tmp_path / "c.md"
    doc.write_text(f"# title\n\nprose\n\n{conformance_runner.TABLE_START}\n| old |\n"
                   f"{conformance_runner.TABLE_END}\n\n## after\n")
    conformance_runner.write_markdown(doc, "| new |\n")
    assert doc.read_text() == (f"# title\n\nprose\n\n{conformance_runner.TABLE_START}\n| new |\n"
                               f"{conformance_runner.TABLE_END}\n\n## after\n")
    bare = tmp_path / "bare.md"
    conformance_runner.write_markdown(bare, "| t |\n")
    assert bare.read_text() == "| t |\n"
