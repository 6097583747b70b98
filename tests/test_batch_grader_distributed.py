"""The batch grader on a distributed lab: submissions whose ranks deadlock or crash get their rows,
lose the questions the failure reaches, and the log names the rank and what it waited in."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from grader.grade import grade_batch
from tests.submissions.mutations import apply, mutation

pytestmark = pytest.mark.slow

SEND_GRADIENT = "            comm.send(inputs.pop(i).grad, dst=rank - 1)"

BATCH = [
    mutation("never_sends_the_gradient",
             "the backward's gradient is never sent: the previous stage waits in recv forever",
             [(SEND_GRADIENT, "            inputs.pop(i)")], breaks={"q5", "q6"}),
    mutation("last_rank_crashes",
             "the last stage raises in its first forward; the other ranks are left waiting",
             [("            out = stage(microbatches[i] if rank == 0 else inputs[i])",
               "            if rank == world_size - 1:\n"
               "                raise RuntimeError('student bug on the last stage')\n"
               "            out = stage(microbatches[i] if rank == 0 else inputs[i])")],
             breaks={"q5", "q6"}),
]


def test_deadlocked_and_crashed_ranks_get_their_rows(assigned, tmp_path):
    lab = assigned("lab03_pipeline")
    folder = tmp_path / "submissions"
    folder.mkdir()
    shutil.copy(lab.solution, folder / "right.ipynb")
    for bug in BATCH:
        apply(bug, lab.solution, folder)

    out = tmp_path / "out"
    grade_batch(lab.zip, sorted(folder.iterdir()), out, jobs=2, timeout=600, memory_gb=6,
                cell_timeout=300, progress=False)

    rows = pd.read_csv(out / "final_grades.csv").set_index("file")
    possible = rows.loc["points-per-question"]
    questions = [c for c in rows.columns if c.startswith("q")]

    def lost(name: str) -> set[str]:
        return {q for q in questions if rows.loc[name, q] < possible[q]}

    assert lost("right.ipynb") == set()
    for bug in BATCH:
        assert lost(f"{bug.name}.ipynb") == bug.breaks, bug.why
    hung = (out / "logs" / "never_sends_the_gradient.log").read_text()
    assert "rank 0" in hung and "recv" in hung, hung[-3000:]
    crashed = (out / "logs" / "last_rank_crashes.log").read_text()
    assert "student bug on the last stage" in crashed, crashed[-3000:]
