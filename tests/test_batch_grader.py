"""The container-free batch grader on a mixed batch: a right, a wrong and an untouched notebook,
a syntax error, an exception, an infinite loop (at top level and inside a graded function), a
memory hog, a hang that ignores interrupts and a crashed kernel. Every submission gets its row,
only the questions a failure reaches lose points, and the batch finishes."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from grader.cluster import in_loopback_namespace, loopback_namespace_available
from grader.grade import grade_batch
from grader.labs import REPO
from tests.submissions.mutations import apply, mutation

pytestmark = pytest.mark.slow
# The mixed batch is graded once, by the local pool, and compared with the Ray cluster's rows.
BATCH_GROUP = pytest.mark.xdist_group("mixed-batch")

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
# Stopped by the per-cell limit: graded to the end, and the status says which cell was stopped.
CELL_LIMITED = {"infinite_loop_top_level", "infinite_loop_in_function", "hang_ignoring_interrupts"}
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


@pytest.fixture(scope="module")
def mixed_batch(assigned, tmp_path_factory):
    """The mixed batch graded once by the local pool: (lab, folder, out folder, table)."""
    lab = assigned("lab01_autograd")
    tmp_path = tmp_path_factory.mktemp("mixed-batch")
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
    return lab, folder, tmp_path / "out", table


@BATCH_GROUP
def test_mixed_batch_gets_one_row_each(mixed_batch):
    lab, folder, out, table = mixed_batch
    tmp_path = out.parent
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
        status = rows.loc[name, "grading_status"]
        if bug.name in CELL_LIMITED:  # graded to the end; the status and log name the cell
            assert status.startswith("Completed; stopped by the per-cell limit: cell "), status
            assert "limit of 20 s" in status, status
            cell = re.match(r"Completed; stopped by the per-cell limit: cell (\d+) ", status)[1]
            log = (tmp_path / "out" / "logs" / f"{bug.name}.log").read_text()
            assert f"[grader] cell {cell} interrupted" in log, log[-3000:]
        else:
            assert status == "Completed", (name, status)
    for bug, reason in FATAL:
        name = f"{bug.name}.ipynb"
        assert lost(name) == bug.breaks, (name, rows.loc[name])
        assert reason in rows.loc[name, "grading_status"], rows.loc[name, "grading_status"]
    assert lost("not_a_notebook.ipynb") == set(questions)
    assert "without results" in rows.loc["not_a_notebook.ipynb", "grading_status"]

    # The same command again finds every result in place and grades nothing.
    stored = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "results").glob("*.pkl")}
    assert len(stored) == len(names)
    again = grade_batch(lab.zip, sorted(folder.iterdir()), tmp_path / "out", jobs=2,
                        timeout=150, memory_gb=2.5, cell_timeout=20, progress=False)
    assert again.equals(table)
    assert stored == {p.name: p.stat().st_mtime_ns
                      for p in (tmp_path / "out" / "results").glob("*.pkl")}

    # The score report names every submission that did not complete, with its reason.
    report = (tmp_path / "out" / "report.html").read_text()
    for bug, reason in FATAL:
        failed = report.split("<h2>Failed or crashed</h2>")[1]
        assert bug.name in failed and reason in failed, failed[:2000]
    assert "not_a_notebook.ipynb" in report.split("<h2>Failed or crashed</h2>")[1]
    assert "right.ipynb" not in report.split("<h2>Failed or crashed</h2>")[1]
    for figure in ("totals", "questions"):
        assert (tmp_path / "out" / f"report-{figure}.png").read_bytes()[:4] == b"\x89PNG"


def _variant(notebook: Path, folder: Path, name: str, text: str) -> Path:
    """``notebook`` with one more Markdown cell: other bytes, the same code."""
    content = json.loads(notebook.read_text())
    content["cells"].append({"cell_type": "markdown", "metadata": {}, "source": [text]})
    path = folder / name
    path.write_text(json.dumps(content))
    return path


def test_a_killed_batch_goes_on_where_it_stopped(assigned, tmp_path):
    """SIGKILL of the whole batch (the grader and every process it started) after two results:
    the two are on disk whole, the CSV holds their rows, and the same command again grades
    only the other submissions; a submission changed since is graded again."""
    lab = assigned("lab01_autograd")
    folder = tmp_path / "submissions"
    folder.mkdir()
    shutil.copy(lab.solution, folder / "a_right.ipynb")
    for i, name in enumerate(["b_untouched", "c_untouched", "d_untouched"]):
        _variant(lab.student, folder, f"{name}.ipynb", f"copy {i}")
    out = tmp_path / "out"
    script = ("import sys; from pathlib import Path; from grader.grade import grade_batch; "
              "grade_batch(Path(sys.argv[1]), sorted(Path(sys.argv[2]).iterdir()), "
              "Path(sys.argv[3]), jobs=1, timeout=300, progress=False)")
    batch = subprocess.Popen([sys.executable, "-c", script, str(lab.zip), str(folder), str(out)],
                             cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while len(list((out / "results").glob("*.pkl"))) < 2:
            assert batch.poll() is None, "the batch ended before it could be killed"
            assert time.monotonic() < deadline, "no two results in 600 s"
            time.sleep(0.2)
    finally:
        os.killpg(batch.pid, signal.SIGKILL)
        batch.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.pkl")}
    assert sorted(name.split(".")[0] for name in kept) == ["a_right", "b_untouched"]
    for path in (out / "results").glob("*.pkl"):
        assert pickle.loads(path.read_bytes())["results"] is not None, path.name
    assert set(pd.read_csv(out / "final_grades.csv")["file"]) >= {"a_right.ipynb"}
    assert json.loads((out / "progress.json").read_text())["finished"] is False

    def rerun() -> pd.DataFrame:
        grade_batch(lab.zip, sorted(folder.iterdir()), out, jobs=2, timeout=300, progress=False)
        return pd.read_csv(out / "final_grades.csv").set_index("file")

    rows = rerun()
    now = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.pkl")}
    assert {name: now[name] for name in kept} == kept, "a finished submission was graded again"
    assert len(now) == 4
    possible = rows.loc["points-per-question"]
    questions = [c for c in rows.columns if c.startswith("q")]
    assert all(rows.loc["a_right.ipynb", q] == possible[q] for q in questions)
    for name in ["b_untouched", "c_untouched", "d_untouched"]:
        assert rows.loc[f"{name}.ipynb", "total_points_earned"] == 0
        assert rows.loc[f"{name}.ipynb", "grading_status"] == "Completed"
    assert json.loads((out / "progress.json").read_text()) == {
        "submissions": 4, "graded": 4, "finished": True}

    _variant(lab.student, folder, "d_untouched.ipynb", "changed")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.pkl")}
    rerun()
    after = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.pkl")}
    changed = set(after.items()) - set(before.items())
    assert [name.split(".")[0] for name, _ in changed] == ["d_untouched"]
    assert len(after) == 4, "the changed submission's old result is still there"


# --------------------------------------------------------------------------------------------
# A real Ray cluster on loopback: a head node and a second worker node, one CPU each
# --------------------------------------------------------------------------------------------

# Quick to grade, and between them: points earned, a cell stopped by the limit, a dead process.
RAY_SUBSET = ["untouched.ipynb", "infinite_loop_top_level.ipynb", "kernel_crash.ipynb"]


@BATCH_GROUP
@pytest.mark.skipif(not loopback_namespace_available(), reason="the Ray cluster runs in a "
                    "network namespace of its own: needs root, unshare and ip")
def test_a_ray_cluster_grades_as_the_local_pool(mixed_batch, tmp_path):
    """Part of the mixed batch graded as Ray tasks on a real two-node cluster (python -m
    grader.cluster, in a network namespace with loopback only): row for row what the local pool
    wrote (scores, totals and statuses), both nodes used, the report written."""
    from grader.cluster import lab_resources
    lab, folder, local_out, _ = mixed_batch
    local = pd.read_csv(local_out / "final_grades.csv")
    assert lab_resources(lab.zip) == {"num_cpus": 1.0, "num_gpus": 0.0}
    out = tmp_path / "out"
    command = [sys.executable, "-m", "grader.cluster", str(lab.zip), str(out),
               *(str(folder / name) for name in RAY_SUBSET)]
    result = subprocess.run(in_loopback_namespace(command), cwd=REPO, timeout=900,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = pd.read_csv(out / "final_grades.csv").set_index("file")
    want = local.set_index("file").loc[["points-per-question", *RAY_SUBSET]]
    pd.testing.assert_frame_equal(rows.loc[want.index], want, check_dtype=False)
    nodes = {(out / "logs" / f"{Path(n).stem}.log").read_text().split("\n")[4]
             for n in RAY_SUBSET}
    assert len(nodes) == 2 and all(n.startswith("graded on Ray node ") for n in nodes), nodes
    assert (out / "report.html").exists()


def test_a_batch_no_node_can_run_is_refused(tmp_path, monkeypatch):
    """Tasks that need more than any node has would wait forever: refused with the reason."""
    from grader import cluster

    class FakeRay:
        @staticmethod
        def nodes():
            return [{"Alive": True, "Resources": {"CPU": 1.0, "memory": 8e9}},
                    {"Alive": False, "Resources": {"CPU": 64.0, "memory": 8e9}}]

    with pytest.raises(SystemExit, match="no node of the Ray cluster can grade"):
        cluster._check_feasible(FakeRay, {"num_cpus": 2.0, "num_gpus": 0.0}, 2**30)
    cluster._check_feasible(FakeRay, {"num_cpus": 1.0, "num_gpus": 0.0}, 2**30)
    with pytest.raises(SystemExit, match="GPU"):
        cluster._check_feasible(FakeRay, {"num_cpus": 1.0, "num_gpus": 1.0}, 2**30)
