"""Checks a submission cannot reach (grader/isolated.py, course_runtime/sandbox.py).

The channel first: what crosses it is plain data, a fresh copy, and everything else a reference;
then the student's process: its exceptions, time limits and interrupts, what it may import and
read, the user it runs as; last, the curated cheats of tests/submissions, each graded as every
grading path grades it, none earning a point on what it cheats with.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from course_runtime import wire
from course_runtime.sandbox import ForbiddenCall
from course_runtime.testing import GradingTimeout
from grader import isolated
from grader.gradescope import gradescope_results
from tests.submissions.mutations import apply_cheat

from .conftest import lab_names


def _no_references(x):
    raise wire.Unsendable(type(x).__name__)


def roundtrip(value):
    data, buffers = wire.encode(value, _no_references)
    return wire.decode(data, buffers, lambda ref: pytest.fail(f"unexpected reference {ref}"))


def test_plain_data_crosses_as_itself():
    value = {"a": (1, 2.5, None, True), 3: [b"raw", "text", slice(1, None, 2), ...],
             "special": [math.inf, -math.inf], (1, 2): {"nested": (("deep",),)}}
    assert roundtrip(value) == value
    assert math.isnan(roundtrip(float("nan")))
    assert type(roundtrip((1,))) is tuple and type(roundtrip([1])) is list


def test_an_array_arrives_as_a_fresh_plain_array():
    class Steering(np.ndarray):
        def __eq__(self, other):
            return True

    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    for array in (base, base[:, ::2].T, base.view(Steering), np.array([1 + 2j]),
                  np.array([True, False]), np.float64(2.5), np.int8(-3)):
        got = roundtrip(array)
        assert type(got) in (np.ndarray, type(array)) and not isinstance(got, Steering)
        assert np.asarray(got).dtype == np.asarray(array).dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(array))
    assert roundtrip(base) is not base


def test_a_tensor_arrives_as_its_values_in_a_plain_tensor():
    import torch

    class Steering(torch.Tensor):
        pass

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    leaf = torch.ones(3, dtype=torch.float64, requires_grad=True)
    for tensor in (base, base[:, ::2].t(), base.as_subclass(Steering), leaf * 2,
                   torch.nn.Parameter(torch.ones(2)), torch.randn(5).bfloat16(),
                   torch.tensor([True, False]), torch.zeros(0, 3), torch.tensor(7)):
        got = roundtrip(tensor)
        assert type(got) is torch.Tensor and not got.requires_grad and got.grad_fn is None
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got, tensor.detach().as_subclass(torch.Tensor))
    assert roundtrip(base).data_ptr() != base.data_ptr()
    data, buffers = wire.encode(base, _no_references)
    with pytest.raises(wire.WireError):
        wire.decode(data, [buffers[0][:-4]], lambda ref: None)  # bytes short of the shape
    data["dtype"] = "qint8"
    with pytest.raises(wire.WireError):
        wire.decode(data, buffers, lambda ref: None)


def test_a_schedule_action_arrives_as_an_action_of_the_receiver():
    from typing import NamedTuple

    from course_runtime.pipeline import Action

    class Lookalike(NamedTuple):  # the same fields, another class: not a value
        op: str
        microbatch: int

    plan = [[Action("F", 0), Action("send_fwd", 0, 1)], [("F", 0)]]
    got = roundtrip(plan)
    assert got == plan and type(got[0][0]) is Action and got[0][1].chunk == 1
    assert type(got[1][0]) is tuple
    with pytest.raises(wire.Unsendable):
        wire.encode(Lookalike("F", 0), _no_references)
    data, buffers = wire.encode(Action("F", 0), _no_references)
    for name, values in (("os:system", ["true"]), (data["$nt"], ["F", 0, 0, 0])):
        with pytest.raises(wire.WireError):
            wire.decode({"$nt": name, "v": values}, buffers, lambda ref: None)


def test_public_dataclasses_and_exceptions_keep_their_class():
    from dataclasses import dataclass

    from course_runtime.serving import OutOfBlocks, Request

    @dataclass(frozen=True)
    class Lookalike:  # the same fields, another class: not a value
        id: int

    got = roundtrip([Request(3, (1, 2), 4)])
    assert got == [Request(3, (1, 2), 4)] and type(got[0]) is Request
    with pytest.raises(wire.Unsendable):
        wire.encode(Lookalike(1), _no_references)
    for fields in ([["id", 1], ["no_such_field", 2]], [["id", 1]]):  # unknown; one missing
        with pytest.raises(wire.WireError):
            wire.decode({"$dc": "course_runtime.serving.workload:Request", "v": fields}, [],
                        lambda ref: None)
    name, values = wire.exception_fields(OutOfBlocks(2, 1, 8))
    rebuilt = wire.public_exception(name, values, isolated.StudentException)
    assert isinstance(rebuilt, OutOfBlocks) and isinstance(rebuilt, isolated.StudentException)
    assert (rebuilt.needed, rebuilt.free, rebuilt.total) == (2, 1, 8)
    assert wire.exception_fields(ValueError("x")) is None
    with pytest.raises(wire.WireError):
        wire.public_exception("builtins:SystemExit", [0])


def test_what_is_not_plain_data_needs_a_reference():
    for value in (object(), np.array([object()]), {1, 2}, lambda: 0):
        with pytest.raises(wire.Unsendable):
            wire.encode(value, _no_references)
    deep: list = []
    for _ in range(wire.MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(wire.Unsendable):
        wire.encode(deep, _no_references)


def test_frames_larger_than_a_pipe_buffer():
    read, write = os.pipe()
    big = np.random.default_rng(0).standard_normal((300, 1000))
    sender = threading.Thread(target=lambda: wire.send(write, {"n": 1}, [big.tobytes()]))
    sender.start()
    message, buffers = wire.Reader(read).frame()
    sender.join()
    os.close(read), os.close(write)
    assert message["n"] == 1
    np.testing.assert_array_equal(np.frombuffer(buffers[0]).reshape(300, 1000), big)


def test_a_malformed_frame_is_a_protocol_error():
    read, write = os.pipe()
    os.write(write, (16).to_bytes(8, "little") + (100).to_bytes(4, "little") + b"{" * 12)
    with pytest.raises(wire.WireError):
        wire.Reader(read).frame()
    os.close(read), os.close(write)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    secret = tmp_path_factory.mktemp("secret")
    (secret / "answers.py").write_text("ANSWER = 42\n")
    workdir = tmp_path_factory.mktemp("work")
    process = isolated.start_student(workdir, isolated.secret_paths(secret))
    process.secret = secret
    yield process
    process.close()


def run(student, source, limit=30.0):
    outcome = student.run_cell(source, limit)
    assert outcome["ok"], outcome
    return isolated.RemoteNamespace(student)


def test_functions_are_called_through_the_channel(student):
    env = run(student, "import numpy as np\n"
                       "def double(x):\n    return 2 * np.asarray(x)\n"
                       "class Box:\n    def __init__(self, v):\n        self.v = v\n"
                       "def fails():\n    raise KeyError('no such key')\n"
                       "def call_back(f, x):\n    return f(x) + 1\n")
    np.testing.assert_array_equal(env["double"](np.arange(3)), [0, 2, 4])
    box = env["Box"](np.ones(2))
    assert isolated.is_remote(box) and box == box and box != env["Box"](np.ones(2))
    np.testing.assert_array_equal(box.v, [1, 1])
    with pytest.raises(KeyError, match="no such key"):
        env["fails"]()
    assert env["call_back"](lambda x: x * 10, 4) == 41  # a function of ours, called there
    assert "missing" not in env and env.get("missing") is None


def test_what_the_student_cannot_reach(student):
    env = run(student, "import os\n"
                       "def can_import(name):\n"
                       "    try:\n        __import__(name)\n        return True\n"
                       "    except ImportError:\n        return False\n"
                       "def can_read(path):\n"
                       "    try:\n        open(path).read()\n        return True\n"
                       "    except OSError:\n        return False\n")
    for package in ("grader", "grader.checks", "course_reference", "course_reference.autograd"):
        assert not env["can_import"](package), package
    assert env["can_import"]("course_runtime.testing") and env["can_import"]("numpy")
    if os.geteuid() == 0:
        assert not env["can_read"](str(student.secret / "answers.py"))
        uid = run(student, "uid = os.getuid()")["uid"]
        assert uid == isolated.unprivileged_user() != 0


def test_a_forbidden_library_is_blocked_wherever_it_is_kept(student):
    env = run(student, "import torch\nkept = {'grad': torch.autograd.grad}\n"
                       "def through_torch(x):\n"
                       "    t = torch.tensor(x, requires_grad=True)\n"
                       "    return kept['grad']((t * t).sum(), t)[0].numpy()\n")
    np.testing.assert_allclose(env["through_torch"](np.array([3.0])), [6.0])
    with student.blocked(["torch.autograd.grad"], "write it yourself"):
        with pytest.raises(ForbiddenCall):
            env["through_torch"](np.array([3.0]))
    np.testing.assert_allclose(env["through_torch"](np.array([3.0])), [6.0])


def test_an_exposed_object_offers_its_listed_members_alone(student):
    from course_runtime.serving import OutOfBlocks

    class Counter:
        def __init__(self):
            self.count, self.secret = 0, "the grader's"

        def add(self, n):
            if n > 5:
                raise OutOfBlocks(n, 5, 5)
            self.count += n
            return self.count

    counter = Counter()
    exposed = isolated.Exposed(counter, methods=("add",), attributes=("count",))
    env = run(student, "from course_runtime.serving import OutOfBlocks\n"
                       "def use(c):\n    c.add(2)\n    return c.add(3), c.count\n"
                       "def reach(c, name):\n"
                       "    try:\n        getattr(c, name)\n    except AttributeError as e:\n"
                       "        return str(e)\n"
                       "def set_it(c):\n"
                       "    try:\n        c.count = 99\n    except AttributeError:\n"
                       "        return 'read-only'\n"
                       "def too_many(c):\n"
                       "    try:\n        c.add(7)\n    except OutOfBlocks as e:\n"
                       "        return e.needed, e.free\n"
                       "def back(c):\n    return c\n"
                       "def raise_one():\n    raise OutOfBlocks(3, 1, 4)\n")
    assert env["use"](exposed) == (5, 5) and counter.count == 5  # called here, on the object
    for name in ("secret", "__dict__", "obj"):
        assert "offers add, count" in env["reach"](exposed, name)
    assert env["set_it"](exposed) == "read-only" and counter.count == 5
    assert env["too_many"](exposed) == (7, 5)  # the grader's OutOfBlocks, as itself
    assert env["back"](exposed) is counter  # handed back, it is the object itself
    with pytest.raises(OutOfBlocks) as raised:  # the student's, with its class and fields
        env["raise_one"]()
    assert (raised.value.needed, raised.value.free, raised.value.total) == (3, 1, 4)


def test_a_loop_is_interrupted_and_the_process_goes_on(student):
    outcome = student.run_cell("while True:\n    pass\n", 1.0)
    assert not outcome["ok"] and outcome["interrupted"]
    env = run(student, "def spin():\n    while True:\n        pass\n")
    with pytest.raises(GradingTimeout):
        student.request("call", {"target": env["spin"], "args": [], "kwargs": {}}, timeout=1.0)
    assert run(student, "alive = 1")["alive"] == 1


def test_a_process_that_ignores_interrupts_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(isolated, "GRACE", 1.0)
    process = isolated.start_student(tmp_path, [])
    try:
        env = run(process, "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                           "def spin():\n    while True:\n        pass\n")
        with pytest.raises(GradingTimeout):
            process.request("call", {"target": env["spin"], "args": [], "kwargs": {}},
                            timeout=1.0)
        assert process.gone and "ignored an interrupt" in process.gone
        with pytest.raises(isolated.StudentProcessGone):
            env["spin"]
    finally:
        process.close()


# --------------------------------------------------------------------------------------------
# The curated cheats
# --------------------------------------------------------------------------------------------

def cheats_of(lab: str) -> list:
    import importlib
    return getattr(importlib.import_module(f"tests.submissions.{lab}"), "CHEATS", [])


CHEATS = [(lab, c) for lab in lab_names() for c in cheats_of(lab)]


def grade_isolated(autograder: Path, notebook: Path, lab: str, tmp: Path):
    """The autograder's folder as otter lays it out, graded as every grading path does."""
    submission = tmp / "submission"
    shutil.copytree(autograder, submission, ignore=shutil.ignore_patterns("*.zip"))
    shutil.copy(notebook, submission / f"{lab}.ipynb")
    tests = sorted(str(p) for p in (submission / "tests").glob("*.py"))
    return isolated.grade_notebook(str(submission / f"{lab}.ipynb"), tests_glob=tests,
                                   cwd=str(submission), test_dir=str(submission / "tests"))


