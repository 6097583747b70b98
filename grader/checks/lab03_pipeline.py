"""Checks for Lab 3 (1F1B pipeline), called by the lab's hidden tests.

Schedules are judged three ways: valid (the reference validator: every dependency, every send
matched, no deadlock under blocking sends), the activations they hold (1F1B: at most p
microbatches), and their bubble (the simulated bubble equals (p - 1) / (m + p - 1), so a valid
schedule that stalls is caught). The executor is run on real processes with the *reference*
schedules, so that a wrong schedule (q1, q2) does not cost points on the executor (q5), and its
gradients are compared with the unsplit model's in one process (the runtime's harness,
``course_runtime.pipeline``, which the public tests use too). With the submission in a process
of its own (``grader.isolated``), the harness forks the ranks there and their gradients come
back as values, compared here; schedules cross as lists of ``Action``s.

The public tests compare with ``public_expectations()``: what the reference computes for their
cases, shipped with the lab as data. The hidden tests rerun those cases (``*_fixed_hidden``), so
they alone decide the grade.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from course_reference.parallel import pipeline as ref
from course_reference.parallel.pipeline import executor, order, schedules, simulation, validation
from course_runtime import pipeline as runtime
from course_runtime.pipeline import COMPUTE, Action, compare_with_torch, lab_batch, measured_bubble
from course_runtime.testing import assert_close, require, time_limit
from grader.checks import check_ratio, forbid, run_there
from grader.isolated import is_remote

ISOLATED = True  # graded with the submission in a process of its own (grader.isolated)


def _paths(function: Any) -> list[str]:
    """The paths ``forbid`` patches for a reference function: where it is defined, read from
    the function itself so that it follows a move, and where the package re-exports it."""
    return [f"{function.__module__}.{function.__qualname__}",
            f"{ref.__name__}.{function.__qualname__}"]


FORBIDDEN = [path for function in (
    schedules.gpipe_schedule, schedules.one_f_one_b_schedule, schedules.interleaved_schedule,
    schedules.add_communication, order.advance, validation.find_deadlock,
    validation.schedule_problems, validation.validate, simulation.simulate,
    simulation.peak_in_flight, executor.pipeline_worker, executor.run_pipeline,
    executor.StageRunner.step) for path in _paths(function)]
REASON = ("Lab 3 asks you to write the schedules, the deadlock check, the simulator and the "
          "executor yourself; course_reference.parallel.pipeline is what yours is checked against")

# The public tests' cases; the hidden tests rerun them (``*_fixed_hidden``).
PUBLIC_GPIPE = [(2, 1), (2, 3), (4, 8)]
PUBLIC_ONE_F_ONE_B = [(2, 1), (2, 4), (4, 8)]
PUBLIC_WORKER = {"world_size": 2, "ms": [1, 2, 5], "seed": 0}
PUBLIC_SPEED = {"bound": 5.0}
SPEED_CHECK = {"world_size": 2, "ms": [3], "seed": 600}  # the worker is checked before timing
SPEED_SIZE = (2, 4)  # (ranks, microbatches) timed against Schedule1F1B


def guard(namespace: dict[str, Any] | None = None) -> Any:
    return forbid(FORBIDDEN, REASON, namespace)


def _guarded(pipeline_worker: Any, namespace: dict[str, Any] | None) -> dict[str, Any]:
    """How the runtime's harness is to guard each call into the worker on its ranks: here, by
    ``guard``; where the submission runs in a process of its own there is nothing to block, as
    everything Lab 3 forbids is the reference, which cannot be imported there at all."""
    assert all(path.startswith("course_reference.") for path in FORBIDDEN)
    return {} if is_remote(pipeline_worker) else {"guard": lambda: guard(namespace)}


def random_sizes(seed: int, cases: int, max_stages: int = 8, max_microbatches: int = 20
                 ) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(2, max_stages + 1)), int(rng.integers(1, max_microbatches + 1)))
            for _ in range(cases)]


# -- q1, q2: schedules ---------------------------------------------------------------------------

def _build(build: Callable[[int, int], Any], name: str, p: int, m: int,
           namespace: dict[str, Any] | None) -> Any:
    with guard(namespace), time_limit(10, f"{name}({p}, {m})"):
        return build(p, m)


def check_schedule(build: Callable[[int, int], Any], kind: str, sizes: Sequence[tuple[int, int]],
                   namespace: dict[str, Any] | None = None) -> None:
    """``kind`` is "gpipe" or "1f1b". Valid, the right memory, and no stall, for every size."""
    name = {"gpipe": "gpipe_schedule", "1f1b": "one_f_one_b_schedule"}[kind]
    require(**{name: build})
    for p, m in sizes:
        schedule = _build(build, name, p, m, namespace)
        if not isinstance(schedule, (list, tuple)) or len(schedule) != p:
            size = f" of length {len(schedule)}" if hasattr(schedule, "__len__") else ""
            raise AssertionError(f"{name}({p}, {m}) should return one list of actions per "
                                 f"stage ({p} lists), got {type(schedule).__name__}{size}")
        problems = ref.schedule_problems(schedule, m)
        if problems:
            raise AssertionError(f"{name}({p}, {m}) is not a valid schedule:\n  "
                                 + "\n  ".join(problems[:6]))
        plan = ref.normalize(schedule)
        peaks = ref.peak_in_flight(plan)
        if kind == "gpipe":
            for s, actions in enumerate(plan):
                ops = [a.op for a in actions if a.op in COMPUTE]
                if "F" in ops[ops.index("B"):]:
                    raise AssertionError(f"{name}({p}, {m}): stage {s} runs a forward after a "
                                         f"backward; GPipe runs every forward first")
        elif max(peaks) > p:
            s = int(np.argmax(peaks))
            raise AssertionError(
                f"{name}({p}, {m}): stage {s} holds the activations of {peaks[s]} microbatches "
                f"at once; 1F1B holds at most p = {p} (stage s runs p - 1 - s warm-up forwards, "
                f"then alternates). Held per stage: {peaks}")
        bubble = ref.simulate(plan, 1.0, 2.0).bubble_fraction
        expected = ref.bubble_formula(p, m)
        if abs(bubble - expected) > 1e-9:
            raise AssertionError(
                f"{name}({p}, {m}) is valid but stalls: simulated bubble {bubble:.4f} (forward "
                f"1, backward 2), where (p - 1) / (m + p - 1) = {expected:.4f}. Check the order "
                f"of sends and receives: a stage that waits for a peer that is busy computing "
                f"loses time")


# -- q3: deadlock detection ----------------------------------------------------------------------

def _swap(schedule: list[list[Action]], stage: int, index: int) -> list[list[Action]]:
    plan = [list(actions) for actions in schedule]
    plan[stage][index], plan[stage][index + 1] = plan[stage][index + 1], plan[stage][index]
    return plan


PHASES = ("recv_fwd", "F", "send_fwd", "recv_bwd", "B", "send_bwd")


def batched_communication(plan: Sequence[Sequence[Action]]) -> list[list[Action]]:
    """Every stage's actions grouped by phase (all its receives of activations, then all its
    forwards, then all its sends, ...), microbatches in order within a phase. On GPipe this
    finishes, and some rounds of the blocking order only pair sends with receives: a stage
    that pairs late in a round may then have a compute to run in the next."""
    return [sorted(actions, key=lambda a: (PHASES.index(a.op), a.microbatch))
            for actions in plan]


def deadlock_cases(seed: int | None) -> list[tuple[str, list[list[Action]]]]:
    """Fixed cases (seed None), or random swaps of neighbouring actions in the reference
    schedules (some deadlock, some do not)."""
    A = Action
    recv_cycle = [[A("recv_bwd", 0), A("F", 0), A("send_fwd", 0), A("B", 0)],
                  [A("recv_fwd", 0), A("F", 0), A("B", 0), A("send_bwd", 0)]]
    send_first = ref.one_f_one_b_schedule(2, 3)
    k = send_first[0].index(A("recv_bwd", 0))
    missing = ref.gpipe_schedule(3, 2)
    missing[2].remove(A("recv_fwd", 1))
    cases = [("gpipe(3, 4)", ref.gpipe_schedule(3, 4)),
             ("1f1b(4, 6)", ref.one_f_one_b_schedule(4, 6)),
             ("1f1b(2, 1)", ref.one_f_one_b_schedule(2, 1)),
             ("both stages receive first", recv_cycle),
             ("both neighbours send first", _swap(send_first, 0, k)),
             ("stage 2 never receives microbatch 1", missing)]
    if seed is None:
        return cases
    # A stage that waits for a peer that has already finished its list.
    cases += [("stage 1 stops after one microbatch",
               [[A("F", 0), A("send_fwd", 0), A("F", 1), A("send_fwd", 1)],
                [A("recv_fwd", 0), A("F", 0)]]),
              ("stage 0 receives a gradient stage 1 never sends",
               [[A("F", 0), A("send_fwd", 0), A("recv_bwd", 0), A("B", 0)],
                [A("recv_fwd", 0), A("F", 0), A("B", 0)]])]
    cases += [(f"gpipe({p}, {m}) with communication batched per phase",
               batched_communication(ref.gpipe_schedule(p, m))) for p, m in ((2, 2), (3, 3))]
    rng = np.random.default_rng(seed)
    random_cases = []
    for _ in range(30):
        p, m = int(rng.integers(2, 6)), int(rng.integers(1, 8))
        build = ref.gpipe_schedule if rng.random() < 0.4 else ref.one_f_one_b_schedule
        plan = build(p, m)
        for _ in range(int(rng.integers(1, 3))):
            s = int(rng.integers(0, p))
            if len(plan[s]) > 1:
                plan = _swap(plan, s, int(rng.integers(0, len(plan[s]) - 1)))
        random_cases.append((f"{build.__name__}({p}, {m}) with actions swapped", plan))
    return cases + random_cases


def expected_deadlock(plan: list[list[Action]]) -> dict[int, Action]:
    """The reference's answer: every stage that can never finish, and the action it waits at."""
    return {r: a for r, (_, a) in ref.find_deadlock(plan).items()}


