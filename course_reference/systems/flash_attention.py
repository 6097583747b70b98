"""Tiled attention with an online softmax, as in FlashAttention, with its memory traffic counted.

A GPU has a large, slow memory (HBM) and a small, fast one (SRAM, on chip). Dense attention writes
the T × T scores to HBM and reads them back twice. FlashAttention (Dao et al. 2022, Algorithm 1)
loads blocks of Q, K and V into SRAM, computes a block of scores there, and folds it into a
running output with the online softmax (a running row maximum m and row sum l), so the scores
never reach HBM. FlashAttention-2 (Dao 2023, Algorithm 1) swaps the loops: the outer loop runs
over blocks of Q, so each output block is accumulated in SRAM and written once, normalised at the
end. Here the "HBM" is ordinary tensors; every block load and store is counted in ``Traffic``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Traffic:
    """Bytes read from and written to the slow memory."""

    reads: int = 0
    writes: int = 0

    def read(self, *tensors: torch.Tensor) -> None:
        self.reads += sum(t.numel() * t.element_size() for t in tensors)

    def write(self, *tensors: torch.Tensor) -> None:
        self.writes += sum(t.numel() * t.element_size() for t in tensors)

    @property
    def total(self) -> int:
        return self.reads + self.writes


def dense_attention_traffic(q: torch.Tensor, k: torch.Tensor) -> Traffic:
    """Traffic of unfused attention: read Q, K; write S; read S, write P; read P and V; write O."""
    scores = q.numel() // q.shape[-1] * k.shape[-2] * q.element_size()
    qkvo = q.numel() * q.element_size()
    kv = k.numel() * k.element_size()
    return Traffic(reads=qkvo + kv + scores + scores + kv, writes=scores + scores + qkvo)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int) -> None:
    if q.shape[:-2] != k.shape[:-2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"flash_attention: expected q (..., Tq, d), k and v (..., Tk, d) with the "
                         f"same leading dims and d, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"flash_attention: block sizes must be positive, got {block_q}, {block_k}")


def _scores(q_i: torch.Tensor, k_j: torch.Tensor, q0: int, k0: int, scale: float,
            causal: bool) -> torch.Tensor:
    s = q_i @ k_j.transpose(-2, -1) * scale
    if causal:
        rows = torch.arange(q0, q0 + q_i.shape[-2])[:, None]
        cols = torch.arange(k0, k0 + k_j.shape[-2])[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    return s


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int = 64,
                    block_k: int = 64, causal: bool = False, version: int = 2
                    ) -> tuple[torch.Tensor, Traffic]:
    """Exact attention softmax(Q Kᵀ / √d) V, tile by tile; returns (output, traffic).

    ``version=2``: outer loop over Q blocks (FlashAttention-2). ``version=1``: outer loop over
    K/V blocks, with O, l and m read and written back for every pair of blocks (FlashAttention).
    Blocks that a causal mask hides completely are skipped, as both papers do.
    """
    _check(q, k, v, block_q, block_k)
    if version not in (1, 2):
        raise ValueError(f"flash_attention: version must be 1 or 2, got {version}")
    Tq, Tk = q.shape[-2], k.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1])
    traffic = Traffic()
    q_blocks = [(i, min(i + block_q, Tq)) for i in range(0, Tq, block_q)]
    k_blocks = [(j, min(j + block_k, Tk)) for j in range(0, Tk, block_k)]
    visible = (lambda qb, kb: kb[0] <= qb[1] - 1) if causal else (lambda qb, kb: True)
    out = torch.empty_like(q)
    if version == 2:
        for qb in q_blocks:
            q_i = q[..., qb[0]:qb[1], :]
            traffic.read(q_i)
            m = torch.full(q_i.shape[:-1] + (1,), float("-inf"), dtype=q.dtype)
            l = torch.zeros_like(m)  # noqa: E741 - the paper's name for the running sum
            acc = torch.zeros_like(q_i)
            for kb in (kb for kb in k_blocks if visible(qb, kb)):
                k_j, v_j = k[..., kb[0]:kb[1], :], v[..., kb[0]:kb[1], :]
                traffic.read(k_j, v_j)
                s = _scores(q_i, k_j, qb[0], kb[0], scale, causal)
                m_new = torch.maximum(m, s.amax(-1, keepdim=True))
                p = torch.exp(s - m_new)
                correction = torch.exp(m - m_new)          # rescales what was accumulated so far
                l = l * correction + p.sum(-1, keepdim=True)  # noqa: E741
                acc = acc * correction + p @ v_j
                m = m_new
            out[..., qb[0]:qb[1], :] = acc / l
            traffic.write(out[..., qb[0]:qb[1], :], (m + l.log()))   # O and logsumexp
        return out, traffic

    out.zero_()
    m_all = torch.full(q.shape[:-1] + (1,), float("-inf"), dtype=q.dtype)
    l_all = torch.zeros_like(m_all)
    traffic.write(out, m_all, l_all)                       # initialised in HBM
    for kb in k_blocks:
        k_j, v_j = k[..., kb[0]:kb[1], :], v[..., kb[0]:kb[1], :]
        traffic.read(k_j, v_j)
        for qb in (qb for qb in q_blocks if visible(qb, kb)):
            rows = slice(qb[0], qb[1])
            q_i, o_i, m_i, l_i = q[..., rows, :], out[..., rows, :], m_all[..., rows, :], \
                l_all[..., rows, :]
            traffic.read(q_i, o_i, m_i, l_i)
            s = _scores(q_i, k_j, qb[0], kb[0], scale, causal)
            m_tile = s.amax(-1, keepdim=True)
            # a row the causal mask hides in this tile has m_tile = -inf; keep exp() finite
            p = torch.exp(s - m_tile.clamp(min=torch.finfo(s.dtype).min))
            l_tile = p.sum(-1, keepdim=True)
            m_new = torch.maximum(m_i, m_tile)
            l_new = torch.exp(m_i - m_new) * l_i + torch.exp(m_tile - m_new) * l_tile
            o_new = (l_i * torch.exp(m_i - m_new) * o_i
                     + torch.exp(m_tile - m_new) * (p @ v_j)) / l_new
            out[..., rows, :], m_all[..., rows, :], l_all[..., rows, :] = o_new, m_new, l_new
            traffic.write(o_new, m_new, l_new)
    return out, traffic
