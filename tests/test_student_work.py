"""No one's work is ever lost: labs/ is updated only when asked, never over a changed notebook,
and no `make` target deletes or overwrites what a student wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from grader.labs import REPO, Lab, manifest
from grader.student_folder import STAMP, StudentWorkChanged, update_student_folder

LAB = "lab01_autograd"


def _lab_at(folder: Path) -> Lab:
    return Lab(LAB, entry={**manifest()[LAB], "student": str(folder)})


def _generated(tmp_path: Path) -> Path:
    """A stand-in for what otter generates: the committed student folder."""
    fresh = tmp_path / "fresh"
    shutil.copytree(REPO / "labs" / LAB, fresh, ignore=shutil.ignore_patterns(STAMP))
    return fresh


def _fill(notebook: Path) -> str:
    nb = nbformat.read(notebook, as_version=4)
    answer = "def broadcast_shape(op, *shapes):\n    return my_own_answer\n"
    nb.cells.append(nbformat.v4.new_code_cell(answer))
    nbformat.write(nb, notebook)
    return notebook.read_text()


def test_a_changed_notebook_is_never_overwritten(tmp_path):
    fresh = _generated(tmp_path)
    student = tmp_path / "labs" / LAB
    update_student_folder(_lab_at(student), fresh)          # first generation: writes everything
    notebook = student / f"{LAB}.ipynb"
    work = _fill(notebook)
    (student / "lab01_autograd_2026_12_01.zip").write_bytes(b"an export")
    (student / ".OTTER_LOG").write_bytes(b"otter's log")

    nb = nbformat.read(fresh / f"{LAB}.ipynb", as_version=4)   # the master changed meanwhile
    nb.cells[1].source += "\n\nA new paragraph of the handout."
    nbformat.write(nb, fresh / f"{LAB}.ipynb")
    with pytest.raises(StudentWorkChanged, match=f"labs/{LAB}/{LAB}.ipynb"):
        update_student_folder(_lab_at(student), fresh)
    assert notebook.read_text() == work

    update_student_folder(_lab_at(student), fresh, force=True)
    backups = list(student.glob(f"{LAB}.ipynb.bak-*"))
    assert len(backups) == 1 and backups[0].read_text() == work
    assert "A new paragraph" in notebook.read_text()
    assert (student / "lab01_autograd_2026_12_01.zip").read_bytes() == b"an export"
    assert (student / ".OTTER_LOG").read_bytes() == b"otter's log"


def test_untouched_files_follow_the_master_and_stale_ones_go(tmp_path):
    fresh = _generated(tmp_path)
    student = tmp_path / "labs" / LAB
    update_student_folder(_lab_at(student), fresh)
    (fresh / "tests" / "q1.py").write_text("# a new public test\n")
    (fresh / "tests" / "q7.py").unlink()
    written = update_student_folder(_lab_at(student), fresh)
    assert written == ["tests/q1.py"]
    assert (student / "tests" / "q1.py").read_text() == "# a new public test\n"
    assert not (student / "tests" / "q7.py").exists()
    assert json.loads((student / STAMP).read_text())["tests/q1.py"]


def _copy_of_the_repository(root: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
    copy = root / "course"
    for rel in filter(None, files.split("\0")):
        if (REPO / rel).is_file():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, copy / rel)
    (copy / ".venv").symlink_to(REPO / ".venv")
    return copy


@pytest.mark.slow
def test_a_filled_in_notebook_survives_every_make_target(tmp_path):
    """The targets that build or grade run for real in a copy of the repository; the rest (book,
    test, bench, lab, lock, setup) are read with `make -n`: none of their commands writes labs/."""
    copy = _copy_of_the_repository(tmp_path)
    notebook = copy / "labs" / LAB / f"{LAB}.ipynb"
    work = _fill(notebook)
    export = copy / "labs" / LAB / "lab01_autograd_2026_12_01.zip"
    export.write_bytes(b"an export")
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    shutil.copy(REPO / "labs" / LAB / f"{LAB}.ipynb", submissions / "untouched.ipynb")
    env = dict(os.environ, PYTHONPATH=str(copy))  # the copy's grader, not the checkout's

    def make(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-o", ".venv/.course-installed", *args], cwd=copy,
                              env=env, capture_output=True, text=True, timeout=600)

    # `make check` fails here, and must: the filled-in notebook differs from the master.
    for target, must_pass in ((["assign", f"LABS={LAB}", "CHECK=0"], True),
                              (["check", f"LABS={LAB}"], False), (["clean"], True),
                              (["grade", f"LAB={LAB}", f"SUBMISSIONS={submissions}",
                                f"OUT={tmp_path / 'o'}", "CHECK=0"], True),
                              (["nbgrader", f"LAB={LAB}"], True), (["lint"], True)):
        result = make(*target)
        assert notebook.read_text() == work, f"make {' '.join(target)} changed the notebook"
        assert export.exists(), f"make {' '.join(target)} removed the export zip"
        assert result.returncode == 0 or not must_pass, result.stdout[-2000:] + result.stderr

    refused = make("update-labs", f"LABS={LAB}", "CHECK=0")
    assert refused.returncode != 0 and f"labs/{LAB}/{LAB}.ipynb" in refused.stdout + refused.stderr
    assert notebook.read_text() == work

    for target in ("book", "test", "bench", "lab", "lock", "setup"):
        commands = subprocess.run(["make", "-n", "-B", target], cwd=copy, env=env,
                                  capture_output=True, text=True).stdout
        writers = [line for line in commands.splitlines() if "labs" in line and
                   "--notebook-dir=labs" not in line]
        assert not writers, f"make {target} runs commands on labs/: {writers}"