def hidden_text(lab: str, autograder: Path) -> list[str]:
    """Lines of what a student must never see: the hidden tests, the checks, the reference."""
    from grader.labs import Lab
    files = [*sorted((autograder / "tests").glob("*.py")), Lab(lab).checks,
             *[p for ref in Lab(lab).paths("reference")
               for p in (sorted(ref.rglob("*.py")) if ref.is_dir() else [ref])]]
    lines = {line.strip() for f in files for line in f.read_text().splitlines()}
    return sorted(line for line in lines if len(line) >= 30 and not line.startswith("#"))


@pytest.mark.slow
@pytest.mark.parametrize("lab,cheat", CHEATS, ids=[f"{lab}-{c.name}" for lab, c in CHEATS])
def test_a_cheat_earns_nothing(assigned, lab, cheat, tmp_path):
    base = assigned(lab).student if cheat.base == "student" else assigned(lab).solution
    notebook = apply_cheat(cheat, base, tmp_path / "in")
    autograder = assigned(lab).out / "autograder"
    results = grade_isolated(autograder, notebook, lab, tmp_path)
    scores = {name: (results.get_result(name).score, results.get_result(name).possible)
              for name in results.test_files}
    targets = cheat.targets or set(scores)
    earned = {q: s for q, s in scores.items() if q in targets and s[0] > 0}
    assert not earned, f"{cheat.name} ({cheat.why}) earns {earned}"
    if cheat.base == "solution":
        lost = {q: s for q, s in scores.items()
                if q not in targets | cheat.partly and s[0] < s[1]}
        assert not lost, f"{cheat.name}: the honest rest of the solution loses {lost}"
    feedback = gradescope_results(results)
    visible = "\n".join(t["output"] for t in feedback["tests"] if t["visibility"] == "visible")
    leaked = [line for line in hidden_text(lab, autograder) if line in visible]
    assert not leaked, f"{cheat.name}: the public feedback quotes hidden code: {leaked[:3]}"


def test_timed_blocks_lease_different_cpus(tmp_path, monkeypatch):
    """Two gradings timing at once are held to two CPUs, not both to the one they ran on; when
    every CPU is leased, a third times where it runs. The leases' lock files are this test's
    own: a grading timed by another test worker at the same moment holds a lease of its own."""
    import os
    import tempfile

    from grader.isolated import _current_cpu, _timing_cpu

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    cpus = sorted(os.sched_getaffinity(0))
    with _timing_cpu() as first:
        with _timing_cpu() as second:
            if len(cpus) == 1:
                assert first == second == cpus[0]
            else:
                assert first != second and {first, second} <= set(cpus)
                if len(cpus) == 2:
                    with _timing_cpu() as third:
                        assert third == _current_cpu()
