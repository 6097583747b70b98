"""Megatron-style tensor parallelism for a Transformer block's MLP and attention.

Shoeybi et al. 2019, section 3: split the MLP's first weight by columns and its second by rows, so
that the GELU between them needs no communication and the block needs one all-reduce forward and
one backward; split attention by heads the same way (Q, K, V by columns, the output projection
by rows). Two conjugate operators carry the communication:

    f: identity forward, all-reduce backward   (where a replicated input enters the split region)
    g: all-reduce forward, identity backward   (where the partial outputs are summed)

Each rank builds its shards from the full, unsplit layer, so a test can compare the two directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from course_runtime.distributed import comm


class _CopyToParallelRegion(torch.autograd.Function):
    """f: every rank holds the input; the gradients from each rank's shard must be summed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return comm.all_reduce(grad.contiguous().clone())


class _ReduceFromParallelRegion(torch.autograd.Function):
    """g: each rank holds a partial sum of the output; its gradient is the same on every rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return comm.all_reduce(x.contiguous().clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


def copy_to_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _CopyToParallelRegion.apply(x)


def reduce_from_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ReduceFromParallelRegion.apply(x)


def _shard_range(size: int, rank: int, world_size: int, what: str) -> slice:
    if size % world_size:
        raise ValueError(f"{what} = {size} is not divisible by the tensor-parallel world size "
                         f"{world_size}")
    step = size // world_size
    return slice(rank * step, (rank + 1) * step)


class ColumnParallelLinear(nn.Module):
    """This rank's slice of the output features of ``full`` (a ``y = x Aᵀ + b`` nn.Linear):
    rows ``rank·out/N ... (rank+1)·out/N`` of its weight, and the matching bias entries."""

    def __init__(self, full: nn.Linear, rank: int, world_size: int,
                 rows: torch.Tensor | None = None):
        super().__init__()
        if rows is None:
            rows = torch.arange(full.out_features)[
                _shard_range(full.out_features, rank, world_size, "out_features")]
        self.rows = rows
        self.weight = nn.Parameter(full.weight.detach()[rows].clone())
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach()[rows].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_parallel_region(x), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """This rank's slice of the input features of ``full``; the partial products are summed by an
    all-reduce, and the bias is added once, after it."""

    def __init__(self, full: nn.Linear, rank: int, world_size: int,
                 cols: torch.Tensor | None = None):
        super().__init__()
        if cols is None:
            cols = torch.arange(full.in_features)[
                _shard_range(full.in_features, rank, world_size, "in_features")]
        self.cols = cols
        self.weight = nn.Parameter(full.weight.detach()[:, cols].clone())
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone())

    def forward(self, x_shard: torch.Tensor) -> torch.Tensor:
        if x_shard.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"RowParallelLinear: expected the input's last dimension to be this "
                             f"rank's {self.weight.shape[1]} features, got {tuple(x_shard.shape)}")
        out = reduce_from_parallel_region(F.linear(x_shard, self.weight))
        return out if self.bias is None else out + self.bias


class MLP(nn.Module):
    """The unsplit Transformer MLP: Linear(C, 4C), GELU, Linear(4C, C)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TensorParallelMLP(nn.Module):
    """fc1 split by columns, fc2 by rows: one all-reduce forward (g), one backward (f)."""

    def __init__(self, full: MLP, rank: int, world_size: int):
        super().__init__()
        self.fc1 = ColumnParallelLinear(full.fc1, rank, world_size)
        self.fc2 = RowParallelLinear(full.fc2, rank, world_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """The unsplit causal self-attention: one Linear(C, 3C) for Q, K, V (in that order, each
    head's features contiguous), scaled dot-product attention per head, Linear(C, C) out."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(_attend(self.qkv(x), self.n_heads))


def _attend(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, three_c = qkv.shape
    q, k, v = (t.reshape(B, T, n_heads, -1).transpose(1, 2) for t in qkv.split(three_c // 3, -1))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(B, T, three_c // 3)


class TensorParallelAttention(nn.Module):
    """Heads split over ranks: this rank's Q, K and V rows of ``qkv`` (column-parallel) and the
    matching input columns of ``proj`` (row-parallel). Heads never interact, so no communication
    is needed between the two projections."""

    def __init__(self, full: Attention, rank: int, world_size: int):
        super().__init__()
        if full.n_heads % world_size:
            raise ValueError(f"TensorParallelAttention: {full.n_heads} heads cannot be split "
                             f"evenly over {world_size} ranks")
        dim = full.proj.in_features
        self.n_heads = full.n_heads // world_size
        mine = torch.arange(dim)[_shard_range(dim, rank, world_size, "dim")]
        rows = torch.cat([mine, mine + dim, mine + 2 * dim])     # this rank's heads in Q, K, V
        self.qkv = ColumnParallelLinear(full.qkv, rank, world_size, rows=rows)
        self.proj = RowParallelLinear(full.proj, rank, world_size, cols=mine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(_attend(self.qkv(x), self.n_heads))

