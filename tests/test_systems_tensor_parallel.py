"""Megatron tensor parallelism on 2 processes against the unsplit layers: outputs, input
gradients and weight gradients, and the number of all-reduces."""

from __future__ import annotations

import pytest
import torch

from course_reference.systems.tensor_parallel import (
    MLP,
    Attention,
    TensorParallelAttention,
    TensorParallelMLP,
)
from course_runtime.distributed import comm, launch


def _build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(8, 32) if kind == "mlp" else Attention(8, 4)


def _run_shard(rank: int, world_size: int, kind: str, x: torch.Tensor):
    full = _build(kind)
    shard = (TensorParallelMLP if kind == "mlp" else TensorParallelAttention)(
        full, rank, world_size)
    x = x.clone().requires_grad_()
    with comm.counting() as counted:
        out = shard(x)
        out.pow(2).sum().backward()
    grads = {name: p.grad for name, p in shard.named_parameters()}
    return out.detach(), x.grad, grads, dict(counted.calls)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_split_layer_matches_the_unsplit_layer(kind):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 8)
    full = _build(kind)
    xr = x.clone().requires_grad_()
    out = full(xr)
    out.pow(2).sum().backward()
    results = launch(_run_shard, 2, kind, x, timeout=60)
    for rank, (got, x_grad, grads, calls) in enumerate(results):
        torch.testing.assert_close(got, out.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_grad, xr.grad, rtol=1e-5, atol=1e-5)
        # one all-reduce forward (g) and one backward (f) per split layer
        assert calls == {"all_reduce": 2}, calls
        if kind == "mlp":
            half = slice(rank * 16, (rank + 1) * 16)
            torch.testing.assert_close(grads["fc1.weight"], full.fc1.weight.grad[half])
            torch.testing.assert_close(grads["fc1.bias"], full.fc1.bias.grad[half])
            torch.testing.assert_close(grads["fc2.weight"], full.fc2.weight.grad[:, half])
            torch.testing.assert_close(grads["fc2.bias"], full.fc2.bias.grad)
        else:
            mine = torch.arange(rank * 4, (rank + 1) * 4)
            rows = torch.cat([mine, mine + 8, mine + 16])
            torch.testing.assert_close(grads["qkv.weight"], full.qkv.weight.grad[rows])
            torch.testing.assert_close(grads["proj.weight"], full.proj.weight.grad[:, mine])


def _bad_heads(rank: int, world_size: int) -> None:
    TensorParallelAttention(Attention(9, 3), rank, world_size)


def test_uneven_heads_are_refused_with_a_clear_error():
    with pytest.raises(Exception, match="3 heads cannot be split evenly over 2 ranks"):
        launch(_bad_heads, 2, timeout=60)
