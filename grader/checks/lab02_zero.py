"""Checks for Lab 2 (ZeRO), called by the lab's public and hidden tests.

The student's optimizers run on forked gloo ranks (``course_reference.parallel.launch``: a deadlock
or an infinite loop becomes a failed test naming the rank), each rank on its slice of a global
batch, and are compared with plain ``torch.optim.AdamW`` on the whole batch in one process:

* the averaged gradient shard each rank holds after every step (Adam divides the gradient by its
  own scale, so parameters alone would hide a gradient that was summed but never averaged);
* the parameters after a few steps;
* the optimizer state each rank holds: 1/N of the unsharded AdamW state, within 5 %;
* the bytes each rank sends per step, counted by ``course_runtime.distributed.comm``, between the
  ZeRO paper's volume (2Ψ or 3Ψ, times (N-1)/N) and that volume with the padding;
* at stages 2 and 3, that the full gradients are dropped once reduced, and at stage 3 that
  every gathered parameter is freed after use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from course_reference.bench.zero import mlp, step_timer
from course_reference.parallel.memory import comm_volume, model_state_bytes
from course_reference.parallel.zero import ZeroAdamW, padded_numel, shard_bounds
from course_runtime.distributed import WorkerError, comm, launch
from course_runtime.distributed.launcher import LaunchTimeout
from course_runtime.testing import assert_close, require, time_limit
from grader.checks import check_ratio, forbid

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

LR, WEIGHT_DECAY, STEPS, BATCH = 1e-2, 0.1, 3, 4
PUBLIC_SIZES = (13, 37, 29, 7)


def guard(namespace: dict[str, Any] | None = None) -> Any:
    return forbid(FORBIDDEN, REASON, namespace)


def sizes_for(seed: int) -> tuple[int, ...]:
    """The public MLP's widths for seed 0; random uneven widths (3-4 layers) otherwise."""
    if seed == 0:
        return PUBLIC_SIZES
    rng = np.random.default_rng(seed)
    return tuple(int(d) for d in rng.integers(3, 41, int(rng.integers(4, 6))))


def global_batches(sizes: Sequence[int], world_size: int, seed: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(world_size * BATCH, sizes[0], generator=g),
             torch.randn(world_size * BATCH, sizes[-1], generator=g)) for _ in range(STEPS)]


def units_of(model: nn.Module, stage: int) -> list[list[nn.Parameter]]:
    """The lab's layout: the whole model as one unit at stages 1-2, one unit per module that owns
    parameters at stage 3, each in ``parameters()`` order."""
    per_module = [list(m.parameters(recurse=False)) for m in model.modules()]
    per_module = [ps for ps in per_module if ps]
    return per_module if stage == 3 else [[p for ps in per_module for p in ps]]


def _expected_run(sizes: Sequence[int], world_size: int, seed: int, stage: int
                  ) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Single-process AdamW: final parameters and, per step, each rank's averaged gradient
    shard (the concatenation over units of the rank's slice of the padded flat gradient)."""
    model = mlp(sizes, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    shards_per_step = []
    for x, y in global_batches(sizes, world_size, seed):
        nn.functional.mse_loss(model(x), y).backward()
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
        opt.step()
        opt.zero_grad()
    return [p.detach().numpy().copy() for p in model.parameters()], shards_per_step


def _storage_bytes(params: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``params`` (a freed storage holds none)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}
    return sum(storages.values())


def _shard_grads(optimizer: Any) -> np.ndarray:
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
             for group in optimizer.param_groups for p in group["params"]]
    return torch.cat(grads).detach().numpy().copy() if grads else np.zeros(0)


def _state_bytes(optimizer: Any) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0)


