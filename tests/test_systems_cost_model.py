"""The cost model's counts against PyTorch (parameters of a real GPT, FLOPs counted by
FlopCounterMode), and the pipeline partitioner against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from course_reference.systems.cost_model import (
    Cluster,
    GPTConfig,
    Strategy,
    estimate,
    flops_per_step,
    partition_layers,
    search,
    split_batch,
)
from course_reference.systems.tensor_parallel import MLP, Attention

CONFIG = GPTConfig(layers=2, hidden=32, heads=4, seq=16, vocab=50)


class Block(nn.Module):
    def __init__(self, h: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.attn, self.mlp = Attention(h, heads), MLP(h, 4 * h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.tok, self.pos = nn.Embedding(c.vocab, c.hidden), nn.Embedding(c.seq, c.hidden)
        self.blocks = nn.Sequential(*[Block(c.hidden, c.heads) for _ in range(c.layers)])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))
        return x @ self.tok.weight.T                    # tied output layer


def test_parameter_count_matches_a_real_gpt():
    model = TinyGPT(CONFIG)
    # the model also has a final LayerNorm in practice; this one does not
    assert sum(p.numel() for p in model.parameters()) == CONFIG.params


def _attention_as_matmuls(q, k, v, is_causal=False):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


def test_flops_match_pytorchs_flop_counter(monkeypatch):
    # PyTorch's fused CPU attention kernel has no FLOP formula; as two matmuls it is counted
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _attention_as_matmuls)
    torch.manual_seed(0)
    model = TinyGPT(CONFIG)
    idx = torch.randint(0, CONFIG.vocab, (3, CONFIG.seq))
    with FlopCounterMode(display=False) as counter:
        model(idx).sum().backward()
    assert counter.get_total_flops() == flops_per_step(CONFIG, 3)


def test_partition_is_optimal_by_brute_force():
    costs, speeds = [3, 1, 4, 1, 5, 9, 2, 6], [1.0, 2.5, 0.5]
    stages, bottleneck = partition_layers(costs, speeds)
    assert stages[0][0] == 0 and stages[-1][1] == len(costs)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(stages, stages[1:]))
    best = min(
        max(sum(costs[a:b]) / s for (a, b), s in zip(zip((0, *cuts), (*cuts, 8)), speeds))
        for cuts in itertools.combinations(range(1, 8), 2))
    assert bottleneck == pytest.approx(best)
    with pytest.raises(ValueError, match="at least one layer per device"):
        partition_layers([1, 2], [1, 1, 1])


def test_split_batch_is_proportional_and_complete():
    assert split_batch(10, [2, 1, 1]) == [5, 3, 2] or split_batch(10, [2, 1, 1]) == [5, 2, 3]
    assert sum(split_batch(97, [3.0, 1.0, 0.7])) == 97


def test_more_parallelism_means_less_memory_per_gpu_and_a_bubble_for_pipelines():
    gpt3 = GPTConfig(96, 12288, 96, 2048, 51200)
    a100 = Cluster(1024, 8, 312e12, 0.5, 80e9, 300e9, 25e9)
    by_tp = [estimate(gpt3, a100, Strategy(1024 // (t * 8), t, 8), 1536).memory_bytes
             for t in (1, 2, 4, 8)]
    assert by_tp == sorted(by_tp, reverse=True)
    no_pipeline = estimate(gpt3, a100, Strategy(128, 8, 1), 1536)
    assert no_pipeline.bubble_s == 0 and not no_pipeline.fits
    best = search(gpt3, a100, 1536)[0]
    assert best.fits and best.strategy.tp <= 8
    with pytest.raises(ValueError, match="dp·tp·pp = 512"):
        estimate(gpt3, a100, Strategy(8, 8, 8), 1536)
