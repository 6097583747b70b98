"""Checks for Lab 2 (ZeRO), called by the lab's hidden tests.

The student's optimizers train on forked gloo ranks through the runtime's harness
(``course_runtime.distributed.data_parallel``: a deadlock or an infinite loop becomes a failed
test naming the rank), each rank on its slice of a global batch, and are compared with plain
``torch.optim.AdamW`` on the whole batch in one process:

* the averaged gradient shard each rank holds after every step (Adam divides the gradient by its
  own scale, so parameters alone would hide a gradient that was summed but never averaged);
* the parameters after a few steps;
* the optimizer state each rank holds: 1/N of the unsharded AdamW state, within 5 %;
* the bytes each rank sends per step, counted by ``course_runtime.distributed.comm``, between the
  ZeRO paper's volume (2Ψ or 3Ψ, times (N-1)/N) and that volume with the padding;
* at stages 2 and 3, that the full gradients are dropped once reduced, and at stage 3 that
  every gathered parameter is freed after use.

Graded with the submission in a process of its own (``grader.isolated``): the ranks are forked
from that process, by the runtime's harness, with what the checks forbid blocked there, and what
each rank recorded comes back as plain data to be compared here. Speed is a ratio of ratios:
yours against PyTorch's ``ZeroRedundancyOptimizer`` in the same ranks, over the reference
against it in ranks of the grader's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from course_reference.bench.zero import reference_timer
from course_reference.parallel.memory import comm_volume, model_state_bytes
from course_reference.parallel.zero import padded_numel, shard_bounds
from course_runtime.distributed import LaunchTimeout, WorkerError, launch
from course_runtime.distributed.data_parallel import (
    assert_sharded_training,
    mlp,
    time_against_pytorch,
    train_on_ranks,
    train_single_process,
    zero_redundancy_timer,
)
from course_runtime.testing import assert_close, require, time_limit, views_of
from grader.checks import forbid, run_there

ISOLATED = True  # graded with the submission in a process of its own (grader.isolated)

FORBIDDEN = [
    "torch.distributed.optim.ZeroRedundancyOptimizer",
    "torch.distributed.fsdp.fully_shard",
    "torch.nn.parallel.DistributedDataParallel",
    "course_reference.parallel.zero.ZeroAdamW",
    "course_reference.parallel.zero.padded_numel",
    "course_reference.parallel.zero.shard_bounds",
    "course_reference.parallel.memory.model_state_bytes",
    "course_reference.parallel.memory.bytes_per_gpu",
    "course_reference.parallel.memory.comm_volume",
]
REASON = ("Lab 2 asks you to shard the training state yourself; PyTorch's sharded optimizers and "
          "the course's reference ZeRO are what yours is compared with, not parts of it")

PUBLIC_SIZES = (13, 37, 29, 7)
PUBLIC_WORLD_SIZE = 2


def guard(namespace: dict[str, Any] | None = None) -> Any:
    return forbid(FORBIDDEN, REASON, namespace)


def _guarded(cls: Any, namespace: dict[str, Any] | None) -> dict[str, Any]:
    """How the runtime's harness is to guard each call into ``cls`` on its ranks: by what it
    blocks itself where the submission runs in a process of its own, by ``guard`` here."""
    from grader.isolated import is_remote

    if is_remote(cls):
        return {"forbidden": (FORBIDDEN, REASON)}
    return {"guard": lambda: guard(namespace)}


def sizes_for(seed: int) -> tuple[int, ...]:
    """The public MLP's widths for seed 0; random uneven widths (3-4 layers) otherwise."""
    if seed == 0:
        return PUBLIC_SIZES
    rng = np.random.default_rng(seed)
    return tuple(int(d) for d in rng.integers(3, 41, int(rng.integers(4, 6))))


def units_of(model: nn.Module, stage: int) -> list[list[nn.Parameter]]:
    """The lab's layout: the whole model as one unit at stages 1-2, one unit per module that owns
    parameters at stage 3, each in ``parameters()`` order."""
    per_module = [list(m.parameters(recurse=False)) for m in model.modules()]
    per_module = [ps for ps in per_module if ps]
    return per_module if stage == 3 else [[p for ps in per_module for p in ps]]


