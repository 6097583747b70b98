"""Container-free batch grading: the same final_grades.csv as `otter grade`, without Docker.

Every submission is graded by otter's own API (``otter.api.grade_submission``) in a process of
its own, with a wall-clock timeout, a memory cap and a time limit per notebook cell, several at a
time. A submission that crashes, hangs, does not parse or eats memory still gets its row (zero
on what could not be graded, and the reason in ``grading_status``), and the batch goes on.

Nothing graded is lost: each submission's result is written as it finishes, atomically (a
temporary file renamed into place), to ``results/<file>.<key>.pkl``, where the key hashes the
autograder zip and the submission's bytes; the log and ``final_grades.csv`` (the rows graded so
far) are rewritten the same way after each one. Running the same command again after a kill
grades only the submissions with no result for their current content; a changed submission,
or a new autograder, is graded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
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
        if results is not None and reason is None and getattr(results, "interrupted", None):
            # Graded to the end, but the per-cell limit stopped some cells: the status says which.
            reason = ("Completed; stopped by the per-cell limit: " +
                      "; ".join(results.interrupted))
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
    from .otter_adapter import case_result, grading_results, load_test_file

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
            test_file = load_test_file(str(path))
            test_file.test_case_results = [case_result(case, False, f"not graded: {reason}")
                                           for case in test_file.test_cases]
            test_files.append(test_file)
    return grading_results(test_files)


def submissions_in(folder: Path) -> list[Path]:
    found = sorted(p for p in folder.iterdir() if p.suffix in (".ipynb", ".zip"))
    if not found:
        raise SystemExit(f"no .ipynb or .zip submissions in {folder}")
    return found


def result_key(autograder_zip: Path, submission: Path) -> str:
    """What a stored result was graded from: the autograder's bytes and the submission's."""
    digest = hashlib.sha256()
    for path in (autograder_zip, submission):
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all: written beside it, then renamed over it."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _stored(results_dir: Path, submission: Path, key: str) -> Path:
    return results_dir / f"{submission.name}.{key}.pkl"


def _store(results_dir: Path, outcome: Outcome, key: str) -> None:
    """The outcome kept for a rerun; results of earlier versions of the submission dropped."""
    path = _stored(results_dir, outcome.submission, key)
    write_atomically(path, pickle.dumps(
        {"results": outcome.results, "reason": outcome.reason, "log": outcome.log,
         "seconds": outcome.seconds, "file": outcome.submission.name}))
    for old in results_dir.glob(f"{outcome.submission.name}.*.pkl"):
        if old != path:
            old.unlink(missing_ok=True)


def _restore(results_dir: Path, submission: Path, key: str) -> Outcome | None:
    stored = _load(_stored(results_dir, submission, key))
    if not isinstance(stored, dict):
        return None
    return Outcome(submission, stored["results"], stored["reason"], stored["log"],
                   stored["seconds"])


def grade_batch(autograder_zip: Path, submissions: list[Path], out_dir: Path, *, jobs: int = 2,
                timeout: float = 900, memory_gb: float = 4.0, cell_timeout: int = 300,
                progress: bool = True, ray: str | None = None) -> Any:
    """Grade ``submissions``; write final_grades.csv, logs/<name>.log and the score report
    (report.html, grader/report.py) to ``out_dir``, and keep each result in
    ``out_dir/results`` so that a rerun grades only what has none.

    ``jobs`` submissions are graded at a time in processes on this machine; with ``ray`` (a
    Ray cluster's address, or "auto" for the one this machine belongs to) each submission is a
    Ray task instead, with the resources its lab declares (grader/cluster.py)."""
    from tqdm.auto import tqdm

    from .otter_adapter import check_version
    check_version()  # before anything is graded, not once per submission
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    results_dir = out_dir / "results"
    results_dir.mkdir(exist_ok=True)
    keys = {}
    for submission in submissions:
        try:
            keys[submission] = result_key(autograder_zip, submission)
        except OSError:
            keys[submission] = "unreadable"
    done: dict[Path, Outcome] = {}
    for submission in submissions:
        if (outcome := _restore(results_dir, submission, keys[submission])) is not None:
            done[submission] = outcome
    todo = [s for s in submissions if s not in done]
    rows: dict[Path, Any] = {}  # each outcome's GradingResults, made once

    csv = out_dir / "final_grades.csv"
    if not done and csv.exists():  # another batch's grades: kept aside, never shown as these
        os.replace(csv, out_dir / "final_grades.previous.csv")
    table = _write_table(autograder_zip, submissions, done, rows, out_dir) if done else None
    _write_progress(out_dir, len(submissions), len(done), finished=False)
    options = dict(timeout=timeout, memory_gb=memory_gb, cell_timeout=cell_timeout)
    if ray is None:
        outcomes = _graded_here(autograder_zip, todo, jobs=jobs, **options)
    else:
        from .cluster import graded_on_ray
        outcomes = graded_on_ray(ray, autograder_zip, todo, **options)
    bar = tqdm(total=len(submissions), initial=len(done), desc="grading", unit="submission",
               disable=not progress)
    for outcome in outcomes:  # each stored as it arrives: a kill loses no finished grading
        _store(results_dir, outcome, keys[outcome.submission])
        done[outcome.submission] = outcome
        _write_log(out_dir, outcome)
        table = _write_table(autograder_zip, submissions, done, rows, out_dir)
        _write_progress(out_dir, len(submissions), len(done), finished=False)
        bar.update()
    bar.close()
    for outcome in done.values():  # logs of results kept from an earlier run, if deleted
        if not (out_dir / "logs" / f"{outcome.submission.stem}.log").exists():
            _write_log(out_dir, outcome)
    if table is None:
        table = _write_table(autograder_zip, submissions, done, rows, out_dir)
    from .report import write_report
    write_report(table, {o.submission.name: o.seconds for o in done.values()}, out_dir,
                 title=f"Grading report: {autograder_zip.stem.split('-autograder')[0]}")
    _write_progress(out_dir, len(submissions), len(done), finished=True)
    return table


def grade_safely(autograder_zip: Path, submission: Path, **options: Any) -> Outcome:
    """``grade_one_in_subprocess``, with a file that cannot even be read still given a row."""
    try:
        return grade_one_in_subprocess(autograder_zip, submission, **options)
    except Exception as error:  # noqa: BLE001 - an unreadable file still gets its row
        return Outcome(submission, None, f"could not be graded: {error}", repr(error), 0.0)


def _graded_here(autograder_zip: Path, todo: list[Path], *, jobs: int, **options: Any) -> Any:
    """Outcomes as they finish, ``jobs`` at a time in processes on this machine, each with an
    equal share of its CPUs as BLAS threads."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(grade_safely, autograder_zip, s, threads=threads, **options)
                   for s in todo]
        for future in as_completed(futures):
            yield future.result()


