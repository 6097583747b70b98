"""The mutation harness (grader/mutation.py) is tested itself: its mutants are real changes of
the solution's code and nothing else, a child that dies or hangs counts as killed, equivalent
mutants leave the denominator; and, graded by it, every lab's curated bugs lose exactly the
points they should while a seeded sample of operator mutants scores at least 90 %."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from grader import mutation
from grader.labs import REPO, find_lab
from grader.mutation import LabUnderTest, Mutant, operator_mutants, sample

from .conftest import lab_names
from .submissions.mutations import Mutation, edited_cells

CELL = '''import numpy as np

def scale(x, y, n):
    # BEGIN SOLUTION
    total = x * (y + 2)
    if total < 3 and n:
        total += 1
    return np.clip(total, 0, 99)
    # END SOLUTION

def given(x):
    return x + 1

z = 1 + 2
'''


def mutants_of(cell: str = CELL) -> list[Mutant]:
    return operator_mutants({4: cell})


def run(source: str, *args):
    namespace: dict = {}
    exec(compile(source, "<cell>", "exec"), namespace)
    return namespace["scale"](*args)


def test_mutants_change_only_solution_code_inside_functions():
    mutants = mutants_of()
    assert mutants, "no mutant of a cell full of operators"
    solution = CELL.split("# BEGIN SOLUTION")[1].split("# END SOLUTION")[0]
    for m in mutants:
        assert set(m.cells) == {4}
        source = m.cells[4]
        ast.parse(source)
        before, after = CELL.split(solution)
        assert source.startswith(before) and source.endswith(after), m.id
        assert m.where == "scale", m.id


def test_every_kind_of_operator_is_mutated():
    names = {m.description.split(" in ")[0] for m in mutants_of()}
    for expected in ["* -> /", "+ -> -", "< -> <=", "and -> or", "2 -> 3", "2 -> 1", "+= -> =",
                     "drop statement", "swap arguments"]:
        assert expected in names, f"no {expected!r} mutant among {sorted(names)}"


def test_a_mutant_computes_something_else():
    """The text spliced in keeps the expression's precedence: `x * (y + 2)` with `+` mutated
    becomes `x * (y - 2)`, not `x * y - 2`."""
    by_kind = {m.description.split(" in ")[0]: m for m in mutants_of()}
    assert run(CELL, 2.0, 3.0, 1) == 10.0
    assert run(by_kind["+ -> -"].cells[4], 2.0, 3.0, 1) == 3.0  # 2 * (3 - 2), plus 1
    assert run(by_kind["* -> /"].cells[4], 2.0, 3.0, 1) == pytest.approx(0.4 + 1)
    assert run(by_kind["+= -> ="].cells[4], 0.5, 0.0, 1) == 1.0


def test_ids_are_unique_and_do_not_depend_on_the_rest_of_the_notebook():
    ids = [m.id for m in mutants_of()]
    assert len(ids) == len(set(ids))
    moved = operator_mutants({0: "# a cell above\n", 9: CELL})
    assert [m.id for m in moved] == ids


def test_sampling_is_seeded_and_keeps_order():
    mutants = mutants_of()
    chosen = sample(mutants, 5)
    assert chosen == sample(mutants, 5) and len(chosen) == 5
    assert [mutants.index(m) for m in chosen] == sorted(mutants.index(m) for m in chosen)
    assert sample(mutants, None) == mutants
    assert set(sample(mutants, 3)) <= set(chosen)


def test_curated_edits_can_span_cells():
    bug = Mutation("two cells", "why", [("a = 1", "a = 2"), ("b = 1", "b = 3")],
                   frozenset({"q1"}))
    assert edited_cells(bug, {0: "a = 1\n", 3: "x\n", 5: "b = 1\n"}) == {0: "a = 2\n",
                                                                        5: "b = 3\n"}
    with pytest.raises(AssertionError, match="exactly once"):
        edited_cells(bug, {0: "a = 1\na = 1\n", 5: "b = 1\n"})


def _under() -> LabUnderTest:
    cells = [("code", "x = 1"), ("code", 'grader.check("q1")'), ("code", "y = 2"),
             ("code", 'grader.check("q2")')]
    return LabUnderTest(find_lab("lab01_autograd"), None, cells)


def test_a_child_that_dies_or_hangs_lost_the_question_it_was_on():
    under, m = _under(), Mutant("m", "operator", "f", "d", {2: "y = 3"})
    first = json.dumps(dict(question="q1", earned=1, possible=1, message="")).encode() + b"\n"
    crashed = mutation._outcome(under, m, 0, first, 1.0, timed_out=False, timeout=9)
    assert crashed.killed and crashed.by == "crash" and crashed.lost == {"q2"}
    hung = mutation._outcome(under, m, 0, b"", 9.5, timed_out=True, timeout=9)
    assert hung.by == "timeout" and hung.lost == {"q1"} and "9 s" in hung.message
    survived = mutation._outcome(under, m, 0, first + b'{"done": true}\n', 1.0, False, 9)
    assert not survived.killed and survived.lost == set()


def test_equivalent_mutants_leave_the_denominator(monkeypatch):
    under = _under()
    monkeypatch.setattr(LabUnderTest, "equivalent", lambda self: {"same": "computes the same"})
    outcomes = [mutation.Outcome(Mutant(i, "operator", "f", "d", {2: "y"}), {}, by, "", 0.0)
                for i, by in [("a", "q2"), ("b", "q2"), ("same", ""), ("alive", "")]]
    summary = mutation.summarise(under, outcomes)
    assert summary["score"] == pytest.approx(2 / 3)
    assert summary["questions"]["q2"]["survivors"][0]["id"] == "alive"
    assert summary["equivalent"] == 1


# --------------------------------------------------------------------------------------------
# The labs, graded by the harness
# --------------------------------------------------------------------------------------------

SAMPLE = 4  # operator mutants per lab in CI; `make mutation-score` grades them all (recorded)


def harness(lab: str, out: Path) -> dict:
    """The harness on ``lab`` in a process of its own, as `make mutation-score` runs it."""
    result = subprocess.run([sys.executable, "-m", "grader.mutation", lab, "--sample",
                             str(SAMPLE), "--json", str(out), "--timeout", "300"],
                            capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("lab", lab_names())
def test_the_lab_graded_by_the_harness(lab, tmp_path):
    """The solution keeps every point (the harness refuses to score otherwise); each curated
    bug loses the points of the questions it breaks and no others; each curated rewrite keeps
    every point; the sampled operator mutants are killed at least 90 % of the time, equivalent
    ones aside."""
    summary = harness(lab, tmp_path / "summary.json")
    bugs = {m.name: m for m in mutation._bug_module(find_lab(lab)).MUTATIONS}
    curated = [o for o in summary["outcomes"] if o["origin"] == "curated"]
    assert {o["id"].removeprefix("curated: ") for o in curated} == set(bugs)
    problems = []
    for outcome in curated:
        bug, lost = bugs[outcome["id"].removeprefix("curated: ")], set(outcome["lost"])
        if missing := bug.breaks - lost:
            problems.append(f"{bug.name} ({bug.why}) keeps its points on {sorted(missing)}")
        if extra := lost - bug.breaks - bug.may_break:
            problems.append(f"{bug.name} also costs {sorted(extra)}: {outcome['message']}")
    for outcome in summary["outcomes"]:
        if outcome["origin"] == "rewrite" and outcome["lost"]:
            problems.append(f"{outcome['id']} computes what the lab asks for, yet loses points "
                            f"on {outcome['lost']}: {outcome['message']}")
    assert not problems, "\n".join(problems)
    operators = [o for o in summary["outcomes"] if o["origin"] == "operator"]
    equivalent = mutation._bug_module(find_lab(lab)).__dict__.get("EQUIVALENT", {})
    counted = [o for o in operators if o["id"] not in equivalent]
    killed = [o for o in counted if o["by"]]
    survivors = [o["id"] for o in counted if not o["by"]]
    assert len(killed) >= 0.9 * len(counted), f"{lab}: survivors {survivors}"


def test_every_lab_has_a_full_mutation_run_recorded():
    """`make mutation-score` grades every operator mutant; CI grades a sample. The recorded full
    runs (grader/mutation_scores.json, shown on the book's grading page) cover every lab, and
    each reaches 90 % with no curated bug alive and no rewrite losing points."""
    scores = mutation.load_scores()
    assert set(scores) == set(lab_names()), "run `make mutation-score LABS=...` for the others"
    for lab, summary in scores.items():
        assert not summary["sampled"], f"{lab}: only a sample is recorded"
        assert summary["operator_mutants"] >= 100, lab
        assert summary["score"] >= 0.9, (lab, summary["score"])
        assert not summary["curated_alive"] and not summary["rewrites_losing_points"], lab
        equivalent = mutation._bug_module(find_lab(lab)).__dict__.get("EQUIVALENT", {})
        operators = [o["id"] for o in summary["outcomes"] if o["origin"] == "operator"]
        assert summary["equivalent"] == sum(i in equivalent for i in operators), (
            f"{lab}: the recorded run predates the list of equivalent mutants; run it again")