def check_find_deadlock(find_deadlock: Callable[[Any], Any], seed: int | None,
                        namespace: dict[str, Any] | None = None) -> None:
    require(find_deadlock=find_deadlock)
    for name, plan in deadlock_cases(seed):
        expected = expected_deadlock(plan)
        with guard(namespace), time_limit(10, f"find_deadlock on {name}"):
            got = find_deadlock([list(actions) for actions in plan])
        got = {} if got is None else got
        try:
            got = {int(r): Action(*a) for r, a in dict(got).items()}
        except (TypeError, ValueError) as error:
            raise AssertionError(f"find_deadlock on {name}: expected a dict stage -> the action "
                                 f"it is stuck at, got {got!r} ({error})") from None
        if got != expected:
            raise AssertionError(f"find_deadlock on {name}: expected {expected or '{}'} (every "
                                 f"stage that can never finish, and the action it waits at), "
                                 f"got {got or '{}'}")


# -- q4: simulation ------------------------------------------------------------------------------

def simulation_cases(seed: int | None) -> list[tuple[str, Any, list[float], list[float]]]:
    if seed is None:
        return [("gpipe(3, 4)", ref.gpipe_schedule(3, 4), [1.0] * 3, [2.0] * 3),
                ("1f1b(4, 8)", ref.one_f_one_b_schedule(4, 8), [1.0] * 4, [2.0] * 4)]
    rng = np.random.default_rng(seed)
    A = Action
    # Valid but stalling: stage 0 sends before it receives, and so waits on a busy stage 1.
    stalling = ref.one_f_one_b_schedule(2, 4)
    stalling[0] = [a for a in stalling[0] if a.op != "send_fwd"]
    for i in range(4):
        stalling[0].insert(stalling[0].index(A("F", i)) + 1, A("send_fwd", i))
    cases = []
    for _ in range(6):
        p, m = int(rng.integers(2, 6)), int(rng.integers(1, 10))
        build = ref.gpipe_schedule if rng.random() < 0.5 else ref.one_f_one_b_schedule
        cases.append((f"{build.__name__}({p}, {m}) with uneven stages", build(p, m),
                      [float(c) for c in rng.uniform(0.5, 2.0, p)],
                      [float(c) for c in rng.uniform(1.0, 4.0, p)]))
    if not ref.schedule_problems(stalling, 4):
        cases.append(("a valid 1F1B(2, 4) that sends before it receives", stalling,
                      [1.0, 1.0], [2.0, 2.0]))
    for p, m in ((2, 2), (3, 4)):
        cases.append((f"gpipe({p}, {m}) with communication batched per phase",
                      batched_communication(ref.gpipe_schedule(p, m)),
                      [float(c) for c in rng.uniform(0.5, 2.0, p)],
                      [float(c) for c in rng.uniform(1.0, 4.0, p)]))
    # Valid schedules with neighbouring actions swapped: some rounds of the simulation then
    # only pair sends with receives, and the simulation must go on after them.
    swapped = 0
    while swapped < 12:
        p, m = int(rng.integers(2, 5)), int(rng.integers(2, 5))
        plan = ref.one_f_one_b_schedule(p, m)
        for _ in range(int(rng.integers(1, 4))):
            s = int(rng.integers(0, p))
            plan = _swap(plan, s, int(rng.integers(0, len(plan[s]) - 1)))
        if ref.schedule_problems(plan, m) or ref.find_deadlock(plan):
            continue
        swapped += 1
        cases.append((f"one_f_one_b_schedule({p}, {m}) with actions swapped", plan,
                      [float(c) for c in rng.uniform(0.5, 2.0, p)],
                      [float(c) for c in rng.uniform(1.0, 4.0, p)]))
    return cases