def _expected_shards(sizes: Sequence[int], world_size: int, seed: int, stage: int
                     ) -> list[list[np.ndarray]]:
    """Per step, each rank's averaged gradient shard under single-process AdamW: the
    concatenation over units of the rank's slice of the padded flat gradient."""
    shards_per_step: list[list[np.ndarray]] = []

    def record(model: nn.Module) -> None:
        per_rank = []
        for rank in range(world_size):
            pieces = []
            for unit in units_of(model, stage):
                flat = torch.cat([p.grad.reshape(-1) for p in unit])
                padded = torch.zeros(padded_numel(flat.numel(), world_size))
                padded[:flat.numel()] = flat
                start, end = shard_bounds(flat.numel(), world_size, rank)
                pieces.append(padded[start:end])
            per_rank.append(torch.cat(pieces).numpy().copy())
        shards_per_step.append(per_rank)

    train_single_process(sizes, world_size, seed, on_gradients=record)
    return shards_per_step


def traffic_bounds(sizes: Sequence[int], world_size: int, stage: int) -> tuple[float, float]:
    """Bytes a rank sends per step: the paper's volume, and that volume with the padding."""
    model = mlp(sizes)
    psi = sum(p.numel() for p in model.parameters())
    padded = sum(padded_numel(sum(p.numel() for p in unit), world_size)
                 for unit in units_of(model, stage))
    theory = comm_volume(psi, world_size, 3 if stage == 3 else 1, element_bytes=4)
    return theory, theory * padded / psi


def check_zero(cls: Any, stage: int, world_size: int, seed: int,
               namespace: dict[str, Any] | None = None) -> None:
    """Train with the student's ZeRO-``stage`` class and check everything listed above."""
    require(**{f"Zero{stage}": cls})
    sizes = sizes_for(seed)
    label = f"Zero{stage} (MLP {'-'.join(map(str, sizes))}, N={world_size})"
    results = run_there(train_on_ranks, cls, world_size, tuple(sizes), seed,
                        **_guarded(cls, namespace))
    expected_shards = _expected_shards(sizes, world_size, seed, stage)
    for rank, result in enumerate(results):
        for step, (got, want) in enumerate(zip(result["grad_shards"], expected_shards)):
            assert_close(got, want[rank], atol=1e-6, rtol=1e-4,
                         what=f"{label}: rank {rank}'s averaged gradient shard (the .grad of "
                              f"its optimizer's parameters) at step {step + 1}")
    assert_sharded_training(results, train_single_process(sizes, world_size, seed), stage=stage,
                            num_params=sum(p.numel() for p in mlp(sizes).parameters()),
                            traffic=traffic_bounds(sizes, world_size, stage), label=label)


# --------------------------------------------------------------------------------------------
# q1: partitioning
# --------------------------------------------------------------------------------------------

