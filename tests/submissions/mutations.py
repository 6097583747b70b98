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


def apply(m: Mutation, solution: Path, out_dir: Path) -> Path:
    """Write the solution with ``m``'s edits to ``out_dir/<name>.ipynb``."""
    nb = nbformat.read(solution, as_version=4)
    for old, new in m.edits:
        hits = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
        count = sum(c.source.count(old) for c in hits)
        if count != 1:
            raise AssertionError(f"mutation {m.name}: expected the text to edit exactly once in "
                                 f"the solution, found it {count} times:\n{old}")
        hits[0].source = hits[0].source.replace(old, new)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{m.name}.ipynb"
    nbformat.write(nb, path)
    return path
