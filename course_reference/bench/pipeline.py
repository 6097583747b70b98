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

A simulated scale study (``scale_study``) covers p up to 64 and m up to 512 with no process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from course_runtime.distributed import launch
from course_runtime.timing import device_name

from ..parallel.pipeline import (
    StageRunner,
    bubble_formula,
    gpipe_schedule,
    one_f_one_b_schedule,
    peak_in_flight,
    simulate,
)
from .harness import ratio_record

WIDTH, LAYERS, BATCH = 256, 4, 64


def mlp_stage(stage: int, width: int = WIDTH, layers: int = LAYERS) -> nn.Module:
    """One pipeline stage of the benchmark: ``layers`` Linear + Tanh of ``width``, seeded."""
    torch.manual_seed(100 + stage)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())])


class _Occupy(torch.autograd.Function):
    """Identity that holds the device for ``forward_s`` seconds forward and twice that backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward_s: float) -> torch.Tensor:
        ctx.forward_s = forward_s
        time.sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        time.sleep(2 * ctx.forward_s)
        return grad.clone(), None


class EmulatedStage(nn.Module):
    """A stage that costs a fixed wall time per microbatch (``f`` forward, ``2f`` backward)."""

    def __init__(self, width: int, forward_s: float, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(width, width)
        self.forward_s = forward_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Occupy.apply(self.linear(x), self.forward_s)


def emulated_stage(forward_s: float, width: int = 16) -> Callable[[int], nn.Module]:
    """``make_stage`` for emulated-device stages of the given forward time."""
    def make(stage: int) -> nn.Module:
        return EmulatedStage(width, forward_s, seed=200 + stage)
    return make


def split_batch(m: int, width: int, batch: int, seed: int = 0
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)
    return list(x.chunk(m)), list(y.chunk(m))


def torch_pipeline_step(rank: int, world_size: int, make_stage: Callable[[int], nn.Module],
                        microbatches: list[torch.Tensor], targets: list[torch.Tensor],
                        schedule: str) -> Callable[[], float]:
    """One step of ``torch.distributed.pipelining`` on this rank; returns a timer."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    module = make_stage(rank)
    stage = PipelineStage(module, rank, world_size, torch.device("cpu"))
    kind = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[schedule]
    runner = kind(stage, n_microbatches=len(microbatches), loss_fn=nn.functional.mse_loss)
    x, y = torch.cat(microbatches), torch.cat(targets)

    def step() -> float:
        module.zero_grad(set_to_none=True)
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            runner.step(x)
        elif rank == world_size - 1:
            runner.step(target=y, losses=[])
        else:
            runner.step()
        return time.perf_counter() - start

    return step


def ours_pipeline_step(rank: int, world_size: int, worker: Callable[..., Any] | None,
                       make_stage: Callable[[int], nn.Module], microbatches: list[torch.Tensor],
                       targets: list[torch.Tensor], schedule: list) -> Callable[[], float]:
    """One step of our ``StageRunner`` (stages built once, as PyTorch's are), or of a
    student's ``worker(rank, world_size, schedule, make_stage, microbatches, targets, loss_fn)``
    (which builds its stage on every call)."""
    if worker is None:
        runner = StageRunner(rank, world_size, make_stage, microbatches[0])
        actions = schedule[rank]

        def run_once() -> None:
            runner.step(actions, microbatches, targets, nn.functional.mse_loss)
    else:
        def run_once() -> None:
            worker(rank, world_size, schedule, make_stage, microbatches, targets,
                   nn.functional.mse_loss)

    def step() -> float:
        dist.barrier()
        start = time.perf_counter()
        run_once()
        return time.perf_counter() - start

    return step


def _compare(rank: int, world_size: int, worker: Callable[..., Any] | None,
             make_stage: Callable[[int], nn.Module], m: int, width: int, schedule: str,
             rounds: int) -> dict[str, list[float]]:
    xs, ys = split_batch(m, width, BATCH)
    plan = {"1f1b": one_f_one_b_schedule, "gpipe": gpipe_schedule}[schedule](world_size, m)
    timers = {"ours": ours_pipeline_step(rank, world_size, worker, make_stage, xs, ys, plan),
              "torch": torch_pipeline_step(rank, world_size, make_stage, xs, ys, schedule)}
    times: dict[str, list[float]] = {name: [] for name in timers}
    for round_ in range(rounds + 2):
        for name, timer in timers.items():
            seconds = timer()
            if round_ >= 2:  # two warm-up rounds
                times[name].append(seconds)
    return times


def compare_with_torch(world_size: int, m: int, schedule: str = "1f1b", rounds: int = 10,
                       worker: Callable[..., Any] | None = None,
                       make_stage: Callable[[int], nn.Module] = mlp_stage, width: int = WIDTH,
                       timeout: float = 120.0) -> dict[str, list[float]]:
    """Step times (rank 0's clock) of ``worker`` (default: ours) and of PyTorch's schedule,
    interleaved in the same processes."""
    return launch(_compare, world_size, worker, make_stage, m, width, schedule, rounds,
                  timeout=timeout, threads=1)[0]


def measured_bubble(world_size: int, m: int, schedule: str = "1f1b", forward_s: float = 0.01,
                    rounds: int = 3, worker: Callable[..., Any] | None = None,
                    timeout: float = 120.0) -> dict[str, float]:
    """Bubble of ``worker`` and of PyTorch's schedule on emulated stages: 1 - m(f+b) / step."""
    times = compare_with_torch(world_size, m, schedule, rounds, worker,
                               emulated_stage(forward_s), width=16, timeout=timeout)
    work = m * 3 * forward_s
    return {name: 1.0 - work / statistics.median(seconds) for name, seconds in times.items()}


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
            times = compare_with_torch(world_size, m, schedule, rounds)
            bubbles = measured_bubble(world_size, m, schedule, rounds=2)
            plan = (one_f_one_b_schedule if schedule == "1f1b" else gpipe_schedule)(world_size, m)
            records.append(ratio_record(
                f"pipeline_{schedule}_mlp{LAYERS}x{WIDTH}_b{BATCH}_m{m}", "course_reference."
                f"parallel.pipeline ({schedule})", f"torch.distributed.pipelining "
                f"({'Schedule1F1B' if schedule == '1f1b' else 'ScheduleGPipe'})",
                times["ours"], times["torch"], device=device_name(), world_size=world_size,
                microbatches=m, bubble_measured=bubbles["ours"],
                bubble_measured_torch=bubbles["torch"],
                bubble_theory=bubble_formula(world_size, m),
                peak_activations_stage0=peak_in_flight(plan)[0]))
    return records
