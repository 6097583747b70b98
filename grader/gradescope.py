"""Grading inside an autograder zip (Gradescope, or `otter grade` in a container): otter's own
autograder, with what the course adds on every grading path.

The zip's ``run_otter.py`` checks that the environment can import what the lab needs (else it
writes an autograder error, never a silent zero) and then calls :func:`main`, which installs the
same changes as the batch grader (``grader.grade_one``): the submission graded in a process of
its own (``grader.isolated``), with a time limit per notebook cell, each question graded where
its check cell stands, an interrupted test failing alone. Students' feedback
(:func:`gradescope_results`) shows each result once, in words: the public tests in one entry
visible at once, each question's hidden tests in an entry visible after the grades are
published, with no test source quoted and no grading stdout.
"""

from __future__ import annotations

import os
from typing import Any

CELL_TIMEOUT = int(os.environ.get("COURSE_CELL_TIMEOUT", "300"))


def _result_lines(test_file: Any, hidden: bool) -> tuple[list[str], float, float]:
    """One line per test case of ``test_file`` with the given visibility, and the points."""
    lines, score, possible = [], 0.0, 0.0
    for result in test_file.test_case_results:
        case = result.test_case
        if bool(case.hidden) != hidden:
            continue
        points = case.points or 0
        possible += points
        score += points if result.passed else 0
        name = getattr(case.body, "function_name", None) or case.name
        if result.passed:
            lines.append(f"✅ {name}" + (f": {case.success_message}" if case.success_message
                                         else ": passed"))
        else:
            message = in_words(result.message)
            lines.append(f"❌ {name}: {message}")
    return lines, score, possible


def in_words(message: str) -> str:
    """otter's failure message without its header and any quoted test source."""
    lines = message.replace("❌ Test case failed", "").strip().splitlines()
    if lines and lines[0].startswith("Error at line"):
        lines = lines[1:]
        while lines and lines[0].startswith("  "):
            lines = lines[1:]
    return "\n".join(lines).strip() or "failed"


def gradescope_results(results: Any) -> dict[str, Any]:
    """Gradescope's results.json for otter's ``GradingResults``."""
    if results._catastrophic_error:
        return {"score": 0, "tests": [{
            "name": "Autograder Error", "status": "failed", "visibility": "visible",
            "output": "The submission could not be graded: "
                      f"{type(results._catastrophic_error).__name__}: "
                      f"{results._catastrophic_error}. Tell your instructor."}]}
    public, tests = [], []
    for name in results.test_files:
        test_file = results.get_result(name)
        lines, _, _ = _result_lines(test_file, hidden=False)
        if lines:
            public.append(f"{name}:\n  " + "\n  ".join(lines))
        hidden_lines, _, _ = _result_lines(test_file, hidden=True)
        tests.append({"name": name, "score": round(test_file.score, 5),
                      "max_score": round(test_file.possible, 5),
                      "visibility": "after_published",
                      "output": "\n".join(hidden_lines) or "no hidden tests"})
    summary = {"name": "Public tests (no points: they tell you whether you are on track)",
               "visibility": "visible",
               "status": "passed" if results.passed_all_public else "failed",
               "output": "\n".join(public) or "no public tests"}
    return {"tests": [summary, *tests], "score": round(sum(t["score"] for t in tests), 5),
            "stdout_visibility": "hidden"}


def install(cell_timeout: int = CELL_TIMEOUT, partial_results: str | None = None) -> None:
    """The course's changes to otter's grading (grader/otter_adapter.py), for this process:
    every notebook graded with the submission in a process of its own, each test case failing
    alone, and Gradescope's results in the course's words."""
    from . import isolated
    from .otter_adapter import (
        check_version,
        fail_cases_alone,
        replace_gradescope_results,
        replace_notebook_grading,
    )

    check_version()

    def grade_notebook(submission_path: str, **options: Any) -> Any:
        cwd = options.get("cwd") or os.getcwd()
        require_isolated(os.path.join(cwd, submission_path))
        isolated.CELL_TIMEOUT = float(cell_timeout)
        isolated.PARTIAL_RESULTS = partial_results
        return isolated.grade_notebook(submission_path, tests_glob=options["tests_glob"],
                                       cwd=cwd, test_dir=options.get("test_dir"))

    replace_notebook_grading(grade_notebook)
    replace_gradescope_results(gradescope_results)
    fail_cases_alone()


def require_isolated(notebook_path: str) -> None:
    """Every lab is graded with the submission in a process of its own: its checks say they
    can judge a submission that way (``ISOLATED = True`` in ``grader/checks/<lab>.py``). The
    lab is the notebook's otter assignment name, which otter has checked against the zip's."""
    import importlib

    import nbformat

    try:
        notebook = nbformat.read(notebook_path, as_version=4)
        name = notebook.metadata["otter"]["assignment_name"]
    except (KeyError, TypeError, ValueError, OSError) as error:
        raise RuntimeError(f"cannot tell which lab {os.path.basename(notebook_path)} is "
                           f"({type(error).__name__}: {error})") from None
    checks = importlib.import_module(f"grader.checks.{name}")
    if not getattr(checks, "ISOLATED", False):
        raise RuntimeError(f"grader/checks/{name}.py does not set ISOLATED = True: the course "
                           "grades no lab with the hidden tests in the submission's kernel")


def main(autograder_dir: str = "/autograder") -> None:
    from .otter_adapter import run_autograder

    install()
    run_autograder(autograder_dir)
