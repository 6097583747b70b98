"""What students receive (`make release`): the labs, the runtime and the rendered book, as a git
repository of its own, with no answer in any file; installed alone in a fresh virtual
environment, every lab's public tests pass on the solution and fail on the untouched notebook."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from grader.leaks import BOOK_SHOWS, hidden_tests_of_master, release_leaks
from grader.release import build_release

from .conftest import lab_names

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("book")]


@pytest.fixture(scope="session")
def release(built_book, tmp_path_factory) -> Path:
    return build_release(tmp_path_factory.mktemp("release") / "labs-release",
                         built_book.require())


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_RETRIES="0", PIP_DEFAULT_TIMEOUT="10")
    return env


@pytest.fixture(scope="session")
def release_python(release, tmp_path_factory) -> Path:
    """A fresh virtual environment with the release installed, and nothing else of the course:
    what `make check` in the release sets up, without JupyterLab."""
    venv = tmp_path_factory.mktemp("release-env") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    constraints = release / "requirements" / "constraints.txt"
    torch = next(line for line in constraints.read_text().splitlines()
                 if line.startswith("torch=="))
    for args in (["--no-deps", torch], ["-c", str(constraints), str(release)]):
        result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args],
                                cwd=venv, env=_clean_env(), capture_output=True, text=True,
                                timeout=1200)
        assert result.returncode == 0, result.stderr[-4000:]
    return python


def test_the_release_holds_only_what_students_receive(release):
    top = {p.name for p in release.iterdir()}
    assert top == {".git", ".gitignore", ".dockerignore", ".course-release", "README.md",
                   "Makefile", "pyproject.toml", "requirements", "labs", "course_runtime",
                   "book"}, top
    assert sorted(p.name for p in (release / "labs").iterdir()) == lab_names()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=release, capture_output=True,
                            text=True, check=True).stdout
    assert status == "", f"the release's repository has uncommitted files:\n{status}"
    assert (release / "book" / "index.html").exists()
    assert not (release / "book" / "_sources").exists(), "page sources are not the book"
    readme = (release / "README.md").read_text()
    commands = readme.split("## Two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in commands.strip().splitlines()] == [
        ["make", "lab"], ["make", "check"]]
    assert release_leaks(release) == []


def test_a_planted_answer_is_found(release, tmp_path):
    """The release check itself can fail: each planted leak is reported."""
    from course_reference.autograd import tensor
    from grader.checks import lab03_pipeline

    copy = tmp_path / "release"
    shutil.copytree(release, copy, ignore=shutil.ignore_patterns(".git"))
    renamed = inspect.getsource(tensor.topological_order).replace(
        "def topological_order", "def helpful_sort")
    with open(copy / "course_runtime" / "data.py", "a") as f:
        f.write("\n\n" + renamed)
    notebook = copy / "labs" / "lab01_autograd" / "lab01_autograd.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    hidden = sorted(hidden_tests_of_master(_lab("lab02_zero")))[0]
    nb.cells.append(nbformat.v4.new_code_cell(f"from course_reference import autograd\n# {hidden}"))
    nbformat.write(nb, notebook)
    check = inspect.getsource(lab03_pipeline.check_find_deadlock)
    (copy / "book" / "leak.html").write_text(f"<pre>{check}</pre>")
    (copy / "solutions").mkdir()

    leaks = "\n".join(release_leaks(copy))
    assert "course_runtime/data.py: the function helpful_sort is " \
           "course_reference.autograd.tensor.topological_order" in leaks, leaks
    assert "lab01_autograd.ipynb: imports course_reference" in leaks, leaks
    assert f"names the hidden test {hidden}" in leaks, leaks
    assert "book/leak.html: the function check_find_deadlock" in leaks, leaks
    assert "solutions/ is an instructor's folder" in leaks, leaks


def test_the_book_shows_no_lab_s_answer():
    """The reference code the book prints on purpose belongs to no lab's answer key."""
    from grader.labs import REPO, all_labs

    for lab in all_labs():
        for module in lab.paths("reference"):
            dotted = module.relative_to(REPO).with_suffix("").as_posix().replace("/", ".") + "."
            assert not dotted.startswith(BOOK_SHOWS), f"{lab.name}'s {dotted} is shown in the book"


def _lab(name: str):
    from grader.labs import Lab
    return Lab(name)


def _selfcheck(python: Path, notebook: Path, out: Path) -> tuple[int, dict]:
    result = subprocess.run([str(python), "-m", "course_runtime.selfcheck", str(notebook),
                             "--json", str(out), "--cell-timeout", "300"],
                            cwd=notebook.parent, env=_clean_env(), capture_output=True, text=True,
                            timeout=1500)
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    return result.returncode, json.loads(out.read_text())


def test_the_release_installs_alone_and_runs_its_public_tests(release_python, release, assigned,
                                                              tmp_path):
    for absent in ("course_reference", "grader"):
        result = subprocess.run([str(release_python), "-c", f"import {absent}"], cwd=tmp_path,
                                env=_clean_env(), capture_output=True, text=True)
        assert result.returncode != 0, f"the student's environment can import {absent}"
    for lab in lab_names():
        folder = tmp_path / lab
        shutil.copytree(release / "labs" / lab, folder)
        rc, untouched = _selfcheck(release_python, folder / f"{lab}.ipynb", tmp_path / "u.json")
        passing = {q: [t["test"] for t in tests if t["passed"]] for q, tests in untouched.items()}
        assert rc == 1 and not any(passing.values()), f"{lab} untouched passes {passing}"
        shutil.copy(assigned(lab).solution, folder / f"{lab}.ipynb")
        rc, solved = _selfcheck(release_python, folder / f"{lab}.ipynb", tmp_path / "s.json")
        failing = {q: [t["message"][-300:] for t in tests if not t["passed"]]
                   for q, tests in solved.items()}
        assert rc == 0 and not any(failing.values()), f"{lab}'s solution fails {failing}"
        assert set(solved) == set(untouched) and solved, (lab, solved)
