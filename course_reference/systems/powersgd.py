"""Gradient compression for data parallelism: PowerSGD, QSGD and top-k sparsification.

- PowerSGD (Vogels et al. 2019, algorithm 1): each gradient matrix M (n × m) is replaced by a
  rank-r product P Qᵀ found by one step of power iteration, warm-started from the previous step's
  Q. Only P (n × r) and Q (m × r) are all-reduced, (n + m) r numbers instead of n m. What the
  approximation leaves out is kept on each worker and added to its next gradient (error
  feedback, section 3), so nothing is lost, only delayed.
- QSGD (Alistarh et al. 2017, section 3.1): each coordinate of v is stochastically rounded to one
  of s + 1 levels of |v_i| / ‖v‖₂; the result is unbiased and its variance is at most
  min(n / s², √n / s) ‖v‖².
- Top-k with error feedback, the core of Deep Gradient Compression (Lin et al. 2018, section 3):
  send only the k largest entries of (gradient + residual), keep the rest as the new residual.

Workers can be real processes (the mean is an all-reduce over ``torch.distributed``) or be
simulated in one process as the leading dimension of a stacked tensor (W, ...): the same code
averages over both, so the book can train with eight simulated workers and a test can check two
real ones.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at run time.
import math
from collections.abc import Callable, Hashable

import torch
import torch.distributed as dist

from course_runtime.distributed import comm

Mean = Callable[[torch.Tensor], torch.Tensor]


def worker_mean(stacked: torch.Tensor) -> torch.Tensor:
    """Average a (W, ...) stack of per-worker tensors over the W simulated workers of this process
    and, when a process group is running, over all processes too (one counted all-reduce)."""
    local = stacked.mean(0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        comm.all_reduce(local)
        local /= dist.get_world_size()
    return local


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning the columns of p (n × r), by reduced QR (the paper uses
    Gram-Schmidt; any orthonormal basis of the same span gives the same P Pᵀ)."""
    return torch.linalg.qr(p, mode="reduced").Q


class PowerSGD:
    """Rank-``rank`` PowerSGD with error feedback and warm start (Vogels et al. 2019, alg. 1).

    ``aggregate(key, grads)`` takes this process's gradients of one parameter, stacked over its
    simulated workers as (W, *shape), and returns the compressed average over every worker.
    Tensors with fewer than two dimensions are averaged exactly, as in the paper: they are small.
    Matrices and higher-order tensors are flattened to (shape[0], rest).
    """

    def __init__(self, rank: int, *, error_feedback: bool = True, warm_start: bool = True,
                 seed: int = 0, mean: Mean = worker_mean):
        if rank < 1:
            raise ValueError(f"PowerSGD: rank must be at least 1, got {rank}")
        self.rank = rank
        self.error_feedback = error_feedback
        self.warm_start = warm_start
        self.mean = mean
        # Every worker must start from the same Q, or the all-reduced P would mix different bases.
        self._generator = torch.Generator().manual_seed(seed)
        self.q: dict[Hashable, torch.Tensor] = {}
        self.error: dict[Hashable, torch.Tensor] = {}
        self.sent_numel = 0    # numbers each worker contributed to all-reduces, compressed
        self.dense_numel = 0   # numbers the uncompressed all-reduce would have carried

    def aggregate(self, key: Hashable, grads: torch.Tensor) -> torch.Tensor:
        """The compressed mean over all workers of one parameter's gradients ``grads`` (W, *shape);
        ``key`` names the parameter across steps (for its Q and its error)."""
        shape = grads.shape[1:]
        self.dense_numel += math.prod(shape)
        if len(shape) < 2:
            self.sent_numel += math.prod(shape)
            return self.mean(grads)
        m = grads.reshape(grads.shape[0], shape[0], -1)
        if self.error_feedback and key in self.error:
            m = m + self.error[key]
        n_rows, n_cols = m.shape[1:]
        r = min(self.rank, n_rows, n_cols)
        q = self.q.get(key) if self.warm_start else None
        if q is None or q.shape != (n_cols, r):
            q = torch.randn(n_cols, r, generator=self._generator, dtype=m.dtype)
        p = orthonormalize(self.mean(m @ q))            # all-reduce (n × r)
        q = self.mean(m.transpose(1, 2) @ p)            # all-reduce (m × r)
        self.sent_numel += (n_rows + n_cols) * r
        approx = p @ q.T
        if self.error_feedback:
            self.error[key] = m - approx                # what this worker has not yet sent
        self.q[key] = q
        return approx.reshape(shape)