def compute_events(timeline: Any, compute: bool = True
                   ) -> dict[tuple[int, str, int], tuple[float, float]]:
    """(stage, op, microbatch) -> (start, end) of every forward and backward of a timeline
    (with ``compute=False``: of every send and receive)."""
    return {(e.stage, e.op, e.microbatch): (e.start, e.end) for e in timeline.events
            if (e.op in COMPUTE) == compute}


def _shifted(events: Sequence[Any], offset: float) -> list[tuple[int, str, int, float, float]]:
    """A timeline's events as (stage, op, microbatch, start, end), every time moved by
    ``offset``: the same pipeline, started later."""
    return [(e.stage, e.op, e.microbatch, e.start + offset, e.end + offset) for e in events]


def check_simulate(simulate: Callable[..., Any], bubble_fraction: Callable[..., Any],
                   peak_in_flight: Callable[..., Any], seed: int | None,
                   namespace: dict[str, Any] | None = None) -> None:
    require(simulate=simulate, bubble_fraction=bubble_fraction, peak_in_flight=peak_in_flight)
    for name, plan, fwd, bwd in simulation_cases(seed):
        p = len(plan)
        reference = ref.simulate(plan, fwd, bwd)
        with guard(namespace), time_limit(20, f"simulate on {name}"):
            events = simulate([list(a) for a in plan], fwd, bwd)
            bubble = bubble_fraction(events, p)
            peaks = peak_in_flight([list(a) for a in plan])
        try:
            got = {(int(e[0]), str(e[1]), int(e[2])): (float(e[-2]), float(e[-1]))
                   for e in events if e[1] in COMPUTE}
            transfers = [(int(e[0]), str(e[1]), int(e[2]), float(e[-2]), float(e[-1]))
                         for e in events if e[1] not in COMPUTE]
        except (TypeError, IndexError, ValueError) as error:
            raise AssertionError(f"simulate on {name}: expected a list of (stage, op, "
                                 f"microbatch, start, end), got {str(events)[:200]} "
                                 f"({error})") from None
        expected = compute_events(reference)
        if set(got) != set(expected):
            missing = sorted(set(expected) - set(got))[:4]
            raise AssertionError(f"simulate on {name}: expected one event per forward and "
                                 f"backward; missing {missing}, extra "
                                 f"{sorted(set(got) - set(expected))[:4]}")
        keys = sorted(expected, key=lambda k: expected[k])
        assert_close(np.array([got[k] for k in keys]), np.array([expected[k] for k in keys]),
                     what=f"simulate on {name}: (start, end) of {len(keys)} compute events, in "
                          f"order of expected start (first: stage {keys[0][0]} {keys[0][1]}"
                          f"({keys[0][2]}))", atol=1e-9, rtol=1e-9)
        expected_transfers = compute_events(reference, compute=False)
        if sorted(k[:3] for k in transfers) != sorted(expected_transfers):
            got_keys = {k[:3] for k in transfers}
            missing = sorted(set(expected_transfers) - got_keys)[:4]
            raise AssertionError(
                f"simulate on {name}: expected one event per action, sends and receives too "
                f"({len(expected_transfers)} of them, each starting and ending when it pairs "
                f"with its match); got {len(transfers)}, missing {missing}, extra "
                f"{sorted(got_keys - set(expected_transfers))[:4]}")
        transfers.sort(key=lambda e: expected_transfers[e[:3]])
        assert_close(np.array([e[3:] for e in transfers]),
                     np.array([expected_transfers[e[:3]] for e in transfers]),
                     what=f"simulate on {name}: (start, end) of the {len(transfers)} sends and "
                          f"receives (each happens when both sides reach it, and takes no "
                          f"time)", atol=1e-9, rtol=1e-9)
        assert_close(bubble, reference.bubble_fraction, what=f"bubble_fraction on {name}",
                     atol=1e-9)
        offset = 3.5 + float(p)
        with guard(namespace), time_limit(20, f"bubble_fraction on {name}"):
            later = bubble_fraction(_shifted(reference.events, offset), p)
        assert_close(later, reference.bubble_fraction,
                     what=f"bubble_fraction on {name}'s timeline started at t = {offset} (the "
                          f"makespan runs from the first start to the last end)", atol=1e-9)
        if list(peaks) != reference.peak_in_flight:
            raise AssertionError(f"peak_in_flight on {name}: expected {reference.peak_in_flight}"
                                 f", got {list(peaks)}")


