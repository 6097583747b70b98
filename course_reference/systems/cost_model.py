"""An analytical model of training a GPT on a cluster: FLOPs, memory and step time for a choice of
data, tensor and pipeline parallel degrees, and a search over those choices.

The formulas are the ones Megatron-LM's authors use. Parameters and FLOPs: Narayanan et al. 2021
(Efficient Large-Scale Language Model Training on GPU Clusters), section 5.1 and appendix.
Activation memory per layer: Korthikanti et al. 2023 (Reducing Activation Recomputation), section
4. Pipeline bubble: (p - 1) / m of the ideal time for GPipe and 1F1B (Huang et al. 2019;
Narayanan et al. 2021, section 2.2). Communication: ring collectives, 2 (N - 1) / N of the bytes
per rank for an all-reduce, at one bandwidth inside a node and another between nodes.

It is a model: no overlap of communication with compute, one efficiency for every matrix
product. Its job is to rank strategies and to show where the time goes, not to predict to 5 %.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GPTConfig:
    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int

    @property
    def params(self) -> int:
        """12 l h² + 13 l h per block (Q, K, V, output, two MLP matrices, biases, two LayerNorms),
        plus the token and position embeddings (the output layer shares the token embedding)."""
        n, h = self.layers, self.hidden
        return 12 * n * h * h + 13 * n * h + (self.vocab + self.seq) * h


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int
    peak_flops: float          # per GPU, for the training precision
    efficiency: float          # fraction of peak a large matrix product reaches
    memory_bytes: float        # per GPU
    intra_node_bw: float       # bytes/s per GPU, e.g. NVLink
    inter_node_bw: float       # bytes/s per GPU, e.g. InfiniBand


@dataclass(frozen=True)
class Strategy:
    dp: int
    tp: int
    pp: int
    micro_batch: int = 1

    def __str__(self) -> str:
        return f"dp={self.dp} tp={self.tp} pp={self.pp} b={self.micro_batch}"


@dataclass(frozen=True)
class Estimate:
    strategy: Strategy
    compute_s: float
    bubble_s: float
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float
    memory_bytes: float
    fits: bool
    flops_per_gpu_s: float     # model FLOPs (without recomputation) per second per GPU

    @property
    def step_s(self) -> float:
        return self.compute_s + self.bubble_s + self.tp_comm_s + self.pp_comm_s + self.dp_comm_s


def flops_per_step(model: GPTConfig, global_batch: int, recompute: bool = False) -> float:
    """Matrix-product FLOPs of forward and backward for ``global_batch`` sequences: per layer
    24 B s h² (projections and MLP) + 4 B s² h (scores and weighted sum) forward, three times
    that with the backward pass, four times with full recomputation; the vocabulary projection
    (2 B s h V forward) is not recomputed."""
    B, s, h, n, V = global_batch, model.seq, model.hidden, model.layers, model.vocab
    passes = 4 if recompute else 3
    return passes * n * (24 * B * s * h * h + 4 * B * s * s * h) + 3 * 2 * B * s * h * V


def activation_bytes_per_layer(model: GPTConfig, micro_batch: int, tp: int,
                               recompute: bool = False) -> float:
    """Activations stored by one Transformer layer for one micro-batch, fp16, tensor parallel
    without sequence parallelism (Korthikanti et al., eq. 2): s b h (10 + 24/t + 5 a s /(h t));
    with full recomputation only the layer's input, 2 s b h bytes."""
    s, b, h, a = model.seq, micro_batch, model.hidden, model.heads
    if recompute:
        return 2 * s * b * h
    return s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))


def _ring(n: int) -> float:
    return 2 * (n - 1) / n


