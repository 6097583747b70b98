"""`make release`: what students receive, as a folder that is its own git repository.

It holds the labs with their public tests (from a fresh assign of every master, so never a
student's work), the runtime package with a pyproject of its own, the rendered book, and a
README with two commands. Nothing else: no master, no hidden test, no check, and no function of
the reference. ``release_leaks`` proves it by content, not by file names alone, and the build
refuses a release that fails it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .labs import DIST, REPO, all_labs

TEMPLATE = Path(__file__).resolve().parent / "release"
MARKER = ".course-release"
# What a student's environment needs beyond the runtime's own dependencies: otter (the
# notebooks' grader.check), a kernel, and nbclient (the headless self-check).
# Everything a release holds, at its top level (tests/test_docker.py builds the student image's
# context from this list).
LAYOUT = ("README.md", "Makefile", "pyproject.toml", "requirements/constraints.txt", "labs/",
          "course_runtime/", "book/", ".gitignore", ".dockerignore", MARKER)
STUDENT_EXTRAS = ["otter-grader==7.0.0", "ipykernel>=6.29", "nbclient>=0.10", "nbformat>=5.10"]


def release_pyproject() -> str:
    """The runtime's own distribution, with the course's runtime dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    version = project["version"]
    dependencies = [*project["dependencies"], *STUDENT_EXTRAS]
    lab = [d for d in project["optional-dependencies"]["course"] if d.startswith("jupyterlab")]
    listed = "".join(f'    "{d}",\n' for d in dependencies)
    return f'''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "ai-systems-course-runtime"
version = "{version}"
description = "AI Systems, hands-on: what the labs import"
readme = "README.md"
requires-python = "{project["requires-python"]}"
license = {{ text = "MIT" }}
dependencies = [
{listed}]

[project.optional-dependencies]
lab = {lab!r}

[tool.setuptools.packages.find]
include = ["course_runtime*"]

[tool.setuptools.package-data]
"course_runtime.assets" = ["corpus/*", "weights/*"]
'''.replace("'", '"')


def _ignore(directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n in ("__pycache__", ".ipynb_checkpoints") or n.endswith(".pyc")}


def build_release(out: Path, book_html: Path) -> Path:
    """Write the release into ``out`` (replacing an earlier release there) and commit it."""
    from .assign import build
    from .leaks import release_leaks

    if not (book_html / "index.html").exists():
        raise SystemExit(f"no book at {book_html}: run `make book` first")
    if out.exists():
        if not (out / MARKER).exists():
            raise SystemExit(f"{out} exists and is not a release this command wrote; not "
                             "touching it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by `make release`; the next release replaces this folder\n")
    with tempfile.TemporaryDirectory(prefix="release-") as tmp:
        for lab in all_labs():
            build(lab, Path(tmp) / lab.name)
            shutil.copytree(Path(tmp) / lab.name / "student", out / "labs" / lab.name)
    shutil.copytree(REPO / "course_runtime", out / "course_runtime", ignore=_ignore)
    (out / "requirements").mkdir()
    shutil.copy(REPO / "requirements" / "constraints.txt", out / "requirements")
    for name in ("README.md", "Makefile"):
        shutil.copy(TEMPLATE / name, out / name)
    shutil.copy(TEMPLATE / "gitignore", out / ".gitignore")
    shutil.copy(TEMPLATE / "dockerignore", out / ".dockerignore")
    (out / "pyproject.toml").write_text(release_pyproject())
    # The rendered book, without the page sources and the build's caches.
    shutil.copytree(book_html, out / "book", ignore=lambda d, names: _ignore(d, names) | {
        n for n in names if n in ("_sources", ".doctrees", ".buildinfo", "reports")})
    problems = release_leaks(out)
    if problems:
        raise SystemExit("the release would give students answers:\n  " + "\n  ".join(problems))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    git = ["git", "-c", "user.name=course release", "-c", "user.email=release@course.invalid"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["commit", "-q", "-m", f"The labs and the book, released from {commit}"]):
        subprocess.run([*git, *args], cwd=out, check=True, capture_output=True)
    return out


def default_out() -> Path:
    return DIST / "release"
