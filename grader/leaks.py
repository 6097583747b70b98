"""Checks on what students receive: labs/ in sync with solutions/, and nothing leaked into it."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import nbformat

from .labs import Lab

MARKERS = re.compile(r"BEGIN SOLUTION|END SOLUTION|#\s*SOLUTION\b|BEGIN HIDDEN|hidden\s*=\s*True|"
                     r"hidden:\s*true", re.IGNORECASE)


def solution_lines(lab: Lab, min_length: int = 20) -> set[str]:
    """The distinctive lines of the master's solutions (between the markers, or tagged): those
    long enough to mean something and not also written elsewhere in the master (given code)."""
    nb = nbformat.read(lab.master, as_version=4)
    secret: set[str] = set()
    public: list[str] = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            public.append(cell.source)
            continue
        inside = False
        for line in cell.source.splitlines():
            stripped = line.strip()
            if stripped.startswith("# BEGIN SOLUTION"):
                inside = True
            elif stripped.startswith("# END SOLUTION"):
                inside = False
            elif inside or stripped.endswith("# SOLUTION"):
                if len(stripped) >= min_length and not stripped.startswith("#"):
                    secret.add(stripped.removesuffix("# SOLUTION").strip())
            else:
                public.append(line)
    given = "\n".join(public)
    return {line for line in secret if line not in given}


def hidden_test_names(autograder_zip: Path) -> set[str]:
    """Names of the hidden test functions, read from the autograder zip."""
    names: set[str] = set()
    with zipfile.ZipFile(autograder_zip) as archive:
        for name in archive.namelist():
            if name.startswith("tests/") and name.endswith(".py"):
                source = archive.read(name).decode()
                names.update(re.findall(r"hidden=True[^\n]*\n(?:[^\n]*\n)?def (\w+)", source))
    return names


def find_leaks(lab: Lab, student_dir: Path | None = None,
               autograder_zip: Path | None = None) -> list[str]:
    """Every place under labs/<lab>/ (or ``student_dir``) where a solution line, a marker or the
    name of a hidden test (read from ``autograder_zip``, by default the built one) shows."""
    student_dir = student_dir or lab.student_dir
    autograder_zip = autograder_zip or lab.autograder_zip
    problems = []
    secrets = solution_lines(lab)
    hidden = hidden_test_names(autograder_zip) if autograder_zip.exists() else set()
    for path in sorted(p for p in student_dir.rglob("*") if p.is_file()):
        text = _readable_text(path)
        rel = path.relative_to(student_dir.parent)
        if MARKERS.search(text):
            problems.append(f"{rel}: contains a solution or hidden-test marker")
        problems += [f"{rel}: contains the solution line {line!r}" for line in secrets
                     if line in text]
        problems += [f"{rel}: contains the hidden test {name}" for name in hidden if name in text]
    return problems


def _readable_text(path: Path) -> str:
    """A file's text; for a notebook, its cells' sources and outputs as written, not JSON-escaped
    (a solution line with quotes in it would not match the raw JSON)."""
    text = path.read_text(errors="replace")
    if path.suffix != ".ipynb":
        return text
    nb = nbformat.reads(text, as_version=4)
    parts = [cell.source for cell in nb.cells]
    parts += [str(output) for cell in nb.cells for output in cell.get("outputs", [])]
    return "\n".join(parts + [str(nb.metadata)])