def _worker(rank: int, world_size: int, cls: Any, stage: int, sizes: Sequence[int], seed: int,
            namespace: dict[str, Any] | None) -> dict[str, Any]:
    model = mlp(sizes, seed=seed)
    params = list(model.parameters())
    with guard(namespace):
        opt = cls(model, lr=LR, weight_decay=WEIGHT_DECAY)
    optimizer = getattr(opt, "optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise AssertionError(f"{cls.__name__} should keep its torch.optim.AdamW over this rank's "
                             "shard as `self.optimizer`")
    out: dict[str, Any] = {"traffic": [], "grad_shards": [], "grads_left": [],
                           "after_forward": [], "after_step": []}
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    for x, y in global_batches(sizes, world_size, seed):
        with comm.counting() as counted, guard(namespace):
            loss = nn.functional.mse_loss(model(x[mine]), y[mine])
            out["after_forward"].append(_storage_bytes(params))
            loss.backward()
            out["grads_left"].append(sum(p.grad is not None for p in params))
            opt.step()
        out["traffic"].append(dict(counted.bytes_sent))
        out["grad_shards"].append(_shard_grads(optimizer))
        out["after_step"].append(_storage_bytes(params))
        with guard(namespace):
            opt.zero_grad()
    out["state_bytes"] = _state_bytes(optimizer)
    if stage == 3:
        # Read the gathered parameters from inside each module's forward, after the student's
        # pre-hook (registered first) has gathered them.
        captured: dict[int, np.ndarray] = {}

        def capture(module: nn.Module, args: Any) -> None:
            for p in module.parameters(recurse=False):
                # A copy first: .numpy() on the parameter would pin its storage.
                captured[id(p)] = p.detach().clone().numpy()

        handles = [m.register_forward_pre_hook(capture) for m in model.modules()]
        with guard(namespace):
            model(global_batches(sizes, world_size, seed)[0][0][mine])
        for h in handles:
            h.remove()
        missing = [i for i, p in enumerate(params) if id(p) not in captured
                   or captured[id(p)].shape != tuple(p.shape)]
        if missing:
            raise AssertionError(f"parameters {missing} were not gathered (or had the wrong "
                                 "shape) when their module's forward ran")
        out["params"] = [captured[id(p)] for p in params]
    else:
        out["params"] = [p.detach().numpy().copy() for p in params]
    return out


def _run(cls: Any, stage: int, world_size: int, seed: int,
         namespace: dict[str, Any] | None) -> list[dict[str, Any]]:
    sizes = sizes_for(seed)
    try:
        return launch(_worker, world_size, cls, stage, sizes, seed, namespace, timeout=90,
                      group_timeout=30, threads=1)
    except WorkerError as error:
        first_line = error.remote_traceback.strip().splitlines()[-1]
        raise AssertionError(f"{cls.__name__} failed on rank {error.rank} (MLP {sizes}, "
                             f"N={world_size}): {first_line}\n{error.remote_traceback}") from None
    except LaunchTimeout as error:
        raise AssertionError(f"{cls.__name__} (MLP {sizes}, N={world_size}) did not finish: "
                             f"{error}") from None


