"""How the experiment report counts a table's rows and writes numbers (the refusal to shrink a table is
tests/test_sharing.py's). `commands.report` is imported in each test, not at collection: docs/testing.md."""

from __future__ import annotations


def test_a_readme_counts_only_the_rows_of_its_compare_block() -> None:
    from commands import report

    start, end = report.MARKERS
    params = ["| key | default |", "|---|---|", "| `train.epochs` | `10` |"]
    block = [start, "| experiment | loss |", "|---|---|", "| exp-a | poisson |", "| exp-b | poisson |", end]
    readme = "\n".join([*params, *block, "| other | table |"])
    assert report.rows_shown(readme) == 2
    assert report.rows_shown("| experiment | loss |\n|---|---|\n| exp-a | poisson |\n") == 1  # compare.md


def test_numbers_are_written_for_people() -> None:
    from commands import report

    assert [report._number(v) for v in (10.0, 0.001, 1e30, 2e-5, 0.9)] == ["10", "0.001", "1e+30", "2e-05", "0.9"]
    assert report._number("adam") == "adam" and report._number(None) is None
