"""Lab 2's benchmark: the reference ZeRO against PyTorch's own sharded training, same run.

ZeRO-1 and ZeRO-2 are compared with ``DistributedDataParallel`` plus
``torch.distributed.optim.ZeroRedundancyOptimizer`` (PyTorch's optimizer-state sharding: gradients
all-reduced by DDP, each rank updates its parameters, then broadcasts them), and ZeRO-3 with FSDP2
(``torch.distributed.fsdp.fully_shard`` on each linear layer and on the model). Every contender
trains the same MLP on the same per-rank batches, on forked gloo ranks; a round times one training
step of each contender in turn, so that the machine's load affects all alike, and the ratio is
ours over PyTorch's.

Beside the times, each record carries hardware-independent counts from the same run: the bytes a
rank sends per step (counted by ``course_runtime.distributed.comm``) against the ZeRO paper's 2Ψ or
3Ψ, and the optimizer bytes a rank holds against 1/N of the unsharded AdamW state.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from course_runtime.distributed import comm, launch
from course_runtime.distributed.data_parallel import (
    BATCH,
    SIZES,
    fsdp2_timer,
    mlp,
    optimizer_state_bytes,
    step_timer,
    zero_redundancy_timer,
)
from course_runtime.distributed.data_parallel import SPEED_LR as LR
from course_runtime.distributed.data_parallel import SPEED_WEIGHT_DECAY as WEIGHT_DECAY
from course_runtime.timing import device_name

from ..parallel.memory import comm_volume
from ..parallel.zero import ZeroAdamW
from .harness import ratio_record


def reference_timer(stage: int, rank: int, sizes: Sequence[int] = SIZES
                    ) -> tuple[Callable[[], float], ZeroAdamW]:
    model = mlp(sizes)
    zero = ZeroAdamW(model, stage=stage, lr=LR, weight_decay=WEIGHT_DECAY)

    def step() -> None:
        zero.step()
        zero.zero_grad()

    return step_timer(model, step, rank, sizes), zero


def _measure(rank: int, world_size: int, rounds: int, warmup: int = 3) -> dict[str, Any]:
    torch.manual_seed(0)
    timers: dict[str, Callable[[], float]] = {}
    zeros: dict[int, ZeroAdamW] = {}
    for stage in (1, 2, 3):
        timers[f"zero{stage}"], zeros[stage] = reference_timer(stage, rank)
    timers["zero_redundancy"], _, zro = zero_redundancy_timer(rank)
    timers["fsdp2"] = fsdp2_timer(rank)
    for timer in timers.values():
        for _ in range(warmup):
            timer()
    traffic = {}
    for stage in (1, 2, 3):
        with comm.counting() as counted:
            timers[f"zero{stage}"]()
        traffic[stage] = counted.total_bytes
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer())
    return {"times": times, "traffic": traffic,
            "optimizer_bytes": {s: z.optimizer_state_bytes() for s, z in zeros.items()},
            "zero_redundancy_bytes": optimizer_state_bytes(zro.optim),
            "num_params": zeros[1].num_params}


def run(rounds: int = 30, world_sizes: Sequence[int] = (2, 4)) -> list[dict[str, Any]]:
    """One record per (stage, world size): ZeRO-1/2 against ZeroRedundancyOptimizer, ZeRO-3
    against FSDP2, with traffic and optimizer bytes per rank."""
    records = []
    for n in world_sizes:
        # Each rank gets one thread: the ranks share the machine's cores.
        results = launch(_measure, n, rounds, timeout=600, threads=1)
        # A step takes as long as its slowest rank: time each round by its maximum.
        times = {name: [max(r["times"][name][i] for r in results) for i in range(rounds)]
                 for name in results[0]["times"]}
        psi = results[0]["num_params"]
        unsharded = 2 * psi * 4
        for stage in (1, 2, 3):
            peer = "fsdp2" if stage == 3 else "zero_redundancy"
            peer_name = ("FSDP2 fully_shard" if stage == 3
                         else "DDP + ZeroRedundancyOptimizer")
            share = statistics.mean(r["optimizer_bytes"][stage] for r in results) / unsharded
            records.append(ratio_record(
                f"ZeRO-{stage} step, MLP {'-'.join(map(str, SIZES))}, batch {BATCH}/rank",
                f"reference ZeRO-{stage}", peer_name, times[f"zero{stage}"], times[peer],
                device=device_name(), world_size=n, num_params=psi,
                bytes_per_step=max(r["traffic"][stage] for r in results),
                theory_bytes_per_step=comm_volume(psi, n, stage, element_bytes=4),
                optimizer_bytes_per_rank=max(r["optimizer_bytes"][stage] for r in results),
                optimizer_share=share,
                peer_optimizer_share=statistics.mean(r["zero_redundancy_bytes"]
                                                     for r in results) / unsharded
                if stage < 3 else None))
    return records


__all__ = ["reference_timer", "run"]
