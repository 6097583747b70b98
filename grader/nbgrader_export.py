"""`course nbgrader LAB`: a lab as an nbgrader course, converted from its otter master.

nbgrader 0.9.6 cannot read an otter-assign master, so the master is converted into an nbgrader
*source* notebook, beside (not instead of) the otter student notebook and autograder zip:

* a code cell with ``# BEGIN SOLUTION`` / ``# END SOLUTION`` lines (or a ``# SOLUTION`` line)
  becomes a solution cell whose regions are ``### BEGIN SOLUTION`` / ``### END SOLUTION``;
* each otter test becomes one autograded, locked test cell worth that test's points, so a
  question keeps otter's partial credit; a hidden test goes inside ``### BEGIN HIDDEN TESTS`` /
  ``### END HIDDEN TESTS``, which nbgrader strips from the release and restores when grading;
* an otter test function takes notebook globals by name (``env`` is the whole namespace), so
  the test cell calls it with them, ``None`` for a name the notebook never defined, as otter does;
* otter's raw cells (assignment config, question, solution and test delimiters) are dropped, and
  so are cells of otter's own machinery (`grader = otter.Notebook()`, `grader.check("q1")`, ...).

Then ``nbgrader generate_assignment`` (offline, sqlite gradebook in the course folder) writes
``release/<lab>/``, the notebook students would receive.
"""

from __future__ import annotations

import ast
import copy
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import yaml

from .labs import DIST, Lab

COURSE_ID = "ai-systems-hands-on"
SCHEMA_VERSION = 3

CONFIG = f'''\
"""nbgrader configuration of this course folder, written by `course nbgrader`."""

c = get_config()  # noqa: F821 - defined by traitlets when it loads this file
c.CourseDirectory.course_id = "{COURSE_ID}"
# nbgrader's default of 30 s per cell is too short for the labs: a cell trains a model or times
# three engines against each other.
c.Execute.timeout = 600
'''

RAW_MARKERS = ("ASSIGNMENT CONFIG", "BEGIN QUESTION", "END QUESTION", "BEGIN SOLUTION",
               "END SOLUTION", "BEGIN TESTS", "END TESTS")
BEGIN_SOLUTION = re.compile(r"(\s*)# BEGIN SOLUTION( NO PROMPT)?\s*$")
END_SOLUTION = re.compile(r"(\s*)# END SOLUTION\s*$")
SOLUTION_LINE = re.compile(r"^(\s*)(.*?)\s*# ?SOLUTION( NO PROMPT)?\s*$")
# Otter constructs this converter does not translate: fail rather than ship them to students.
UNSUPPORTED_LINE = re.compile(r"#\s*(BEGIN|END) (PROMPT|IGNORE)\b|# (SEED|IGNORE)\s*$")
OTTER_CALL = re.compile(r"import otter|grader\s*=\s*otter\.Notebook\(.*\)|"
                        r"grader\.(check|check_all|export)\(.*\)")
TEST_CONFIG = re.compile(r'^\s*"""\s*# BEGIN TEST CONFIG\n(.*?)\n\s*"""\s*# END TEST CONFIG\s*\n',
                         re.DOTALL)


class ConversionError(ValueError):
    """The master uses an otter feature that has no nbgrader translation here."""


@dataclass
class OtterTest:
    """One otter test case: a function whose arguments are notebook globals by name."""

    function: str
    arguments: list[str]
    source: str
    points: float | None
    hidden: bool
    success_message: str | None = None
    failure_message: str | None = None


def _raw_marker(cell: Any) -> tuple[str, dict[str, Any]] | None:
    """('BEGIN QUESTION', {its YAML}) for an otter raw cell, None for any other cell."""
    if cell.cell_type != "raw":
        return None
    first, _, rest = cell.source.strip().partition("\n")
    marker = first.strip().removeprefix("#").strip().upper()
    if marker not in RAW_MARKERS:
        return None
    return marker, (yaml.safe_load(rest) or {})


def parse_test(source: str, question: str) -> tuple[dict[str, Any], str, str, list[str]]:
    """Split an otter test cell into (config, function source, function name, arguments)."""
    match = TEST_CONFIG.match(source)
    config = yaml.safe_load(match.group(1)) if match else {}
    body = source[match.end():] if match else source
    tree = ast.parse(body)
    function = tree.body[0] if tree.body else None
    if not isinstance(function, ast.FunctionDef) or len(tree.body) > 2:
        raise ConversionError(f"{question}: a test cell must hold one test function (and at most "
                              f"a call to it), got:\n{source}")
    arguments = [a.arg for a in function.args.posonlyargs + function.args.args +
                 function.args.kwonlyargs]
    start = (function.decorator_list[0].lineno if function.decorator_list else function.lineno)
    lines = body.split("\n")[start - 1:function.end_lineno]
    return config, "\n".join(lines).rstrip(), function.name, arguments


