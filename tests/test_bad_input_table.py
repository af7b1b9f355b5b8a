"""docs/bad-inputs.md is the tested table: regenerated from the cases, at least 40 rows over the three
commands, and linked from the README."""

from __future__ import annotations

from tests.bad_inputs import AREAS, DOC, REPO, all_cases, markdown


def test_the_doc_is_the_table_of_tested_cases():
    assert DOC.read_text() == markdown(), "docs/bad-inputs.md is stale: run `python -m tests.bad_inputs`"


def test_the_table_covers_every_command_with_40_rows_or_more():
    cases = all_cases()
    assert set(cases) == set(AREAS)
    assert all(len(rows) >= 30 for rows in cases.values()), {a: len(r) for a, r in cases.items()}
    for area, rows in cases.items():  # each row a distinct input (the table's first column)
        assert len({c.what for c in rows}) == len(rows), area
    assert sum(len(rows) for rows in cases.values()) >= 40
    assert "docs/bad-inputs.md" in (REPO / "README.md").read_text()
