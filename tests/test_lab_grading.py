"""Every lab's tests are themselves tested, through a grading kernel: the untouched student
notebook scores zero on every question.

That the solution scores full marks, and that the first curated bug of each lab loses its points,
is proven from the autograder zip alone in tests/test_gradescope.py. Every curated bug, and a
sample of automatic mutants, is graded by the mutation harness in tests/test_mutation.py: it
calls the same otter test cases on the notebook's namespace without a kernel per submission,
so that all of them fit in the suite's time."""

from __future__ import annotations

import importlib

import pytest

from grader.grade import grade_one_in_subprocess
from tests.submissions.mutations import Mutation

from .conftest import lab_names

pytestmark = pytest.mark.slow


def grade(assigned_lab, notebook):
    outcome = grade_one_in_subprocess(assigned_lab.zip, notebook, timeout=600, memory_gb=6,
                                      cell_timeout=120)
    assert outcome.results is not None, f"grading failed: {outcome.reason}\n{outcome.log[-3000:]}"
    return outcome.results


def scores(results) -> dict[str, tuple[float, float]]:
    return {name: (d["score"], d["possible"]) for name, d in results.to_dict().items()}


def mutations_of(lab: str) -> list[Mutation]:
    try:
        return importlib.import_module(f"tests.submissions.{lab}").MUTATIONS
    except ModuleNotFoundError:
        return []


@pytest.mark.parametrize("lab", lab_names())
def test_untouched_student_notebook_scores_zero(assigned, lab):
    results = grade(assigned(lab), assigned(lab).student)
    earned = {q: s for q, s in scores(results).items() if s[0] > 0}
    assert not earned, f"the untouched notebook earns points: {earned}"


def test_each_lab_with_a_solution_has_curated_bugs():
    for lab in lab_names():
        assert len(mutations_of(lab)) >= 6, f"{lab} needs at least 6 curated buggy submissions"