# -- q5: the executor ----------------------------------------------------------------------------

def worker_cases(world_size: int, ms: Sequence[int], seed: int
                 ) -> list[tuple[str, list[list[Action]], int, int]]:
    """(name, reference schedule, m, seed of ``lab_batch``): GPipe and 1F1B for each m."""
    return [(f"{kind} with p = {world_size}, m = {m}", build(world_size, m), m, seed + m)
            for m in ms for kind, build in (("gpipe", ref.gpipe_schedule),
                                            ("1f1b", ref.one_f_one_b_schedule))]


def check_worker(pipeline_worker: Callable[..., Any], world_size: int, ms: Sequence[int],
                 seed: int, namespace: dict[str, Any] | None = None) -> None:
    """Run the student's worker on ``world_size`` processes with the reference GPipe and 1F1B
    schedules, and compare its gradients with the unsplit model's."""
    require(pipeline_worker=pipeline_worker)
    cases = [(name, plan, *lab_batch(m, seed=batch_seed))
             for name, plan, m, batch_seed in worker_cases(world_size, ms, seed)]
    # The ranks are forked where the worker lives; their gradients come back as values and are
    # compared with the unsplit model's here.
    results = run_there(runtime.run_worker, pipeline_worker, world_size, cases,
                        **_guarded(pipeline_worker, namespace))
    runtime.assert_unsplit_gradients(results, cases, world_size)


