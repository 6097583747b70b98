"""Make otter's autograder zip self-contained: everything grading needs travels inside it.

otter generate writes a zip whose environment installs otter alone, so graded anywhere but here
every test failed with ModuleNotFoundError and the submission scored zero, silently. The zip
that `course assign` ships adds:

* ``wheels/ai_systems_course-*.whl``: the course's packages (runtime, reference, checks),
  built from this checkout, with the weights and data they load;
* ``constraints.txt`` (``requirements/constraints.txt``) and ``requirements.txt``: torch's CPU
  build and every dependency at the pinned versions, the wheel last; ``environment.yml``, which
  otter's ``setup.sh`` builds with mamba on Gradescope's image, installs exactly these;
* ``run_otter.py``: before grading, imports what the lab needs and, if anything is missing,
  writes an "Autograder Error" that says what (and exits non-zero) instead of grading; then
  grades with ``grader.gradescope`` (the course's cell limit, per-question grading and feedback);
* ``otter_config.json``: no score summary on stdout, stdout hidden from students.
"""

from __future__ import annotations

import atexit
import io
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import cache
from pathlib import Path

import yaml

from .labs import REPO

CONSTRAINTS = REPO / "requirements" / "constraints.txt"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
NEEDED_MODULES = ("otter", "numpy", "torch", "course_runtime", "course_reference",
                  "grader.checks", "grader.gradescope")
PACKAGES = ("course_runtime", "course_reference", "grader")

RUN_OTTER = '''"""Grade one submission: check the environment, then run the course's autograder."""

import json
import os
import sys
import traceback

AUTOGRADER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDED = {needed!r}


def autograder_error(message):
    results = os.path.join(AUTOGRADER_DIR, "results")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "results.json"), "w") as f:
        json.dump({{"score": 0, "stdout_visibility": "hidden", "tests": [{{
            "name": "Autograder Error", "status": "failed", "visibility": "visible",
            "output": message}}]}}, f, indent=2)
    print(message, file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    missing = []
    for name in NEEDED:
        try:
            __import__(name)
        except Exception as error:  # noqa: BLE001 - report every module that fails
            missing.append(f"  {{name}}: {{type(error).__name__}}: {{error}}")
    if missing:
        autograder_error(
            "Nothing was graded: the grading environment cannot import what this lab needs "
            "(the autograder's setup failed; this is not the submission's fault, tell your "
            "instructor):\\n" + "\\n".join(missing) + f"\\nPython: {{sys.executable}}")
    try:
        from grader.gradescope import main
        main(AUTOGRADER_DIR)
    except SystemExit:
        raise
    except Exception:  # noqa: BLE001 - an error of the grader itself, not of the submission
        autograder_error("The autograder failed (tell your instructor):\\n" +
                         traceback.format_exc())
'''


@cache
def course_wheel() -> Path:
    """A wheel of the course's packages from this checkout (built once per process)."""
    out = Path(tempfile.mkdtemp(prefix="course-wheel-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns(
            "__pycache__", "*.pyc", "dist", ".ipynb_checkpoints"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(src)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the course's wheel failed:\n{result.stderr}")
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel, found {wheels}")
    return wheels[0]


def requirements(wheel_name: str) -> list[str]:
    """What the grading environment installs besides otter, every version pinned."""
    torch = next(line for line in CONSTRAINTS.read_text().splitlines()
                 if line.startswith("torch=="))
    return [f"--extra-index-url {TORCH_CPU_INDEX}", "-c constraints.txt", torch,
            f"./wheels/{wheel_name}"]


def make_self_contained(zip_path: Path) -> None:
    """Rewrite ``zip_path`` in place with the course's wheel, pins and entry point."""
    wheel = course_wheel()
    with zipfile.ZipFile(zip_path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    environment = yaml.safe_load(entries["environment.yml"])
    for dependency in environment["dependencies"]:
        if isinstance(dependency, dict) and "pip" in dependency:
            otter = [d for d in dependency["pip"] if d.startswith("otter-grader")]
            dependency["pip"] = otter + requirements(wheel.name)
    config = json.loads(entries.get("otter_config.json", b"{}"))
    config.update({"print_summary": False, "show_stdout": False, "show_hidden": True})
    entries.update({
        "environment.yml": yaml.safe_dump(environment, sort_keys=False).encode(),
        "requirements.txt": ("\n".join(requirements(wheel.name)) + "\n").encode(),
        "constraints.txt": CONSTRAINTS.read_bytes(),
        f"wheels/{wheel.name}": wheel.read_bytes(),
        "run_otter.py": RUN_OTTER.format(needed=NEEDED_MODULES).encode(),
        "otter_config.json": json.dumps(config, indent=2).encode(),
    })
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if name in ("setup.sh", "run_autograder") else 0o644) << 16
            archive.writestr(info, entries[name], zipfile.ZIP_DEFLATED)
    zip_path.write_bytes(buffer.getvalue())
