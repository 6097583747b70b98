"""Every use the grader makes of otter-grader beyond its documented API, in one place.

The course keeps otter's formats (the autograder zip, ``results.json`` for Gradescope, the CSV
of ``otter grade``) and otter's runner, and changes three things inside them:

* the notebook is graded by ``grader.isolated.grade_notebook`` (the submission in a process of
  its own) instead of ``otter.execute.grade_notebook``: ``replace_notebook_grading`` puts it
  where otter's Python runner looks the function up;
* each test case of a file is run alone, an interrupted or failed case failing alone with a
  message in words (otter's default quotes the test's source line, which for a hidden test shows
  its inputs): ``fail_cases_alone`` replaces ``ExceptionTestFile.run``;
* Gradescope's results are written by the course (public results visible, hidden ones after
  publication): ``replace_gradescope_results`` replaces ``GradingResults.to_gradescope_dict``.

otter's plugin events (``before_grading``, ``after_grading``, ...) run around the grading, not
in place of it, so none of the three can be a plugin. Everything else the grader needs of otter
(its test-file and result classes, its scores table) is reached through the names below. Each
internal relied on has a contract test in ``tests/test_otter_contract.py``; an otter other than
the versions in ``SUPPORTED`` is refused by ``check_version`` before anything is graded, so an
upgrade fails loudly here instead of silently losing partial results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SUPPORTED = ("7.0.0",)  # the otter-grader versions this adapter was written and tested for


class UnsupportedOtter(RuntimeError):
    pass


def check_version(version: str | None = None) -> None:
    """Refuse an otter-grader this adapter was not written for, saying what to do."""
    if version is None:
        import otter
        version = otter.__version__
    if version not in SUPPORTED:
        raise UnsupportedOtter(
            f"otter-grader {version} is installed, but the course's grader was written for "
            f"{', '.join(SUPPORTED)} (grader/otter_adapter.py). Install the pinned version "
            "(pip install -c requirements/constraints.txt otter-grader), or update the adapter "
            "and run its contract tests (tests/test_otter_contract.py).")


# -- otter's classes and functions, by the names the grader uses -----------------------------

def grading_results(test_files: list[Any]) -> Any:
    """otter's ``GradingResults`` of the given test files."""
    from otter.test_files import GradingResults
    return GradingResults(test_files)


def load_test_file(path: str) -> Any:
    """An otter test file (``tests/qN.py``) read from ``path``, its cases not yet run."""
    from otter.test_files import create_test_file
    return create_test_file(str(path), None)


def case_result(case: Any, passed: bool, message: str) -> Any:
    """otter's record of one test case's outcome."""
    from otter.test_files.abstract_test import TestCaseResult
    return TestCaseResult(test_case=case, message=message, passed=passed)


def resolve_points(total: Any, tests: list[tuple[str, str, bool, Any]]) -> list[float]:
    """Each test's points from the question's ``points`` and the tests' own, as otter resolves
    them; ``tests`` are (name, source, hidden, points)."""
    from otter.test_files.abstract_test import TestCase, TestFile
    cases = [TestCase(name, source, hidden, points, None, None)
             for name, source, hidden, points in tests]
    return [case.points for case in TestFile.resolve_test_file_points(total, cases)]


def scores_table(results: list[Any]) -> Any:
    """``otter grade``'s table (a ``points-per-question`` row, one row per submission)."""
    from otter.grade.utils import merge_scores_to_df
    return merge_scores_to_df(results)


def score_columns() -> set[str]:
    """The columns of ``scores_table`` that are not questions."""
    from otter.grade import utils
    return {utils.SCORES_DICT_FILE_KEY, utils.SCORES_DICT_GRADING_STATUS_KEY,
            utils.SCORES_DICT_PERCENT_CORRECT_KEY, utils.SCORES_DICT_TOTAL_POINTS_KEY}


def grade_submission(submission: str, autograder_zip: str) -> Any:
    """otter's documented API: grade one submission with an autograder zip, in this process."""
    check_version()
    from otter.api import grade_submission as grade
    return grade(submission, autograder_zip, quiet=False)


def run_autograder(autograder_dir: str) -> None:
    """otter's Gradescope entry point (``otter run`` and ``run_autograder`` call it)."""
    check_version()
    from otter.run.run_autograder import main
    main(autograder_dir)


# -- the three replacements --------------------------------------------------------------------

def replace_notebook_grading(grade_notebook: Callable[..., Any]) -> None:
    """Have otter's Python runner call ``grade_notebook(submission_path, tests_glob=...,
    cwd=..., test_dir=..., **rest)`` in place of ``otter.execute.grade_notebook``."""
    check_version()
    from otter.run.run_autograder.runners import python_runner
    python_runner.grade_notebook = grade_notebook


def replace_gradescope_results(to_dict: Callable[[Any], dict[str, Any]]) -> None:
    """Have otter write ``to_dict(results)`` as Gradescope's results.json."""
    check_version()
    from otter.test_files import GradingResults
    GradingResults.to_gradescope_dict = lambda self, ag_config: to_dict(self)


INTERRUPTED = ("❌ Test case failed\ninterrupted by the grader: this test ran past the per-cell "
               "time limit (an infinite loop, or far too slow)")


def fail_cases_alone() -> None:
    """Each case of a test file run alone: an exception, or an interrupt from the grader's time
    limit (which otter lets through, aborting the whole file), fails that case, with the
    exception in words."""
    from otter.test_files.exception_test import ExceptionTestFile

    def run(self: Any, global_environment: dict) -> None:
        self.test_case_results = []
        for case in self.test_cases:
            case.body.function_name = case.body.test_func.__name__  # survives pickling
            passed, message = True, "✅ Test case passed"
            try:
                case.body.call_func(global_environment)
            except Exception as error:  # noqa: BLE001 - the case fails, in words
                passed, message = False, f"❌ Test case failed\n{type(error).__name__}: {error}"
            except KeyboardInterrupt:
                passed, message = False, INTERRUPTED
            self.test_case_results.append(case_result(case, passed, message))

    check_version()
    ExceptionTestFile.run = run