# -- q6: speed -----------------------------------------------------------------------------------

def check_speed(pipeline_worker: Callable[..., Any], bound: float,
                namespace: dict[str, Any] | None = None) -> float:
    """Step time of the student's executor over ``torch.distributed.pipelining``'s
    Schedule1F1B, same stages, same processes, interleaved (2 ranks, 4 microbatches, the
    reference 1F1B schedule). A worker must first be right (q5's check on 2 ranks, and its
    gradients in the timed steps equal PyTorch's): a fast wrong answer earns nothing."""
    check_worker(pipeline_worker, **SPEED_CHECK, namespace=namespace)
    plan = ref.one_f_one_b_schedule(*SPEED_SIZE)
    with guard(namespace):
        times = run_there(compare_with_torch, pipeline_worker, plan, *SPEED_SIZE, rounds=6,
                          timeout=120)
    _check_difference(times["difference"], "timed")
    return check_ratio(times["yours"], times["torch"], what="1F1B pipeline step",
                       peer_name="torch.distributed.pipelining", bound=bound)


def _check_difference(difference: float, what: str) -> None:
    if not difference < 1e-4:
        raise AssertionError(f"in the {what} steps your gradients differ from "
                             f"torch.distributed.pipelining's by {difference:.3g} (relative to "
                             f"the largest): a step only counts when it is right")


