"""Container-free batch grading: the same final_grades.csv as `otter grade`, without Docker.

Every submission is graded by otter's own API (``otter.api.grade_submission``) in a process of
its own, with a wall-clock timeout, a memory cap and a time limit per notebook cell, several at a
time. A submission that crashes, hangs, does not parse or eats memory still gets its row (zero
on what could not be graded, and the reason in ``grading_status``), and the batch goes on.
"""

from __future__ import annotations

import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from .labs import REPO


@dataclass
class Outcome:
    submission: Path
    results: Any  # otter.test_files.GradingResults, or None when grading itself failed
    reason: str | None
    log: str
    seconds: float


def _kill_tree(pid: int) -> None:
    """Kill a process and all its descendants (the Jupyter kernel runs in its own session)."""
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for process in parent.children(recursive=True) + [parent]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _describe_exit(returncode: int, memory_gb: float) -> str:
    if returncode < 0:
        import signal
        name = signal.Signals(-returncode).name
        if -returncode == signal.SIGKILL:
            return (f"grading process killed ({name}); likely more than {memory_gb:g} GiB of "
                    "memory")
        return f"grading process died from signal {name}"
    return f"grading process exited with status {returncode} without results"


def grade_one_in_subprocess(autograder_zip: Path, submission: Path, *, timeout: float = 900,
                            memory_gb: float = 4.0, cell_timeout: int = 300,
                            threads: int | None = None) -> Outcome:
    """Grade one notebook in a child process; never raises for a bad submission."""
    start = time.perf_counter()
    memory = int(memory_gb * 2**30)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    with tempfile.TemporaryDirectory(prefix="grade-") as tmp:
        notebook = _notebook_of(submission, Path(tmp))
        results_path = Path(tmp) / "results.pkl"
        partial_path = Path(tmp) / "partial.pkl"
        command = [sys.executable, "-m", "grader.grade_one", str(autograder_zip.resolve()),
                   str(notebook), str(results_path), "--cell-timeout", str(cell_timeout),
                   "--partial-results", str(partial_path)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=env, cwd=tmp, preexec_fn=limit_memory)
        reason = None
        try:
            log, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(process.pid)
            log, _ = process.communicate()
            reason = f"timed out after {timeout:g} s (an infinite loop or a hang?)"
        else:
            _kill_tree(process.pid)  # a kernel left behind by a crash
        results = None
        if reason is None and results_path.exists():
            results = _load(results_path)
        elif reason is None:
            reason = _describe_exit(process.returncode, memory_gb)
        if results is not None and getattr(results, "stopped", None):
            # Graded in a process of its own that stopped part-way (grader/isolated.py): the
            # questions before it keep their scores, the status says why the rest has none.
            reason = results.stopped
        if results is not None and results.has_catastrophic_failure():
            reason, results = f"grading failed: {results.catastrophic_error}", None
        if results is None and partial_path.exists():
            # Killed part-way: keep the questions graded before, fail the rest with the reason.
            partial = _load(partial_path)
            if partial is not None:
                results = failed_results(autograder_zip, reason or "unknown failure", partial)
    return Outcome(submission, results, reason, log or "", time.perf_counter() - start)


def _load(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception:  # noqa: BLE001 - a half-written file is as good as none
        return None


def _notebook_of(submission: Path, workdir: Path) -> Path:
    """A submission is a notebook, or the zip that otter's export cell writes around one."""
    if submission.suffix != ".zip":
        return submission.resolve()
    with zipfile.ZipFile(submission) as archive:
        notebooks = [n for n in archive.namelist() if n.endswith(".ipynb") and "/" not in n]
        if len(notebooks) != 1:
            raise ValueError(f"{submission.name}: expected one notebook in the zip, found "
                             f"{notebooks}")
        target = workdir / "submission" / notebooks[0]
        target.parent.mkdir()
        target.write_bytes(archive.read(notebooks[0]))
    return target


def failed_results(autograder_zip: Path, reason: str, graded: Any = None) -> Any:
    """Results with every test case failed for ``reason`` (a row of zeros, question by question),
    except the questions already in ``graded`` (partial GradingResults), which keep their scores.
    """
    from otter.test_files import GradingResults, create_test_file
    from otter.test_files.abstract_test import TestCaseResult

    test_files = []
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(autograder_zip) as archive:
        for name in sorted(n for n in archive.namelist() if n.startswith("tests/") and
                           n.endswith(".py")):
            path = Path(tmp) / Path(name).name
            done = graded.results.get(path.stem) if graded is not None else None
            if done is not None:
                test_files.append(done)
                continue
            path.write_bytes(archive.read(name))
            test_file = create_test_file(str(path), None)
            test_file.test_case_results = [
                TestCaseResult(test_case=case, message=f"not graded: {reason}", passed=False)
                for case in test_file.test_cases]
            test_files.append(test_file)
    return GradingResults(test_files)


def submissions_in(folder: Path) -> list[Path]:
    found = sorted(p for p in folder.iterdir() if p.suffix in (".ipynb", ".zip"))
    if not found:
        raise SystemExit(f"no .ipynb or .zip submissions in {folder}")
    return found


def grade_batch(autograder_zip: Path, submissions: list[Path], out_dir: Path, *, jobs: int = 2,
                timeout: float = 900, memory_gb: float = 4.0, cell_timeout: int = 300,
                progress: bool = True) -> Any:
    """Grade ``submissions``; write final_grades.csv and logs/<name>.log to ``out_dir``."""
    from otter.grade.utils import merge_scores_to_df
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)

    def grade(submission: Path) -> Outcome:
        try:
            return grade_one_in_subprocess(autograder_zip, submission, timeout=timeout,
                                           memory_gb=memory_gb, cell_timeout=cell_timeout,
                                           threads=threads)
        except Exception as error:  # noqa: BLE001 - an unreadable file still gets its row
            return Outcome(submission, None, f"could not be graded: {error}", repr(error), 0.0)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        outcomes = list(tqdm(pool.map(grade, submissions), total=len(submissions),
                             desc="grading", unit="submission", disable=not progress))

    all_results = []
    for outcome in outcomes:
        results = outcome.results
        if results is None:
            results = failed_results(autograder_zip, outcome.reason or "unknown failure")
        results.file = outcome.submission.name
        all_results.append(results)
        summary = results.summary() if outcome.results is not None else ""
        status = outcome.reason or "completed"
        (out_dir / "logs" / f"{outcome.submission.stem}.log").write_text(
            f"submission: {outcome.submission.name}\nstatus: {status}\n"
            f"seconds: {outcome.seconds:.1f}\n\n{outcome.log}\n{summary}\n")

    table = merge_scores_to_df(all_results)
    for outcome in outcomes:
        if outcome.reason:
            table.loc[table["file"] == outcome.submission.name, "grading_status"] = outcome.reason
    table.to_csv(out_dir / "final_grades.csv", index=False)
    return table