def resolve_points(question: dict[str, Any], tests: list[OtterTest]) -> None:
    """Each test's points, resolved from the question's and the tests' configs as otter does."""
    from .otter_adapter import resolve_points as resolve

    total = question.get("points")
    if isinstance(total, dict):
        total = total.get("each", 1) * len(tests)
    points = resolve(total, [(t.function, t.source, t.hidden, t.points) for t in tests])
    for test, value in zip(tests, points):
        test.points = value


def call_with_globals(test: OtterTest) -> str:
    """The call of a test function with the notebook's globals, as otter's ``call_func``."""
    arguments = [f'{a}=globals()' if a == "env" else f'{a}=globals().get("{a}")'
                 for a in test.arguments]
    one_line = f"{test.function}({', '.join(arguments)})"
    if len(one_line) <= 100:
        return one_line
    return f"{test.function}(\n" + "".join(f"    {a},\n" for a in arguments) + ")"


def _points(value: float) -> str:
    return f"{value:g} point" + ("" if value == 1 else "s")


def grade_cell_source(question: str, test: OtterTest) -> str:
    """The test function, its call and, for a hidden test, nbgrader's hidden-test markers."""
    call = call_with_globals(test)
    if test.failure_message:
        call = (f"try:\n{textwrap.indent(call, '    ')}\nexcept Exception:\n"
                f"    print({test.failure_message!r})\n    raise")
    code = f"{test.source}\n\n\n{call}"
    if test.success_message:
        code += f"\nprint({test.success_message!r})"
    if test.hidden:
        return (f"# {question}, hidden test ({_points(test.points)}): it runs when your notebook "
                f"is graded.\n### BEGIN HIDDEN TESTS\n{code}\n### END HIDDEN TESTS")
    return f"# {question}, public test ({_points(test.points)})\n{code}"


def solution_source(source: str) -> str | None:
    """The cell with otter's solution markers as nbgrader's, or None if it has none."""
    lines, marked = [], False
    for line in source.split("\n"):
        if begin := BEGIN_SOLUTION.match(line):
            lines.append(f"{begin.group(1)}### BEGIN SOLUTION")
            marked = True
        elif end := END_SOLUTION.match(line):
            lines.append(f"{end.group(1)}### END SOLUTION")
        elif single := SOLUTION_LINE.match(line):
            indent, code = single.group(1), single.group(2)
            lines += [f"{indent}### BEGIN SOLUTION", f"{indent}{code}", f"{indent}### END SOLUTION"]
            marked = True
        else:
            lines.append(line)
    return "\n".join(lines) if marked else None


def _nbgrader_metadata(grade_id: str, *, solution: bool = False, grade: bool = False,
                       locked: bool = False, points: float | None = None) -> dict[str, Any]:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked,
            "schema_version": SCHEMA_VERSION, "solution": solution}
    if points is not None:
        meta["points"] = points
    return meta


def grade_cells(question: dict[str, Any], tests: list[OtterTest]) -> list[Any]:
    """One locked, autograded cell per otter test of ``question``, worth that test's points."""
    resolve_points(question, tests)
    cells = []
    for number, test in enumerate(tests, 1):
        # a hidden test's name is not shown to students, even in the cell metadata
        suffix = f"hidden-{number}" if test.hidden else test.function
        cells.append(nbformat.v4.new_code_cell(
            grade_cell_source(question["name"], test),
            metadata={"nbgrader": _nbgrader_metadata(f"{question['name']}-{suffix}", grade=True,
                                                     locked=True, points=test.points)}))
    return cells


def is_otter_cell(source: str) -> bool:
    """A cell of otter's own machinery: `import otter`, `grader = otter.Notebook(...)`,
    `grader.check(...)`, `grader.check_all()`, `grader.export(...)`."""
    lines = [line.strip() for line in source.split("\n")
             if line.strip() and not line.strip().startswith("#")]
    return bool(lines) and all(OTTER_CALL.fullmatch(line) for line in lines)