def check_bubble(pipeline_worker: Callable[..., Any], world_size: int, m: int,
                 namespace: dict[str, Any] | None = None) -> float:
    """Measured bubble of the student's executor on emulated stages (forward 10 ms, backward
    20 ms of wall time), under the reference 1F1B schedule: closer to the theory than to a
    pipeline that runs one stage at a time. The worker must first be right, as in
    ``check_speed``."""
    check_worker(pipeline_worker, world_size=2, ms=[3], seed=601, namespace=namespace)
    plan = ref.one_f_one_b_schedule(world_size, m)
    with guard(namespace):
        bubbles = run_there(measured_bubble, pipeline_worker, plan, world_size, m,
                            forward_s=0.01, rounds=3)
    _check_difference(bubbles["difference"], "measured")
    theory = ref.bubble_formula(world_size, m)
    serial = 1 - 1 / world_size
    print(f"measured bubble: yours {bubbles['yours']:.3f}, torch.distributed.pipelining "
          f"{bubbles['torch']:.3f}, theory {theory:.3f}")
    if bubbles["yours"] > (theory + serial) / 2:
        raise AssertionError(f"your measured bubble is {bubbles['yours']:.3f}: closer to a "
                             f"pipeline that runs one stage at a time ({serial:.3f}) than to "
                             f"1F1B's (p - 1) / (m + p - 1) = {theory:.3f}")
    return bubbles["yours"]


# -- what the public tests compare with -----------------------------------------------------------

def public_expectations() -> dict[str, Any]:
    """What the public tests compare with, computed by the reference when the lab is assigned:
    q1's GPipe schedules, q2's 1F1B compute order per stage, q3's deadlocks, q4's simulated
    timelines, and the reference schedules (with their batches' seeds) that q5 and q6 run."""
    def schedule_data(plan: Sequence[Sequence[Action]]) -> list[list[list[Any]]]:
        return [[list(a) for a in actions] for actions in plan]

    def worker_data(world_size: int, ms: Sequence[int], seed: int) -> dict[str, Any]:
        return {"world_size": world_size, "cases": [
            {"name": name, "schedule": schedule_data(plan), "num_microbatches": m, "seed": s}
            for name, plan, m, s in worker_cases(world_size, ms, seed)]}

    simulated = []
    for name, plan, fwd, bwd in simulation_cases(None):
        timeline = ref.simulate(plan, fwd, bwd)
        simulated.append({
            "name": name, "schedule": schedule_data(plan), "forward_cost": fwd,
            "backward_cost": bwd, "bubble": timeline.bubble_fraction,
            "peak_in_flight": timeline.peak_in_flight,
            "events": [[*key, *span] for key, span in sorted(compute_events(timeline).items())]})
    p, m = SPEED_SIZE
    return {
        "q1_gpipe": [{"num_stages": p, "num_microbatches": m,
                      "schedule": schedule_data(ref.gpipe_schedule(p, m))}
                     for p, m in PUBLIC_GPIPE],
        "q2_one_f_one_b": [
            {"num_stages": p, "num_microbatches": m,
             "compute": [[list(a) for a in actions if a.op in COMPUTE]
                         for actions in ref.one_f_one_b_schedule(p, m)]}
            for p, m in PUBLIC_ONE_F_ONE_B],
        "q3_deadlock": [
            {"name": name, "schedule": schedule_data(plan),
             "stuck": [[r, list(a)] for r, a in sorted(expected_deadlock(plan).items())]}
            for name, plan in deadlock_cases(None)],
        "q4_simulate": simulated,
        "q5_worker": worker_data(**PUBLIC_WORKER),
        "q6_speed": {"check": worker_data(**SPEED_CHECK), "num_stages": p,
                     "num_microbatches": m, **PUBLIC_SPEED,
                     "schedule": schedule_data(ref.one_f_one_b_schedule(p, m))},
    }


__all__ = ["check_bubble", "check_find_deadlock", "check_schedule", "check_simulate",
           "check_speed", "check_worker", "deadlock_cases", "public_expectations",
           "random_sizes", "simulation_cases", "worker_cases"]
