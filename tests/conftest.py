"""Shared fixtures: each lab assigned once per test session, from the master, into a temp dir
(never into labs/, whose sync with the master is itself under test)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grader.labs import Lab, all_labs


class AssignedLab:
    """A lab assigned into a temporary folder: its zip and its solution notebook."""

    def __init__(self, lab: Lab, out: Path):
        self.lab = lab
        self.out = out
        zips = sorted((out / "autograder").glob("*-autograder_*.zip"))
        assert len(zips) == 1, zips
        self.zip = zips[0]
        self.solution = out / "autograder" / f"{lab.name}.ipynb"
        self.student = out / "student" / f"{lab.name}.ipynb"


_assigned: dict[str, AssignedLab] = {}


@pytest.fixture(scope="session")
def assigned(tmp_path_factory: pytest.TempPathFactory):
    from grader.assign import build

    def get(name: str) -> AssignedLab:
        if name not in _assigned:
            lab = Lab(name)
            out = tmp_path_factory.mktemp(f"assign-{name}") / "out"
            build(lab, out)
            _assigned[name] = AssignedLab(lab, out)
        return _assigned[name]

    yield get
    for assigned_lab in _assigned.values():
        shutil.rmtree(assigned_lab.out, ignore_errors=True)
    _assigned.clear()


def lab_names() -> list[str]:
    return [lab.name for lab in all_labs()]


class BuiltBook:
    """The book built as `make book` builds it: fresh, every notebook executed, -W."""

    def __init__(self, result: subprocess.CompletedProcess, html: Path):
        self.result = result
        self.html = html

    def require(self) -> Path:
        assert self.result.returncode == 0, (self.result.stdout[-6000:] +
                                             self.result.stderr[-6000:])
        return self.html


@pytest.fixture(scope="session")
def built_book(tmp_path_factory: pytest.TempPathFactory) -> BuiltBook:
    """Built once per session; the tests that use it share an xdist group, so one worker."""
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("book")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "jupyter-book"), "build", str(repo / "book"),
         "--warningiserror", "--keep-going", "--path-output", str(out)],
        capture_output=True, text=True, cwd=repo, timeout=1800)
    return BuiltBook(result, out / "_build" / "html")