def convert(master: Any) -> tuple[Any, dict[str, Any]]:
    """(nbgrader source notebook, otter assignment config) from an otter-assign v1 master."""
    cells: list[Any] = []
    assignment: dict[str, Any] = {}
    question: dict[str, Any] | None = None
    block: str | None = None
    tests: list[OtterTest] = []
    answers: dict[str, int] = {}
    for cell in master.cells:
        marker = _raw_marker(cell)
        if marker is not None:
            name, config = marker
            if name == "ASSIGNMENT CONFIG":
                assignment = config
            elif name == "BEGIN QUESTION":
                if config.get("manual") or config.get("all_or_nothing"):
                    raise ConversionError(f"{config.get('name')}: manual and all-or-nothing "
                                          "questions are not converted to nbgrader")
                question, tests = config, []
            elif name == "END QUESTION":
                question = None
            elif question is None:
                raise ConversionError(f"'# {name}' outside a question")
            elif name in ("BEGIN SOLUTION", "BEGIN TESTS"):
                block = name.split()[1].lower()
            else:
                if name == "END TESTS":
                    cells += grade_cells(question, tests)
                block = None
            continue

        where = question["name"] if question else "notebook"
        if block == "tests":
            config, source, function, arguments = parse_test(cell.source, where)
            tests.append(OtterTest(function, arguments, source, config.get("points"),
                                   bool(config.get("hidden", False)),
                                   config.get("success_message"), config.get("failure_message")))
            continue
        if block == "solution" and cell.cell_type != "code":
            raise ConversionError(f"{where}: written (markdown) answers are not converted")
        cell = copy.deepcopy(cell)
        cell.metadata.pop("lines_to_next_cell", None)
        if cell.cell_type == "code":
            if is_otter_cell(cell.source):
                continue
            converted = solution_source(cell.source)
            if converted is not None:
                answers[where] = answers.get(where, 0) + 1
                suffix = "" if answers[where] == 1 else f"-{answers[where]}"
                cell = nbformat.v4.new_code_cell(converted, metadata={
                    **cell.metadata,
                    "nbgrader": _nbgrader_metadata(f"{where}-answer{suffix}", solution=True)})
            if any(UNSUPPORTED_LINE.search(line) for line in cell.source.split("\n")):
                raise ConversionError(f"{where}: otter prompt, seed or ignore markers are not "
                                      f"converted:\n{cell.source}")
        cells.append(cell)

    notebook = nbformat.v4.new_notebook(cells=cells, metadata={
        k: v for k, v in master.metadata.items() if k != "otter"})
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{index:03d}"
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    _validate(notebook)
    return notebook, assignment


def _validate(notebook: Any) -> None:
    """nbgrader's own checks of the cell metadata (ids present and unique, points on grades)."""
    from nbgrader.nbgraderformat import MetadataValidator

    MetadataValidator().validate_nb(notebook)


def write_course(master: Path, out: Path, name: str | None = None) -> Path:
    """Lay out an nbgrader course folder ``out`` for ``master``: nbgrader_config.py and
    source/<name>/ (the converted notebook and the files the master ships). Returns the
    source notebook. Other assignments, the gradebook and submissions already there are kept."""
    name = name or master.stem
    notebook, assignment = convert(nbformat.read(master, as_version=4))
    if assignment.get("autograder_files"):
        raise ConversionError(f"{name}: autograder_files have no nbgrader equivalent here")
    source = out / "source" / name
    if source.exists():
        shutil.rmtree(source)
    source.mkdir(parents=True)
    (out / "nbgrader_config.py").write_text(CONFIG)
    for shipped in assignment.get("files") or []:
        origin = master.parent / shipped
        target = source / shipped
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_dir():
            shutil.copytree(origin, target)
        else:
            shutil.copyfile(origin, target)
    path = source / f"{name}.ipynb"
    nbformat.write(notebook, path)
    return path


def nbgrader(course: Path, *arguments: str, timeout: float = 900) -> str:
    """Run an nbgrader command in the course folder; raise with its log if it fails."""
    # nbgrader creates a gradebook by running the `alembic` command, found on PATH: make it the
    # one beside this interpreter, also when its environment is not activated.
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]))
    result = subprocess.run([sys.executable, "-m", "nbgrader", *arguments], cwd=course, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"nbgrader {' '.join(arguments)} failed in {course}:\n"
                           f"{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def export_lab(lab: Lab, out: Path | None = None) -> Path:
    """Write the nbgrader course for ``lab`` into ``out`` (default grader/dist/nbgrader/) and
    generate its release; returns the released student notebook."""
    out = (out or DIST / "nbgrader").resolve()
    write_course(lab.master, out, lab.name)
    nbgrader(out, "generate_assignment", lab.name, "--force")
    return out / "release" / lab.name / f"{lab.name}.ipynb"