def _write_progress(out_dir: Path, total: int, graded: int, *, finished: bool) -> None:
    """progress.json: how much of the batch final_grades.csv holds; ``finished`` is false in
    the folder of a batch that is running or was stopped (run the same command to go on)."""
    write_atomically(out_dir / "progress.json", json.dumps(
        {"submissions": total, "graded": graded, "finished": finished}).encode())


def _results_of(autograder_zip: Path, outcome: Outcome) -> Any:
    results = outcome.results
    if results is None:
        results = failed_results(autograder_zip, outcome.reason or "unknown failure")
    results.file = outcome.submission.name
    return results


def _write_log(out_dir: Path, outcome: Outcome) -> None:
    summary = outcome.results.summary() if outcome.results is not None else ""
    status = outcome.reason or "completed"
    write_atomically(out_dir / "logs" / f"{outcome.submission.stem}.log", (
        f"submission: {outcome.submission.name}\nstatus: {status}\n"
        f"seconds: {outcome.seconds:.1f}\n\n{outcome.log}\n{summary}\n").encode())


def _write_table(autograder_zip: Path, submissions: list[Path], done: dict[Path, Outcome],
                 rows: dict[Path, Any], out_dir: Path) -> Any:
    """final_grades.csv with a row for each submission graded so far, in the batch's order."""
    from .otter_adapter import scores_table

    outcomes = [done[s] for s in submissions if s in done]
    for outcome in outcomes:
        if outcome.submission not in rows:
            rows[outcome.submission] = _results_of(autograder_zip, outcome)
    table = scores_table([rows[o.submission] for o in outcomes])
    for outcome in outcomes:
        if outcome.reason:
            table.loc[table["file"] == outcome.submission.name, "grading_status"] = outcome.reason
    write_atomically(out_dir / "final_grades.csv", table.to_csv(index=False).encode())
    return table
