"""The nbgrader export: an otter master becomes an nbgrader source notebook that nbgrader itself
accepts, releases without solutions or hidden tests, and grades as otter does (the solution
scores full marks, the untouched release zero on every autograded cell)."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import nbformat
import pytest

from grader.cli import main
from grader.labs import Lab
from grader.leaks import solution_lines
from grader.nbgrader_export import (
    COURSE_ID,
    ConversionError,
    convert,
    nbgrader,
    parse_test,
    write_course,
)

LAB = Lab("lab01_autograd")
# nbgrader's own imports trip a traitlets deprecation warning
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:traitlets")


def otter_tests(master: Path) -> dict[str, tuple[float, bool]]:
    """{test function: (points, hidden)} as written in the master's test cells."""
    found = {}
    for cell in nbformat.read(master, as_version=4).cells:
        if cell.cell_type == "code" and "# BEGIN TEST CONFIG" in cell.source:
            config, _, name, _ = parse_test(cell.source, "?")
            found[name] = (config.get("points"), bool(config.get("hidden")))
    return found


def grade_cells(notebook) -> list:
    return [c for c in notebook.cells if c.metadata.get("nbgrader", {}).get("grade")]


def master_of(*cells) -> nbformat.NotebookNode:
    """A small otter master from (cell type, source) pairs."""
    new = {"raw": nbformat.v4.new_raw_cell, "code": nbformat.v4.new_code_cell,
           "markdown": nbformat.v4.new_markdown_cell}
    return nbformat.v4.new_notebook(
        cells=[new[kind](textwrap.dedent(source).strip()) for kind, source in cells],
        metadata={"kernelspec": {"name": "python3", "language": "python",
                                 "display_name": "Python 3"}})


QUESTION = [
    ("raw", "# ASSIGNMENT CONFIG\nname: tiny"),
    ("raw", "# BEGIN QUESTION\nname: q1\npoints: 3"),
    ("raw", "# BEGIN SOLUTION"),
    ("code", """\
        def double(x):
            y = x * 2  # SOLUTION
            return y
    """),
    ("raw", "# END SOLUTION"),
    ("raw", "# BEGIN TESTS"),
    ("code", '''\
        """ # BEGIN TEST CONFIG
        points: 1
        failure_message: double(2) should be 4
        """ # END TEST CONFIG
        def test_double(double):
            assert double(2) == 4
    '''),
    ("code", '''\
        """ # BEGIN TEST CONFIG
        hidden: true
        """ # END TEST CONFIG
        def test_double_hidden(double, env):
            assert double(-1) == -2 and "double" in env
    '''),
    ("raw", "# END TESTS"),
    ("raw", "# END QUESTION"),
]


def test_lab_converts_to_valid_nbgrader_cells():
    notebook, _ = convert(nbformat.read(LAB.master, as_version=4))
    tests = otter_tests(LAB.master)
    cells = grade_cells(notebook)
    assert len(cells) == len(tests), "one nbgrader test cell per otter test"
    assert sum(c.metadata.nbgrader.points for c in cells) == sum(p for p, _ in tests.values())
    for cell in cells:
        assert cell.metadata.nbgrader.locked and not cell.metadata.nbgrader.solution
        hidden = [name for name, (_, is_hidden) in tests.items() if is_hidden and
                  f"def {name}(" in cell.source]
        if hidden:
            before, _, after = cell.source.partition("### BEGIN HIDDEN TESTS")
            assert f"def {hidden[0]}(" in after.partition("### END HIDDEN TESTS")[0]
            assert hidden[0] not in before + cell.metadata.nbgrader.grade_id
    answers = [c for c in notebook.cells if c.metadata.get("nbgrader", {}).get("solution")]
    assert answers and all("### BEGIN SOLUTION" in c.source for c in answers)
    assert not any(c.cell_type == "raw" for c in notebook.cells), "otter's raw cells are dropped"


def test_test_cells_call_the_test_with_notebook_globals():
    notebook, _ = convert(master_of(*QUESTION))
    public, hidden = grade_cells(notebook)
    assert public.metadata.nbgrader.points == 1 and hidden.metadata.nbgrader.points == 2
    namespace: dict = {}
    exec(notebook.cells[0].source.replace("### BEGIN SOLUTION", "").replace(
        "### END SOLUTION", ""), namespace)
    exec(public.source, namespace)
    exec(hidden.source, namespace)
    assert 'double=globals().get("double")' in public.source
    assert "env=globals()" in hidden.source


def test_failing_test_raises_with_its_failure_message(capsys):
    notebook, _ = convert(master_of(*QUESTION))
    namespace = {"double": lambda x: x}
    with pytest.raises(AssertionError):
        exec(grade_cells(notebook)[0].source, namespace)
    assert "double(2) should be 4" in capsys.readouterr().out


