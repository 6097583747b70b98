"""ZeRO stages 1-3 against plain single-process AdamW, with their memory and traffic measured.

Each case trains a small model with uneven parameter sizes (no unit divides evenly by the world
size, so padding is exercised) for a few steps on N forked gloo ranks, each on its slice of the
global batch, and compares the parameters with ``torch.optim.AdamW`` on the whole batch in one
process. The same run measures the optimizer state each rank holds (1/N of the unsharded state),
the bytes each rank sends per step (the ZeRO paper's 2Ψ or 3Ψ, times (N-1)/N for a ring) and, for
stage 3, that gathered parameters are freed after use.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from course_reference.parallel.memory import comm_volume
from course_reference.parallel.zero import ZeroAdamW, padded_numel, shard_bounds
from course_runtime.distributed import WorkerError, comm, launch

STEPS, BATCH, LR, WD = 3, 4, 1e-2, 0.1


class Net(nn.Module):
    """Three uneven linear layers plus a parameter owned by the root module itself."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(13, 37), nn.Tanh(), nn.Linear(37, 29), nn.Tanh(),
                                    nn.Linear(29, 7))
        self.scale = nn.Parameter(torch.ones(7) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) * self.scale


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batches(world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(world_size * BATCH, 13, generator=g),
             torch.randn(world_size * BATCH, 7, generator=g)) for _ in range(STEPS)]


def single_process(world_size: int) -> list[np.ndarray]:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    for x, y in batches(world_size):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().numpy().copy() for p in model.parameters()]


def _train(rank: int, world_size: int, stage: int, offload: bool = False) -> dict:
    # Each rank starts from a different seed: ZeroAdamW must broadcast rank 0's parameters.
    model = make_model(seed=rank)
    zero = ZeroAdamW(model, stage=stage, lr=LR, weight_decay=WD, offload=offload)
    traffic, peaks, after_forward = [], [], []
    for x, y in batches(world_size):
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        with comm.counting() as counted:
            out = model(x[mine])
            after_forward.append(zero.parameter_bytes())
            nn.functional.mse_loss(out, y[mine]).backward()
            zero.step()
        zero.zero_grad()
        traffic.append(dict(counted.bytes_sent))
        peaks.append(zero.peak_gathered_numel)
    return {
        "params": [p.numpy() for p in zero.gathered_parameters()],
        "optimizer_bytes": zero.optimizer_state_bytes(),
        "traffic": traffic,
        "padded": sum(u.padded for u in zero.units),
        "unit_padded": [u.padded for u in zero.units],
        "num_params": zero.num_params,
        "parameter_bytes_after_step": zero.parameter_bytes(),
        "after_forward": after_forward,
        "peak_gathered": peaks[-1],
        "grad_bytes_after_step": zero.gradient_bytes(),
    }


@pytest.fixture(scope="module")
def runs() -> dict:
    cache: dict = {}

    def get(stage: int, world_size: int, offload: bool = False) -> list[dict]:
        key = (stage, world_size, offload)
        if key not in cache:
            cache[key] = launch(_train, world_size, stage, offload, timeout=120)
        return cache[key]

    return get


CASES = [(stage, n) for stage in (1, 2, 3) for n in (2, 4)]


@pytest.mark.parametrize("stage,world_size", CASES)
def test_parameters_match_single_process_adamw(runs, stage, world_size):
    expected = single_process(world_size)
    for rank, result in enumerate(runs(stage, world_size)):
        assert len(result["params"]) == len(expected)
        for i, (got, want) in enumerate(zip(result["params"], expected)):
            np.testing.assert_allclose(
                got, want, rtol=1e-5, atol=1e-6,
                err_msg=f"stage {stage}, N={world_size}, rank {rank}, parameter {i} "
                        f"{want.shape} after {STEPS} steps")


@pytest.mark.parametrize("stage,world_size", CASES)
def test_optimizer_state_is_one_nth_per_rank(runs, stage, world_size):
    results = runs(stage, world_size)
    unsharded = 2 * results[0]["num_params"] * 4          # momentum + variance, fp32
    for rank, result in enumerate(results):
        share = result["optimizer_bytes"] / unsharded
        assert share == pytest.approx(1 / world_size, rel=0.05), (
            f"rank {rank} holds {share:.3f} of the optimizer state, expected 1/{world_size}")
    # Together the ranks hold exactly the padded state, once.
    assert sum(r["optimizer_bytes"] for r in results) == 2 * results[0]["padded"] * 4


@pytest.mark.parametrize("stage,world_size", CASES)
def test_traffic_per_step_matches_theory(runs, stage, world_size):
    n = world_size
    for result in runs(stage, world_size):
        psi, padded = result["num_params"], result["padded"]
        for step in result["traffic"]:
            total = sum(step.values())
            # Exactly 2 (stages 1-2) or 3 (stage 3) passes over the padded buffers, as a ring.
            passes = 3 if stage == 3 else 2
            assert total == pytest.approx(passes * (n - 1) / n * padded * 4)
            assert set(step) == {"reduce_scatter", "all_gather"}, step
            # ... which is the paper's volume, up to the padding.
            theory = comm_volume(psi, n, stage, element_bytes=4)
            assert theory <= total <= theory * padded / psi


@pytest.mark.parametrize("world_size", [2, 4])
def test_stage_3_frees_gathered_parameters(runs, world_size):
    for result in runs(3, world_size):
        assert result["parameter_bytes_after_step"] == 0, "parameters left gathered after step"
        # After the forward every unit has been freed again, and at no time were all units
        # gathered together: the largest unit plus the root (gathered around its children).
        assert all(b == 0 for b in result["after_forward"]), result["after_forward"]
        units = result["unit_padded"]
        assert result["peak_gathered"] < sum(units)
        assert result["grad_bytes_after_step"] == 0


@pytest.mark.parametrize("stage", [1, 2])
def test_stages_1_and_2_keep_parameters_whole(runs, stage):
    for result in runs(stage, 2):
        assert result["parameter_bytes_after_step"] == result["padded"] * 4


def test_offload_gives_the_same_parameters(runs):
    expected = single_process(2)
    for result in runs(2, 2, offload=True):
        for got, want in zip(result["params"], expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_padding_and_bounds():
    assert [padded_numel(n, 4) for n in (0, 1, 4, 5, 1830)] == [0, 4, 4, 8, 1832]
    bounds = [shard_bounds(10, 4, r) for r in range(4)]
    assert bounds == [(0, 3), (3, 6), (6, 9), (9, 12)]
    with pytest.raises(ValueError, match="rank 4 is outside a world of size 4"):
        shard_bounds(10, 4, 4)


def _bad_stage(rank: int, world_size: int) -> None:
    ZeroAdamW(make_model(), stage=4)


def test_bad_stage_is_named():
    with pytest.raises(WorkerError, match="ZeRO stage must be 1, 2 or 3, got 4"):
        launch(_bad_stage, 2, timeout=60)


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised process group"):
        ZeroAdamW(make_model(), stage=1)
