"""Pipeline schedules: validated, simulated against the bubble formula, and executed on real
processes with gradients equal to the unsplit model's; the runtime's check of a schedule's form,
and its harness that times a worker against torch.distributed.pipelining."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from course_reference.bench.pipeline import stage_runner
from course_reference.parallel.pipeline import (
    Action,
    ScheduleError,
    advance,
    bubble_formula,
    find_deadlock,
    gpipe_schedule,
    interleaved_schedule,
    one_f_one_b_schedule,
    peak_in_flight,
    run_pipeline,
    schedule_problems,
    simulate,
    validate,
)
from course_runtime.distributed import LaunchTimeout, WorkerError
from course_runtime.pipeline import (
    check_structure,
    check_worker,
    compare_with_torch,
    lab_batch,
    structure_problems,
    unsplit_gradients,
)

SIZES = [(p, m) for p in (1, 2, 3, 4, 8) for m in (1, 2, 3, 4, 7, 16)]
SCHEDULES = {"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule}


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("p,m", SIZES)
def test_validator_accepts_the_schedules(name, p, m):
    assert schedule_problems(SCHEDULES[name](p, m), m) == []


@pytest.mark.parametrize("p,m,v", [(2, 2, 2), (2, 4, 2), (4, 4, 2), (4, 8, 3), (3, 6, 2)])
def test_validator_accepts_interleaved(p, m, v):
    assert schedule_problems(interleaved_schedule(p, m, v), m, v) == []


def test_validator_rejects_a_deadlocking_order():
    # 1F1B with the steady state's send before the receive: both neighbours send first.
    schedule = one_f_one_b_schedule(2, 3)
    stage0 = schedule[0]
    k = stage0.index(Action("recv_bwd", 0))
    stage0[k], stage0[k + 1] = stage0[k + 1], stage0[k]
    problems = schedule_problems(schedule, 3)
    assert len(problems) == 1 and problems[0].startswith("deadlock"), problems
    assert "stage 0 waits at position 3, send_fwd(1)" in problems[0], problems
    assert "stage 1 waits at position 3, send_bwd(0)" in problems[0], problems
    assert find_deadlock(schedule) == {0: (3, Action("send_fwd", 1)), 1: (3, Action("send_bwd", 0))}


def test_validator_rejects_backward_before_forward():
    schedule = gpipe_schedule(2, 2)
    schedule[1] = [Action("recv_fwd", 0), Action("B", 0), Action("F", 0)] + [
        a for a in schedule[1] if a not in (Action("recv_fwd", 0), Action("F", 0), Action("B", 0))]
    problems = schedule_problems(schedule, 2)
    assert any("B(0) at position 1 comes before F(0) at position 2" in p for p in problems), \
        problems


def test_validator_rejects_an_unmatched_send():
    schedule = gpipe_schedule(2, 2)
    schedule[1].remove(Action("recv_fwd", 1))
    problems = schedule_problems(schedule, 2)
    assert "stage 1: recv_fwd(1) is missing" in problems, problems
    with pytest.raises(ScheduleError, match="recv_fwd.1. is missing"):
        validate(schedule, 2)


def test_validator_rejects_wrong_indices_and_unknown_ops():
    schedule = gpipe_schedule(2, 2)
    schedule[0][schedule[0].index(Action("send_fwd", 1))] = Action("send_fwd", 2)
    assert any("microbatch must be in [0, 2)" in p for p in schedule_problems(schedule, 2))
    assert "unknown op 'fwd'" in schedule_problems([[("fwd", 0)]], 1)[0]
    assert "no neighbour" in schedule_problems([[("F", 0), ("send_fwd", 0), ("B", 0)]], 1)[0]


def test_validator_rejects_a_missing_backward():
    schedule = one_f_one_b_schedule(4, 8)
    schedule[0].pop()  # the last backward of the cool-down
    assert "stage 0: B(7) is missing" in schedule_problems(schedule, 8)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("p,m", SIZES)
def test_simulated_bubble_equals_the_formula(name, p, m):
    timeline = simulate(SCHEDULES[name](p, m), forward_cost=1.0, backward_cost=2.0)
    assert timeline.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert timeline.makespan == pytest.approx(3.0 * (m + p - 1))


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 16, 2), (4, 8, 4)])
def test_interleaving_divides_the_bubble_by_the_number_of_chunks(p, m, v):
    timeline = simulate(interleaved_schedule(p, m, v), 1.0, 2.0, chunks=v, blocking=False)
    assert timeline.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)
    assert timeline.bubble_fraction < simulate(one_f_one_b_schedule(p, m)).bubble_fraction


def test_blocking_sends_cost_the_interleaved_schedule_but_not_1f1b():
    blocking = simulate(interleaved_schedule(2, 4, 2), 1.0, 2.0, chunks=2)
    assert blocking.bubble_fraction > bubble_formula(2, 4, 2) + 0.05
    assert simulate(one_f_one_b_schedule(2, 4), blocking=False).bubble_fraction == \
        pytest.approx(bubble_formula(2, 4))


@pytest.mark.parametrize("p,m", SIZES)
def test_peak_in_flight(p, m):
    assert max(peak_in_flight(one_f_one_b_schedule(p, m))) <= p
    assert peak_in_flight(one_f_one_b_schedule(p, m))[0] == min(p, m)
    assert peak_in_flight(gpipe_schedule(p, m)) == [m] * p


def test_uneven_stage_costs_make_the_slowest_stage_the_bottleneck():
    timeline = simulate(one_f_one_b_schedule(3, 12), forward_cost=[1, 3, 1],
                        backward_cost=[2, 6, 2])
    # Steady state runs at the slow stage's pace: at least m * (3 + 6).
    assert timeline.makespan >= 12 * 9
    assert timeline.busy()[1] == pytest.approx(12 * 9)


# -- execution on real processes --------------------------------------------------------------

WIDTH = 6


def make_stage(stage: int) -> nn.Module:
    torch.manual_seed(1000 + stage)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())


def batch(m: int, rows: int = 3, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(rows, WIDTH, generator=g) for _ in range(m)],
            [torch.randn(rows, WIDTH, generator=g) for _ in range(m)])


def assert_same_gradients(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("p", [2, 4])
def test_executor_gradients_match_the_unsplit_model(name, p):
    for m in (1, p, 2 * p + 1):
        xs, ys = batch(m, seed=m)
        result = run_pipeline(SCHEDULES[name](p, m), make_stage, xs, ys, nn.functional.mse_loss)
        expected, loss = unsplit_gradients(make_stage, p, xs, ys, nn.functional.mse_loss)
        assert_same_gradients(result.grads, expected)
        assert sum(result.losses) / m == pytest.approx(loss, rel=1e-5)
        peaks = result.timeline.peak_in_flight
        assert peaks == (peak_in_flight(SCHEDULES[name](p, m))), peaks


def test_interleaved_executor_gradients_match():
    p, m, v = 2, 4, 2
    xs, ys = batch(m)
    result = run_pipeline(interleaved_schedule(p, m, v), make_stage, xs, ys,
                          nn.functional.mse_loss, chunks=v)
    expected, _ = unsplit_gradients(make_stage, p * v, xs, ys, nn.functional.mse_loss)
    assert_same_gradients(result.grads, expected)


@pytest.mark.parametrize("name", SCHEDULES)
def test_repeated_steps_reuse_buffers_without_mixing_steps(name):
    # The executor keeps its receive buffers from step to step; three steps on the same batch
    # must give the gradients of one (each step starts from zero) and the same losses.
    p, m = 3, 4
    xs, ys = batch(m, seed=5)
    result = run_pipeline(SCHEDULES[name](p, m), make_stage, xs, ys, nn.functional.mse_loss,
                          steps=3)
    expected, loss = unsplit_gradients(make_stage, p, xs, ys, nn.functional.mse_loss)
    assert_same_gradients(result.grads, expected)
    assert sum(result.losses) / m == pytest.approx(loss, rel=1e-5)


def test_executor_sends_do_not_wait_for_the_receiver():
    # Both neighbours send first: the validator refuses it (blocking sends deadlock), buffered
    # sends finish it, and the executor posts its sends without waiting, so it runs.
    m = 3
    schedule = one_f_one_b_schedule(2, m)
    k = schedule[0].index(Action("recv_bwd", 0))
    schedule[0][k], schedule[0][k + 1] = schedule[0][k + 1], schedule[0][k]
    assert find_deadlock(schedule)
    simulate(schedule, blocking=False)  # raises ScheduleError if it deadlocks
    xs, ys = batch(m, seed=6)
    result = run_pipeline(schedule, make_stage, xs, ys, nn.functional.mse_loss, check=False,
                          timeout=20)
    expected, _ = unsplit_gradients(make_stage, 2, xs, ys, nn.functional.mse_loss)
    assert_same_gradients(result.grads, expected)


def test_measured_timeline_is_ordered_on_every_stage():
    m = 4
    xs, ys = batch(m)
    timeline = run_pipeline(one_f_one_b_schedule(2, m), make_stage, xs, ys,
                            nn.functional.mse_loss).timeline
    for stage in range(2):
        events = [e for e in timeline.events if e.stage == stage]
        assert len(events) == len(one_f_one_b_schedule(2, m)[stage])
        assert all(a.end <= b.start + 1e-9 for a, b in zip(events, events[1:]))
    assert 0.0 <= timeline.bubble_fraction < 1.0


def test_deadlocking_schedule_is_refused_before_it_runs():
    schedule = [[Action("recv_bwd", 0), Action("F", 0), Action("send_fwd", 0), Action("B", 0)],
                [Action("recv_fwd", 0), Action("F", 0), Action("B", 0), Action("send_bwd", 0)]]
    xs, ys = batch(1)
    with pytest.raises(ScheduleError, match="deadlock.*stage 0 waits at position 0, recv_bwd"):
        run_pipeline(schedule, make_stage, xs, ys, nn.functional.mse_loss)


def test_deadlocking_schedule_on_real_processes_fails_in_bounded_time():
    # Each stage receives first: a cycle that no buffering can break.
    schedule = [[Action("recv_bwd", 0), Action("F", 0), Action("send_fwd", 0), Action("B", 0)],
                [Action("recv_fwd", 0), Action("F", 0), Action("B", 0), Action("send_bwd", 0)]]
    xs, ys = batch(1)
    start = time.monotonic()
    with pytest.raises((LaunchTimeout, WorkerError)) as info:
        run_pipeline(schedule, make_stage, xs, ys, nn.functional.mse_loss, check=False,
                     timeout=6)
    message = str(info.value)
    assert "rank 0" in message and "waiting in recv((3, 6), src=1" in message, message
    assert time.monotonic() - start < 30


# -- the runtime: a schedule's form, and the harnesses ------------------------------------------

def test_the_runtime_checks_the_form_and_leaves_deadlocks_to_the_lab():
    schedule = one_f_one_b_schedule(2, 3)
    k = schedule[0].index(Action("recv_bwd", 0))
    schedule[0][k], schedule[0][k + 1] = schedule[0][k + 1], schedule[0][k]
    assert structure_problems(schedule, 3) == []
    assert check_structure(schedule, 3) == schedule
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(schedule, 3)
    broken = gpipe_schedule(2, 2)
    broken[1].remove(Action("recv_fwd", 1))
    assert structure_problems(broken, 2) == schedule_problems(broken, 2)
    with pytest.raises(ScheduleError, match="recv_fwd.1. is missing"):
        check_structure(broken, 2)


def test_one_loop_runs_a_schedule_blocking_or_buffered():
    # Both neighbours send first: stuck under blocking sends, finished when sends are buffered.
    schedule = one_f_one_b_schedule(2, 3)
    k = schedule[0].index(Action("recv_bwd", 0))
    schedule[0][k], schedule[0][k + 1] = schedule[0][k + 1], schedule[0][k]
    assert advance(schedule) == [3, 3]
    assert advance(schedule, buffered=True) == [len(actions) for actions in schedule]
    matched = []
    advance(gpipe_schedule(2, 2), transfer=lambda r, a, peer, partner: matched.append(
        (r, str(a), peer, str(partner))))
    assert matched == [(0, "send_fwd(0)", 1, "recv_fwd(0)"), (0, "send_fwd(1)", 1, "recv_fwd(1)"),
                       (1, "send_bwd(0)", 0, "recv_bwd(0)"), (1, "send_bwd(1)", 0, "recv_bwd(1)")]


def _scaled_worker(scale):
    """A worker that runs the reference executor and returns its gradients times ``scale``."""
    def worker(rank, world_size, schedule, make_stage, microbatches, targets, loss_fn):
        step = stage_runner(rank, world_size, schedule, make_stage, microbatches, targets)
        return {name: scale * grad for name, grad in step().items()}
    return worker


def test_the_runtime_compares_a_worker_with_the_unsplit_model():
    m = 3
    cases = [(f"{name}", build(2, m), *lab_batch(m, seed=1)) for name, build in SCHEDULES.items()]
    check_worker(_scaled_worker(1.0), 2, cases)
    with pytest.raises(AssertionError, match="3x too large"):
        check_worker(_scaled_worker(3.0), 2, cases)


def test_the_runtime_times_a_worker_against_torch_and_checks_its_gradients():
    kwargs = dict(world_size=2, num_microbatches=4, rounds=2, make_stage=make_stage,
                  width=WIDTH, batch=8)
    right = compare_with_torch(None, one_f_one_b_schedule, runner=stage_runner, **kwargs)
    assert len(right["yours"]) == len(right["torch"]) == 2
    assert right["difference"] < 1e-6
    wrong = compare_with_torch(_scaled_worker(4.0), one_f_one_b_schedule(2, 4), **kwargs)
    assert wrong["difference"] == pytest.approx(3.0, rel=1e-4)
    with pytest.raises(ScheduleError, match="is missing"):
        compare_with_torch(_scaled_worker(1.0), [one_f_one_b_schedule(2, 4)[0], []], **kwargs)
