"""Every lab's tests are themselves tested: the untouched student notebook scores zero on every
question, and each curated buggy submission loses the points of the question it breaks (and only
of the questions it can reach).

That the solution scores full marks, and that the first curated bug of each lab loses its points,
is proven from the autograder zip alone in tests/test_gradescope.py; grading them here again, by
the batch grader's path, would only double the suite's longest tests."""

from __future__ import annotations

import importlib

import pytest

from grader.grade import grade_one_in_subprocess
from tests.submissions.mutations import Mutation, apply

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


# The first bug of each lab is graded from its zip by tests/test_gradescope.py.
CASES = [(lab, m) for lab in lab_names() for m in mutations_of(lab)[1:]]


@pytest.mark.parametrize("lab,bug", CASES, ids=[f"{lab}-{m.name}" for lab, m in CASES])
def test_buggy_submission_loses_the_points_it_breaks(assigned, tmp_path, lab, bug):
    notebook = apply(bug, assigned(lab).solution, tmp_path)
    results = scores(grade(assigned(lab), notebook))
    kept = {q for q in bug.breaks if results[q][0] >= results[q][1]}
    assert not kept, f"{bug.name} ({bug.why}) should lose points on {sorted(kept)}: {results}"
    collateral = {q: s for q, s in results.items()
                  if q not in bug.breaks | bug.may_break and s[0] < s[1]}
    assert not collateral, f"{bug.name} should not cost points elsewhere, lost {collateral}"


def test_each_lab_with_a_solution_has_curated_bugs():
    for lab in lab_names():
        assert len(mutations_of(lab)) >= 6, f"{lab} needs at least 6 curated buggy submissions"
