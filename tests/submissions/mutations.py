"""Buggy submissions as edits of the solution notebook.

A curated bug is a small, named edit of the lab's solution (the code a student would have got
wrong), with the questions it must cost. Building them from the current solution keeps them in
step with the lab, and an edit whose text is no longer in the solution fails loudly instead of
silently producing a correct submission.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nbformat


@dataclass(frozen=True)
class Mutation:
    name: str
    why: str
    edits: list[tuple[str, str]]
    breaks: frozenset[str]
    may_break: frozenset[str] = field(default_factory=frozenset)


def mutation(name: str, why: str, edits: list[tuple[str, str]], breaks: set[str],
             may_break: set[str] = frozenset()) -> Mutation:
    return Mutation(name, why, edits, frozenset(breaks), frozenset(may_break))


def edited_cells(m: Mutation, cells: dict[int, str]) -> dict[int, str]:
    """The code cells (index to source) that ``m`` changes, as it changes them."""
    edited: dict[int, str] = {}
    for old, new in m.edits:
        current = {i: edited.get(i, source) for i, source in cells.items()}
        hits = [i for i, source in current.items() if old in source]
        count = sum(current[i].count(old) for i in hits)
        if count != 1:
            raise AssertionError(f"mutation {m.name}: expected the text to edit exactly once in "
                                 f"the solution, found it {count} times:\n{old}")
        edited[hits[0]] = current[hits[0]].replace(old, new)
    return edited


def apply(m: Mutation, solution: Path, out_dir: Path) -> Path:
    """Write the solution with ``m``'s edits to ``out_dir/<name>.ipynb``."""
    nb = nbformat.read(solution, as_version=4)
    code = {i: c.source for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    for index, source in edited_cells(m, code).items():
        nb.cells[index].source = source
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{m.name}.ipynb"
    nbformat.write(nb, path)
    return path


@dataclass(frozen=True)
class Cheat:
    """A submission that tries to earn points without the work: ``cell`` inserted into the
    ``base`` notebook ("student", untouched, or "solution") after the code cell that contains
    ``after``. ``targets`` are the questions it must not earn anything on; on the untouched
    notebook that is every question."""
    name: str
    why: str
    cell: str
    after: str
    base: str = "student"
    targets: frozenset[str] = frozenset()


def cheat(name: str, why: str, cell: str, after: str, base: str = "student",
          targets: set[str] = frozenset()) -> Cheat:
    return Cheat(name, why, cell, after, base, frozenset(targets))


def apply_cheat(c: Cheat, notebook: Path, out_dir: Path) -> Path:
    """Write ``notebook`` with ``c``'s cell inserted to ``out_dir/<name>.ipynb``."""
    nb = nbformat.read(notebook, as_version=4)
    hits = [i for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code" and c.after in cell.source]
    if len(hits) != 1:
        raise AssertionError(f"cheat {c.name}: expected one cell containing {c.after!r}, "
                             f"found {len(hits)}")
    nb.cells.insert(hits[0] + 1, nbformat.v4.new_code_cell(c.cell))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{c.name}.ipynb"
    nbformat.write(nb, path)
    return path
