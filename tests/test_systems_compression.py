"""Gradient compressors against exact arithmetic: PowerSGD at full rank is the exact mean, at low
rank it converges to the truncated SVD, error feedback loses nothing; two real processes agree
with simulated workers, and PowerSGD as a DDP hook matches the uncompressed gradients; QSGD is
unbiased within its variance bound; top-k keeps k entries and, with feedback, loses nothing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from course_reference.systems.powersgd import (
    PowerSGD,
    TopK,
    ddp_comm_hook,
    qsgd,
    rounding_variance,
    stochastic_round,
    variance_minimizing_levels,
)
from course_runtime.distributed import comm, launch


def _grads(steps, workers, *shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(steps, workers, *shape, generator=gen, dtype=torch.float64)


def test_full_rank_is_the_exact_mean_at_every_step():
    for shape in [(6, 9), (9, 6), (4, 3, 2)]:
        compressor = PowerSGD(rank=min(shape[0], math.prod(shape[1:])))
        for g in _grads(5, 4, *shape):
            torch.testing.assert_close(compressor.aggregate("w", g), g.mean(0))


def test_warm_started_power_iteration_converges_to_the_truncated_svd():
    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    s = 2.0 ** -torch.arange(20, dtype=torch.float64)          # a clear gap after each value
    m = u[:, :20] @ torch.diag(s) @ v.T
    compressor = PowerSGD(rank=3, error_feedback=False)
    for _ in range(40):
        approx = compressor.aggregate("w", m[None])
    best = u[:, :3] @ torch.diag(s[:3]) @ v[:, :3].T        # Eckart-Young: the best rank 3
    torch.testing.assert_close(approx, best, atol=1e-9, rtol=0)
    assert compressor.sent_numel == 40 * (30 + 20) * 3 and compressor.dense_numel == 40 * 600


def test_error_feedback_delays_but_never_loses_gradient():
    compressor = PowerSGD(rank=1)
    grads = _grads(6, 3, 8, 5, seed=2)
    sent = sum(compressor.aggregate("w", g) for g in grads)
    # Σ_t sent_t = Σ_t mean(g_t) − mean(error still held): the rest arrives later
    torch.testing.assert_close(sent, grads.mean(1).sum(0) - compressor.error["w"].mean(0))
    without = PowerSGD(rank=1, error_feedback=False)
    lost = sum(without.aggregate("w", g) for g in grads) - grads.mean(1).sum(0)
    assert lost.norm() > 0.1 * grads.mean(1).sum(0).norm()


def _powersgd_on_ranks(rank, world_size, grads):
    compressor = PowerSGD(rank=2)
    with comm.counting() as counted:
        out = [compressor.aggregate("w", g[rank][None]) for g in grads]
    return torch.stack(out), counted.as_dict()


def test_real_processes_agree_with_simulated_workers_and_send_the_compressed_bytes():
    grads = _grads(3, 2, 10, 7, seed=3)
    simulated = PowerSGD(rank=2)
    expected = torch.stack([simulated.aggregate("w", g) for g in grads])
    for out, counts in launch(_powersgd_on_ranks, 2, grads, timeout=60):
        torch.testing.assert_close(out, expected)
        # two all-reduces per step, of P (10 × 2) and Q (7 × 2), 2(N−1)/N · 8 bytes each
        assert counts["all_reduce"]["calls"] == 6
        assert counts["all_reduce"]["bytes"] == 3 * (10 + 7) * 2 * 8


def _ddp_step(rank, world_size, x, y, state_dict, rank_r):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model.load_state_dict(state_dict)
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(PowerSGD(rank=rank_r), ddp_comm_hook)
    grads = []
    for _ in range(2):                      # the second step runs on DDP's rebuilt buckets
        ddp.zero_grad()
        nn.functional.mse_loss(ddp(x[rank]), y[rank]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


@pytest.mark.parametrize("rank_r, exact", [(6, True), (1, False)])
def test_as_a_ddp_hook_full_rank_matches_the_uncompressed_mean(rank_r, exact):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(2, 8, 6, dtype=torch.float64), torch.randn(2, 8, 3, dtype=torch.float64)
    nn.functional.mse_loss(model(x.reshape(16, 6)), y.reshape(16, 3)).backward()
    results = launch(_ddp_step, 2, x, y, model.state_dict(), rank_r, timeout=90)
    for grads in results:
        for step in grads:
            for got, want in zip(step, (p.grad for p in model.parameters()), strict=True):
                if exact or got.dim() == 1:
                    torch.testing.assert_close(got, want)
        if not exact:   # rank 1 of a 5 × 6 gradient cannot be the mean
            assert not torch.allclose(grads[0][0], model[0].weight.grad)
    torch.testing.assert_close(results[0][1][0], results[1][1][0])   # every rank gets the same


def test_qsgd_is_unbiased_and_within_its_variance_bound():
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(64, generator=gen, dtype=torch.float64)
    for s in [1, 4]:
        samples = torch.stack([qsgd(v, s, gen) for _ in range(20000)])
        levels = samples.abs() / v.norm() * s
        torch.testing.assert_close(levels, levels.round())          # on the grid k/s · ‖v‖
        per_entry_var = ((samples - v) ** 2).mean(0)
        standard_error = (per_entry_var / len(samples)).sqrt()
        assert ((samples.mean(0) - v).abs() <= 5 * standard_error + 1e-12).all()
        bound = min(64 / s**2, 8 / s) * v.norm() ** 2               # Lemma 3.1 of the paper
        assert per_entry_var.sum() <= bound
    assert qsgd(torch.zeros(5), 3).eq(0).all()


def test_stochastic_round_names_bad_input():
    with pytest.raises(ValueError, match=r"outside the levels' range \[0, 1\]"):
        stochastic_round(torch.tensor([0.5, 1.5]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="at least two values"):
        stochastic_round(torch.tensor([0.5]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="rank must be at least 1, got 0"):
        PowerSGD(rank=0)


def test_top_k_sends_k_entries_and_error_feedback_loses_nothing():
    grads = _grads(5, 2, 40, seed=5)
    seen = []
    compressor = TopK(0.1, mean=lambda t: seen.append(t) or t.mean(0))
    sent = sum(compressor.aggregate("w", g) for g in grads)
    assert all((t != 0).sum(1).tolist() == [4, 4] for t in seen)
    torch.testing.assert_close(sent, grads.mean(1).sum(0) - compressor.residual["w"].mean(0))
    torch.testing.assert_close(TopK(1.0).aggregate("w", grads[0]), grads[0].mean(0))


def test_variance_minimizing_levels_beat_even_and_quantile_levels_and_find_the_optimum():
    torch.manual_seed(6)
    x = torch.distributions.StudentT(3.0).sample((4000,)).double()
    for k in (4, 8):
        best = variance_minimizing_levels(x, k)
        assert best[0] == x.min() and best[-1] == x.max()
        even = torch.linspace(x.min(), x.max(), k, dtype=torch.float64)
        quantile = torch.quantile(x, torch.linspace(0, 1, k, dtype=torch.float64))
        assert rounding_variance(x, best) < 0.5 * rounding_variance(x, even)
        assert rounding_variance(x, best) <= rounding_variance(x, quantile)
    # one interior level: against a brute-force scan of its position
    found = variance_minimizing_levels(x, 3)[1]
    grid = torch.linspace(x.min(), x.max(), 20001, dtype=torch.float64)
    scan = torch.stack([rounding_variance(x, torch.stack([x.min(), g, x.max()])) for g in grid])
    assert abs(found - grid[scan.argmin()]) <= 2 * (grid[1] - grid[0])