def test_missing_global_reaches_the_test_as_none():
    notebook, _ = convert(master_of(*QUESTION))
    namespace: dict = {}
    with pytest.raises(TypeError, match="'NoneType' object is not callable"):
        exec(grade_cells(notebook)[0].source, namespace)


def test_single_line_solution_becomes_a_region():
    notebook, _ = convert(master_of(*QUESTION))
    assert notebook.cells[0].source.splitlines() == [
        "def double(x):", "    ### BEGIN SOLUTION", "    y = x * 2", "    ### END SOLUTION",
        "    return y"]
    assert notebook.cells[0].metadata.nbgrader.grade_id == "q1-answer"


def test_otter_machinery_cells_are_dropped():
    notebook, _ = convert(master_of(
        ("code", 'import otter\ngrader = otter.Notebook("tiny.ipynb")'), *QUESTION,
        ("code", 'grader.check("q1")'), ("code", "# submit\ngrader.export(pdf=False)")))
    assert [c.metadata.nbgrader.grade_id for c in notebook.cells] == [
        "q1-answer", "q1-test_double", "q1-hidden-2"]


@pytest.mark.parametrize("cells, message", [
    ([("raw", "# BEGIN QUESTION\nname: q9\nmanual: true")], "manual"),
    ([("raw", "# BEGIN QUESTION\nname: q9"), ("raw", "# BEGIN SOLUTION"),
      ("markdown", "An answer.")], "markdown"),
    ([("code", "x = 1  # SEED")], "seed"),
    ([("raw", "# BEGIN QUESTION\nname: q9"), ("raw", "# BEGIN TESTS"),
      ("code", "x = 1\nassert x == 1")], "one test function"),
    ([("raw", "# BEGIN TESTS")], "outside a question"),
])
def test_unsupported_otter_constructs_fail_loudly(cells, message):
    with pytest.raises(ConversionError, match=message):
        convert(master_of(*cells))


def test_course_ships_the_files_the_master_lists(tmp_path):
    master_dir = tmp_path / "solutions" / "tiny"
    (master_dir / "data").mkdir(parents=True)
    (master_dir / "data" / "points.csv").write_text("x\n1\n")
    (master_dir / "helper.py").write_text("VALUE = 1\n")
    config = ("raw", "# ASSIGNMENT CONFIG\nname: tiny\nfiles:\n  - helper.py\n  - data")
    nbformat.write(master_of(config, *QUESTION[1:]), master_dir / "tiny.ipynb")
    source = write_course(master_dir / "tiny.ipynb", tmp_path / "course")
    assert source == tmp_path / "course" / "source" / "tiny" / "tiny.ipynb"
    assert (source.parent / "helper.py").read_text() == "VALUE = 1\n"
    assert (source.parent / "data" / "points.csv").exists()
    assert (tmp_path / "course" / "nbgrader_config.py").exists()


@pytest.mark.slow
def test_nbgrader_releases_and_grades_the_lab(tmp_path):
    from nbgrader.api import Gradebook

    course = tmp_path / "course"
    assert main(["nbgrader", LAB.name, "--out", str(course)]) == 0
    source = course / "source" / LAB.name / f"{LAB.name}.ipynb"
    release = course / "release" / LAB.name / f"{LAB.name}.ipynb"

    released = release.read_text()
    hidden = [name for name, (_, is_hidden) in otter_tests(LAB.master).items() if is_hidden]
    assert "BEGIN SOLUTION" not in released and "HIDDEN TESTS" not in released
    assert not [line for line in solution_lines(LAB) if line in released], "solution code leaked"
    assert not [name for name in hidden if name in released], "hidden tests leaked"

    for student, notebook in (("solution", source), ("untouched", release)):
        target = course / "submitted" / student / LAB.name
        target.mkdir(parents=True)
        shutil.copyfile(notebook, target / notebook.name)
    nbgrader(course, "autograde", LAB.name, timeout=240)

    graded = nbformat.read(course / "autograded" / "untouched" / LAB.name / release.name,
                           as_version=4)
    restored = "\n".join(c.source for c in grade_cells(graded))
    assert all(f"def {name}(" in restored for name in hidden), "hidden tests were not run"

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", COURSE_ID) as gradebook:
        def scores(student: str) -> dict[str, tuple[float, float]]:
            submission = gradebook.find_submission_notebook(LAB.name, LAB.name, student)
            return {g.name: (g.auto_score, g.max_score) for g in submission.grades}

        full, untouched = scores("solution"), scores("untouched")
    tests = otter_tests(LAB.master)
    assert len(full) == len(tests)
    assert sum(possible for _, possible in full.values()) == sum(p for p, _ in tests.values())
    lost = {cell: s for cell, s in full.items() if s[0] != s[1]}
    assert not lost, f"the solution loses points: {lost}"
    earned = {cell: s for cell, s in untouched.items() if s[0] != 0}
    assert not earned, f"the untouched release earns points: {earned}"
