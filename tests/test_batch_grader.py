"""The container-free batch grader on a mixed batch: a right, a wrong and an untouched notebook,
a syntax error, an exception, an infinite loop (at top level and inside a graded function), a
memory hog, a hang that ignores interrupts and a crashed kernel. Every submission gets its row,
only the questions a failure reaches lose points, and the batch finishes."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from grader.grade import grade_batch
from tests.submissions.mutations import apply, mutation

pytestmark = pytest.mark.slow

MODEL_LINE = "model = MLP([64, 128, 10], seed=0)\n"
ADAM_STEP = "    def step(self):\n        self.t += 1\n"

BATCH = [
    mutation("syntax_error", "a syntax error in the Adam cell",
             [("class Adam:\n", "class Adam(:\n")], breaks={"q5", "q6"}),
    mutation("exception", "the training cell raises before the model exists",
             [(MODEL_LINE, "raise RuntimeError('student bug')\n" + MODEL_LINE)], breaks={"q6"}),
    mutation("infinite_loop_top_level", "the training cell never ends",
             [(MODEL_LINE, "while True:\n    pass\n" + MODEL_LINE)], breaks={"q6"}),
    mutation("infinite_loop_in_function", "Adam.step never returns",
             [(ADAM_STEP, ADAM_STEP + "        while True:\n            pass\n")],
             breaks={"q5", "q6"}),
    mutation("memory_hog", "the training cell grows a list until memory runs out",
             [(MODEL_LINE, "hog = []\nwhile True:\n    hog.append(np.ones(2**24))\n" + MODEL_LINE)],
             breaks={"q6"}, may_break={"q7"}),
    mutation("hang_ignoring_interrupts", "a cell that ignores SIGINT and loops forever: the "
             "cell limit stops it all the same", [(MODEL_LINE, "import signal\n"
             "signal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass\n" +
             MODEL_LINE)], breaks={"q6"}),
]
# These take the notebook's process down: what was graded before them is kept, the rest is
# lost, and the reason goes into the CSV's grading_status. Lab 1 runs the notebook in a process
# of its own (grader/isolated.py), stopped when it ignores the grader's interrupts.
FATAL = [
    (mutation("hang_ignoring_every_signal", "a cell that ignores SIGINT and SIGALRM and loops "
              "forever", [(MODEL_LINE, "import signal\n"
                           "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                           "signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                           "while True:\n    pass\n" + MODEL_LINE)], breaks={"q6", "q7"}),
     "ignored an interrupt"),
    (mutation("kernel_crash", "a cell that kills its own kernel",
              [(MODEL_LINE, "import os\nos._exit(3)\n" + MODEL_LINE)], breaks={"q6", "q7"}),
     "exit status 3"),
]


def test_mixed_batch_gets_one_row_each(assigned, tmp_path):
    lab = assigned("lab01_autograd")
    folder = tmp_path / "submissions"
    folder.mkdir()
    shutil.copy(lab.solution, folder / "right.ipynb")
    shutil.copy(lab.student, folder / "untouched.ipynb")
    apply(mutation("wrong", "Adam without bias correction",
                   [("m_hat = m / (1 - beta1 ** self.t)", "m_hat = m")], breaks={"q5"}),
          lab.solution, folder)
    for bug in BATCH + [bug for bug, _ in FATAL]:
        apply(bug, lab.solution, folder)
    (folder / "not_a_notebook.ipynb").write_text("{ this is not json")

    table = grade_batch(lab.zip, sorted(folder.iterdir()), tmp_path / "out", jobs=2,
                        timeout=150, memory_gb=2.5, cell_timeout=20, progress=False)

    csv = pd.read_csv(tmp_path / "out" / "final_grades.csv")
    assert list(csv.columns) == list(table.columns)
    rows = csv.set_index("file")
    possible = rows.loc["points-per-question"]
    questions = [c for c in csv.columns if c.startswith("q")]
    names = [p.name for p in folder.iterdir()]
    assert sorted(rows.index.drop("points-per-question")) == sorted(names)
    for name in names:
        assert (tmp_path / "out" / "logs" / f"{name.removesuffix('.ipynb')}.log").exists()

    def lost(name: str) -> set[str]:
        return {q for q in questions if rows.loc[name, q] < possible[q]}

    assert lost("right.ipynb") == set()
    assert lost("untouched.ipynb") == set(questions)
    assert lost("wrong.ipynb") == {"q5"}
    for bug in BATCH:
        name = f"{bug.name}.ipynb"
        assert bug.breaks <= lost(name) <= bug.breaks | bug.may_break, (name, rows.loc[name])
        assert rows.loc[name, "grading_status"] == "Completed"
    for bug, reason in FATAL:
        name = f"{bug.name}.ipynb"
        assert lost(name) == bug.breaks, (name, rows.loc[name])
        assert reason in rows.loc[name, "grading_status"], rows.loc[name, "grading_status"]
    assert lost("not_a_notebook.ipynb") == set(questions)
    assert "without results" in rows.loc["not_a_notebook.ipynb", "grading_status"]
