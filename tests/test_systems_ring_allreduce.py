"""Ring all-reduce and bucketed gradient averaging, against torch.distributed and a single
process that sees the whole batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from course_reference.systems.ring_allreduce import (
    BucketedAllReduce,
    make_buckets,
    ring_contributions,
    ring_schedule,
)
from course_runtime.distributed import comm, launch


def _ring(rank: int, world_size: int, numel: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    from course_reference.systems.ring_allreduce import ring_all_reduce

    torch.manual_seed(rank)
    mine = torch.randn(numel, dtype=torch.float64)
    expected = mine.clone()
    torch.distributed.all_reduce(expected)
    with comm.counting() as counted:
        ring_all_reduce(mine)
    return mine, expected, counted.bytes_sent["ring_send"]


@pytest.mark.parametrize("world_size,numel", [(2, 1000), (3, 1001), (4, 7)])
def test_ring_all_reduce_sums_and_sends_the_bandwidth_optimal_volume(world_size, numel):
    for got, expected, sent in launch(_ring, world_size, numel, timeout=60):
        torch.testing.assert_close(got, expected)
        # Chunks of an uneven split differ by one element; the total is within one chunk's
        # rounding of 2 (N - 1) / N Ψ, and exact when N divides the tensor.
        ideal = 2 * (world_size - 1) / world_size * numel * 8
        assert abs(sent - ideal) <= 2 * (world_size - 1) * 8, (sent, ideal)


def test_schedule_ends_with_every_chunk_complete_on_every_rank():
    for n in (1, 2, 3, 5):
        final = ring_contributions(n)[-1]
        assert final == [[n] * n for _ in range(n)]
        assert len(ring_schedule(n)) == 2 * (n - 1)
        for messages in ring_schedule(n):
            assert sorted(m.dst for m in messages) == list(range(n))  # each rank receives once


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3))


def _ddp(rank: int, world_size: int, x: torch.Tensor, y: torch.Tensor, bucket_bytes: int):
    model = _model()
    ddp = BucketedAllReduce(model.parameters(), bucket_bytes)
    shard = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
    ddp.start()
    nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
    ddp.finish()
    return [p.grad for p in model.parameters()], len(ddp.buckets)


@pytest.mark.parametrize("bucket_bytes", [1, 400, 10**6])
def test_bucketed_gradients_equal_the_full_batch_gradient(bucket_bytes):
    torch.manual_seed(1)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    model = _model()
    nn.functional.mse_loss(model(x), y).backward()
    for grads, _ in launch(_ddp, 2, x, y, bucket_bytes, timeout=60):
        for got, p in zip(grads, model.parameters()):
            torch.testing.assert_close(got, p.grad)


def test_buckets_follow_reverse_order_and_respect_the_size():
    model = _model()
    params = list(model.parameters())
    buckets = make_buckets(params, 400)
    assert [p for b in buckets for p in b] == params[::-1]
    for b in buckets:
        assert len(b) == 1 or sum(p.numel() * 4 for p in b) <= 400
    assert len(make_buckets(params, 10**9)) == 1
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        make_buckets(params, 0)
