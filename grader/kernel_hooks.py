"""Imported first thing in the kernel that runs a submission (see grade_one.py).

otter catches ``Exception`` around each test case, but the grader's per-cell time limit arrives
as ``KeyboardInterrupt``, which otter lets through: one interrupted test would abort its whole
check and, in the final cell, every score. Here a test case that is interrupted fails alone, with
a message that says why, and the check goes on. A failure's message is the exception, in words:
otter's default quotes the test's source line, which for a hidden test shows its inputs.
"""

from otter.test_files.abstract_test import TestCaseResult
from otter.test_files.exception_test import ExceptionTestFile

INTERRUPTED = ("❌ Test case failed\ninterrupted by the grader: this test ran past the per-cell "
               "time limit (an infinite loop, or far too slow)")


def run(self: ExceptionTestFile, global_environment: dict) -> None:
    self.test_case_results = []
    for case in self.test_cases:
        case.body.function_name = case.body.test_func.__name__  # survives pickling, unlike it
        passed, message = True, "✅ Test case passed"
        try:
            case.body.call_func(global_environment)
        except Exception as error:
            passed, message = False, f"❌ Test case failed\n{type(error).__name__}: {error}"
        except KeyboardInterrupt:
            passed, message = False, INTERRUPTED
        self.test_case_results.append(TestCaseResult(test_case=case, message=message,
                                                     passed=passed))


ExceptionTestFile.run = run
