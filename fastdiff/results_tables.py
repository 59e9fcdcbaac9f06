"""The markdown of the results files (fastdiff eval, the solver error, the quality intervals,
the likelihood, the benchmark reports): a title over `- key: value` lines, then pipe tables.

    lines = [*header_lines("Solver error", {"model": "digits"}), ""]
    lines += nfe_table(["solver"], [("ddim",)], [10, 20], {("ddim", 10): "0.031"})
    write(path, lines)
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

RULES = {"l": "---|", "r": "---:|"}  # a column's alignment: left, right (numbers)


def header_lines(title: str, facts: Mapping[str, object], notes: Iterable[str] = ()) -> list[str]:
    """`# title`, a blank line, then `- key: value` per fact and `- note` per note."""
    return [f"# {title}", "", *(f"- {k}: {v}" for k, v in facts.items()), *(f"- {note}" for note in notes)]


def pipe_table(columns: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> list[str]:
    """A pipe table's lines: the column names, the rule, a line per row. align: one letter per
    column, "l" (left) or "r" (right); empty: every column left."""
    align = align or "l" * len(columns)
    if len(align) != len(columns) or set(align) - set(RULES):
        raise ValueError(f"align must be one of {'/'.join(RULES)} per column ({len(columns)}), got {align!r}")
    lines = ["| " + " | ".join(columns) + " |", "|" + "".join(RULES[a] for a in align)]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row has {len(row)} cells for {len(columns)} columns: {list(row)!r}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def nfe_table(key_columns: Sequence[str], keys: Iterable[tuple], nfes: Sequence[int],
              cells: Mapping[tuple, str]) -> list[str]:
    """A row per key (its values under key_columns) and a right-aligned column "NFE n" per
    budget n; cells[(*key, n)] is a cell's text, a missing one stays empty."""
    return pipe_table([*key_columns, *(f"NFE {n}" for n in nfes)],
                      ([*key, *(cells.get((*key, n), "") for n in nfes)] for key in keys),
                      align="l" * len(key_columns) + "r" * len(nfes))


def write(path: Path, lines: list[str]) -> None:
    """`lines` as a file ending in a newline; the folder is made when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
