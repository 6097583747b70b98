"""The autograder zips grade anywhere, with nothing of the course preinstalled.

A fresh virtual environment is built only from what a zip says to install (its environment.yml's
pip list, which otter's setup.sh hands to mamba on Gradescope), and each lab's zip grades in
Gradescope's layout (source/, submission/, results/results.json under a scratch root) with the
zip's own run_otter.py: the solution scores full marks, the lab's first curated bug loses its
points, students see the public tests at once and the hidden ones only after publication, and no
feedback quotes a hidden test. An environment that cannot import the lab is an autograder error
that says so, never a silent zero.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from tests.submissions.mutations import apply

from .conftest import lab_names
from .test_lab_grading import mutations_of

pytestmark = pytest.mark.slow


def _pip_list(zip_path: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as archive:
        environment = yaml.safe_load(archive.read("environment.yml"))
    return next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))


@pytest.fixture(scope="session")
def zip_python(tmp_path_factory, assigned) -> Path:
    """The python of an environment built from a zip alone (one for the session, across
    workers: every lab's zip asks for the same pinned packages and the same wheel)."""
    shared = tmp_path_factory.getbasetemp().parent / "zip-environment"
    with FileLock(str(shared) + ".lock"):
        python = shared / "env" / "bin" / "python"
        if not python.exists():
            source = shared / "source"
            with zipfile.ZipFile(assigned(lab_names()[0]).zip) as archive:
                archive.extractall(source)
            subprocess.run([sys.executable, "-m", "venv", str(shared / "env")], check=True)
            # As conda does with an environment file's pip list: a requirements file beside it.
            requirements = source / "condaenv.requirements.txt"
            requirements.write_text("\n".join(_pip_list(assigned(lab_names()[0]).zip)) + "\n")
            env = dict(os.environ, PIP_RETRIES="0", PIP_DEFAULT_TIMEOUT="10")
            env.pop("PYTHONPATH", None)
            result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r",
                                     str(requirements)], cwd=source, env=env,
                                    capture_output=True, text=True, timeout=1200)
            assert result.returncode == 0, result.stderr[-4000:]
    return python


def gradescope(python: Path, zip_path: Path, notebook: Path, root: Path,
               python_flags: tuple[str, ...] = ()) -> tuple[int, dict, str]:
    """Grade ``notebook`` with ``zip_path`` as Gradescope does, under ``root``."""
    autograder = root / "autograder"
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(autograder / "source")
    (autograder / "submission").mkdir(parents=True)
    (autograder / "results").mkdir()
    shutil.copy(notebook, autograder / "submission" / notebook.name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{python.parent}{os.pathsep}/usr/bin{os.pathsep}/bin"  # `mamba activate`
    result = subprocess.run([str(python), *python_flags, str(autograder / "source" /
                                                             "run_otter.py")],
                            cwd=autograder, env=env, capture_output=True, text=True, timeout=900)
    path = autograder / "results" / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    return result.returncode, results, result.stdout[-3000:] + result.stderr[-3000:]


def _hidden_source_lines(zip_path: Path) -> set[str]:
    """The lines of the zip's hidden test functions (their calls name the hidden inputs)."""
    lines: set[str] = set()
    with zipfile.ZipFile(zip_path) as archive:
        for name in archive.namelist():
            if name.startswith("tests/") and name.endswith(".py"):
                for block in archive.read(name).decode().split("@test_case(")[1:]:
                    if "hidden=True" in block.split("\n", 1)[0]:
                        lines |= {line.strip() for line in block.splitlines()[2:]
                                  if len(line.strip()) > 20}
    return lines


def _scores(results: dict) -> dict[str, tuple[float, float]]:
    return {t["name"]: (t["score"], t["max_score"]) for t in results["tests"] if "score" in t}


def _check_feedback(results: dict, zip_path: Path) -> None:
    public, *questions = results["tests"]
    assert public["visibility"] == "visible" and "score" not in public, public
    assert all(t["visibility"] == "after_published" for t in questions), questions
    assert results.get("stdout_visibility") == "hidden"
    hidden = _hidden_source_lines(zip_path)
    for test in results["tests"]:
        assert "Error at line" not in test["output"], test
        quoted = [line for line in hidden if line in test["output"]]
        assert not quoted, f"{test['name']} quotes hidden tests: {quoted}"


# A curated bug is graded from the zips of two labs (one of functions alone, one whose loops run
# on objects of the grader's): that the zip's tests take points is what this shows; which points
# each bug costs, the harness shows for every lab with the same tests (tests/test_mutation.py).
BUG_FROM_THE_ZIP = {"lab01_autograd", "lab04_paged_kv"}


@pytest.mark.parametrize("lab", lab_names())
def test_the_zip_alone_grades_the_solution_and_takes_points(zip_python, assigned, tmp_path, lab):
    built = assigned(lab)
    rc, results, log = gradescope(zip_python, built.zip, built.solution, tmp_path / "solution")
    assert rc == 0 and results, log
    scores = _scores(results)
    lost = {q: s for q, s in scores.items() if s[0] < s[1]}
    assert not lost, f"the solution loses points graded from its zip: {lost}\n{log}"
    assert results["score"] == sum(s[1] for s in scores.values()) > 0
    _check_feedback(results, built.zip)
    if lab not in BUG_FROM_THE_ZIP:
        return

    bug = mutations_of(lab)[0]
    notebook = apply(bug, built.solution, tmp_path / "bug")
    rc, results, log = gradescope(zip_python, built.zip, notebook, tmp_path / "graded-bug")
    assert rc == 0 and results, log
    scores = _scores(results)
    kept = {q for q in bug.breaks if scores[q][0] >= scores[q][1]}
    assert not kept, f"{bug.name} keeps its points on {sorted(kept)} from the zip: {scores}"
    collateral = {q: s for q, s in scores.items()
                  if q not in bug.breaks | bug.may_break and s[0] < s[1]}
    assert not collateral, f"{bug.name} costs points elsewhere from the zip: {collateral}"
    _check_feedback(results, built.zip)


def test_an_environment_without_the_course_is_an_autograder_error(zip_python, assigned,
                                                                  tmp_path):
    """Without site-packages (python -S) nothing the lab needs imports: no grade, an error."""
    built = assigned(lab_names()[0])
    rc, results, log = gradescope(zip_python, built.zip, built.solution, tmp_path,
                                  python_flags=("-S",))
    assert rc != 0, log
    (error,) = results["tests"]
    assert error["name"] == "Autograder Error" and error["visibility"] == "visible"
    assert "course_runtime" in error["output"] and "otter" in error["output"], error
