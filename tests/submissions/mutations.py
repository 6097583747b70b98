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
    notebook that is every question. ``partly``: questions the cheat reaches in some of their
    cases only, which may lose points (and must not gain any)."""
    name: str
    why: str
    cell: str
    after: str
    base: str = "student"
    targets: frozenset[str] = frozenset()
    partly: frozenset[str] = frozenset()


def cheat(name: str, why: str, cell: str, after: str, base: str = "student",
          targets: set[str] = frozenset(), partly: set[str] = frozenset()) -> Cheat:
    return Cheat(name, why, cell, after, base, frozenset(targets), frozenset(partly))


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


# Cheats every lab is tried with: one cell each, inserted after the code cell containing
# ``after`` (in the untouched notebook); ``functions`` are the names the first public test calls.

def checks_made_no_ops(lab: str, after: str) -> Cheat:
    return cheat("checks_made_no_ops",
                 "replaces every check function of the lab's checks with one that does nothing",
                 f'''import importlib
checks = importlib.import_module("grader.checks.{lab}")
for name in dir(checks):
    if name.startswith("check_"):
        setattr(checks, name, lambda *args, **kwargs: None)
''', after=after)


def otter_runner_replaced(after: str) -> Cheat:
    return cheat("otter_runner_replaced",
                 "replaces otter's test runners with ones in which every test case passes",
                 '''from otter.test_files import abstract_test, exception_test, python_test

def everything_passes(self, global_environment):
    self.test_case_results = [abstract_test.TestCaseResult(test_case=case, passed=True,
                                                           message="passed")
                              for case in self.test_cases]

exception_test.ExceptionTestFile.run = everything_passes
python_test.PythonTestFile.run = everything_passes
''', after=after)


def reference_read_from_disk(after: str, files: str) -> Cheat:
    """``files``: a glob of the reference's source below the course's root."""
    return cheat("reference_read_from_disk",
                 "looks for the reference's source files on disk and runs them in the notebook",
                 f'''import glob, os, sys
for root in sorted({{p for p in sys.path if p}} | {{os.getcwd(), "/autograder"}}):
    for path in sorted(glob.glob(os.path.join(root, "{files}"))):
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), globals())
''', after=after)


def hidden_tests_leaked(after: str, functions: list[str], reference: str) -> Cheat:
    """``functions``: signatures (``name(args)``) of what the first public test calls, each
    made to raise what it read; ``reference``: the reference's folder below the root."""
    raising = "".join(f"\ndef {signature}:\n    raise ValueError(what_can_be_read())\n"
                      for signature in functions)
    return cheat("hidden_tests_leaked",
                 "reads every hidden test, check and reference file it can find and raises their "
                 "text from the functions the public tests call, so that it shows in the public "
                 "feedback",
                 f'''import glob, os, sys

def what_can_be_read():
    roots = sorted({{p for p in sys.path if p}} | {{os.getcwd(), os.path.dirname(os.getcwd()),
                                                   "/autograder", "/autograder/source"}})
    found = []
    for root in roots:
        for pattern in ("tests/*.py", "source/tests/*.py", "grader/checks/*.py",
                        "{reference}/*.py"):
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                try:
                    with open(path) as f:
                        found.append(path + ":\\n" + f.read()[:3000])
                except OSError:
                    pass
    text = "\\n".join(found) or "nothing could be read"
    print(text)
    return text
{raising}''', after=after)


def cheats_for(lab: str, setup: str, reference_files: str, leak_after: str,
               leak_functions: list[str], reference_folder: str) -> list[Cheat]:
    """The cheats every lab is tried with: its checks made no-ops and otter's runners replaced
    after ``setup``; its reference's source (``reference_files``) run from disk; the hidden
    files' text raised from ``leak_functions`` (after the cell holding ``leak_after``)."""
    return [checks_made_no_ops(lab, setup), otter_runner_replaced(setup),
            reference_read_from_disk(setup, reference_files),
            hidden_tests_leaked(leak_after, leak_functions, reference_folder)]
