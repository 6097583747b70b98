"""How fast a class is graded: the batch grader's throughput and memory, measured.

    python -m grader.bench_grading [--submissions 100] [--engines local-1,local-2,ray]
                                   [--labs lab01_autograd,...]

A batch of generated Lab 1 submissions (right; partly wrong, from the curated bugs; broken, a
syntax error; hanging, an infinite loop stopped by the per-cell limit) is graded by each engine:
the local pool with 1 and 2 workers and a Ray cluster of two one-CPU nodes started on this
machine. Each run records its wall time, submissions per minute and the peak memory the
machine used above idle while it ran, and whether its rows equal the first run's. Each lab's
solution is then graded once from its zip, and those times project how long a class of 300
students takes for every lab, on this machine and on a cluster. Results go to
``book/benchmarks/grading.json``, which the book's grading page shows; `make bench` runs it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .labs import REPO, Lab, all_labs

RESULTS = REPO / "book" / "benchmarks" / "grading.json"
CLASS_SIZE = 300
CELL_TIMEOUT = 10  # seconds: a hanging submission holds a worker this long per hanging cell
MIX = {"right": 0.4, "partly wrong": 0.3, "broken": 0.15, "hanging": 0.15}
MODEL_LINE = "model = MLP([64, 128, 10], seed=0)\n"


class PeakMemory:
    """The machine's peak used memory above what it used when started, sampled every 0.25 s."""

    def __init__(self) -> None:
        import psutil
        self._psutil = psutil
        self.baseline = psutil.virtual_memory().used
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, self._psutil.virtual_memory().used)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gb(self) -> float:
        return (self.peak - self.baseline) / 2**30


def make_batch(solution: Path, folder: Path, count: int, seed: int = 0) -> dict[str, str]:
    """``count`` Lab 1 submissions in ``folder`` in the proportions of ``MIX``, each different
    bytes (a Markdown cell names it); the kind of each, by file name."""
    sys.path.insert(0, str(REPO))
    from tests.submissions.lab01_autograd import MUTATIONS
    from tests.submissions.mutations import apply, mutation

    rng = random.Random(seed)
    kinds = [kind for kind, share in MIX.items() for _ in range(round(share * count))]
    kinds = (kinds + ["right"] * count)[:count]
    rng.shuffle(kinds)
    broken = mutation("syntax_error", "a syntax error", [("class Adam:\n", "class Adam(:\n")],
                      breaks=set())
    hanging = mutation("hanging", "the training cell never ends",
                       [(MODEL_LINE, "while True:\n    pass\n" + MODEL_LINE)], breaks=set())
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, kind in enumerate(kinds):
            name = f"s{i:03d}.ipynb"
            if kind == "right":
                source = solution
            else:
                bug = {"partly wrong": lambda: rng.choice(MUTATIONS), "broken": lambda: broken,
                       "hanging": lambda: hanging}[kind]()
                source = apply(bug, solution, Path(tmp))
            notebook = json.loads(source.read_text())
            notebook["cells"].append({"cell_type": "markdown", "metadata": {},
                                      "source": [f"submission {i} ({kind})"]})
            (folder / name).write_text(json.dumps(notebook))
            made[name] = kind
    return made


def _rows(out: Path) -> list[dict[str, Any]]:
    import pandas as pd
    return pd.read_csv(out / "final_grades.csv").to_dict("records")


