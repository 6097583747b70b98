"""Grade one submission with otter's own API; run by the batch grader in a child process.

    python -m grader.grade_one AUTOGRADER_ZIP SUBMISSION RESULTS_PICKLE [--cell-timeout S]
                                [--partial-results PICKLE]

The child inherits the batch grader's memory cap; here each notebook cell also gets a time
limit, after which the kernel is interrupted and execution goes on with the next cell, and each
question is graded where it stands in the notebook, so an infinite loop, a memory hog or a crash
in one answer costs the questions it reaches, not the whole submission.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys

CHECK_CALL = re.compile(r"""^\s*grader\.check\(\s*["'](\w+)["']\s*\)\s*$""", re.MULTILINE)
OTTER_CHECK = re.compile(r"""^notebook_\w+\(\)\.check\("\w+"\)$""", re.MULTILINE)
SAVE_PARTIAL = """
import pickle as _course_pickle
from otter.execute import Checker as _CourseChecker
from otter.test_files import GradingResults as _CourseResults
with open({path!r}, "wb") as _course_file:
    _course_pickle.dump(_CourseResults(_CourseChecker.get_results()), _course_file)
"""


def grade_questions_in_place(partial_results: str | None) -> None:
    """Adjust otter's grading notebook in three ways, through its own preprocessor:

    * Grade each question right after its cells, where the student's `grader.check("qN")` cell
      stands, instead of all at the end: a later infinite loop, memory hog or crash then costs
      only the questions it reaches (otter inserts such checks for cells tagged with
      ``metadata.otter.tests``; we tag the check cells, whose own `grader` is undefined here).
    * After each check, save the scores so far to ``partial_results``, so that a submission killed
      later (a hang that ignores interrupts, a dead kernel) keeps the questions graded before.
    * First of all, make an interrupted test fail alone (``grader.kernel_hooks``).
    """
    import nbformat
    from otter.execute import preprocessor

    original = preprocessor.GradingPreprocessor.preprocess

    def preprocess(self, nb, resources=None):
        for cell in nb.cells:
            questions = CHECK_CALL.findall(cell.source) if cell.cell_type == "code" else []
            if questions:
                cell.metadata.setdefault("otter", {})["tests"] = questions
                cell.source = "# the grader checks " + ", ".join(questions) + " here"
        nb, resources = original(self, nb, resources)
        if partial_results:
            for cell in nb.cells:
                if cell.cell_type == "code" and OTTER_CHECK.search(cell.source):
                    cell.source += SAVE_PARTIAL.format(path=partial_results)
        nb.cells.insert(0, nbformat.v4.new_code_cell(
            "__import__(\"importlib\").import_module(\"grader.kernel_hooks\")"))
        return nb, resources

    preprocessor.GradingPreprocessor.preprocess = preprocess


def limit_cell_time(seconds: int) -> None:
    """otter's grade_notebook builds nbconvert's ExecutePreprocessor with no cell timeout; give it
    one that interrupts the kernel (the cell then fails with KeyboardInterrupt) and carries on."""
    import nbconvert.preprocessors

    class TimedExecutePreprocessor(nbconvert.preprocessors.ExecutePreprocessor):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.timeout = seconds
            self.interrupt_on_timeout = True

    nbconvert.preprocessors.ExecutePreprocessor = TimedExecutePreprocessor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("autograder_zip")
    parser.add_argument("submission")
    parser.add_argument("results")
    parser.add_argument("--cell-timeout", type=int, default=300)
    parser.add_argument("--partial-results", default=None,
                        help="where to save the scores after each question")
    args = parser.parse_args(argv)

    from otter.api import grade_submission

    from .gradescope import install
    install(args.cell_timeout, args.partial_results)  # the same changes as inside a zip

    results = grade_submission(args.submission, args.autograder_zip, quiet=False)
    results.notebook = None  # the executed notebook is large and not needed by the batch
    with open(args.results, "wb") as f:
        pickle.dump(results, f)
    print("\n" + results.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
