"""Tiled online-softmax attention against PyTorch's dense attention, and its counted memory
traffic against the closed forms of the FlashAttention papers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from course_reference.systems.flash_attention import dense_attention_traffic, flash_attention


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,block_q,block_k", [(50, 16, 12), (64, 64, 64), (7, 3, 5)])
def test_matches_dense_attention(version, causal, T, block_q, block_k):
    torch.manual_seed(T)
    q, k, v = torch.randn(3, 2, 3, T, 8, dtype=torch.float64).unbind(0)
    out, _ = flash_attention(q, k, v, block_q, block_k, causal, version)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))


def test_cross_attention_with_different_lengths():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 10, 4), torch.randn(1, 33, 4), torch.randn(1, 33, 4)
    out, _ = flash_attention(q, k, v, 4, 8)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-5)


def test_traffic_matches_the_closed_forms():
    T, d, bq, bk = 96, 16, 32, 24
    q, k, v = torch.randn(3, T, d).unbind(0)
    mat, stat = T * d * 4, T * 4                    # bytes of Q (or K, V, O) and of one statistic
    nq, nk = math.ceil(T / bq), math.ceil(T / bk)
    _, fa2 = flash_attention(q, k, v, bq, bk, version=2)
    assert (fa2.reads, fa2.writes) == (mat + nq * 2 * mat, mat + stat)
    _, fa1 = flash_attention(q, k, v, bq, bk, version=1)
    assert (fa1.reads, fa1.writes) == (2 * mat + nk * (2 * mat + 2 * stat),
                                       (nk + 1) * (mat + 2 * stat))
    dense = dense_attention_traffic(q, k)
    assert dense.total == 4 * mat + 4 * T * T * 4     # Q, K, V, O; S written, read; P written, read
    assert fa2.total < fa1.total < dense.total


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"got \(4, 8\), \(5, 7\)"):
        flash_attention(torch.randn(4, 8), torch.randn(5, 7), torch.randn(5, 7))
