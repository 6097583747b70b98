"""Checks for Lab 3 (1F1B pipeline), called by the lab's public and hidden tests.

Schedules are judged three ways: valid (the reference validator: every dependency, every send
matched, no deadlock under blocking sends), the activations they hold (1F1B: at most p
microbatches), and their bubble (the simulated bubble equals (p - 1) / (m + p - 1), so a valid
schedule that stalls is caught). The executor is run on real processes with the *reference*
schedules, so that a wrong schedule (q1, q2) does not cost points on the executor (q5), and its
gradients are compared with the unsplit model's in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from course_reference.bench.pipeline import compare_with_torch, measured_bubble
from course_reference.parallel import pipeline as ref
from course_runtime.distributed import LaunchTimeout, WorkerError, launch
from course_runtime.testing import assert_close, require, time_limit
from grader.checks import check_ratio, forbid

FORBIDDEN = [
    "course_reference.parallel.pipeline.gpipe_schedule",
    "course_reference.parallel.pipeline.one_f_one_b_schedule",
    "course_reference.parallel.pipeline.interleaved_schedule",
    "course_reference.parallel.pipeline.add_communication",
    "course_reference.parallel.pipeline.find_deadlock",
    "course_reference.parallel.pipeline.schedule_problems",
    "course_reference.parallel.pipeline.simulate",
    "course_reference.parallel.pipeline.peak_in_flight",
    "course_reference.parallel.pipeline.pipeline_worker",
    "course_reference.parallel.pipeline.run_pipeline",
    "course_reference.parallel.pipeline.StageRunner.step",
]
REASON = ("Lab 3 asks you to write the schedules, the deadlock check, the simulator and the "
          "executor yourself; course_reference.parallel.pipeline is what yours is checked against")

WIDTH = 8


def guard(namespace: dict[str, Any] | None = None) -> Any:
    return forbid(FORBIDDEN, REASON, namespace)


def make_stage(stage: int) -> nn.Module:
    """The lab's model stage s: Linear(8, 8) and tanh, seeded by s (every process builds the
    same one). Activations keep the shape of a microbatch, (rows, 8)."""
    torch.manual_seed(3000 + stage)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())


def lab_batch(m: int, rows: int = 4, seed: int = 0) -> tuple[list[torch.Tensor],
                                                              list[torch.Tensor]]:
    """m microbatches of ``rows`` rows, and their regression targets."""
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(rows, WIDTH, generator=g) for _ in range(m)],
            [torch.randn(rows, WIDTH, generator=g) for _ in range(m)])


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
                ops = [a.op for a in actions if a.op in ref.COMPUTE]
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

def _swap(schedule: list[list[ref.Action]], stage: int, index: int) -> list[list[ref.Action]]:
    plan = [list(actions) for actions in schedule]
    plan[stage][index], plan[stage][index + 1] = plan[stage][index + 1], plan[stage][index]
    return plan


def deadlock_cases(seed: int | None) -> list[tuple[str, list[list[ref.Action]]]]:
    """Fixed cases (seed None), or random swaps of neighbouring actions in the reference
    schedules (some deadlock, some do not)."""
    A = ref.Action
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


def check_find_deadlock(find_deadlock: Callable[[Any], Any], seed: int | None,
                        namespace: dict[str, Any] | None = None) -> None:
    require(find_deadlock=find_deadlock)
    for name, plan in deadlock_cases(seed):
        expected = {r: a for r, (_, a) in ref.find_deadlock(plan).items()}
        with guard(namespace), time_limit(10, f"find_deadlock on {name}"):
            got = find_deadlock([list(actions) for actions in plan])
        got = {} if got is None else got
        try:
            got = {int(r): ref.Action(*a) for r, a in dict(got).items()}
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
    A = ref.Action
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
    return cases


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
                   for e in events if e[1] in ref.COMPUTE}
        except (TypeError, IndexError, ValueError) as error:
            raise AssertionError(f"simulate on {name}: expected a list of (stage, op, "
                                 f"microbatch, start, end), got {str(events)[:200]} "
                                 f"({error})") from None
        expected = {(e.stage, e.op, e.microbatch): (e.start, e.end) for e in reference.events
                    if e.op in ref.COMPUTE}
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
        assert_close(bubble, reference.bubble_fraction, what=f"bubble_fraction on {name}",
                     atol=1e-9)
        if list(peaks) != reference.peak_in_flight:
            raise AssertionError(f"peak_in_flight on {name}: expected {reference.peak_in_flight}"
                                 f", got {list(peaks)}")


# -- q5: the executor ----------------------------------------------------------------------------

def _run_cases(rank: int, world_size: int, worker: Callable[..., Any],
               cases: list[tuple[str, list, list, list]]) -> list[dict[str, torch.Tensor]]:
    results = []
    for _, schedule, xs, ys in cases:
        grads = worker(rank, world_size, schedule, make_stage, xs, ys, nn.functional.mse_loss)
        results.append({name: torch.as_tensor(g).detach().clone()
                        for name, g in dict(grads).items()})
    return results


def check_worker(pipeline_worker: Callable[..., Any], world_size: int, ms: Sequence[int],
                 seed: int, namespace: dict[str, Any] | None = None) -> None:
    """Run the student's worker on ``world_size`` processes with the reference GPipe and 1F1B
    schedules, and compare its gradients with the unsplit model's."""
    require(pipeline_worker=pipeline_worker)
    cases = []
    for m in ms:
        xs, ys = lab_batch(m, seed=seed + m)
        for kind, build in (("gpipe", ref.gpipe_schedule), ("1f1b", ref.one_f_one_b_schedule)):
            cases.append((f"{kind} with p = {world_size}, m = {m}", build(world_size, m), xs, ys))
    try:
        with guard(namespace):
            results = launch(_run_cases, world_size, pipeline_worker, cases, timeout=90,
                             group_timeout=20, threads=1)
    except LaunchTimeout as error:
        raise AssertionError(f"pipeline_worker did not finish on {world_size} processes: "
                             f"{error}") from None
    except WorkerError as error:
        raise AssertionError(f"pipeline_worker failed on rank {error.rank} with "
                             f"{error.error_type}:\n{error.remote_traceback[-1500:]}") from None
    for index, (name, _, xs, ys) in enumerate(cases):
        expected, _ = ref.reference_gradients(make_stage, world_size, xs, ys,
                                              nn.functional.mse_loss)
        for rank in range(world_size):
            got = results[rank][index]
            for param, grad in expected.items():
                stage, _, local = param.partition(".")
                if int(stage) != rank:
                    continue
                if local not in got:
                    raise AssertionError(f"{name}: rank {rank} returned no gradient for "
                                         f"{local!r} (it returned {sorted(got)})")
                actual = got[local].numpy()
                hint = ""
                ratio = float(np.sum(actual * grad.numpy()) / max(np.sum(grad.numpy() ** 2), 1e-30))
                if len(xs) > 1 and abs(ratio - len(xs)) < 0.01 * len(xs):
                    hint = (f" (yours is {len(xs)}x too large: the loss of the batch is the "
                            f"mean over microbatches, so divide each microbatch's loss by m)")
                assert_close(actual, grad.numpy(), what=f"{name}: gradient of stage {rank}'s "
                             f"{local}{hint}", atol=1e-6, rtol=1e-4)


