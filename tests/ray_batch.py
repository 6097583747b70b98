"""A batch graded on a real Ray cluster of two nodes on this machine, as an instructor starts
one: ``ray start --head`` and ``ray start --address`` (one CPU each), then ``grade_batch(...,
ray=address)``, then ``ray stop``. Run by tests/test_batch_grader.py inside a network namespace
of its own with only a loopback interface, so that every Ray process binds and talks on
127.0.0.1 (Ray picks a non-loopback address for a multi-node cluster when it can find one).

    python -m tests.ray_batch AUTOGRADER_ZIP OUT_DIR SUBMISSION...
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from course_runtime.distributed.launcher import free_port
    from grader.grade import grade_batch

    autograder, out, *submissions = argv
    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    node = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
            "--object-store-memory=200000000", "--disable-usage-stats"]
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--include-dashboard=false",
                        *node], check=True, env=env, timeout=180, stdout=subprocess.DEVNULL)
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", *node], check=True,
                       env=env, timeout=180, stdout=subprocess.DEVNULL)
        grade_batch(Path(autograder), [Path(s) for s in submissions], Path(out), timeout=150,
                    memory_gb=2.5, cell_timeout=20, progress=False, ray=f"127.0.0.1:{port}")
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
