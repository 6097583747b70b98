"""`make assign`: otter assign for every lab, into grader/dist/ (built, never committed).

otter assign writes cell ids at random and a timestamped zip; this wrapper renumbers the ids so
that labs/ only changes when the master does, gives the zip a stable name, and refuses a master
whose solution does not score 100 %. It writes labs/ (committed) only when asked
(``update_labs``), through ``grader.student_folder``, which never overwrites a student's work.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

from course_runtime.testing import EXPECTED_FILE

from .autograder_zip import make_self_contained
from .labs import DIST, REPO, Lab


def normalize_notebook(path: Path) -> None:
    """Stable cell ids and no execution state, so regenerated notebooks diff cleanly."""
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{index:03d}"
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("lines_to_next_cell", None)
    nbformat.write(nb, path)


def run_otter_assign(lab: Lab, master: Path, out: Path, run_tests: bool = False) -> None:
    """otter assign MASTER OUT. Its own test run only prints; ``assign`` grades the solution
    with the batch grader instead, which fails loudly."""
    flags = ["--no-pdfs"] + ([] if run_tests else ["--no-run-tests"])
    result = subprocess.run(
        [sys.executable, "-m", "otter", "assign", *flags, str(master), str(out)],
        capture_output=True, text=True, cwd=master.parent)
    if result.returncode != 0:
        raise RuntimeError(f"otter assign failed for {lab.name}:\n{result.stdout}\n{result.stderr}")
    for name in ("student", "autograder"):
        for notebook in (out / name).glob("*.ipynb"):
            normalize_notebook(notebook)


def public_expectations(lab: Lab) -> dict | None:
    """What the reference computes for the lab's public test cases, if its checks say
    (``public_expectations()`` in grader/checks/<lab>.py): the public tests compare with these
    values, shipped as data, because students do not receive the reference."""
    module = importlib.import_module(f"grader.checks.{lab.name}")
    make = getattr(module, "public_expectations", None)
    return make() if make is not None else None


def build(lab: Lab, out: Path) -> None:
    """Assign ``lab`` into the folder ``out`` (student/ and autograder/ inside).

    otter assign runs on a copy of the master's folder, into which the public tests' expected
    values are written first (``expected.json``, listed in the master's ``files:``), so that
    nothing generated is ever written into solutions/.
    """
    if out.exists():
        shutil.rmtree(out)
    source = out.parent / f"{out.name}-source"
    if source.exists():
        shutil.rmtree(source)
    shutil.copytree(lab.master.parent, source,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    try:
        data = public_expectations(lab)
        if data is not None:
            (source / EXPECTED_FILE).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        run_otter_assign(lab, source / lab.master.name, out)
        for zip_path in (out / "autograder").glob("*-autograder_*.zip"):
            make_self_contained(zip_path)
    finally:
        shutil.rmtree(source, ignore_errors=True)


def assign(lab: Lab, check: bool = True, update_labs: bool = False, force: bool = False) -> None:
    """Build ``lab`` into grader/dist/<lab>/ and its zip; update labs/<lab>/ if ``update_labs``."""
    from .grade import grade_one_in_subprocess
    from .student_folder import out_of_sync, update_student_folder

    out = DIST / lab.name
    build(lab, out)
    zips = sorted((out / "autograder").glob("*-autograder_*.zip"))
    if len(zips) != 1:
        raise RuntimeError(f"expected one autograder zip for {lab.name}, found {zips}")
    shutil.copyfile(zips[0], lab.autograder_zip)
    shutil.copyfile(out / "autograder" / f"{lab.name}.ipynb", lab.solution_notebook)
    print(f"{lab.name}: wrote {lab.autograder_zip.relative_to(REPO)} and "
          f"{(out / 'student').relative_to(REPO)}/")
    if update_labs:
        written = update_student_folder(lab, out / "student", force=force)
        print(f"{lab.name}: labs/{lab.name}/ " +
              (f"updated ({len(written)} files)" if written else "already up to date"))
    elif problems := out_of_sync(lab, out / "student"):
        print(f"{lab.name}: labs/{lab.name}/ differs from this build ({problems[0]}, ...); "
              "`make update-labs` updates it, never overwriting a changed notebook")
    if check:
        outcome = grade_one_in_subprocess(lab.autograder_zip, lab.solution_notebook,
                                          timeout=900, memory_gb=6)
        if outcome.results is None or outcome.results.percent < 1:
            raise SystemExit(f"{lab.name}: the solution does not score 100 %:\n{outcome.log}")
        print(f"{lab.name}: the solution scores {outcome.results.total:g}/"
              f"{outcome.results.possible:g}")
