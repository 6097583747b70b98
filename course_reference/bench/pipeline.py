"""Lab 3's benchmark: our 1F1B and GPipe executors against ``torch.distributed.pipelining``.

Three measurements, each in one run:

* **Step time**, ours against PyTorch's ``Schedule1F1B`` / ``ScheduleGPipe`` on the same stages,
  timed interleaved in the same processes (world 2 and 4, gloo): an MLP of 4 layers of 256 per
  stage, batch 64 in m = 2p microbatches.
* **Bubble**, on an *emulated device*: each stage's forward occupies ``f`` seconds of wall time
  and its backward ``2f`` without using a core (a sleep, as a GPU kernel would occupy the GPU
  and not the CPU), so that 4 ranks on a 2-core laptop measure the schedule and not the
  scheduler. Measured bubble = 1 - m (f + b) / step time, against (p - 1) / (m + p - 1).
* **Peak activations** held by stage 0: at most p under 1F1B, m under GPipe.

The timing is the runtime's (``course_runtime.pipeline.compare_with_torch`` and
``measured_bubble``, which the lab times a student's worker with); here they time the
reference's ``StageRunner``, its stages built once, as PyTorch's are. A simulated scale study
(``scale_study``) covers p up to 64 and m up to 512 with no process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from course_runtime.pipeline import (
    BATCH,
    MLP_LAYERS,
    MLP_WIDTH,
    Schedule,
    bubble_formula,
    compare_with_torch,
    measured_bubble,
)
from course_runtime.timing import device_name

from ..parallel.pipeline import (
    StageRunner,
    gpipe_schedule,
    one_f_one_b_schedule,
    peak_in_flight,
    simulate,
)
from .harness import ratio_record

SCHEDULES = {"1f1b": one_f_one_b_schedule, "gpipe": gpipe_schedule}


def stage_runner(rank: int, world_size: int, schedule: Schedule,
                 make_stage: Callable[[int], nn.Module], microbatches: list[torch.Tensor],
                 targets: list[torch.Tensor]) -> Callable[[], dict[str, torch.Tensor]]:
    """A step of our ``StageRunner`` on this rank (stages and receive buffers built once, as
    PyTorch's are), for the runtime's timing harness; the step returns the stage's gradients."""
    runner = StageRunner(rank, world_size, make_stage, microbatches[0])
    actions = schedule[rank]

    def step() -> dict[str, torch.Tensor]:
        runner.step(actions, microbatches, targets, nn.functional.mse_loss)
        return {name: p.grad for name, p in runner.modules[rank].named_parameters()}

    return step


def scale_study(stages: tuple[int, ...] = (4, 8, 16, 32, 64),
                microbatches: tuple[int, ...] = (1, 4, 16, 64, 128, 256, 512)) -> list[dict]:
    """Simulated bubble and activations held per stage (in microbatches) for GPipe and 1F1B,
    without processes. The simulated bubble is checked against the formula as it goes."""
    rows = []
    for p in stages:
        for m in microbatches:
            for name, build in (("gpipe", gpipe_schedule), ("1f1b", one_f_one_b_schedule)):
                plan = build(p, m)
                bubble = simulate(plan, 1.0, 2.0).bubble_fraction
                if abs(bubble - bubble_formula(p, m)) > 1e-9:
                    raise AssertionError(f"{name} p={p} m={m}: simulated bubble {bubble:.6f}, "
                                         f"formula {bubble_formula(p, m):.6f}")
                rows.append({"schedule": name, "stages": p, "microbatches": m,
                             "bubble": bubble, "peak_activations": max(peak_in_flight(plan))})
    return rows


def run(rounds: int = 30) -> list[dict[str, Any]]:
    """Records for ``make bench``: step-time ratios to PyTorch with the bubble and peak counts."""
    records = []
    rounds = min(rounds, 10)  # a pipeline step is long; ten interleaved rounds keep this < 2 min
    for world_size in (2, 4):
        m = 2 * world_size
        for schedule in ("1f1b", "gpipe"):
            plan = SCHEDULES[schedule](world_size, m)
            times = compare_with_torch(None, plan, world_size, m, schedule, rounds,
                                       runner=stage_runner)
            bubbles = measured_bubble(None, plan, world_size, m, schedule, rounds=2,
                                      runner=stage_runner)
            for measured in (times, bubbles):
                if not measured["difference"] < 1e-4:
                    raise AssertionError(f"{schedule} at p={world_size}: our gradients differ "
                                         f"from PyTorch's by {measured['difference']:.3g}")
            records.append(ratio_record(
                f"pipeline_{schedule}_mlp{MLP_LAYERS}x{MLP_WIDTH}_b{BATCH}_m{m}",
                f"course_reference.parallel.pipeline ({schedule})",
                f"torch.distributed.pipelining "
                f"({'Schedule1F1B' if schedule == '1f1b' else 'ScheduleGPipe'})",
                times["yours"], times["torch"], device=device_name(), world_size=world_size,
                microbatches=m, bubble_measured=bubbles["yours"],
                bubble_measured_torch=bubbles["torch"],
                bubble_theory=bubble_formula(world_size, m),
                peak_activations_stage0=peak_in_flight(plan)[0]))
    return records