def check_zero(cls: Any, stage: int, world_size: int, seed: int,
               namespace: dict[str, Any] | None = None) -> None:
    """Train with the student's ZeRO-``stage`` class and check everything listed above."""
    require(**{f"Zero{stage}": cls})
    sizes = sizes_for(seed)
    label = f"Zero{stage} (MLP {'-'.join(map(str, sizes))}, N={world_size})"
    results = _run(cls, stage, world_size, seed, namespace)
    expected_params, expected_shards = _expected_run(sizes, world_size, seed, stage)
    model = mlp(sizes, seed=seed)
    psi = sum(p.numel() for p in model.parameters())
    padded = sum(padded_numel(sum(p.numel() for p in unit), world_size)
                 for unit in units_of(model, stage))

    for rank, result in enumerate(results):
        for step, (got, want) in enumerate(zip(result["grad_shards"], expected_shards)):
            assert_close(got, want[rank], atol=1e-6, rtol=1e-4,
                         what=f"{label}: rank {rank}'s averaged gradient shard (the .grad of "
                              f"its optimizer's parameters) at step {step + 1}")
        for i, (got, want) in enumerate(zip(result["params"], expected_params)):
            assert_close(got, want, atol=1e-5, rtol=1e-4,
                         what=f"{label}: rank {rank}, parameter {i} after {STEPS} steps "
                              "(against torch.optim.AdamW on the whole batch)")

        share = result["state_bytes"] / (2 * psi * 4)
        if abs(share * world_size - 1) > 0.05:
            raise AssertionError(
                f"{label}: rank {rank} holds {result['state_bytes']} bytes of AdamW state, "
                f"{share:.3f} of the unsharded {2 * psi * 4}; expected 1/{world_size} within "
                "5 %: does every rank keep the state of its own shard only?")

        theory = comm_volume(psi, world_size, 3 if stage == 3 else 1, element_bytes=4)
        ceiling = theory * padded / psi
        for step, traffic in enumerate(result["traffic"]):
            sent = sum(traffic.values())
            if not theory - 1e-6 <= sent <= ceiling + 1e-6:
                raise AssertionError(
                    f"{label}: rank {rank} sent {sent:.0f} bytes in step {step + 1} "
                    f"({dict(traffic)}); ZeRO-{stage} sends {theory:.0f} "
                    f"({3 if stage == 3 else 2}Ψ (N-1)/N, Ψ = {psi} fp32 parameters), up to "
                    f"{ceiling:.0f} with padding. Use course_runtime.distributed.comm for every "
                    "collective, and reduce-scatter rather than all-reduce")

        if stage >= 2 and any(result["grads_left"]):
            raise AssertionError(
                f"{label}: after the backward, {result['grads_left'][0]} parameters still hold "
                "a full .grad; ZeRO-2 reduce-scatters each gradient as soon as it is ready and "
                "drops it (set p.grad = None), keeping only this rank's shard")
        if stage == 3:
            for what, held in (("forward", result["after_forward"]),
                               ("step", result["after_step"])):
                if any(held):
                    raise AssertionError(
                        f"{label}: rank {rank} still holds {max(held)} bytes of gathered "
                        f"parameters after the {what}; free each unit once its module has run "
                        "(and once its gradients are reduced)")


# --------------------------------------------------------------------------------------------
# q1: partitioning
# --------------------------------------------------------------------------------------------

