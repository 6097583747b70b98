"""The grading benchmark's own pieces (grader/bench_grading.py): the generated batch has the
mix it claims, each submission its own bytes, and the projection counts each lab's ranks."""

from __future__ import annotations

import json

from grader.bench_grading import MIX, make_batch, projection
from grader.labs import find_lab


def test_the_generated_batch_has_its_mix(tmp_path):
    kinds = make_batch(find_lab("lab01_autograd").master, tmp_path / "batch", 20, seed=3)
    files = sorted((tmp_path / "batch").glob("*.ipynb"))
    assert [f.name for f in files] == sorted(kinds) and len(files) == 20
    assert {kind: list(kinds.values()).count(kind) for kind in MIX} == {
        "right": 8, "partly wrong": 6, "broken": 3, "hanging": 3}
    assert len({f.read_bytes() for f in files}) == 20, "two submissions share their bytes"
    for f in files:
        code = "\n".join("".join(c["source"]) for c in json.loads(f.read_text())["cells"]
                         if c["cell_type"] == "code")
        assert ("class Adam(:" in code) == (kinds[f.name] == "broken"), f.name
        assert ("while True:\n    pass" in code) == (kinds[f.name] == "hanging"), f.name
    right = [f for f in files if kinds[f.name] == "right"]
    wrong = [f for f in files if kinds[f.name] == "partly wrong"]
    code_of = {f.name: [c["source"] for c in json.loads(f.read_text())["cells"]
                        if c["cell_type"] == "code"] for f in right + wrong}
    assert all(code_of[w.name] != code_of[right[0].name] for w in wrong)


def test_the_projection_counts_each_labs_ranks():
    # Lab 2 forks 2 ranks (grading_cpus = 2): 300 x (36 + 2 x 18) CPU-seconds on 2 cores.
    assert projection({"lab01_autograd": 36.0, "lab02_zero": 18.0}, cores=2) == {
        "students": 300, "cores": 2, "hours": 3.0}
    assert projection({"lab01_autograd": 36.0}, cores=64, students=640)["hours"] == 0.1