def estimate(model: GPTConfig, cluster: Cluster, strategy: Strategy, global_batch: int,
             recompute: bool = True, zero1: bool = True) -> Estimate:
    """Time of one training step and memory per GPU for one strategy (1F1B pipeline schedule;
    tensor parallel ranks fill a node first, then pipeline stages, then data-parallel replicas)."""
    d, t, p, b = strategy.dp, strategy.tp, strategy.pp, strategy.micro_batch
    if d * t * p != cluster.gpus:
        raise ValueError(f"estimate: dp·tp·pp = {d * t * p} but the cluster has {cluster.gpus} "
                         "GPUs")
    if global_batch % (d * b):
        raise ValueError(f"estimate: global batch {global_batch} is not a multiple of "
                         f"dp·micro_batch = {d * b}")
    m = global_batch // (d * b)                     # micro-batches per pipeline per step
    flops = flops_per_step(model, global_batch, recompute)
    compute = flops / cluster.gpus / (cluster.peak_flops * cluster.efficiency)
    bubble = (p - 1) / m * compute
    node = cluster.gpus_per_node
    tp_bw = cluster.intra_node_bw if t <= node else cluster.inter_node_bw
    pp_bw = cluster.intra_node_bw if t * p <= node else cluster.inter_node_bw
    dp_bw = cluster.intra_node_bw if t * p * d <= node else cluster.inter_node_bw
    act = 2 * b * model.seq * model.hidden          # one fp16 activation tensor of a micro-batch
    # 2 all-reduces forward, 2 backward per layer, 2 more when the forward is recomputed
    tp_calls = (6 if recompute else 4) * model.layers // p * m
    tp_comm = tp_calls * _ring(t) * act / tp_bw if t > 1 else 0.0
    pp_comm = 2 * m * act / t / pp_bw if p > 1 else 0.0   # activations forward, gradients back
    shard_params = model.params / (t * p)
    dp_comm = _ring(d) * 2 * shard_params / dp_bw if d > 1 else 0.0   # fp16 gradients
    # mixed-precision Adam: fp16 weights and gradients (4 bytes) + fp32 master, m, v (12 bytes),
    # the 12 sharded over data-parallel ranks with ZeRO-1
    states = shard_params * (4 + (12 / d if zero1 else 12))
    # 1F1B keeps p micro-batches in flight on the first stage, each with layers/p layers
    activations = p * (model.layers / p) * activation_bytes_per_layer(model, b, t, recompute)
    memory = states + activations
    step = compute + bubble + tp_comm + pp_comm + dp_comm
    return Estimate(strategy, compute, bubble, tp_comm, pp_comm, dp_comm, memory,
                    memory <= cluster.memory_bytes,
                    flops_per_step(model, global_batch) / cluster.gpus / step)


def strategies(model: GPTConfig, cluster: Cluster, global_batch: int,
               micro_batches: Sequence[int] = (1, 2, 4, 8)) -> list[Strategy]:
    """Every (dp, tp, pp, b) with dp·tp·pp = GPUs, tp dividing the heads, pp dividing the layers,
    and dp·b dividing the global batch."""
    n = cluster.gpus
    found = []
    for t, p in itertools.product(range(1, n + 1), repeat=2):
        if n % (t * p) or model.heads % t or model.layers % p:
            continue
        d = n // (t * p)
        found += [Strategy(d, t, p, b) for b in micro_batches if global_batch % (d * b) == 0]
    return found


def search(model: GPTConfig, cluster: Cluster, global_batch: int, recompute: bool = True,
           zero1: bool = True) -> list[Estimate]:
    """Every strategy's estimate, fastest first; strategies that do not fit in memory last."""
    found = [estimate(model, cluster, s, global_batch, recompute, zero1)
             for s in strategies(model, cluster, global_batch)]
    return sorted(found, key=lambda e: (not e.fits, e.step_s))


# -- heterogeneous devices ------------------------------------------------------------------------

def partition_layers(layer_costs: Sequence[float], speeds: Sequence[float]
                     ) -> tuple[list[tuple[int, int]], float]:
    """Split consecutive layers into one pipeline stage per device, in the given device order, so
    that the slowest stage is as fast as possible (the pipeline's throughput is set by it).

    Returns the ``(start, stop)`` layer range of each stage and the bottleneck stage time, where a
    stage's time is the sum of its layers' costs divided by its device's speed. Dynamic
    programming over (layers placed, devices used), O(L² D).
    """
    L, D = len(layer_costs), len(speeds)
    if D == 0 or L < D:
        raise ValueError(f"partition_layers: need at least one layer per device, got {L} layers "
                         f"for {D} devices")
    if any(s <= 0 for s in speeds):
        raise ValueError(f"partition_layers: speeds must be positive, got {list(speeds)}")
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (D + 1) for _ in range(L + 1)]
    cut = [[0] * (D + 1) for _ in range(L + 1)]
    best[0][0] = 0.0
    for j in range(1, D + 1):
        for i in range(j, L - (D - j) + 1):
            for k in range(j - 1, i):               # the last stage holds layers k .. i-1
                value = max(best[k][j - 1], (prefix[i] - prefix[k]) / speeds[j - 1])
                if value < best[i][j]:
                    best[i][j], cut[i][j] = value, k
    stages, i = [], L
    for j in range(D, 0, -1):
        stages.append((cut[i][j], i))
        i = cut[i][j]
    return stages[::-1], best[L][D]


def split_batch(batch: int, speeds: Sequence[float]) -> list[int]:
    """Data parallelism over unequal devices: sample counts proportional to speed (largest
    remainders get the leftover samples), so that every replica finishes at about the same time."""
    total = sum(speeds)
    shares = [batch * s / total for s in speeds]
    counts = [int(x) for x in shares]
    for i in sorted(range(len(speeds)), key=lambda i: counts[i] - shares[i])[:batch - sum(counts)]:
        counts[i] += 1
    return counts