def run_engine(engine: str, autograder: Path, folder: Path, out: Path) -> dict[str, Any]:
    """One engine over the batch in ``folder``: wall time, rate and peak memory."""
    submissions = sorted(folder.glob("*.ipynb"))
    with PeakMemory() as memory:
        start = time.perf_counter()
        if engine.startswith("local-"):
            command = [sys.executable, "-c",
                       "import sys; from pathlib import Path; from grader.grade import "
                       "grade_batch; grade_batch(Path(sys.argv[1]), [Path(p) for p in "
                       "sys.argv[4:]], Path(sys.argv[2]), jobs=int(sys.argv[3]), timeout=300, "
                       f"cell_timeout={CELL_TIMEOUT}, memory_gb=2.5, progress=False)",
                       str(autograder), str(out), engine.split("-")[1], *map(str, submissions)]
        else:
            from .cluster import in_loopback_namespace, loopback_namespace_available
            command = [sys.executable, "-m", "grader.cluster", str(autograder), str(out),
                       *map(str, submissions), "--timeout", "300", "--cell-timeout",
                       str(CELL_TIMEOUT)]
            if loopback_namespace_available():
                command = in_loopback_namespace(command)
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
    workers = {"ray": "2 nodes x 1 CPU"}.get(engine, engine.split("-")[-1])
    return {"engine": "Ray cluster" if engine == "ray" else "local pool", "workers": workers,
            "submissions": len(submissions), "seconds": round(seconds, 1),
            "per_minute": round(60 * len(submissions) / seconds, 2),
            "peak_memory_gb": round(memory.gb, 2)}


def lab_seconds(labs: list[Lab], workdir: Path) -> dict[str, float]:
    """Each lab's solution graded once from its zip, as the batch grades one submission."""
    from .assign import build
    from .grade import grade_one_in_subprocess
    found = {}
    for lab in labs:
        out = workdir / lab.name
        build(lab, out)
        autograder = next((out / "autograder").glob("*-autograder_*.zip"))
        outcome = grade_one_in_subprocess(autograder, out / "autograder" / f"{lab.name}.ipynb",
                                          timeout=900, memory_gb=6, threads=1)
        if outcome.results is None or outcome.results.percent < 1:
            raise SystemExit(f"{lab.name}: the solution did not score full marks\n{outcome.log}")
        found[lab.name] = round(outcome.seconds, 1)
    return found


def projection(seconds: dict[str, float], cores: int, students: int = CLASS_SIZE
               ) -> dict[str, Any]:
    """Hours to grade ``students`` submissions of every lab on ``cores`` CPUs, each lab's
    grading holding the CPUs its lab declares (grader/labs.toml) for its measured time."""
    from .labs import manifest
    cpu_seconds = sum(t * manifest()[lab].get("grading_cpus", 1) for lab, t in seconds.items())
    return {"students": students, "cores": cores,
            "hours": round(students * cpu_seconds / cores / 3600, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grader.bench_grading", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submissions", type=int, default=100)
    parser.add_argument("--engines", default="local-1,local-2,ray")
    parser.add_argument("--labs", default=",".join(lab.name for lab in all_labs()),
                        help="the labs whose solution grading times the projection uses")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from .assign import build
    from .labs import find_lab

    with tempfile.TemporaryDirectory(prefix="bench-grading-") as tmp:
        tmp = Path(tmp)
        lab = find_lab("lab01_autograd")
        build(lab, tmp / "assigned")
        autograder = next((tmp / "assigned" / "autograder").glob("*-autograder_*.zip"))
        solution = tmp / "assigned" / "autograder" / f"{lab.name}.ipynb"
        kinds = make_batch(solution, tmp / "batch", args.submissions)
        runs, first_rows = [], None
        for engine in args.engines.split(","):
            out = tmp / f"out-{engine}"
            shutil.rmtree(out, ignore_errors=True)
            run = run_engine(engine, autograder, tmp / "batch", out)
            rows = _rows(out)
            first_rows = first_rows if first_rows is not None else rows
            run["rows_equal_first_run"] = rows == first_rows
            print(json.dumps(run), flush=True)
            runs.append(run)
        labs = [find_lab(name) for name in args.labs.split(",") if name]
        seconds = lab_seconds(labs, tmp / "labs")
    record = {
        "measured": dt.date.today().isoformat(), "device": f"cpu ({os.cpu_count()} cores)",
        "lab": "lab01_autograd", "cell_timeout_s": CELL_TIMEOUT,
        "mix": {kind: sum(1 for k in kinds.values() if k == kind) for kind in MIX},
        "runs": runs, "solution_seconds": seconds,
        "projections": [projection(seconds, os.cpu_count() or 1), projection(seconds, 64)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