def check_partition(padded_size: Any, shard_range: Any, flatten_padded: Any, unflatten: Any,
                    seed: int, cases: int, namespace: dict[str, Any] | None = None) -> None:
    require(padded_size=padded_size, shard_range=shard_range, flatten_padded=flatten_padded,
            unflatten=unflatten)
    rng = np.random.default_rng(seed)
    pairs = [(10, 4), (12, 4), (1, 2), (7, 3), (8, 1), (0, 2)]
    pairs += [(int(rng.integers(0, 200)), int(rng.integers(1, 9))) for _ in range(cases)]
    pairs += [(n * k, n) for n, k in rng.integers(1, 9, (cases, 2))]
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

    for trial in range(max(2, cases // 10)):
        shapes = [tuple(int(d) for d in rng.integers(1, 6, int(rng.integers(0, 3))))
                  for _ in range(int(rng.integers(1, 5)))]
        n = int(rng.integers(1, 6))
        tensors = [torch.randn(s, generator=torch.Generator().manual_seed(trial)) for s in shapes]
        flat_want = torch.cat([t.reshape(-1) for t in tensors])
        padded = torch.zeros(padded_numel(flat_want.numel(), n))
        padded[:flat_want.numel()] = flat_want
        with guard(namespace), time_limit(5, "flatten_padded"):
            flat = flatten_padded(tensors, n)
        assert_close(flat, padded.numpy(), atol=0.0,
                     what=f"flatten_padded of shapes {shapes} for world size {n}")
        with guard(namespace), time_limit(5, "unflatten"):
            views = list(unflatten(flat, shapes))
        if len(views) != len(shapes):
            raise AssertionError(f"unflatten returned {len(views)} tensors for {len(shapes)} "
                                 "shapes")
        for shape, t, view in zip(shapes, tensors, views):
            assert_close(view, t.numpy(), atol=0.0, what=f"unflatten: tensor of shape {shape}")
            if view.numel() and view.untyped_storage().data_ptr() != \
                    flat.untyped_storage().data_ptr():
                raise AssertionError(f"unflatten returned a copy for shape {shape}: return views "
                                     "of the flat buffer (slice and .view), so that writing "
                                     "into the buffer updates the parameters")


# --------------------------------------------------------------------------------------------
# q5: the theory table
# --------------------------------------------------------------------------------------------

def check_theory(theory_bytes: Any, theory_traffic: Any, seed: int, cases: int,
                 namespace: dict[str, Any] | None = None) -> None:
    """Model states in fp32 with AdamW (4 + 4 + 8 bytes per parameter) and bytes sent."""
    require(theory_bytes=theory_bytes, theory_traffic=theory_traffic)
    rng = np.random.default_rng(seed)
    cases_list = [(1830, 2, s) for s in range(4)] + [
        (int(rng.integers(1, 10**9)), int(rng.integers(1, 1025)), int(rng.integers(0, 4)))
        for _ in range(cases)]
    for psi, n, stage in cases_list:
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

def _speed_worker(rank: int, world_size: int, cls: Any, stage: int, rounds: int,
                  namespace: dict[str, Any] | None) -> dict[str, list[float]]:
    model = mlp()
    with guard(namespace):
        opt = cls(model, lr=1e-3, weight_decay=1e-2)

    def student_step() -> None:
        with guard(namespace):
            opt.step()
            opt.zero_grad()

    reference_model = mlp()
    reference = ZeroAdamW(reference_model, stage=stage, lr=1e-3, weight_decay=1e-2)

    def reference_step() -> None:
        reference.step()
        reference.zero_grad()

    timers = {"yours": step_timer(model, student_step, rank),
              "reference": step_timer(reference_model, reference_step, rank)}
    times: dict[str, list[float]] = {name: [] for name in timers}
    for i in range(rounds + 2):
        for name, timer in timers.items():
            elapsed = timer()
            if i >= 2:
                times[name].append(elapsed)
    # Both trained on the same batches from the same weights: a fast step must also be right.
    times["difference"] = [max(float((p - q).abs().max()) for p, q in
                               zip(model.parameters(), reference_model.parameters()))]
    return times


def check_speed(cls: Any, stage: int, world_size: int, bound: float, rounds: int = 10,
                namespace: dict[str, Any] | None = None) -> float:
    """Median step time (slowest rank per round) of the student's ZeRO over the reference's, on
    the benchmark's MLP, interleaved in the same processes. Fails above ``bound``."""
    require(**{f"Zero{stage}": cls})
    try:
        results = launch(_speed_worker, world_size, cls, stage, rounds, namespace, timeout=240,
                         threads=1)
    except (WorkerError, LaunchTimeout) as error:
        raise AssertionError(f"timing Zero{stage} failed: {error}") from None
    difference = max(r["difference"][0] for r in results)
    if not difference < 1e-4:
        raise AssertionError(f"after {rounds + 2} timed steps your Zero{stage}'s parameters "
                             f"differ from the reference's by up to {difference:.3g}: the speed "
                             "test only counts a step that trains the model correctly")
    per_round = {name: [max(r[name][i] for r in results) for i in range(rounds)]
                 for name in ("yours", "reference")}
    return check_ratio(per_round["yours"], per_round["reference"],
                       what=f"ZeRO-{stage} step at N={world_size}", peer_name="the reference",
                       bound=bound)


__all__ = ["check_partition", "check_speed", "check_theory", "check_zero", "sizes_for",
           "units_of"]