def ddp_comm_hook(state: PowerSGD, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """PowerSGD as a DDP communication hook: ``model.register_comm_hook(PowerSGD(r), hook)``.

    DDP hands over a bucket of gradients (views into one flat buffer) and expects the averaged
    buffer back. Each gradient is compressed on its own, keyed by its parameter, since DDP
    rebuilds its buckets after the first step and bucket numbers are not stable."""
    for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
        grad.copy_(state.aggregate(id(param), grad[None]))
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def stochastic_round(x: torch.Tensor, levels: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Round each entry of x to one of its two neighbouring ``levels`` (sorted, 1-D), choosing the
    upper one with probability (x − lower) / (upper − lower): unbiased for x inside the range,
    with variance (upper − x)(x − lower) per entry."""
    if levels.dim() != 1 or len(levels) < 2:
        raise ValueError(f"stochastic_round: levels must be a 1-D tensor of at least two values, "
                         f"got shape {tuple(levels.shape)}")
    if x.min() < levels[0] or x.max() > levels[-1]:
        raise ValueError(f"stochastic_round: values span [{x.min():.3g}, {x.max():.3g}], outside "
                         f"the levels' range [{levels[0]:.3g}, {levels[-1]:.3g}]")
    upper_index = torch.searchsorted(levels, x.contiguous()).clamp(1, len(levels) - 1)
    lower, upper = levels[upper_index - 1], levels[upper_index]
    p_up = (x - lower) / (upper - lower)
    go_up = torch.rand(x.shape, generator=generator, dtype=x.dtype) < p_up
    return torch.where(go_up, upper, lower)


def qsgd(v: torch.Tensor, levels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """QSGD's quantizer Q_s(v) = ‖v‖₂ · sign(v_i) · ξ_i(v, s), returned dequantized (what the
    receiver reconstructs from the norm, the signs and the level indices)."""
    if levels < 1:
        raise ValueError(f"qsgd: need at least one quantization level, got {levels}")
    norm = v.norm()
    if norm == 0:
        return torch.zeros_like(v)
    grid = torch.linspace(0, 1, levels + 1, dtype=v.dtype)
    scaled = (v.abs() / norm).clamp(max=1.0)   # clamp: rounding may put |v_i|/‖v‖ at 1 + 1e-7
    return norm * v.sign() * stochastic_round(scaled, grid, generator)


def qsgd_bits(numel: int, levels: int) -> int:
    """Bits for one QSGD message with plain fixed-width codes: a 32-bit norm, then per entry a
    sign bit and ⌈log2(s + 1)⌉ bits for the level (the paper's Elias coding needs fewer)."""
    return 32 + numel * (1 + math.ceil(math.log2(levels + 1)))


class TopK:
    """Top-k sparsification with error feedback (Deep Gradient Compression's residual
    accumulation): each worker sends the k entries of largest magnitude of gradient + residual,
    as (index, value) pairs, and keeps the rest for later."""

    def __init__(self, fraction: float, *, error_feedback: bool = True, mean: Mean = worker_mean):
        if not 0 < fraction <= 1:
            raise ValueError(f"TopK: fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.error_feedback = error_feedback
        self.mean = mean
        self.residual: dict[Hashable, torch.Tensor] = {}

    def aggregate(self, key: Hashable, grads: torch.Tensor) -> torch.Tensor:
        """The mean over all workers of their sparsified gradients ``grads`` (W, *shape). The
        exchange is simulated by a dense mean of the sparse tensors; on a network the (index,
        value) pairs would be all-gathered (8 bytes per entry sent)."""
        flat = grads.reshape(grads.shape[0], -1)
        if self.error_feedback and key in self.residual:
            flat = flat + self.residual[key]
        k = max(1, round(self.fraction * flat.shape[1]))
        index = flat.abs().topk(k, dim=1).indices
        sparse = torch.zeros_like(flat).scatter(1, index, flat.gather(1, index))
        if self.error_feedback:
            self.residual[key] = flat - sparse
        return self.mean(sparse).reshape(grads.shape[1:])


def rounding_variance(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The mean over entries of x of the variance that ``stochastic_round`` adds,
    (upper − x)(x − lower), computed exactly rather than sampled."""
    upper_index = torch.searchsorted(levels, x.contiguous()).clamp(1, len(levels) - 1)
    lower, upper = levels[upper_index - 1], levels[upper_index]
    return ((upper - x) * (x - lower)).mean()


def variance_minimizing_levels(x: torch.Tensor, num_levels: int, sweeps: int = 10) -> torch.Tensor:
    """Non-uniform levels for stochastic rounding of values like x that minimize the variance it
    adds, the criterion of TinyScript (Fu et al. 2020, section 3), found here by coordinate
    descent rather than the paper's own search. The ends stay at min(x) and max(x) so every value
    is covered; each interior level is moved to its exact optimum given its neighbours.

    With neighbours a < b, the variance is convex in the level l between them, with derivative
    Σ_{a≤x<l} (x − a) − Σ_{l≤x≤b} (b − x), increasing in l: bisection finds its zero."""
    if num_levels < 2:
        raise ValueError(f"variance_minimizing_levels: need at least 2 levels, got {num_levels}")
    x = x.flatten()
    # Start at the quantiles: an even grid would leave most levels where no values are.
    levels = torch.quantile(x, torch.linspace(0, 1, num_levels, dtype=x.dtype))
    for _ in range(sweeps):
        for j in range(1, num_levels - 1):
            a, b = levels[j - 1], levels[j + 1]
            inside = x[(x >= a) & (x <= b)]
            lo, hi = a, b
            for _ in range(40):
                mid = (lo + hi) / 2
                below = inside < mid
                if (inside[below] - a).sum() > (b - inside[~below]).sum():
                    hi = mid
                else:
                    lo = mid
            levels[j] = (lo + hi) / 2
    return levels