def partition_cases(seed: int, cases: int) -> tuple[list[tuple[int, int]],
                                                   list[tuple[list[tuple[int, ...]], int]]]:
    """(numel, world size) pairs for padded_size and shard_range, the edge cases first (an empty
    buffer, one rank, exact multiples), and (shapes, world size) trials for flatten/unflatten."""
    rng = np.random.default_rng(seed)
    pairs = [(10, 4), (12, 4), (1, 2), (7, 3), (8, 1), (0, 2)]
    pairs += [(int(rng.integers(0, 200)), int(rng.integers(1, 9))) for _ in range(cases)]
    pairs += [(int(n * k), int(n)) for n, k in rng.integers(1, 9, (cases, 2))]
    trials = []
    for _ in range(max(2, cases // 10)):
        shapes = [tuple(int(d) for d in rng.integers(1, 6, int(rng.integers(0, 3))))
                  for _ in range(int(rng.integers(1, 5)))]
        trials.append((shapes, int(rng.integers(1, 6))))
    return pairs, trials


def trial_tensors(shapes: Sequence[tuple[int, ...]], trial: int) -> list[torch.Tensor]:
    return [torch.randn(s, generator=torch.Generator().manual_seed(trial)) for s in shapes]


def check_partition(padded_size: Any, shard_range: Any, flatten_padded: Any, unflatten: Any,
                    seed: int, cases: int, namespace: dict[str, Any] | None = None) -> None:
    require(padded_size=padded_size, shard_range=shard_range, flatten_padded=flatten_padded,
            unflatten=unflatten)
    pairs, trials = partition_cases(seed, cases)
    for numel, n in pairs:
        want = padded_numel(numel, n)
        with guard(namespace), time_limit(5, f"padded_size({numel}, {n})"):
            got = padded_size(numel, n)
        if got != want:
            raise AssertionError(f"padded_size({numel}, {n}) returned {got}, expected {want}: "
                                 "the smallest multiple of the world size that holds them")
        for rank in range(n):
            with guard(namespace), time_limit(5, f"shard_range({numel}, {n}, {rank})"):
                got_range = tuple(shard_range(numel, n, rank))
            if got_range != shard_bounds(numel, n, rank):
                raise AssertionError(f"shard_range({numel}, {n}, {rank}) returned {got_range}, "
                                     f"expected {shard_bounds(numel, n, rank)}")

    for trial, (shapes, n) in enumerate(trials):
        tensors = trial_tensors(shapes, trial)
        flat_want = torch.cat([t.reshape(-1) for t in tensors])
        padded = torch.zeros(padded_numel(flat_want.numel(), n))
        padded[:flat_want.numel()] = flat_want
        with guard(namespace), time_limit(5, "flatten_padded"):
            flat = flatten_padded(tensors, n)
        assert_close(flat, padded.numpy(), atol=0.0,
                     what=f"flatten_padded of shapes {shapes} for world size {n}")
        with guard(namespace), time_limit(5, "unflatten"):
            views, shared = run_there(views_of, unflatten, flat, shapes)
        if len(views) != len(shapes):
            raise AssertionError(f"unflatten returned {len(views)} tensors for {len(shapes)} "
                                 "shapes")
        for shape, t, view, is_view in zip(shapes, tensors, views, shared):
            assert_close(view, t.numpy(), atol=0.0, what=f"unflatten: tensor of shape {shape}")
            if not is_view:
                raise AssertionError(f"unflatten returned a copy for shape {shape}: return views "
                                     "of the flat buffer (slice and .view), so that writing "
                                     "into the buffer updates the parameters")


# --------------------------------------------------------------------------------------------
# q5: the theory table
# --------------------------------------------------------------------------------------------

def theory_cases(seed: int, cases: int) -> list[tuple[int, int, int]]:
    """(Ψ, N, stage): the public MLP at N = 2 for every stage, then random sizes."""
    rng = np.random.default_rng(seed)
    return [(1830, 2, s) for s in range(4)] + [
        (int(rng.integers(1, 10**9)), int(rng.integers(1, 1025)), int(rng.integers(0, 4)))
        for _ in range(cases)]


def check_theory(theory_bytes: Any, theory_traffic: Any, seed: int, cases: int,
                 namespace: dict[str, Any] | None = None) -> None:
    """Model states in fp32 with AdamW (4 + 4 + 8 bytes per parameter) and bytes sent."""
    require(theory_bytes=theory_bytes, theory_traffic=theory_traffic)
    for psi, n, stage in theory_cases(seed, cases):
        want = model_state_bytes(psi, n, stage, param_bytes=4, grad_bytes=4, optimizer_bytes=8)
        with guard(namespace), time_limit(5, "theory_bytes"):
            got = theory_bytes(psi, n, stage)
        for key in ("parameters", "gradients", "optimizer"):
            if key not in got:
                raise AssertionError(f"theory_bytes should return a dict with key {key!r}")
            assert_close(float(got[key]), getattr(want, key), atol=1e-6, rtol=1e-9,
                         what=f"theory_bytes({psi}, {n}, stage {stage})[{key!r}]")
        with guard(namespace), time_limit(5, "theory_traffic"):
            sent = theory_traffic(psi, n, stage)
        assert_close(float(sent), comm_volume(psi, n, stage, element_bytes=4), atol=1e-6,
                     rtol=1e-9, what=f"theory_traffic({psi}, {n}, stage {stage}) in bytes")


# --------------------------------------------------------------------------------------------
# q6: speed against the reference
# --------------------------------------------------------------------------------------------

def _reference_vs_pytorch(rank: int, world_size: int, stage: int, rounds: int,
                          warmup: int) -> dict[str, list[float]]:
    timers = {"reference": reference_timer(stage, rank)[0],
              "pytorch": zero_redundancy_timer(rank)[0]}
    times: dict[str, list[float]] = {name: [] for name in timers}
    for i in range(warmup + rounds):
        for name, timer in timers.items():
            elapsed = timer()
            if i >= warmup:
                times[name].append(elapsed)
    return times


def check_speed(cls: Any, stage: int, world_size: int, bound: float, rounds: int = 10,
                namespace: dict[str, Any] | None = None) -> float:
    """The student's ZeRO step time over the reference's, on the benchmark's MLP, one thread per
    rank, each round timed on its slowest rank, as a ratio of ratios: the student's step over
    PyTorch's DDP with ``ZeroRedundancyOptimizer``, interleaved in the same ranks (forked where
    the submission runs), over the reference's step over PyTorch's, interleaved in ranks of the
    grader's; PyTorch's step is the yardstick that carries from one set of ranks to the other.
    Fails above ``bound``, or when the timed steps did not train the model as PyTorch does."""
    require(**{f"Zero{stage}": cls})
    if stage not in (1, 2):
        raise ValueError("speed is graded at stages 1 and 2, against ZeroRedundancyOptimizer")
    table = run_there(time_against_pytorch, {stage: cls}, world_size, rounds, 2, timeout=240,
                      **_guarded(cls, namespace))[stage]
    if not table["difference"] < 1e-4:
        raise AssertionError(f"after {rounds + 2} timed steps your Zero{stage}'s parameters "
                             f"differ from ZeroRedundancyOptimizer's by up to "
                             f"{table['difference']:.3g}: the speed test only counts a step that "
                             "trains the model correctly")
    try:
        ranks = launch(_reference_vs_pytorch, world_size, stage, rounds, 2, timeout=240,
                       threads=1)
    except (WorkerError, LaunchTimeout) as error:
        raise RuntimeError(f"timing the reference failed: {error}") from None
    reference = [max(r["reference"][i] for r in ranks) for i in range(rounds)]
    pytorch = [max(r["pytorch"][i] for r in ranks) for i in range(rounds)]
    yours_vs = float(np.median(table["yours"]) / np.median(table["pytorch"]))
    reference_vs = float(np.median(reference) / np.median(pytorch))
    ratio = yours_vs / reference_vs
    print(f"ZeRO-{stage} step at N={world_size}: yours {np.median(table['yours']) * 1e3:.2f} ms "
          f"against PyTorch's {np.median(table['pytorch']) * 1e3:.2f} ms ({yours_vs:.2f}x); the "
          f"reference {np.median(reference) * 1e3:.2f} ms against {np.median(pytorch) * 1e3:.2f}"
          f" ms ({reference_vs:.2f}x): yours takes {ratio:.2f}x the reference's time")
    if ratio > bound:
        raise AssertionError(
            f"your ZeRO-{stage} step takes {yours_vs:.2f}x the time of PyTorch's DDP with "
            f"ZeroRedundancyOptimizer, the reference's {reference_vs:.2f}x: {ratio:.2f}x the "
            f"reference's time (medians of {rounds} interleaved rounds; the bound is {bound:g}x)")
    return ratio


def public_expectations() -> dict[str, Any]:
    """What the public tests compare with, computed by the reference when the lab is assigned:
    q1's partitions, the traffic bounds of q2-q4 on the public MLP, and q5's table."""
    pairs, trials = partition_cases(seed=0, cases=5)
    return {
        "q1_partition": {
            "pairs": [{"numel": numel, "world_size": n, "padded": padded_numel(numel, n),
                       "ranges": [list(shard_bounds(numel, n, r)) for r in range(n)]}
                      for numel, n in pairs],
            "trials": [{"shapes": [list(s) for s in shapes], "world_size": n,
                        "tensors": [t.tolist() for t in trial_tensors(shapes, trial)],
                        "padded_size": padded_numel(sum(int(np.prod(s)) for s in shapes), n)}
                       for trial, (shapes, n) in enumerate(trials)]},
        "zero": {"sizes": list(PUBLIC_SIZES), "world_size": PUBLIC_WORLD_SIZE,
                 "num_params": sum(p.numel() for p in mlp(PUBLIC_SIZES).parameters()),
                 "traffic": {str(stage): list(traffic_bounds(PUBLIC_SIZES, PUBLIC_WORLD_SIZE,
                                                             stage)) for stage in (1, 2, 3)}},
        "q5_theory": [
            {"num_params": psi, "world_size": n, "stage": stage,
             "bytes": {k: v for k, v in vars(model_state_bytes(
                 psi, n, stage, param_bytes=4, grad_bytes=4, optimizer_bytes=8)).items()},
             "traffic": comm_volume(psi, n, stage, element_bytes=4)}
            for psi, n, stage in theory_cases(seed=0, cases=0)],
    }


__all__ = ["check_partition", "check_speed", "check_theory", "check_zero", "partition_cases",
           "public_expectations", "sizes_for", "theory_cases", "traffic_bounds", "units_of"]
