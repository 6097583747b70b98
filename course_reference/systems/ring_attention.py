"""Sequence (context) parallel attention: ring attention and DeepSpeed-Ulysses.

Each of N ranks holds T/N tokens of the sequence. Attention needs every query to meet every key,
so the ranks must exchange something:

- **Ring attention** (Liu et al. 2024; the blockwise computation of FlashAttention run across
  devices) keeps each rank's queries in place and passes the key/value blocks around a ring, N - 1
  hops. Each arriving block is folded into the output with the online softmax (running maximum
  and sum), so the result is exact. With a causal mask, a contiguous split leaves the first rank
  idle most of the time; **striped attention** (Brandon et al. 2023) gives rank r the tokens
  r, r + N, r + 2N, ..., which balances the work.
- **Ulysses** (Jacobs et al. 2023) turns the sequence split into a head split with one
  all-to-all, runs ordinary attention on H/N full-length heads, and turns it back with another.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812 - the usual name

from course_runtime.distributed import comm
from course_runtime.distributed.launcher import status


def token_positions(seq_len: int, rank: int, world_size: int, layout: str) -> torch.Tensor:
    """The global positions of the tokens rank ``rank`` holds: "contiguous" or "striped"."""
    if seq_len % world_size:
        raise ValueError(f"sequence length {seq_len} is not divisible by the world size "
                         f"{world_size}")
    if layout == "contiguous":
        n = seq_len // world_size
        return torch.arange(rank * n, (rank + 1) * n)
    if layout == "striped":
        return torch.arange(rank, seq_len, world_size)
    raise ValueError(f"layout must be 'contiguous' or 'striped', got {layout!r}")


def attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over one block of keys: (normalised output, log-sum-exp per row).
    Rows that see no key get output 0 and log-sum-exp -inf, so merging ignores them."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse.clamp(min=torch.finfo(s.dtype).min))
    return p @ v, lse


def merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
          block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets (the online softmax, in
    log-sum-exp form): weights exp(lse_i - lse) with lse = log(exp(lse_1) + exp(lse_2))."""
    new_lse = torch.logaddexp(lse, block_lse)
    safe = new_lse.clamp(min=torch.finfo(new_lse.dtype).min)
    return out * torch.exp(lse - safe) + block_out * torch.exp(block_lse - safe), new_lse


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                   layout: str = "contiguous") -> tuple[torch.Tensor, list[int]]:
    """Exact attention for this rank's queries over the whole sequence, (..., T/N, d) each.

    Key/value blocks travel around the ring; returns the output and, per step, how many
    query-key pairs this rank actually computed (the work a causal mask leaves).
    """
    rank, n = dist.get_rank(), dist.get_world_size()
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"ring_attention: q, k, v must have one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    local = q.shape[-2]
    positions = [token_positions(local * n, r, n, layout) for r in range(n)]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:-1] + (1,), float("-inf"), dtype=q.dtype)
    kv = torch.stack([k, v]).contiguous()
    work = []
    for step in range(n):
        source = (rank - step) % n                     # whose keys we hold in this step
        mask = None
        if causal:
            mask = positions[source][None, :] <= positions[rank][:, None]
        visible = local * local if mask is None else int(mask.sum())
        work.append(visible)
        if visible:                                    # a fully masked block costs nothing
            block_out, block_lse = attention_block(q, kv[0], kv[1], mask)
            out, lse = merge(out, lse, block_out, block_lse)
        if step < n - 1:
            incoming = torch.empty_like(kv)
            comm.stats.record("ring_send", kv.numel() * kv.element_size())
            with status(f"ring_attention step {step}: K/V block to rank {(rank + 1) % n}"):
                requests = [dist.isend(kv, (rank + 1) % n), dist.irecv(incoming, (rank - 1) % n)]
                for request in requests:
                    request.wait()
            kv = incoming
    return out, work


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      causal: bool = False) -> torch.Tensor:
    """Attention for this rank's contiguous T/N tokens of (H, T/N, d) q, k, v: all-to-all to
    (H/N, T, d), full-sequence attention on H/N heads, all-to-all back."""
    n = dist.get_world_size()
    heads = q.shape[0]
    if q.dim() != 3 or heads % n:
        raise ValueError(f"ulysses_attention: expected (heads, T/N, d) with heads divisible by "
                         f"the world size {n}, got {tuple(q.shape)}")

    def seq_to_heads(x: torch.Tensor) -> torch.Tensor:
        # send head group j to rank j; receive every rank's tokens for our head group (a view's
        # strides would be kept by empty_like, and the received bytes read through them)
        x = x.contiguous()
        received = torch.empty_like(x)
        comm.all_to_all(received, x)   # dim 0 = head groups, in rank order
        groups = received.reshape(n, heads // n, *x.shape[1:])    # (source rank, H/N, T/N, d)
        return groups.transpose(0, 1).reshape(heads // n, n * x.shape[1], x.shape[2])

    def heads_to_seq(x: torch.Tensor) -> torch.Tensor:
        chunks = x.reshape(heads // n, n, -1, x.shape[-1]).transpose(0, 1).contiguous()
        received = torch.empty_like(chunks)
        comm.all_to_all(received, chunks)
        return received.reshape(heads, -1, x.shape[-1])

    out = F.scaled_dot_product_attention(seq_to_heads(q), seq_to_heads(k), seq_to_heads(v),
                                         is_causal=causal)
    return heads_to_seq(out)
