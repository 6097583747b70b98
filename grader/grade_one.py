"""Grade one submission with otter's own API; run by the batch grader in a child process.

    python -m grader.grade_one AUTOGRADER_ZIP SUBMISSION RESULTS_PICKLE [--cell-timeout S]
                                [--partial-results PICKLE]

The child inherits the batch grader's memory cap. The course's changes to otter are installed
first, as inside a zip (``grader.gradescope.install``): the submission runs in a process of its
own with a time limit per notebook cell, after which the cell is interrupted and execution goes
on with the next one, and each question is graded where its check cell stands, the scores so far
saved after each, so an infinite loop, a memory hog or a crash in one answer costs the questions
it reaches, not the whole submission.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys

# A `grader.check("qN")` cell of a lab notebook, where question qN is graded.
CHECK_CALL = re.compile(r"""^\s*grader\.check\(\s*["'](\w+)["']\s*\)\s*$""", re.MULTILINE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("autograder_zip")
    parser.add_argument("submission")
    parser.add_argument("results")
    parser.add_argument("--cell-timeout", type=int, default=300)
    parser.add_argument("--partial-results", default=None,
                        help="where to save the scores after each question")
    args = parser.parse_args(argv)

    from .gradescope import install
    from .otter_adapter import grade_submission
    install(args.cell_timeout, args.partial_results)  # the same changes as inside a zip

    results = grade_submission(args.submission, args.autograder_zip)
    results.notebook = None  # the executed notebook is large and not needed by the batch
    with open(args.results, "wb") as f:
        pickle.dump(results, f)
    print("\n" + results.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
