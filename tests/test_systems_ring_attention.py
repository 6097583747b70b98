"""Ring (contiguous and striped) and Ulysses attention on 2-3 processes against PyTorch's dense
attention over the whole sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from course_reference.systems.ring_attention import (
    attention_block,
    merge,
    ring_attention,
    token_positions,
    ulysses_attention,
)
from course_runtime.distributed import comm, launch


def _ring(rank, world_size, q, k, v, causal, layout):
    mine = token_positions(q.shape[-2], rank, world_size, layout)
    with comm.counting() as counted:
        out, work = ring_attention(q[..., mine, :], k[..., mine, :], v[..., mine, :], causal,
                                   layout)
    return mine, out, work, counted.bytes_sent["ring_send"]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("causal,layout", [(False, "contiguous"), (True, "contiguous"),
                                           (True, "striped")])
def test_ring_attention_matches_dense_attention(world_size, causal, layout):
    torch.manual_seed(world_size)
    q, k, v = torch.randn(3, 2, 12, 8, dtype=torch.float64).unbind(0)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    results = launch(_ring, world_size, q, k, v, causal, layout, timeout=60)
    for mine, out, _, sent in results:
        torch.testing.assert_close(out, dense[..., mine, :])
        local_kv_bytes = 2 * q[..., mine, :].numel() * 8
        assert sent == (world_size - 1) * local_kv_bytes
    total_work = sum(sum(r[2]) for r in results)
    T = q.shape[-2]
    assert total_work == (T * (T + 1) // 2 if causal else T * T)


def test_striped_layout_balances_causal_work():
    def per_rank(layout):
        results = launch(_ring, 4, *torch.randn(3, 1, 32, 4).unbind(0), True, layout, timeout=60)
        return [sum(r[2]) for r in results]

    contiguous, striped = per_rank("contiguous"), per_rank("striped")
    assert max(contiguous) / min(contiguous) > 3
    assert max(striped) - min(striped) <= 32 // 4 * 3    # within a triangle's diagonal


def _ulysses(rank, world_size, q, k, v, causal):
    chunk = q.shape[1] // world_size
    mine = slice(rank * chunk, (rank + 1) * chunk)
    with comm.counting() as counted:
        out = ulysses_attention(q[:, mine], k[:, mine], v[:, mine], causal)
    return out, counted.calls["all_to_all"]


@pytest.mark.parametrize("causal", [False, True])
def test_ulysses_matches_dense_attention(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 10, 8, dtype=torch.float64).unbind(0)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    for rank, (out, calls) in enumerate(launch(_ulysses, 2, q, k, v, causal, timeout=60)):
        torch.testing.assert_close(out, dense[:, rank * 5:(rank + 1) * 5])
        assert calls == 4                  # q, k, v in; the output back


def _ulysses_on_views(rank, world_size, q, k, v):
    """Each rank's heads-first views of [tokens, heads, dim] tensors, as a transformer's head
    split gives them (not contiguous)."""
    chunk = q.shape[0] // world_size
    mine = slice(rank * chunk, (rank + 1) * chunk)
    return ulysses_attention(*(t[mine].transpose(0, 1) for t in (q, k, v)))


def test_ulysses_takes_views_as_their_values():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 10, 4, 8, dtype=torch.float64).unbind(0)  # [tokens, heads, dim]
    dense = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)))
    for rank, out in enumerate(launch(_ulysses_on_views, 2, q, k, v, timeout=60)):
        torch.testing.assert_close(out, dense[:, rank * 5:(rank + 1) * 5])


def test_merge_of_two_key_blocks_is_attention_over_both():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 5, 6, 4, dtype=torch.float64).unbind(0)
    a, lse_a = attention_block(q, k[:, :2], v[:, :2], None)
    b, lse_b = attention_block(q, k[:, 2:], v[:, 2:], None)
    both = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(merge(a, lse_a, b, lse_b)[0], both)


def test_bad_split_is_named():
    with pytest.raises(ValueError, match="sequence length 10 is not divisible by the world size 3"):
        token_positions(10, 0, 3, "striped")
