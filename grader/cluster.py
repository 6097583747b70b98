"""Grading beyond one machine: each submission a Ray task, on any Ray cluster.

``course grade LAB SUBMISSIONS --ray auto`` (or ``--ray HOST:PORT``) hands every submission to
Ray with the resources its lab declares in grader/labs.toml (``grading_cpus``: the processes it
runs at once, the ranks of a distributed lab; ``grading_gpus``: GPUs for a lab graded on CUDA)
and a memory request equal to the per-submission memory cap. On the node that runs it, a task
grades exactly as the local pool does (grader.grade.grade_one_in_subprocess: a process of its
own, a wall-clock timeout, a memory cap, a per-cell limit), from the autograder's and the
submission's bytes, so the nodes need the course installed (the grading image) but no shared
disk. A task whose node dies is retried by Ray on another node; the batch keeps one result per
submission, whichever attempt returned it, so nothing is counted twice.

A batch whose tasks no node of the cluster could ever run (more CPUs or GPUs than any node has)
is refused before anything is submitted, instead of waiting forever.

``python -m grader.cluster ZIP OUT SUBMISSION...`` grades a batch on a cluster of two nodes it
starts on this machine (``ray start --head``, ``ray start --address``, one CPU each) and stops
afterwards; the tests and the grading benchmark run it in a network namespace with only a
loopback interface (``in_loopback_namespace``), so every Ray process binds and talks on
127.0.0.1 (Ray prefers a non-loopback address for a multi-node cluster when it finds one).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .grade import Outcome, grade_safely

RETRIES = 3  # attempts after the first when a node or its worker process dies


def lab_resources(autograder_zip: Path) -> dict[str, float]:
    """The Ray resources one submission of the zip's lab needs (labs.toml; 1 CPU otherwise)."""
    from .labs import manifest
    entry = manifest().get(autograder_zip.name.split("-autograder")[0], {})
    return {"num_cpus": float(entry.get("grading_cpus", 1)),
            "num_gpus": float(entry.get("grading_gpus", 0))}


def _grade_task(zip_name: str, zip_bytes: bytes, name: str, data: bytes,
                options: dict[str, Any]) -> tuple[Any, str | None, str, float]:
    """Runs on a node: the submission graded from bytes, in a scratch folder of its own."""
    import ray
    node = ray.get_runtime_context().get_node_id()
    with tempfile.TemporaryDirectory(prefix="course-ray-") as tmp:
        autograder = Path(tmp) / zip_name
        autograder.write_bytes(zip_bytes)
        submission = Path(tmp) / "submission" / name
        submission.parent.mkdir()
        submission.write_bytes(data)
        outcome = grade_safely(autograder, submission, **options)
    log = f"graded on Ray node {node}\n{outcome.log}"
    return outcome.results, outcome.reason, log, outcome.seconds


def _check_feasible(ray: Any, resources: dict[str, float], memory: int) -> None:
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    wanted = {"CPU": resources["num_cpus"], "GPU": resources["num_gpus"], "memory": memory}
    if not any(all(node.get(k, 0) >= v for k, v in wanted.items() if v) for node in nodes):
        largest = [{k: node.get(k, 0) for k in wanted} for node in nodes]
        raise SystemExit(f"no node of the Ray cluster can grade one submission: each needs "
                         f"{wanted}, and the nodes have {largest}. Start nodes with more "
                         "resources, or lower --memory-gb.")


def graded_on_ray(address: str, autograder_zip: Path, todo: list[Path], *, timeout: float,
                  memory_gb: float, cell_timeout: int) -> Any:
    """Outcomes as they finish, each submission graded by a Ray task on the cluster at
    ``address`` ("auto": the cluster this machine belongs to)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        yield from _graded(ray, autograder_zip, todo, timeout=timeout, memory_gb=memory_gb,
                           cell_timeout=cell_timeout)
    finally:
        if started:
            ray.shutdown()


def _graded(ray: Any, autograder_zip: Path, todo: list[Path], *, timeout: float,
            memory_gb: float, cell_timeout: int) -> Any:
    resources = lab_resources(autograder_zip)
    memory = int(memory_gb * 2**30)
    _check_feasible(ray, resources, memory)
    task = ray.remote(_grade_task).options(
        max_retries=RETRIES, retry_exceptions=False, memory=memory, **resources)
    zip_ref = ray.put(autograder_zip.read_bytes())
    threads = max(1, int(resources["num_cpus"]))
    options = dict(timeout=timeout, memory_gb=memory_gb, cell_timeout=cell_timeout,
                   threads=threads)
    pending: dict[Any, Path] = {}
    for submission in todo:
        try:
            data = submission.read_bytes()
        except OSError as error:
            yield Outcome(submission, None, f"could not be graded: {error}", repr(error), 0.0)
            continue
        ref = task.remote(autograder_zip.name, zip_ref, submission.name, data, options)
        pending[ref] = submission
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        submission = pending.pop(ready[0])
        try:
            results, reason, log, seconds = ray.get(ready[0])
        except ray.exceptions.RayError as error:  # retries spent: the row says why
            yield Outcome(submission, None, f"could not be graded on the cluster: "
                          f"{type(error).__name__}", str(error)[-4000:], 0.0)
            continue
        yield Outcome(submission, results, reason, log, seconds)


# -- a cluster on this machine ----------------------------------------------------------------

@contextlib.contextmanager
def local_cluster(nodes: int = 2, cpus: int = 1) -> Any:
    """A Ray cluster of ``nodes`` nodes of ``cpus`` CPUs on this machine, started as an
    instructor starts one; its head's address. Every Ray process here is stopped afterwards."""
    from course_runtime.distributed.launcher import free_port
    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    node = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
            "--object-store-memory=200000000", "--disable-usage-stats"]
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--include-dashboard=false",
                        *node], check=True, env=env, timeout=180, stdout=subprocess.DEVNULL)
        for _ in range(nodes - 1):
            subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", *node], check=True,
                           env=env, timeout=180, stdout=subprocess.DEVNULL)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def loopback_namespace_available() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and \
        shutil.which("ip") is not None


def in_loopback_namespace(command: list[str]) -> list[str]:
    """``command`` run in a network namespace of its own whose only interface is loopback."""
    import shlex
    return ["unshare", "--net", "sh", "-c",
            "ip link set lo up && exec " + " ".join(shlex.quote(c) for c in command)]


def main(argv: list[str]) -> int:
    """Grade a batch on a two-node cluster started here: ZIP OUT SUBMISSION... [--timeout S]
    [--cell-timeout S] [--memory-gb G]."""
    import argparse

    from .grade import grade_batch
    parser = argparse.ArgumentParser(prog="python -m grader.cluster", description=main.__doc__)
    parser.add_argument("autograder_zip", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("submissions", type=Path, nargs="+")
    parser.add_argument("--timeout", type=float, default=150)
    parser.add_argument("--cell-timeout", type=int, default=20)
    parser.add_argument("--memory-gb", type=float, default=2.5)
    args = parser.parse_args(argv)
    with local_cluster() as address:
        grade_batch(args.autograder_zip, args.submissions, args.out, timeout=args.timeout,
                    memory_gb=args.memory_gb, cell_timeout=args.cell_timeout, progress=False,
                    ray=address)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