# -- q6: speed -----------------------------------------------------------------------------------

def check_speed(pipeline_worker: Callable[..., Any], bound: float,
                namespace: dict[str, Any] | None = None) -> float:
    """Step time of the student's executor over ``torch.distributed.pipelining``'s
    Schedule1F1B, same stages, same processes, interleaved (2 ranks, 4 microbatches). A worker
    must first be right (q5's check on 2 ranks): a fast wrong answer earns nothing."""
    check_worker(pipeline_worker, world_size=2, ms=[3], seed=600, namespace=namespace)
    with guard(namespace):
        times = compare_with_torch(2, 4, "1f1b", rounds=6, worker=pipeline_worker, timeout=120)
    return check_ratio(times["ours"], times["torch"], what="1F1B pipeline step",
                       peer_name="torch.distributed.pipelining", bound=bound)


def check_bubble(pipeline_worker: Callable[..., Any], world_size: int, m: int,
                 namespace: dict[str, Any] | None = None) -> float:
    """Measured bubble of the student's executor on emulated stages (forward 10 ms, backward
    20 ms of wall time), under the reference 1F1B schedule: closer to the theory than to a
    pipeline that runs one stage at a time. The worker must first be right, as in
    ``check_speed``."""
    check_worker(pipeline_worker, world_size=2, ms=[3], seed=601, namespace=namespace)
    with guard(namespace):
        bubbles = measured_bubble(world_size, m, "1f1b", forward_s=0.01, rounds=2,
                                  worker=pipeline_worker)
    theory = ref.bubble_formula(world_size, m)
    serial = 1 - 1 / world_size
    print(f"measured bubble: yours {bubbles['ours']:.3f}, torch.distributed.pipelining "
          f"{bubbles['torch']:.3f}, theory {theory:.3f}")
    if bubbles["ours"] > (theory + serial) / 2:
        raise AssertionError(f"your measured bubble is {bubbles['ours']:.3f}: closer to a "
                             f"pipeline that runs one stage at a time ({serial:.3f}) than to "
                             f"1F1B's (p - 1) / (m + p - 1) = {theory:.3f}")
    return bubbles["ours"]
